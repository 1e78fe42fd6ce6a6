"""E-LatentLPIPS (Kang et al., "Distilling Diffusion Models into Conditional GANs", ECCV 2024): LPIPS
computed on a latent diffusion model's VAE latents by a VGG16-BN trunk trained on them, averaged over
random augmentations applied alike to both inputs ("ensembled").

Our own network, laid out under the parameter names of the authors' package (`elatentlpips` on PyPI,
mingukkang/elatentlpips `elatentlpips/elatentlpips.py` `ELatentLPIPS`, `elatentlpips/vgg16.py`
`CalibratedLatentVGG16BN`), so its published files (`{encoder}_latest_vgg16_tuned.pth`: trunk and
calibrated heads) load by name: the package itself imports torchvision, which this project keeps out.

    d = ELatentLPIPS("sd15", augment="bg")(z0, z1)     # z: [B, 4, h, w] latents; d: [B]

What it computes (the package's `forward` with its defaults: `normalize=False, ensembling=True,
add_l1_loss=True`): the mean absolute difference of the two latents, plus, after one random
augmentation drawn per sample and applied to both, sum over five trunk taps of the spatial mean of a
calibrated 1x1 head over the squared difference of channel-normalised features.

sony/cmt's ImageNet-512 run uses another variant (`imagenet512/training/loss.py` `DPMSolverLoss`:
`ELatentLPIPS2(pretrained_latent_lpips_path="vgg.pt", aug_type="bgcfnc")`, defined in
`imagenet512/elatentlpips/models.py`): a GroupNorm latent VGG trained on EDM2's latents by
`imagenet512/train_latent_vgg.py` whose weights are not published, no heads (channel sums), no L1
term, and an augmentation module that is not in the published tree. docs/recipes.md says what the
`imagenet512` recipe takes from each.

(Over 400 lines for a reason: the metric and its ensembling augmentation, which nothing else uses, are
one idea; the augmentation is the second half of the file.)
"""
import functools
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cmt.download import DownloadError, fetch

# The package's latent conventions (`ELatentLPIPS.__init__` / `forward(normalize=True)`): channels, and
# the shift and factor that take the VAE's raw latents to the ones its trunk was trained on,
# `(raw - shift) * factor`.
ENCODERS = {
    "sd15": dict(channels=4, shift=0.0, factor=0.18215),
    "sd21": dict(channels=4, shift=0.0, factor=0.18215),
    "sdxl": dict(channels=4, shift=0.0, factor=0.13025),
    "sd3": dict(channels=16, shift=0.0609, factor=1.5305),
    "flux": dict(channels=16, shift=0.1159, factor=0.3611),
}
WEIGHTS_URL = ("https://huggingface.co/Mingguksky/elatentlpips/resolve/main/elatentlpips_ckpt/"
               "{encoder}_latest_vgg16_tuned.pth")

# torchvision's vgg16_bn `features` (conv, BN, ReLU per width; "M" a 2x2 max-pool) with the package's
# changes (vgg16.py LatentVGG16BN): the first conv takes the latent channels and the first three
# pools are identities, so 64x64 latents keep their size through the first three taps.
VGG16_WIDTHS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# CalibratedLatentVGG16BN's slices of `features` (the taps relu1_2 ... relu5_3; the last two end
# after a pool that stays); the heads' widths.
SLICES = ((0, 7), (7, 14), (14, 24), (24, 34), (34, 44))
TAP_WIDTHS = (64, 128, 256, 512, 512)
NORM_EPS = 1e-8   # the package's normalize_tensor: x / sqrt(sum(x^2) + eps)


def latent_vgg16_bn_layers(in_channels):
    """The 44 modules of the package's latent vgg16_bn `features`, by index."""
    layers, channels, pools = [], in_channels, 0
    for width in VGG16_WIDTHS:
        if width == "M":
            layers.append(nn.Identity() if pools < 3 else nn.MaxPool2d(kernel_size=2, stride=2))
            pools += 1
        else:
            layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            channels = width
    return layers


