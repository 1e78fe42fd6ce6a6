"""DINOv2 ViT-L/14 as EDM2's FD-DINOv2 detector, with our own vision transformer (torchvision and
timm are not needed).

The network is laid out exactly as facebookresearch/dinov2 `dinov2/models/vision_transformer.py`
builds `dinov2_vitl14` (`hub/backbones.py`: img_size 518, patch 14, width 1024, 24 blocks, 16 heads,
MLP ratio 4, layer scale with init 1.0, no registers, `block_chunks=0`, position embeddings
interpolated bicubically with the 0.1 offset), with the same state-dict names, so the official
checkpoint `dinov2_vitl14_pretrain.pth` loads into it with `torch.load(weights_only=True)`. Its
output is the final-normed class token (`x_norm_clstoken`, 1024 numbers).

EDM2's protocol (NVlabs/edm2 `calculate_metrics.py`, `DINOv2Detector` with the default
`resize_mode="torch"`): images as uint8 RGB (`StandardRGBEncoder.decode`: `x * 127.5 + 128`, clipped,
truncated), resized to 224 x 224 by bicubic interpolation with antialiasing (in float, not rounded
back), divided by 255, normalised with the ImageNet mean and std, then the network.

    detector = DINOv2Detector()                 # downloads the weights once into $CMT_CACHE/dinov2
    features = detector.features(images)        # [N, C, H, W] in [-1, 1] -> float64 numpy [N, 1024]
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cmt.checkpoint import read_safetensors, read_torch_file
from cmt.download import fetch

DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
# dinov2_vitl14 (hub/backbones.py `_make_dinov2_model`, models/vision_transformer.py `vit_large`).
VITL14 = dict(img_size=518, patch_size=14, width=1024, depth=24, num_heads=16, mlp_ratio=4.0, layer_scale=True)
HEAD_WIDTH = 64            # every DINOv2 backbone has 64-wide heads (ViT-S 384/6 ... ViT-g 1536/24)
INTERPOLATE_OFFSET = 0.1   # vision_transformer.py interpolate_offset, "historical kludge" kept for parity
LAYER_NORM_EPS = 1e-6
# EDM2's DINOv2Detector: resize to 224, ImageNet normalisation.
RESOLUTION = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, width):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)    # [B, tokens, width]


class Attention(nn.Module):
    def __init__(self, width, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, width))


class Mlp(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, width, init=1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((width,), init))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with layer scale on both residual branches."""

    def __init__(self, width, num_heads, mlp_ratio, layer_scale):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.attn = Attention(width, num_heads)
        self.ls1 = LayerScale(width) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.ls2 = LayerScale(width) if layer_scale else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
    """DINOv2's ViT without registers; `forward(x)` -> the normed class token `[B, width]`.

    `x`: `[B, 3, H, W]` normalised images, H and W multiples of the patch size; the position
    embeddings of the `img_size` grid are resampled to the input's grid."""

    def __init__(self, img_size=518, patch_size=14, in_chans=3, width=1024, depth=24, num_heads=16, mlp_ratio=4.0,
                 layer_scale=True):
        super().__init__()
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, width=width, depth=depth,
                           num_heads=num_heads, mlp_ratio=mlp_ratio, layer_scale=layer_scale)
        self.patch_size = patch_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, width))
        self.mask_token = nn.Parameter(torch.zeros(1, width))   # unused at inference; in the checkpoint
        self.blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio, layer_scale) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)

    def position_embedding(self, height, width):
        """The position embeddings for an input of `height x width` pixels (`interpolate_pos_encoding`:
        bicubic, no antialiasing, scale factors `(n + 0.1) / grid`, whose output size is `n`)."""
        grid = math.isqrt(self.pos_embed.shape[1] - 1)
        rows, columns = height // self.patch_size, width // self.patch_size
        if rows == columns == grid:
            return self.pos_embed
        embed = self.pos_embed.float()
        patches = embed[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, mode="bicubic", antialias=False,
                                scale_factor=((rows + INTERPOLATE_OFFSET) / grid, (columns + INTERPOLATE_OFFSET) / grid))
        patches = patches.permute(0, 2, 3, 1).reshape(1, rows * columns, -1)
        return torch.cat([embed[:, :1], patches], dim=1).to(self.pos_embed.dtype)

    def forward(self, x):
        height, width = x.shape[-2:]
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embedding(height, width).to(tokens.dtype)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]


