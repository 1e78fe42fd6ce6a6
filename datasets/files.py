"""Users' own image data loaded whole into memory: an image folder, an `.npz` array, or an EDM/EDM2
dataset zip (for small sets and scripts; `resolve_data` streams users' paths instead, through
`cmt.datasets.images.ImageFiles`, whatever their size).

Every loader returns `(images [N, C, H, W] float32 in [-1, 1], labels [N] int64)` with label -1
where there is none. Grayscale sources give C = 1 and colour sources C = 3 (alpha is dropped).
"""

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
NPZ_IMAGE_KEYS = ("x", "images", "samples", "arr_0")
NPZ_LABEL_KEYS = ("labels", "y")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def _is_image_name(name):
    return name.lower().endswith(IMAGE_SUFFIXES)


def _resize_pil(image, resolution):
    """Center-crop to a square, then Lanczos-resize to `resolution` (EDM's dataset tool does the same)."""
    width, height = image.size
    side = min(width, height)
    if (width, height) != (side, side):
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if side != resolution:
        image = image.resize((resolution, resolution), PIL.Image.Resampling.LANCZOS)
    return image


def _stack_images(images, names, source, resolution):
    """PIL images -> `[N, C, H, W]` in [-1, 1]; one colour mode and one size for all."""
    channels = 1 if all(image.mode in _GRAY_MODES for image in images) else 3
    arrays = []
    for image, name in zip(images, names):
        image = image.convert("L" if channels == 1 else "RGB")
        if resolution is not None:
            image = _resize_pil(image, resolution)
        array = np.asarray(image, dtype=np.uint8)
        if arrays and array.shape != arrays[0].shape:
            raise ValueError(
                f"{source}: images have different sizes ({names[0]} is {arrays[0].shape[1]}x{arrays[0].shape[0]}, "
                f"{name} is {array.shape[1]}x{array.shape[0]}); pass a resolution to resize them all"
            )
        arrays.append(array)
    pixels = torch.from_numpy(np.stack(arrays))
    pixels = pixels[:, None] if channels == 1 else pixels.permute(0, 3, 1, 2)
    return pixels.float() / 127.5 - 1


def _open_image(data, name, source):
    try:
        image = PIL.Image.open(data)
        image.load()
    except (OSError, PIL.UnidentifiedImageError) as error:
        raise ValueError(f"{source}: cannot read image {name}: {error}") from None
    return image


def load_image_folder(path, resolution=None):
    """Every png/jpg under `path` (recursively, sorted by relative path); no labels."""
    path = Path(path)
    files = sorted(file for file in path.rglob("*") if file.is_file() and _is_image_name(file.name))
    if not files:
        raise ValueError(f"{path}: folder has no images (accepted: {', '.join(IMAGE_SUFFIXES)}, searched recursively)")
    names = [str(file.relative_to(path)) for file in files]
    images = [_open_image(file, name, path) for file, name in zip(files, names)]
    x = _stack_images(images, names, path, resolution)
    return x, torch.full((len(x),), -1, dtype=torch.int64)