class LatentVGG16BN(nn.Module):
    """The trunk: `slice1` ... `slice5`, each keeping the `features` indices as module names
    (`slice1.0.weight`, `slice2.7.weight`, ...), as the package's CalibratedLatentVGG16BN."""

    def __init__(self, in_channels=4):
        super().__init__()
        layers = latent_vgg16_bn_layers(in_channels)
        for k, (start, stop) in enumerate(SLICES, start=1):
            block = nn.Sequential()
            for index in range(start, stop):
                block.add_module(str(index), layers[index])
            setattr(self, f"slice{k}", block)

    def forward(self, x):
        taps = []
        for k in range(1, len(SLICES) + 1):
            x = getattr(self, f"slice{k}")(x)
            taps.append(x)
        return taps


class LinearHead(nn.Module):
    """LPIPS's calibrated 1x1 head (`lin{k}.model.1.weight`; `model.0` is the dropout the package
    trains it with, inactive here)."""

    def __init__(self, width):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(width, 1, kernel_size=1, bias=False))

    def forward(self, x):
        return self.model(x)


def weights_path(encoder):
    """The package's published file for `encoder`, from the cmt cache (`$CMT_CACHE/elatentlpips`) or
    downloaded there once; offline, a DownloadError naming the file and where to put it."""
    check_encoder(encoder)
    url = WEIGHTS_URL.format(encoder=encoder)
    try:
        return fetch(url, subdir="elatentlpips")
    except DownloadError as error:
        raise DownloadError(f"E-LatentLPIPS ({encoder}) needs its authors' weights: {error}") from None


def check_encoder(encoder):
    if encoder not in ENCODERS:
        raise ValueError(f"E-LatentLPIPS encoder must be one of {', '.join(ENCODERS)}, got {encoder!r}")


