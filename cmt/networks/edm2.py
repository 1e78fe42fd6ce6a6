"""EDM2's magnitude-preserving U-Net and its preconditioning, as our own code.

Architecture of "Analyzing and Improving the Training Dynamics of Diffusion Models" (Karras et
al. 2024, NVlabs/edm2 `training/networks_edm2.py`). Module and parameter names are EDM2's, so the
state dict of an official checkpoint loads by name (see `cmt.networks.nvlabs_pickle`).

Additions of ours:
- `Precond(flow_map=True)`: a second noise embedding for `target_sigma` (the flow-map / consistency
  students), added to the noise embedding through a scalar gain that starts at 0, so a student
  loaded from a teacher's weights starts out as that teacher.
- `Precond(sigma_min > 0)`: the consistency-model boundary form of the preconditioning.
- Forced weight normalisation (EDM2 rewrites the stored weights in place at every training
  forward) can be switched off and run explicitly with `normalize_weights()`, so that
  `torch.func.jvp` / `functional_call` see a pure function. See `Precond.frozen_weight_norm`.
"""
import contextlib
import math

import numpy as np
import torch

from cmt.edm import SIGMA_DATA, edm_scalings
from cmt.networks.family import NetworkFamily, batch_sigmas, target_noise_labels


def normalize(x, dim=None, eps=1e-4):
    """Scale `x` to unit magnitude (RMS 1) over `dim`, all but the first dimension by default."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def resample(x, f=(1, 1), mode="keep"):
    """Down- or upsample by 2 with the separable filter `f` (or keep `x` as is)."""
    if mode == "keep":
        return x
    f = torch.as_tensor(f, dtype=x.dtype, device=x.device)
    pad = (len(f) - 1) // 2
    f = f / f.sum()
    f = torch.outer(f, f)[None, None].tile([x.shape[1], 1, 1, 1])
    if mode == "down":
        return torch.nn.functional.conv2d(x, f, groups=x.shape[1], stride=2, padding=(pad,))
    if mode == "up":
        return torch.nn.functional.conv_transpose2d(x, f * 4, groups=x.shape[1], stride=2, padding=(pad,))
    raise ValueError(f"resample mode must be 'keep', 'down' or 'up', got {mode!r}")


def mp_silu(x):
    """SiLU scaled to keep unit magnitude for unit-normal input (EDM2 eq. 81)."""
    return torch.nn.functional.silu(x) / 0.596


def mp_sum(a, b, t=0.5):
    """Blend of `a` and `b` (weight `t` on `b`) that keeps unit magnitude (EDM2 eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a, b, dim=1, t=0.5):
    """Concatenation that keeps unit magnitude with `t` balancing the two parts (EDM2 eq. 103)."""
    size_a, size_b = a.shape[dim], b.shape[dim]
    scale = math.sqrt((size_a + size_b) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (scale / math.sqrt(size_a) * (1 - t)), b * (scale / math.sqrt(size_b) * t)], dim=dim)


class MPFourier(torch.nn.Module):
    """Fourier features of a scalar with unit magnitude (EDM2 eq. 75); fixed random frequencies."""

    def __init__(self, num_channels, bandwidth=1):
        super().__init__()
        self.register_buffer("freqs", 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * np.pi * torch.rand(num_channels))

    def forward(self, x):
        y = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32))
        y = (y + self.phases.to(torch.float32)).cos() * math.sqrt(2)
        return y.to(x.dtype)


