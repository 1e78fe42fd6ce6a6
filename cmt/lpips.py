"""LPIPS v0.1 (Zhang et al. 2018) with our own VGG16 / AlexNet trunks, so torchvision is not needed.

The trunks are laid out exactly as torchvision's `features` stacks, so torchvision's ImageNet files
(`vgg16-397923af.pth`, `alexnet-owt-7be5be79.pth`) load into them by name. The calibrated linear heads
come from the `lpips` package's weight files, read directly: importing `lpips` would import torchvision.

    d = LPIPS("vgg")(x0, x1)          # x0, x1: [B, C, H, W] in [-1, 1], C = 1 or 3; d: [B]

Small images: the trunks were trained on 224 x 224 ImageNet crops and their deepest taps shrink a
32 x 32 image to 2 x 2 (VGG) or 1 x 1 (AlexNet); AlexNet cannot take images under 31 pixels at all.
Consistency-model papers (CM, iCT, ECT) therefore upsample CIFAR-size images bilinearly to 224 before
LPIPS; `resize=224` does that. `resize=None` compares the images at their own size, as the `lpips`
package does.
"""

import functools
import importlib.util
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from cmt.download import DownloadError, fetch

TRUNK_URLS = {
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
}
# Indices in the `features` stack of the ReLUs whose outputs LPIPS compares (relu1_2 ... relu5_3 for
# VGG16, relu1 ... relu5 for AlexNet).
TAPS = {"vgg": (3, 8, 15, 22, 29), "alex": (1, 4, 7, 9, 11)}
# The smallest image side for which every tap still has at least one pixel.
MIN_SIZE = {"vgg": 16, "alex": 31}
# lpips v0.1's ScalingLayer: ImageNet mean / std rewritten for inputs in [-1, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10

VGG16_WIDTHS = (64, 64, "pool", 128, 128, "pool", 256, 256, 256, "pool", 512, 512, 512, "pool", 512, 512, 512, "pool")


def vgg16_features() -> nn.Sequential:
    layers, channels = [], 3
    for width in VGG16_WIDTHS:
        if width == "pool":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = width
    return nn.Sequential(*layers)


def alexnet_features() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )


FEATURES = {"vgg": vgg16_features, "alex": alexnet_features}


def _check_net(net: str) -> None:
    if net not in FEATURES:
        raise ValueError(f"LPIPS net must be one of {sorted(FEATURES)}, got {net!r}")


def trunk_weights_path(net: str) -> Path:
    """torchvision's ImageNet weights file for `net`: from the cmt cache (`$CMT_CACHE/lpips`), from
    torch hub's `checkpoints/` if torchvision already put it there, else downloaded into the cache."""
    _check_net(net)
    url = TRUNK_URLS[net]
    file_name = url.rsplit("/", 1)[-1]
    hub_checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    # torch hub names carry the first 8 hex digits of the file's sha256 (`vgg16-397923af.pth`).
    digest_prefix = file_name.rsplit("-", 1)[-1].split(".")[0]
    try:
        return fetch(url, subdir="lpips", sha256=digest_prefix, also_look_in=[hub_checkpoints])
    except DownloadError as error:
        raise DownloadError(f"LPIPS ({net}) needs torchvision's ImageNet weights {file_name}: {error}, "
                            "or pass trunk_weights=PATH") from error


def _read_weights(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS trunk weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def linear_heads_path(net: str) -> Path:
    """Where the installed `lpips` package keeps its v0.1 linear heads; the package is not imported."""
    _check_net(net)
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "LPIPS needs the calibrated linear heads shipped in the `lpips` package: "
            "pip install --no-deps lpips  (--no-deps keeps torchvision out)"
        )
    path = Path(spec.submodule_search_locations[0]) / "weights" / "v0.1" / f"{net}.pth"
    if not path.is_file():
        raise FileNotFoundError(f"the lpips package has no {path}; reinstall it: pip install --no-deps lpips")
    return path