class ELatentLPIPS(nn.Module):
    """Frozen E-LatentLPIPS distance; gradients flow to the inputs only (a training loss).

    encoder: the latent space (`ENCODERS`: sd15, sd21, sdxl, sd3, flux). weights: None (the published
    file: `weights_path`), "random" (random weights of the same network, for tests), a `.pth` /
    `.safetensors` path or a state dict under the package's names. augment: the pair augmentation
    (`AUGMENT_OPS` letters, e.g. the package's "bg", "bgco"; None: none). l1: add the mean absolute
    difference (the package's `add_l1_loss`, on by default).
    Inputs are latents in the package's convention (`(raw - shift) * factor`; `latent_input` converts
    a data set's scaling)."""

    def __init__(self, encoder="sd15", weights=None, augment="bg", l1=True):
        super().__init__()
        check_encoder(encoder)
        self.encoder, self.augment, self.l1 = encoder, augment_ops(augment), bool(l1)
        self.channels = ENCODERS[encoder]["channels"]
        self.net = LatentVGG16BN(self.channels)
        for k, width in enumerate(TAP_WIDTHS):
            setattr(self, f"lin{k}", LinearHead(width))
        self.register_buffer("filter", geometric_filter())
        if weights != "random":
            self._load(weights)
        self.requires_grad_(False)
        self.eval()

    def _load(self, weights):
        if weights is None:
            weights = weights_path(self.encoder)
        source = "the given state dict" if isinstance(weights, Mapping) else str(weights)
        state = weights if isinstance(weights, Mapping) else read_state(Path(weights))
        # The package registers its heads twice (`lin{k}` and the ModuleList `lins.{k}`): one copy is enough.
        state = {key: value for key, value in state.items() if not key.startswith("lins.")}
        try:
            self.load_state_dict({**state, "filter": geometric_filter()})
        except RuntimeError as error:
            raise ValueError(f"E-LatentLPIPS weights from {source} do not fit the {self.encoder} network "
                             f"(the elatentlpips package's names): {' '.join(str(error).split())[:300]}") from None

    def forward(self, x0, x1, generator=None, percentile=None):
        if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[1] != self.channels:
            raise ValueError(f"E-LatentLPIPS ({self.encoder}) compares latents [B, {self.channels}, h, w] of one "
                             f"shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
        x0, x1 = x0.float(), x1.float()
        distance = (x0 - x1).abs().mean(dim=(1, 2, 3)) if self.l1 else x0.new_zeros(len(x0))
        if self.augment:
            x0, x1 = augment_pair(x0, x1, self.augment, self.filter, generator=generator, percentile=percentile)
        taps = self.net(torch.cat([x0, x1]))
        for k, features in enumerate(taps):
            features = features / (features.square().sum(dim=1, keepdim=True) + NORM_EPS).sqrt()
            features0, features1 = features.chunk(2)
            distance = distance + getattr(self, f"lin{k}")((features0 - features1).square()).mean(dim=(1, 2, 3))
        return distance


def read_state(path):
    if not path.is_file():
        raise DownloadError(f"E-LatentLPIPS weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


def latent_input(encoder_record, encoder="sd15"):
    """`x -> x in E-LatentLPIPS's convention` for latents of a data set whose record
    (`cmt.latents`: `{"scale", "bias"}` per channel, final = raw * scale + bias) says how they were
    scaled: raw = (x - bias) / scale, then the package's `(raw - shift) * factor`. Without a record,
    the latents are taken as they are. EDM2's VAE sees pixels in [0, 1], Stable Diffusion's (and the
    package's training data) in [-1, 1]: EDM2 latents reach the trunk as raw latents of other pixels."""
    convention = ENCODERS[encoder]
    if not encoder_record or "scale" not in encoder_record:
        return lambda x: x
    scale = torch.tensor(encoder_record["scale"], dtype=torch.float32).view(1, -1, 1, 1)
    bias = torch.tensor(encoder_record["bias"], dtype=torch.float32).view(1, -1, 1, 1)

    def convert(x):
        raw = (x.float() - bias.to(x.device)) / scale.to(x.device)
        return (raw - convention["shift"]) * convention["factor"]
    return convert


@functools.lru_cache(maxsize=None)
def cached_elatentlpips(encoder, weights, augment, device):
    return ELatentLPIPS(encoder, weights=weights, augment=augment).to(device)


def elatentlpips_distance(encoder="sd15", augment="bg", encoder_record=None, weights=None):
    """A distance `d(x, y) -> [B]` for training losses: one frozen module per (encoder, weights,
    augment, device), inputs converted from the data's scaling (`latent_input`). The CPU module is
    built now, so missing weights fail before training starts. weights: None (published), "random"."""
    cached_elatentlpips(encoder, weights, augment, torch.device("cpu"))
    convert = latent_input(encoder_record, encoder)

    def distance(x, y):
        return cached_elatentlpips(encoder, weights, augment, x.device)(convert(x), convert(y))
    return distance


# ---- the ensembling augmentation ----------------------------------------------------------------
# The package's pair augmentation (elatentlpips/ada_aug.py `AdaAugment`, after StyleGAN2-ADA's
# augment pipe; the package sets its overall probability p to 1): the same random transform of each
# sample applied to both inputs. Letters as the package's pipes name them (elatentlpips.py
# `ada_augpipe`: b blit, g geometric, c colour, o cutout), plus n, the additive noise AdaAugment has
# but no package pipe names (sony/cmt's "bgcfnc" includes it).
AUGMENT_OPS = {
    "b": ("xflip", "rotate90", "xint"),
    "g": ("scale", "rotate", "aniso", "xfrac"),
    "c": ("brightness", "contrast", "saturation"),
    "n": ("noise",),
    "o": ("cutout",),
}
# AdaAugment's defaults: ranges of the random transforms.
XINT_MAX, SCALE_STD, ROTATE_MAX, ANISO_STD, XFRAC_STD = 0.125, 0.2, 1.0, 0.2, 0.125
NOISE_STD, CUTOUT_SIZE = 0.1, 0.5
# The anti-aliasing filter of the geometric transforms: the Symlet-6 low-pass (ada_aug.py `wavelets['sym6']`).
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)


def augment_ops(augment):
    """The set of transforms a letter string names (None or "" or "none": none)."""
    if augment in (None, "", "none"):
        return frozenset()
    unknown = sorted(set(str(augment)) - set(AUGMENT_OPS))
    if unknown:
        raise ValueError(f"E-LatentLPIPS augment {augment!r}: unknown letter(s) {''.join(unknown)}; letters: "
                         + ", ".join(f"{letter} ({'/'.join(ops)})" for letter, ops in AUGMENT_OPS.items()))
    return frozenset(op for letter in str(augment) for op in AUGMENT_OPS[letter])


def geometric_filter():
    """The separable low-pass of the 2x up- and down-sampling around a geometric transform (unit DC gain)."""
    taps = torch.tensor(SYM6, dtype=torch.float32)
    return taps / taps.sum()


def _fir(x, taps, up=1, down=1, pad=(0, 0, 0, 0), gain=1.0, flip=True):
    """Upsample by zero insertion, pad (negative: crop) `(left, right, top, bottom)`, convolve with the
    separable filter `taps` along both axes (`flip`: true convolution, else correlation), keep every
    `down`-th pixel. The reference form of StyleGAN2-ADA's upfirdn2d."""
    batch, channels, height, width = x.shape
    if up > 1:
        x = x.reshape(batch, channels, height, 1, width, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1]).reshape(batch, channels, height * up, width * up)
    left, right, top, bottom = pad
    x = F.pad(x, [max(left, 0), max(right, 0), max(top, 0), max(bottom, 0)])
    x = x[:, :, max(-top, 0): x.shape[2] - max(-bottom, 0), max(-left, 0): x.shape[3] - max(-right, 0)]
    taps = (taps * math.sqrt(gain)).to(x.dtype)
    if flip:
        taps = taps.flip(0)
    kernel = taps.view(1, 1, -1).repeat(channels, 1, 1)
    x = F.conv2d(x, kernel.unsqueeze(2), groups=channels)
    x = F.conv2d(x, kernel.unsqueeze(3), groups=channels)
    return x[:, :, ::down, ::down]


