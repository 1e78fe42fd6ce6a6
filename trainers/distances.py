"""Distances `d(x, y) -> [B]` between a student's outputs and their targets.

- `l2`: the summed squared error, as the official CMT and ECT code compute it before any weighting.
- `huber`: pseudo-Huber `sqrt(|x - y|^2 + c^2) - c` (iCT / ECT), `c = 0.00054 sqrt(dim)` by default.
- `lpips`: LPIPS with the VGG trunk (`cmt.lpips`), for pixel images only; the official CMT
  mid-training metric on pixels.
- `elatentlpips`: E-LatentLPIPS (`cmt.elatentlpips`), for VAE latents only; the distance of the
  official CMT ImageNet-512 mid-training (sony/cmt imagenet512/run_cmt_512.sh --loss_metric=ELatentLPIPS).
"""
import math

import torch

from cmt.elatentlpips import ENCODERS, elatentlpips_distance
from cmt.lpips import lpips_distance

DISTANCES = ("l2", "huber", "lpips", "elatentlpips")
# The pair augmentation of E-LatentLPIPS when none is named: the package's default (elatentlpips.py `augment="bg"`).
ELATENTLPIPS_AUGMENT = "bg"
# iCT's pseudo-Huber constant for CIFAR-10 (0.03 at dim = 3 * 32 * 32), scaled with sqrt(dim).
HUBER_C_PER_SQRT_DIM = 0.00054


def squared_l2(x, y):
    """Summed squared error per sample, in float32 at least: `[B, ...]` -> `[B]`."""
    difference = (x - y).flatten(1)
    if difference.dtype in (torch.float16, torch.bfloat16):
        difference = difference.float()
    return difference.square().sum(dim=1)


def default_huber_c(data_shape):
    """iCT / ECT's pseudo-Huber constant for data of this shape: 0.00054 * sqrt(dim)."""
    return HUBER_C_PER_SQRT_DIM * math.sqrt(math.prod(data_shape))


def pseudo_huber(x, y, c):
    """`sqrt(|x - y|^2 + c^2) - c`: squared error near 0, the plain L2 norm far from it (c = 0)."""
    return (squared_l2(x, y) + c ** 2).sqrt() - c


def make_distance(name, data_shape, huber_c=None, lpips_resize=None, elatentlpips_augment=None, encoder=None):
    """The distance `d(x, y) -> [B]` called `name` for data of shape `data_shape`.

    huber_c: pseudo-Huber constant (default `default_huber_c(data_shape)`). lpips_resize: None
    compares images at their own size (the official CMT code), or a side to upsample to first.
    elatentlpips_augment: E-LatentLPIPS's pair augmentation (`cmt.elatentlpips.AUGMENT_OPS` letters;
    None: `ELATENTLPIPS_AUGMENT`); encoder: the latent data's record (`{"scale", "bias"}`), which
    converts them to the metric's SD-VAE convention.
    Raises ValueError when the distance cannot apply to this data (LPIPS on points or latents,
    E-LatentLPIPS on pixels) and FileNotFoundError / ModuleNotFoundError when weights are missing.
    """
    data_shape = tuple(data_shape)
    if name == "l2":
        return squared_l2
    if name == "huber":
        c = default_huber_c(data_shape) if huber_c is None else float(huber_c)
        if c < 0:
            raise ValueError(f"the pseudo-Huber constant must be >= 0, got {c}")
        return lambda x, y: pseudo_huber(x, y, c)
    if name == "lpips":
        if len(data_shape) != 3 or data_shape[0] not in (1, 3):
            raise ValueError(
                f"LPIPS compares pixel images [1 or 3 channels, H, W]; this data has shape {data_shape}. "
                "Use l2 or huber for points and latents.")
        return lpips_distance("vgg", resize=lpips_resize)
    if name == "elatentlpips":
        # The published models are Stable Diffusion's latent spaces; 4-channel SD-VAE latents (EDM2's and
        # MeanFlow's VAE, sd-vae-ft-mse) take the sd15 one.
        channels = ENCODERS["sd15"]["channels"]
        if len(data_shape) != 3 or data_shape[0] != channels or (encoder or {}).get("kind") == "standard_rgb":
            raise ValueError(
                f"E-LatentLPIPS compares {channels}-channel SD-VAE latents [{channels}, h, w]; this data has shape "
                f"{data_shape}. Use lpips for pixel images, l2 or huber otherwise.")
        return elatentlpips_distance("sd15", augment=ELATENTLPIPS_AUGMENT if elatentlpips_augment is None
                                     else elatentlpips_augment, encoder_record=encoder)
    raise ValueError(f"unknown distance {name!r}; valid: {', '.join(DISTANCES)}")
