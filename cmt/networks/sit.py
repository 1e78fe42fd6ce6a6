"""SiT / DiT transformers on latents (and MeanFlow's two-time variant) as cmt denoisers.

The transformer is SiT's (Ma et al. 2024, willisma/SiT `models.py`, itself DiT's backbone,
facebookresearch/DiT `models.py`): patch embedding, a fixed 2-D sin-cos position embedding, adaLN-Zero
blocks, a final adaLN layer, a sinusoidal time embedding and a class table with a null row for
classifier-free guidance. Module and parameter names are SiT's, so an official state dict (e.g.
`SiT-XL-2-256x256.pt`) loads by name; `flow_map=True` adds MeanFlow's second time embedder `r_embedder`
with the names of the public PyTorch port (zhuyu-cs/MeanFlow `sit.py`), so its checkpoints load too.

Time and velocity conventions (`time_convention` in the config: a network keeps receiving the
convention it was trained in; a student built from a SiT teacher keeps "sit"):
- "sit": willisma/SiT `transport/path.py` (ICPlan): x_s = s * data + (1 - s) * noise, s = 0 is noise,
  s = 1 data; the network predicts the velocity dx_s/ds = data - noise (sample.py integrates s from 0
  to 1). In our time t (t = 1 noise), s = 1 - t and our velocity dz/dt = -(network output).
- "meanflow": zhuyu-cs/MeanFlow `loss.py`: z_t = (1 - t) x + t e, t = 1 is noise; the network outputs
  the average velocity u(z, r, t) toward noise, z_r = z_t - (t - r) u (`meanflow_sampler.py`): ours.
In both, `r_embedder` sees the interval length t - r (the port's `r_embedder(t - r)`, the official
JAX code's `h = t - r`, Gsunshine/meanflow `meanflow.py`), the same number in either convention.

cmt contract: `forward(x, sigma, labels, target_sigma)` = D(x; sigma) in EDM sigma space, with
t = sigma / (1 + sigma), z = x / (1 + sigma), r = target_sigma / (1 + target_sigma) and
D = z - t u(z, t, r) exactly (`cmt.edm`, docs/design.md "Flow maps"). `average_velocity(z, t, r,
labels)` is MeanFlow's u in our t without that round trip. `learn_sigma` networks output 2C channels
and the first C are the velocity (SiT `forward` keeps `x.chunk(2, dim=1)[0]`).

Our additions and choices:
- `r_embedder.mlp.2` (its output layer) starts at zero, so a student loaded from a teacher's state dict
  is that teacher for every r (the port initialises it N(0, 0.02); a port checkpoint loads either way).
- `sigma_min > 0` (consistency students): D <- D + (sigma_min / sigma) (x - D), the DDIM jump of the
  network's D to sigma_min. It is x at sigma = sigma_min (the boundary condition) and, for a student
  loaded from a teacher, the teacher's own one-step jump to sigma_min: EDM's c_skip / c_out form is
  made for an x-predicting F and would not start the student at its teacher.
- labels: one-hot `[B, label_dim]`; a row of zeros or `labels=None` takes the null class (index
  label_dim, the CFG row; SiT's `y_null = 1000`), which needs `null_class=True` (SiT's tables have
  it whenever class_dropout_prob > 0). The port maps y=None to class 0 instead; we do not.
- `return_logvar=True` returns logvar = 0 (SiT learns no uncertainty).
- Attention: `torch.nn.functional.scaled_dot_product_attention`. Forward-mode AD (`torch.func.jvp`,
  MeanFlow's du/dt) exists only in its math backend in torch 2.13: the fused kernels
  (`_scaled_dot_product_flash_attention_for_cpu`, which CPU picks by default, and CUDA's flash,
  memory-efficient and cuDNN kernels) have backward formulas only (pytorch issues #128971, #117629,
  #165530) and raise NotImplementedError under jvp. So when q carries a forward-mode tangent,
  attention runs under `sdpa_kernel(SDPBackend.MATH)`; plain forwards keep the fused kernels.
"""
import contextlib
import math

import torch
from torch.autograd import forward_ad
from torch.nn.attention import SDPBackend, sdpa_kernel

from cmt.edm import SIGMA_DATA, broadcast_sigma
from cmt.errors import ArgumentError
from cmt.networks.family import NetworkFamily