def unit_channels(features: torch.Tensor) -> torch.Tensor:
    """Scale each pixel's feature vector to unit length (lpips' normalize_tensor)."""
    return features / (features.square().sum(dim=1, keepdim=True).sqrt() + EPS)


class LPIPS(nn.Module):
    """Frozen LPIPS distance; gradients flow to the inputs only, so it serves as a training loss.

    net: "vgg" or "alex". trunk_weights: None (`trunk_weights_path`: cache or download), a `.pth` or `.safetensors`
    path, or a state dict, torchvision-style (`features.0.weight`, ...; other keys are ignored).
    resize: None, or a side length the inputs are bilinearly resized to before the trunk.
    """

    def __init__(self, net: str = "vgg", trunk_weights=None, resize: int | None = None):
        super().__init__()
        _check_net(net)
        if resize is not None and resize < MIN_SIZE[net]:
            raise ValueError(f"LPIPS resize={resize} is below the {net} trunk's smallest input side {MIN_SIZE[net]}")
        self.net = net
        self.resize = resize
        self.taps = TAPS[net]
        self.features = FEATURES[net]()
        self._load_trunk(trunk_weights)
        widths = [self.features[index - 1].out_channels for index in self.taps]
        self.heads = nn.ModuleList(nn.Conv2d(width, 1, kernel_size=1, bias=False) for width in widths)
        heads = torch.load(linear_heads_path(net), map_location="cpu", weights_only=True)
        for k, head in enumerate(self.heads):
            head.weight.data.copy_(heads[f"lin{k}.model.1.weight"])
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def _load_trunk(self, trunk_weights) -> None:
        if trunk_weights is None:
            path = trunk_weights_path(self.net)
            source, state = str(path), _read_weights(path)
        elif isinstance(trunk_weights, Mapping):
            source, state = "the given state dict", trunk_weights
        else:
            source, state = str(trunk_weights), _read_weights(Path(trunk_weights))
        features = {name.removeprefix("features."): value for name, value in state.items() if name.startswith("features.")}
        try:
            self.features.load_state_dict(features)
        except RuntimeError as error:
            raise ValueError(f"LPIPS trunk weights from {source} do not fit torchvision's {self.net} `features`: {error}") from None

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS takes images [B, 1 or 3, H, W], got shape {tuple(images.shape)}")
        images = images.to(self.shift.dtype).expand(-1, 3, -1, -1)
        if self.resize is not None and images.shape[-2:] != (self.resize, self.resize):
            images = F.interpolate(images, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        if min(images.shape[-2:]) < MIN_SIZE[self.net]:
            raise ValueError(
                f"LPIPS ({self.net}) needs images of at least {MIN_SIZE[self.net]} pixels a side, got "
                f"{tuple(images.shape[-2:])}; pass resize=224 to upsample them"
            )
        return (images - self.shift) / self.scale

    def _tapped_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        tapped = []
        for index, layer in enumerate(self.features[: self.taps[-1] + 1]):
            images = layer(images)
            if index in self.taps:
                tapped.append(images)
        return tapped

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        if x0.shape != x1.shape:
            raise ValueError(f"LPIPS compares images of one shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
        # One trunk pass over both batches.
        tapped = self._tapped_features(self._prepare(torch.cat([x0, x1])))
        distance = 0.0
        for features, head in zip(tapped, self.heads):
            features0, features1 = unit_channels(features).chunk(2)
            distance = distance + head((features0 - features1).square()).mean(dim=(1, 2, 3))
        return distance


@functools.lru_cache(maxsize=None)
def cached_lpips(net: str, device: torch.device, resize: int | None) -> LPIPS:
    return LPIPS(net, resize=resize).to(device)


def lpips_distance(net: str = "vgg", resize: int | None = 224):
    """A distance `d(x, y) -> [B]` for training losses, backed by one LPIPS module per (net, device).

    The CPU module is built now, so missing weights fail before training starts.
    """
    cached_lpips(net, torch.device("cpu"), resize)

    def distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return cached_lpips(net, x.device, resize)(x, y)

    return distance