class MPConv(torch.nn.Module):
    """Magnitude-preserving convolution (`kernel=[k, k]`) or linear layer (`kernel=[]`).

    Weights are normalised per output channel at every call. In train mode with
    `force_normalize` on, the stored weights are also overwritten by their normalised values
    (EDM2's forced weight normalisation, eq. 66), from the values they had before this call.
    """

    def __init__(self, in_channels, out_channels, kernel):
        super().__init__()
        self.out_channels = out_channels
        self.force_normalize = True
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x, gain=1):
        w = self.weight.to(torch.float32)
        if self.training and self.force_normalize:
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        w = normalize(w)
        w = w * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return torch.nn.functional.conv2d(x, w, padding=(w.shape[-1] // 2,))


class Block(torch.nn.Module):
    """U-Net encoder or decoder block with optional self-attention (EDM2 fig. 21)."""

    def __init__(self, in_channels, out_channels, emb_channels, flavor="enc", resample_mode="keep",
                 resample_filter=(1, 1), attention=False, channels_per_head=64, dropout=0,
                 res_balance=0.3, attn_balance=0.3, clip_act=256):
        super().__init__()
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = list(resample_filter)
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x, emb):
        # Main branch: the encoder resamples and changes width before the residual branch.
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm

        # Residual branch, modulated by the embedding.
        y = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * scale[:, :, None, None].to(y.dtype))
        if self.training and self.dropout != 0:
            y = torch.nn.functional.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads:
            y = self.attn_qkv(x)
            y = y.reshape(y.shape[0], self.num_heads, -1, 3, y.shape[2] * y.shape[3])
            q, k, v = normalize(y, dim=2).unbind(3)  # pixel norm per head, then split
            weights = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
            y = torch.einsum("nhqk,nhck->nhcq", weights, v)
            y = self.attn_proj(y.reshape(*x.shape))
            x = mp_sum(x, y, t=self.attn_balance)

        if self.clip_act is not None:
            x = x.clip(-self.clip_act, self.clip_act)
        return x


class UNet(torch.nn.Module):
    """EDM2's U-Net: `forward(x, noise_labels, class_labels, target_noise_labels=None)`."""

    def __init__(self, img_resolution, img_channels, label_dim, model_channels=192, channel_mult=(1, 2, 3, 4),
                 channel_mult_noise=None, channel_mult_emb=None, num_blocks=3, attn_resolutions=(16, 8),
                 label_balance=0.5, concat_balance=0.5, flow_map=False, dropout_res=None, **block_kwargs):
        """dropout_res: the largest feature resolution whose blocks use dropout (None: all, EDM2's);
        locuslab/ect's ImageNet presets set 16 (branch imgnet, training/networks_edm2.py)."""
        super().__init__()

        def level_kwargs(res):
            return {**block_kwargs, "dropout": 0.0} if dropout_res and res > dropout_res else block_kwargs
        block_channels = [model_channels * mult for mult in channel_mult]
        noise_channels = model_channels * channel_mult_noise if channel_mult_noise is not None else block_channels[0]
        emb_channels = model_channels * channel_mult_emb if channel_mult_emb is not None else max(block_channels)
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = torch.nn.Parameter(torch.zeros([]))

        # Embedding.
        self.emb_fourier = MPFourier(noise_channels)
        self.emb_noise = MPConv(noise_channels, emb_channels, kernel=[])
        self.emb_label = MPConv(label_dim, emb_channels, kernel=[]) if label_dim != 0 else None
        if flow_map:
            self.emb_fourier_target = MPFourier(noise_channels)
            self.emb_target = MPConv(noise_channels, emb_channels, kernel=[])
            self.emb_target_gain = torch.nn.Parameter(torch.zeros([]))

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(block_channels):
            res = img_resolution >> level
            kwargs = level_kwargs(res)
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, emb_channels, flavor="enc", resample_mode="down",
                                                      **kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = Block(cin, cout, emb_channels, flavor="enc",
                                                            attention=(res in attn_resolutions), **kwargs)

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(block_channels))):
            res = img_resolution >> level
            kwargs = level_kwargs(res)
            if level == len(block_channels) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, emb_channels, flavor="dec", attention=True,
                                                     **kwargs)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, emb_channels, flavor="dec", **kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, emb_channels, flavor="dec", resample_mode="up",
                                                    **kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = Block(cin, cout, emb_channels, flavor="dec",
                                                            attention=(res in attn_resolutions), **kwargs)
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def forward(self, x, noise_labels, class_labels, target_noise_labels=None):
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if target_noise_labels is not None:
            emb = emb + self.emb_target(self.emb_fourier_target(target_noise_labels), gain=self.emb_target_gain)
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(class_labels * math.sqrt(class_labels.shape[1])), t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # constant channel lets convs see the border
        skips = []
        for name, block in self.enc.items():
            x = block(x) if "conv" in name else block(x, emb)
            skips.append(x)

        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)


