"""2-D toy distributions for quick experiments and tests.

Every distribution is centered and scaled by one isotropic factor so that the variance per
coordinate, averaged over the two coordinates, is `sigma_data ** 2 = 0.25` (std about 0.5, EDM's
`sigma_data`). The mean and the scale come from a fixed calibration sample of 2**18 points, so the
shapes keep their aspect ratio (two moons: std about 0.6 across and 0.35 along y).
"""

import functools
import math

import torch

from cmt.edm import SIGMA_DATA

REFERENCE_SEED = 20250929
REFERENCE_SIZE = 4096


def _checkerboard(n, generator):
    # 4 x 4 board on [-2, 2]^2 with every other square filled; each coordinate is uniform.
    x = torch.rand(n, generator=generator) * 4 - 2
    row = torch.randint(0, 2, (n,), generator=generator) * 2
    y = torch.rand(n, generator=generator) - row + torch.floor(x) % 2
    return torch.stack([x, y], dim=1)


def _gaussians(n, generator):
    centers = torch.arange(8) * (2 * math.pi / 8)
    k = torch.randint(0, 8, (n,), generator=generator)
    mean = torch.stack([torch.cos(centers[k]), torch.sin(centers[k])], dim=1) * 4
    return mean + 0.5 * torch.randn(n, 2, generator=generator)


def _moons(n, generator):
    angle = torch.rand(n, generator=generator) * math.pi
    upper = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    lower = torch.stack([1 - torch.cos(angle), 0.5 - torch.sin(angle)], dim=1)
    which = torch.rand(n, 1, generator=generator) < 0.5
    return torch.where(which, upper, lower) + 0.05 * torch.randn(n, 2, generator=generator)


def _swissroll(n, generator):
    turn = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator))
    spiral = torch.stack([turn * torch.cos(turn), turn * torch.sin(turn)], dim=1)
    return spiral + 0.5 * torch.randn(n, 2, generator=generator)


def _rings(n, generator):
    radius = torch.randint(1, 5, (n,), generator=generator).float()
    angle = torch.rand(n, generator=generator) * 2 * math.pi
    circle = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1) * radius[:, None]
    return circle + 0.08 * torch.randn(n, 2, generator=generator)


_RAW = {
    "checkerboard": _checkerboard,
    "8gaussians": _gaussians,
    "moons": _moons,
    "swissroll": _swissroll,
    "rings": _rings,
}
TOY_NAMES = tuple(_RAW)


def _check_name(name):
    if name not in _RAW:
        raise ValueError(f"unknown toy distribution {name!r}; accepted: {', '.join(TOY_NAMES)}")


@functools.cache
def _standardization(name):
    calibration = _RAW[name](2**18, torch.Generator().manual_seed(0)).double()
    mean = calibration.mean(dim=0)
    scale = SIGMA_DATA / calibration.var(dim=0).mean().sqrt()
    return mean.float(), float(scale)


def sample_toy(name, n, generator=None):
    """`n` fresh points `[n, 2]` float32 from the toy distribution `name`."""
    _check_name(name)
    mean, scale = _standardization(name)
    return ((_RAW[name](n, generator) - mean) * scale).float()


@functools.cache
def _reference(name, n):
    return sample_toy(name, n, torch.Generator().manual_seed(REFERENCE_SEED))


def reference_sample(name, n=REFERENCE_SIZE):
    """A fixed sample `[n, 2]` (same seed on every call) that metrics compare against."""
    _check_name(name)
    return _reference(name, n).clone()