def load_edm_zip(path, resolution=None):
    """An EDM/EDM2 dataset zip: images plus an optional `dataset.json` of `{"labels": [[name, label], ...]}`."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path}: not a readable zip file ({error})") from None
    with archive:
        names = sorted(name for name in archive.namelist() if _is_image_name(name))
        if not names:
            raise ValueError(f"{path}: zip has no images (accepted: {', '.join(IMAGE_SUFFIXES)})")
        images = [_open_image(io.BytesIO(archive.read(name)), name, path) for name in names]
        labels_by_name = {}
        if "dataset.json" in archive.namelist():
            try:
                listed = json.loads(archive.read("dataset.json")).get("labels")
                labels_by_name = {str(name): int(label) for name, label in (listed or [])}
            except (ValueError, TypeError, AttributeError) as error:
                raise ValueError(
                    f'{path}: dataset.json must be {{"labels": [[file name, integer label], ...]}} or {{"labels": null}} ({error})'
                ) from None
    x = _stack_images(images, names, path, resolution)
    labels = torch.tensor([labels_by_name.get(name, -1) for name in names], dtype=torch.int64)
    return x, labels


def _images_from_array(array, path, key):
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4:
        raise ValueError(f"{path}: array {key!r} has shape {array.shape}; expected [N, C, H, W], [N, H, W, C] or [N, H, W]")
    if array.shape[1] not in (1, 3) and array.shape[-1] in (1, 3):
        array = array.transpose(0, 3, 1, 2)
    if array.shape[1] not in (1, 3):
        raise ValueError(f"{path}: array {key!r} has shape {array.shape}; expected 1 or 3 channels (NCHW or NHWC)")
    if array.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(array)).float() / 127.5 - 1
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{path}: array {key!r} has dtype {array.dtype}; expected uint8 (0-255) or float in [-1, 1]")
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    low, high = float(x.min()), float(x.max())   # NaN if any is NaN
    if not (np.isfinite(low) and np.isfinite(high)):
        first = int(torch.nonzero(~torch.isfinite(x.flatten(1)).all(dim=1))[0])
        raise ValueError(f"{path}: float array {key!r} holds NaN or inf (image {first} first); expected values in "
                         "[-1, 1]")
    if low < -1.01 or high > 1.01:
        raise ValueError(f"{path}: float array {key!r} has values in [{low:.3g}, {high:.3g}]; expected [-1, 1] (or store uint8)")
    return x.clamp(-1, 1)


def _labels_from_array(array, path, key, count):
    if array.ndim == 2:
        array = array.argmax(axis=1)
    whole = np.issubdtype(array.dtype, np.integer) or (np.issubdtype(array.dtype, np.floating) and np.all(array == np.round(array)))
    if array.shape != (count,) or not whole:
        raise ValueError(f"{path}: {key!r} must hold {count} integer labels (or one-hot rows); got shape {array.shape}, dtype {array.dtype}")
    return torch.from_numpy(array.astype(np.int64))


def read_npz(path):
    """Every array of an .npz file, never unpickling (object arrays are refused); a file that is not
    an .npz is a ValueError naming it (and never suggesting allow_pickle=True)."""
    try:
        with np.load(path, allow_pickle=False) as contents:
            if not hasattr(contents, "files"):
                raise ValueError("a single .npy array, not an .npz archive")
            return {key: contents[key] for key in contents.files}
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path}: not a readable .npz file ({error})") from None
    except ValueError as error:
        detail = ("it is not an .npz archive, or holds pickled Python objects, which are refused (their "
                  "unpickling could run code)") if "pickle" in str(error) else str(error)
        raise ValueError(f"{path}: not a readable .npz file: {detail}") from None


def load_npz(path, resolution=None):
    """Images under key x / images / samples / arr_0 (NCHW or NHWC, uint8 or float in [-1, 1]),
    labels under `labels` / `y` (integers or one-hot), if present."""
    path = Path(path)
    arrays = read_npz(path)
    image_key = next((key for key in NPZ_IMAGE_KEYS if key in arrays), None)
    if image_key is None:
        raise ValueError(f"{path}: no image array; found keys {sorted(arrays)}, accepted: {', '.join(NPZ_IMAGE_KEYS)}")
    x = _images_from_array(arrays[image_key], path, image_key)
    if len(x) == 0:
        raise ValueError(f"{path}: array {image_key!r} is empty")
    if resolution is not None and x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False).clamp(-1, 1)
    label_key = next((key for key in NPZ_LABEL_KEYS if key in arrays), None)
    if label_key is None:
        return x, torch.full((len(x),), -1, dtype=torch.int64)
    return x, _labels_from_array(arrays[label_key], path, label_key, len(x))