def _upsample2x(x, taps):
    n = len(taps)
    return _fir(x, taps, up=2, pad=((n + 1) // 2, (n - 2) // 2, (n + 1) // 2, (n - 2) // 2), gain=4.0)


def _downsample2x(x, taps, crop):
    n = len(taps)
    first, second = (n - 1) // 2 - crop, (n - 2) // 2 - crop
    return _fir(x, taps, down=2, pad=(first, second, first, second), flip=False)


def _matrix(rows, device):
    """`[B, 3, 3]` (or `[3, 3]`) from rows of scalars and `[B]` tensors."""
    entries = [[torch.as_tensor(value, dtype=torch.float32, device=device) for value in row] for row in rows]
    batch = max((value.numel() for row in entries for value in row), default=1)
    return torch.stack([torch.stack([value.expand(batch) for value in row], dim=-1) for row in entries], dim=-2)


def _translate(tx, ty, device):
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], device)


def _scale(sx, sy, device):
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], device)


def _rotate(theta, device):
    theta = torch.as_tensor(theta, dtype=torch.float32, device=device)
    return _matrix([[theta.cos(), -theta.sin(), 0], [theta.sin(), theta.cos(), 0], [0, 0, 1]], device)


def augment_pair(x0, x1, ops, taps, generator=None, percentile=None):
    """Both batches under one random transform per sample, AdaAugment's draws with p = 1, in its
    order (blit, geometric, colour, noise, cutout). percentile: AdaAugment's `debug_percentile`, a
    fixed point of every distribution instead of a draw (deterministic; for tests)."""
    batch, channels, height, width = x0.shape
    device = x0.device

    def rand(*shape):
        return torch.rand(shape, generator=generator, device=device)

    def randn(*shape):
        return torch.randn(shape, generator=generator, device=device)

    p = torch.as_tensor(percentile, dtype=torch.float32, device=device) if percentile is not None else None
    g_inv = torch.eye(3, device=device).expand(batch, 3, 3)
    geometric = False
    if "xflip" in ops:
        i = torch.floor(rand(batch) * 2)
        i = torch.where(rand(batch) < 1, i, torch.zeros_like(i))
        if p is not None:
            i = torch.full_like(i, float(torch.floor(p * 2)))
        g_inv, geometric = g_inv @ _scale(1 - 2 * i, torch.ones_like(i), device), True
    if "rotate90" in ops:
        i = torch.floor(rand(batch) * 4)
        i = torch.where(rand(batch) < 1, i, torch.zeros_like(i))
        if p is not None:
            i = torch.full_like(i, float(torch.floor(p * 4)))
        g_inv, geometric = g_inv @ _rotate(np.pi / 2 * i, device), True   # rotate2d_inv(-pi/2 i)
    if "xint" in ops:
        t = (rand(batch, 2) * 2 - 1) * XINT_MAX
        t = torch.where(rand(batch, 1) < 1, t, torch.zeros_like(t))
        if p is not None:
            t = torch.full_like(t, float((p * 2 - 1) * XINT_MAX))
        g_inv, geometric = g_inv @ _translate(-torch.round(t[:, 0] * width), -torch.round(t[:, 1] * height), device), True
    if "scale" in ops:
        s = torch.exp2(randn(batch) * SCALE_STD)
        s = torch.where(rand(batch) < 1, s, torch.ones_like(s))
        if p is not None:
            s = torch.full_like(s, float(torch.exp2(torch.erfinv(p * 2 - 1) * SCALE_STD)))
        g_inv, geometric = g_inv @ _scale(1 / s, 1 / s, device), True
    # Rotation before and after the anisotropic scaling, each with AdaAugment's 1 - sqrt(1 - p): 1 at p = 1.
    p_rot = 1.0
    if "rotate" in ops:
        theta = (rand(batch) * 2 - 1) * np.pi * ROTATE_MAX
        theta = torch.where(rand(batch) < p_rot, theta, torch.zeros_like(theta))
        if p is not None:
            theta = torch.full_like(theta, float((p * 2 - 1) * np.pi * ROTATE_MAX))
        g_inv, geometric = g_inv @ _rotate(theta, device), True
    if "aniso" in ops:
        s = torch.exp2(randn(batch) * ANISO_STD)
        s = torch.where(rand(batch) < 1, s, torch.ones_like(s))
        if p is not None:
            s = torch.full_like(s, float(torch.exp2(torch.erfinv(p * 2 - 1) * ANISO_STD)))
        g_inv, geometric = g_inv @ _scale(1 / s, s, device), True
    if "rotate" in ops:
        theta = (rand(batch) * 2 - 1) * np.pi * ROTATE_MAX
        theta = torch.where(rand(batch) < p_rot, theta, torch.zeros_like(theta))
        if p is not None:
            theta = torch.zeros_like(theta)
        g_inv = g_inv @ _rotate(theta, device)
    if "xfrac" in ops:
        t = randn(batch, 2) * XFRAC_STD
        t = torch.where(rand(batch, 1) < 1, t, torch.zeros_like(t))
        if p is not None:
            t = torch.full_like(t, float(torch.erfinv(p * 2 - 1) * XFRAC_STD))
        g_inv, geometric = g_inv @ _translate(-t[:, 0] * width, -t[:, 1] * height, device), True
    if geometric:
        x0, x1 = _warp(torch.cat([x0, x1]), torch.cat([g_inv, g_inv]), taps).chunk(2)
    if "brightness" in ops:
        shift = rand(batch, 1, 1, 1) - 0.5
        x0, x1 = x0 + shift, x1 + shift
    if "contrast" in ops:
        factor = rand(batch, 1, 1, 1) + 0.5
        x0, x1 = [(x - x.mean(dim=(1, 2, 3), keepdim=True)) * factor + x.mean(dim=(1, 2, 3), keepdim=True)
                  for x in (x0, x1)]
    if "saturation" in ops and channels > 1:
        factor = rand(batch, 1, 1, 1) * 2
        x0, x1 = [(x - x.mean(dim=1, keepdim=True)) * factor + x.mean(dim=1, keepdim=True) for x in (x0, x1)]
    if "noise" in ops:
        sigma = randn(batch, 1, 1, 1).abs() * NOISE_STD
        sigma = torch.where(rand(batch, 1, 1, 1) < 1, sigma, torch.zeros_like(sigma))
        if p is not None:
            sigma = torch.full_like(sigma, float(torch.erfinv(p) * NOISE_STD))
        x0 = x0 + randn(batch, channels, height, width) * sigma
        x1 = x1 + randn(batch, channels, height, width) * sigma
    if "cutout" in ops:
        size = torch.full((batch, 2, 1, 1, 1), CUTOUT_SIZE, device=device)
        size = torch.where(rand(batch, 1, 1, 1, 1) < 1, size, torch.zeros_like(size))
        center = rand(batch, 2, 1, 1, 1)
        if p is not None:
            center = torch.full_like(center, float(p))
        xs = torch.arange(width, device=device).reshape(1, 1, 1, -1)
        ys = torch.arange(height, device=device).reshape(1, 1, -1, 1)
        keep = (((xs + 0.5) / width - center[:, 0]).abs() >= size[:, 0] / 2) | \
               (((ys + 0.5) / height - center[:, 1]).abs() >= size[:, 1] / 2)
        x0, x1 = x0 * keep.float(), x1 * keep.float()
    return x0, x1