class Precond(torch.nn.Module):
    """EDM preconditioning around the EDM2 U-Net, plus EDM2's learned uncertainty `logvar(sigma)`.

    `forward(x, sigma, labels=None, target_sigma=None, return_logvar=False)` returns D(x; sigma);
    labels are one-hot `[B, label_dim]` (None = all-zero labels, EDM2's unconditional call).
    """

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_data=SIGMA_DATA,
                 logvar_channels=128, sigma_min=0.0, flow_map=False, **unet_kwargs):
        super().__init__()
        self.config = dict(architecture="edm2", img_resolution=img_resolution, img_channels=img_channels,
                           label_dim=label_dim, use_fp16=use_fp16, sigma_data=sigma_data,
                           logvar_channels=logvar_channels, sigma_min=sigma_min, flow_map=flow_map,
                           **{key: list(value) if isinstance(value, tuple) else value
                              for key, value in unet_kwargs.items()})
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.data_shape = (img_channels, img_resolution, img_resolution)
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.sigma_min = sigma_min
        self.flow_map = flow_map
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                         flow_map=flow_map, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    @property
    def flow_map_keys(self):
        """State-dict keys that exist only because of `flow_map=True` (absent from a teacher)."""
        if not self.flow_map:
            return set()
        return {key for key in self.state_dict() if key.startswith(("unet.emb_fourier_target.", "unet.emb_target"))}

    @torch.no_grad()
    def normalize_weights(self):
        """Overwrite every MP weight by its normalised value (one step of forced weight norm)."""
        for module in self.modules():
            if isinstance(module, MPConv):
                module.weight.copy_(normalize(module.weight.to(torch.float32)))

    def set_forced_weight_norm(self, enabled):
        """Turn EDM2's in-place weight normalisation inside train-mode forwards on or off."""
        for module in self.modules():
            if isinstance(module, MPConv):
                module.force_normalize = bool(enabled)

    @contextlib.contextmanager
    def frozen_weight_norm(self):
        """Normalise the weights once, then run forwards that do not write to them.

        For `torch.func.jvp` / `functional_call` in training: the forward inside is a pure
        function of the weights; the in-place step EDM2 does per forward is done here, up front.
        """
        self.normalize_weights()
        self.set_forced_weight_norm(False)
        try:
            yield self
        finally:
            self.set_forced_weight_norm(True)

    def forward(self, x, sigma, labels=None, target_sigma=None, return_logvar=False):
        x = x.to(torch.float32)
        sigma = batch_sigmas(x, sigma)
        if self.label_dim == 0:
            labels = None
        elif labels is None:
            labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            labels = labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = torch.float16 if (self.use_fp16 and x.device.type == "cuda") else torch.float32

        c_skip, c_out, c_in, c_noise = edm_scalings(sigma, self.sigma_data, self.sigma_min)
        target_noise = target_noise_labels(x, target_sigma) if self.flow_map else None

        x_in = (c_in[:, None, None, None] * x).to(dtype)
        F_x = self.unet(x_in, c_noise, labels, target_noise)
        D_x = c_skip[:, None, None, None] * x + c_out[:, None, None, None] * F_x.to(torch.float32)
        if return_logvar:
            logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
            return D_x, logvar
        return D_x


# Default learning rates: the magnitude-preserving U-Net takes EDM2's large rates (train_edm2.py:
# 0.0100 to 0.0120 for the S/XS presets at batch 2048); the student phases fine-tune at a tenth
# (post-training, ECT's EDM2 runs: locuslab/ect ct_train_512.py) and twice that in mid-training (the
# official CMT mid-training runs at twice its post-training rate, sony/cmt run scripts).
FAMILY = NetworkFamily(name="edm2", build=Precond, learning_rates={"diffusion": 1e-2, "mid": 2e-3, "post": 1e-3})