def config_from_state_dict(state_dict):
    """The `DinoVisionTransformer` kwargs that fit a DINOv2 state dict (heads are 64 wide)."""
    try:
        width = state_dict["cls_token"].shape[-1]
        depth = 1 + max(int(match.group(1)) for key in state_dict if (match := re.match(r"blocks\.(\d+)\.", key)))
        patch = state_dict["patch_embed.proj.weight"].shape[-1]
        grid = math.isqrt(state_dict["pos_embed"].shape[1] - 1)
        hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError, AttributeError, IndexError) as error:
        raise ValueError(f"not a DINOv2 ViT state dict ({type(error).__name__}: {error})") from None
    return dict(img_size=grid * patch, patch_size=patch, in_chans=state_dict["patch_embed.proj.weight"].shape[1],
                width=width, depth=depth, num_heads=max(1, width // HEAD_WIDTH), mlp_ratio=hidden / width,
                layer_scale="blocks.0.ls1.gamma" in state_dict)


def read_weights(path):
    """A DINOv2 state dict from a `.pth` / `.pt` (torch.load with weights_only=True) or a
    `.safetensors` file; ValueError naming the file otherwise."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state_dict = read_safetensors(path)[0]
    else:
        state_dict = read_torch_file(path, what="DINOv2 weight file")
    if not isinstance(state_dict, dict) or "cls_token" not in state_dict:
        raise ValueError(f"{path}: not a DINOv2 state dict (no 'cls_token'); expected dinov2_vitl14_pretrain.pth "
                         f"({DINOV2_URL})")
    return state_dict


def load_dinov2(weights=DINOV2_URL):
    """Our `DinoVisionTransformer` with the weights at `weights` (a path, or a URL fetched once into
    `$CMT_CACHE/dinov2`; offline, `cmt.download.DownloadError` names the file and where to put it)."""
    state_dict = read_weights(fetch(weights, subdir="dinov2"))
    net = DinoVisionTransformer(**config_from_state_dict(state_dict))
    missing, unexpected = net.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights}: does not fit the DINOv2 ViT (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return net.eval().requires_grad_(False)


def to_uint8(images):
    """Images in [-1, 1] as EDM2's generated images: `x * 127.5 + 128` clipped to 0..255 and truncated
    (`training/encoders.py`, `StandardRGBEncoder.decode`); grayscale repeated to RGB."""
    pixels = (images.detach().float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return pixels.repeat(1, 3, 1, 1) if pixels.shape[1] == 1 else pixels


def preprocess(pixels):
    """uint8 RGB `[B, 3, H, W]` -> the network's input, as EDM2's `DINOv2Detector` (`resize_mode="torch"`)."""
    x = F.interpolate(pixels.float(), size=(RESOLUTION, RESOLUTION), mode="bicubic", antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).reshape(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).reshape(1, -1, 1, 1)
    return (x / 255 - mean) / std


class DINOv2Detector:
    """FD-DINOv2 features: `features(images in [-1, 1]) -> float64 numpy [N, 1024]`, in batches of
    `batch_size` (EDM2's default batch, calculate_metrics.py). `reference`: the data set's `(mu,
    sigma)`, when known (as `cmt.metrics.InceptionFID.reference`)."""

    def __init__(self, weights=DINOV2_URL, device="cpu", batch_size=64, reference=None, net=None):
        self.net = (net if net is not None else load_dinov2(weights)).to(device).eval().requires_grad_(False)
        self.device, self.batch_size, self.reference = device, batch_size, reference
        self.feature_dim = self.net.config["width"]

    @torch.no_grad()
    def features(self, images):
        parts = [self.net(preprocess(to_uint8(batch).to(self.device))).double().cpu().numpy()
                 for batch in images.split(self.batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, self.feature_dim))