def _warp(x, g_inv, taps):
    """Resample `x` at `g_inv @ output pixel` (AdaAugment's geometric path): reflect-pad by what the
    transform reaches, upsample 2x through the low-pass, bilinear sampling, downsample 2x and crop."""
    batch, channels, height, width = x.shape
    device = x.device
    cx, cy = (width - 1) / 2, (height - 1) / 2
    corners = torch.tensor([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], device=device)
    corners = g_inv @ corners.t()                                 # [B, 3, 4]
    pad = len(taps) // 4
    margin = corners[:, :2, :].permute(1, 0, 2).flatten(1)       # [xy, B * 4]
    margin = torch.cat([-margin, margin]).max(dim=1).values      # x0, y0, x1, y1
    margin = margin + torch.tensor([pad * 2 - cx, pad * 2 - cy] * 2, device=device)
    margin = margin.max(torch.zeros(4, device=device)).min(torch.tensor([width - 1, height - 1] * 2, device=device,
                                                                        dtype=margin.dtype))
    mx0, my0, mx1, my1 = (int(v) for v in margin.ceil().to(torch.int32))
    x = F.pad(x, [mx0, mx1, my0, my1], mode="reflect")
    g_inv = _translate((mx0 - mx1) / 2, (my0 - my1) / 2, device) @ g_inv
    x = _upsample2x(x, taps.to(device))
    g_inv = _scale(2, 2, device) @ g_inv @ _scale(0.5, 0.5, device)
    g_inv = _translate(-0.5, -0.5, device) @ g_inv @ _translate(0.5, 0.5, device)
    shape = [batch, channels, (height + pad * 2) * 2, (width + pad * 2) * 2]
    g_inv = _scale(2 / x.shape[3], 2 / x.shape[2], device) @ g_inv @ _scale(shape[3] / 2, shape[2] / 2, device)
    grid = F.affine_grid(g_inv[:, :2, :], shape, align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _downsample2x(x, taps.to(device), crop=pad * 2)