# willisma/SiT models.py SiT_{S,B,L,XL}_{2,4,8}: (depth, hidden_size, num_heads).
SIT_SIZES = {"s": (12, 384, 6), "b": (12, 768, 12), "l": (24, 1024, 16), "xl": (28, 1152, 16)}
PATCH_SIZES = (2, 4, 8)
SIT_PRESETS = {f"sit-{size}/{patch}": dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
               for size, (depth, hidden, heads) in SIT_SIZES.items() for patch in PATCH_SIZES}
TIME_CONVENTIONS = ("sit", "meanflow")
FREQUENCY_EMBEDDING_SIZE = 256   # TimestepEmbedder(frequency_embedding_size=256)
# SiT's forward_with_cfg guides the first 3 channels only ("for exact reproducibility reasons", as
# DiT); the rest keep the conditional output. `cmt.guidance.classifier_free_guidance(channels=3)`;
# every SiT says so (`cfg_channels`), so `apply_guidance` (a build's guided teacher) does it.
SIT_CFG_CHANNELS = 3
def is_sit_state_dict(state_dict):
    """Whether `state_dict` has SiT's layout (an official or MeanFlow-port checkpoint's weights)."""
    keys = ("x_embedder.proj.weight", "pos_embed", "t_embedder.mlp.0.weight")
    return isinstance(state_dict, dict) and all(torch.is_tensor(state_dict.get(key)) for key in keys)


def sit_config(size, data_shape=(4, 32, 32), label_dim=1000, **options):
    """The config (for `cmt.networks.build_network`) of a SiT of the named size, e.g. "sit-b/4";
    `options`: any other `SiT` keyword (learn_sigma, flow_map, time_convention, ...)."""
    if size not in SIT_PRESETS:
        raise ArgumentError("size", f"unknown SiT size {size!r}; valid: {', '.join(SIT_PRESETS)}")
    patch = SIT_PRESETS[size]["patch_size"]
    if len(data_shape) != 3 or data_shape[1] != data_shape[2] or data_shape[1] % patch:
        raise ArgumentError("data_shape", f"{size} needs square latents (C, H, H) with H divisible by its patch size "
                                          f"{patch}; got {tuple(data_shape)}")
    return {"architecture": "sit", "data_shape": list(data_shape), "label_dim": label_dim, **SIT_PRESETS[size],
            **options}


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_position_embedding(dim, grid_size):
    """MAE's fixed 2-D embedding `[grid^2, dim]` as SiT builds it: for the token at (row i, column j)
    the first half encodes j and the second half i, each as [sin, cos] of pos / 10000^(2k / (dim/2))."""
    if dim % 4:
        raise ValueError(f"hidden_size must be divisible by 4 for the 2-D sin-cos embedding, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(positions):
        angles = positions.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).to(torch.float32)


class TimestepEmbedder(torch.nn.Module):
    """A scalar time -> [cos, sin] of t * 10000^(-k / 128) -> Linear, SiLU, Linear."""

    def __init__(self, hidden_size, frequency_embedding_size=FREQUENCY_EMBEDDING_SIZE):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = torch.nn.Sequential(torch.nn.Linear(frequency_embedding_size, hidden_size), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        half = self.frequency_embedding_size // 2
        dtype = torch.promote_types(t.dtype, torch.float32)   # float32 as SiT; float64 nets stay float64
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = t.to(dtype)[:, None] * freqs.to(dtype)[None]
        embedding = torch.cat([angles.cos(), angles.sin()], dim=-1)
        return self.mlp(embedding.to(self.mlp[0].weight.dtype))


class LabelEmbedder(torch.nn.Module):
    """The class table; row `num_classes` (when present) is the null class of classifier-free guidance."""

    def __init__(self, num_classes, hidden_size, null_class=True):
        super().__init__()
        self.embedding_table = torch.nn.Embedding(num_classes + int(null_class), hidden_size)

    def forward(self, index):
        return self.embedding_table(index)


class PatchEmbed(torch.nn.Module):
    """p x p patches -> tokens `[B, (H / p) * (W / p), hidden]`, row-major (timm's PatchEmbed)."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = torch.nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(torch.nn.Module):
    """timm's multi-head self-attention (fused qkv with bias, output projection) through SDPA."""

    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        # Only the math backend has forward-mode AD (module docstring); use it when q carries a tangent.
        dual = forward_ad.unpack_dual(q).tangent is not None
        with sdpa_kernel(SDPBackend.MATH) if dual else contextlib.nullcontext():
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(torch.nn.Module):
    """timm's Mlp: fc1, tanh-GELU, dropout, fc2, dropout (SiT trains with dropout 0)."""

    def __init__(self, dim, hidden, dropout=0.0):
        super().__init__()
        self.fc1 = torch.nn.Linear(dim, hidden)
        self.act = torch.nn.GELU(approximate="tanh")
        self.drop1 = torch.nn.Dropout(dropout)
        self.fc2 = torch.nn.Linear(hidden, dim)
        self.drop2 = torch.nn.Dropout(dropout)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class SiTBlock(torch.nn.Module):
    """Attention and MLP, each modulated by (shift, scale) and gated, from the conditioning c (adaLN-Zero)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, dropout=0.0):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = torch.nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), dropout)
        self.adaLN_modulation = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(torch.nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = torch.nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = torch.nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SiT(torch.nn.Module):
    """A SiT transformer in EDM sigma space (`forward`) and in its native time (`average_velocity`).

    data_shape: (C, H, W) latents, H = W divisible by patch_size. label_dim: number of classes (0:
    unconditional, no class table). Sizes: `SIT_PRESETS["sit-xl/2"]` etc. give depth, hidden_size,
    num_heads and patch_size.
    """

    def __init__(self, data_shape=(4, 32, 32), label_dim=1000, patch_size=2, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, learn_sigma=False, null_class=True, time_convention="sit",
                 flow_map=False, sigma_min=0.0, sigma_data=SIGMA_DATA, dropout=0.0):
        super().__init__()
        channels, height, width = (int(size) for size in data_shape)
        if height != width or height % patch_size:
            raise ValueError(f"SiT needs square latents whose side is divisible by the patch size; got data_shape "
                             f"{tuple(data_shape)} with patch_size {patch_size}")
        if time_convention not in TIME_CONVENTIONS:
            raise ValueError(f"time_convention must be one of {', '.join(TIME_CONVENTIONS)}, got {time_convention!r}")
        self.config = dict(architecture="sit", data_shape=[channels, height, width], label_dim=label_dim,
                           patch_size=patch_size, hidden_size=hidden_size, depth=depth, num_heads=num_heads,
                           mlp_ratio=mlp_ratio, learn_sigma=learn_sigma, null_class=null_class,
                           time_convention=time_convention, flow_map=flow_map, sigma_min=sigma_min,
                           sigma_data=sigma_data, dropout=dropout)
        self.data_shape = (channels, height, width)
        self.label_dim = label_dim
        self.null_class = null_class
        self.sigma_data = sigma_data
        self.sigma_min = sigma_min
        self.flow_map = flow_map
        self.time_convention = time_convention
        self.learn_sigma = learn_sigma
        self.patch_size = patch_size
        self.out_channels = 2 * channels if learn_sigma else channels
        self.cfg_channels = SIT_CFG_CHANNELS   # what classifier-free guidance guides (`cmt.guidance.apply_guidance`)

        self.x_embedder = PatchEmbed(patch_size, channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if flow_map:
            self.r_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(label_dim, hidden_size, null_class) if label_dim else None
        # Fixed, not trained: a buffer (SiT's frozen Parameter), under SiT's state-dict name.
        self.register_buffer("pos_embed", sincos_position_embedding(hidden_size, height // patch_size)[None])
        self.blocks = torch.nn.ModuleList(SiTBlock(hidden_size, num_heads, mlp_ratio, dropout) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self):
        """SiT's initialisation (models.py `initialize_weights`): xavier-uniform linears with zero bias,
        the patch projection as a linear, N(0, 0.02) class table and time MLP, adaLN-Zero and a zero
        output layer; ours: the r-embedder's output layer at zero (the student starts as its teacher)."""
        for module in self.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                torch.nn.init.zeros_(module.bias)
        weight = self.x_embedder.proj.weight
        torch.nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        torch.nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            torch.nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        torch.nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        torch.nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero = [block.adaLN_modulation[-1] for block in self.blocks]
        zero += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        if self.flow_map:
            torch.nn.init.normal_(self.r_embedder.mlp[0].weight, std=0.02)
            zero.append(self.r_embedder.mlp[2])
        for layer in zero:
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)

    @property
    def flow_map_keys(self):
        """State-dict keys that exist only because of `flow_map=True` (absent from a teacher)."""
        return {key for key in self.state_dict() if key.startswith("r_embedder.")} if self.flow_map else set()

    @contextlib.contextmanager
    def frozen_weight_norm(self):
        """No-op twin of `Precond.frozen_weight_norm` (no forced weight norm; jvp needs nothing more)."""
        yield self

    def class_index(self, labels, batch, device):
        """Rows of the class table for one-hot `labels` (a zero row or None: the null class)."""
        if self.y_embedder is None:
            return None
        null = torch.full((batch,), self.label_dim, dtype=torch.long, device=device)
        if labels is not None:
            labels = labels.reshape(-1, self.label_dim).to(device)
            index = torch.where(labels.ne(0).any(dim=1), labels.argmax(dim=1), self.label_dim)
            null = index.expand(batch) if index.shape[0] == 1 else index
        if not self.null_class and bool((null == self.label_dim).any()):
            raise ValueError("this SiT has no null class (null_class=False): every sample needs a label")
        return null

    def transformer(self, x, time, class_index=None, interval=None):
        """The network in its own convention: `x [B, C, H, W]`, `time [B]` and, for flow maps, the
        interval `t - r [B]`; returns the first C output channels (velocity or average velocity)."""
        tokens = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(time)
        if self.flow_map:
            c = c + self.r_embedder(interval)
        if self.y_embedder is not None:
            c = c + self.y_embedder(class_index)
        for block in self.blocks:
            tokens = block(tokens, c)
        tokens = self.final_layer(tokens, c)
        batch, patch, side = x.shape[0], self.patch_size, x.shape[-1] // self.patch_size
        out = tokens.reshape(batch, side, side, patch, patch, self.out_channels)
        out = torch.einsum("nhwpqc->nchpwq", out).reshape(batch, self.out_channels, side * patch, side * patch)
        return out[:, :self.data_shape[0]]

    def _batch(self, value, like):
        value = torch.as_tensor(value, device=like.device)
        value = value.to(torch.promote_types(value.dtype, like.dtype)).reshape(-1)
        return value.expand(like.shape[0]) if value.numel() == 1 else value

    def average_velocity(self, z, t, r=None, labels=None):
        """u(z, t, r) in our time (t = 1 noise, z_t = (1 - t) x0 + t e, z_r = z_t - (t - r) u); the
        instantaneous velocity e - x0 (r = None) for networks without `flow_map`. `z` of another
        dtype is taken in the network's (float32, or float64 for a float64 network), as `forward` does."""
        z = z.to(torch.promote_types(self.pos_embed.dtype, torch.float32))
        t = self._batch(t, z)
        if self.flow_map:
            if r is None:
                raise ValueError("this flow-map network needs r (r = t for the instantaneous velocity)")
            interval = t - self._batch(r, z)
        elif r is not None:
            raise ValueError("this network has no second time (flow_map=False): call it with r=None")
        else:
            interval = None
        index = self.class_index(labels, z.shape[0], z.device)
        if self.time_convention == "sit":
            return -self.transformer(z, 1 - t, index, interval)
        return self.transformer(z, t, index, interval)

    def forward(self, x, sigma, labels=None, target_sigma=None, return_logvar=False):
        dtype = torch.promote_types(self.pos_embed.dtype, torch.float32)
        x = x.to(dtype)
        sigma = self._batch(sigma, x).to(dtype)
        sigma_b = broadcast_sigma(sigma, x)
        t, z = sigma / (1 + sigma), x / (1 + sigma_b)
        r = None
        if self.flow_map:
            if target_sigma is None:
                raise ValueError("this flow-map network needs target_sigma (0 for a consistency jump)")
            target_sigma = self._batch(target_sigma, x).to(dtype)
            r = target_sigma / (1 + target_sigma)
        D_x = z - broadcast_sigma(t, x) * self.average_velocity(z, t, r, labels).to(dtype)
        if self.sigma_min:
            D_x = D_x + (self.sigma_min / sigma_b) * (x - D_x)
        if return_logvar:
            return D_x, torch.zeros(x.shape[0], 1, 1, 1, dtype=dtype, device=x.device)
        return D_x


# Default learning rates (Adam(W), batch 256): pre-training, flow matching from scratch, willisma/SiT
# train.py AdamW(lr=1e-4, weight_decay=0); post-training, MeanFlow's Gsunshine/meanflow
# configs/default.py and run_b4.yml learning_rate 0.0001 (constant), zhuyu-cs/MeanFlow train.py
# --learning-rate 1e-4; mid-training: no CMT + MeanFlow code is published, so the official CMT rule,
# twice the post-training rate (sony/cmt run scripts).
FAMILY = NetworkFamily(name="sit", build=SiT, learning_rates={"diffusion": 1e-4, "mid": 2e-4, "post": 1e-4})
