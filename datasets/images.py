"""Users' image data sets, streamed: an EDM/EDM2 dataset zip, an image folder, or an `.npz` array.

`open_images(path, resolution=None)` returns an `ImageFiles`: a map-style torch Dataset that keeps
an index of its items (names, where each lies, labels; ~60 bytes an image) and decodes one item
when asked, so a process costs the same for 20 k or 1.28 M images, give or take the index.
Items stay uint8 `[C, H, W]` (a float `.npz` stays float32) until they are on the device; the
training loop maps uint8 to [-1, 1] there, as EDM2's `StandardRGBEncoder.encode_latents` does
(`x / 127.5 - 1`). `cmt.datasets.stream.BatchStream` draws training batches from it (ranks,
workers, pinned memory, prefetch, exact resume).

Layouts (EDM's `training/dataset.py` and EDM2's `dataset_tool.py`, NVlabs):
- zip: every png/jpg member, sorted by name; labels from `dataset.json`, `{"labels": [[name,
  label], ...]}` or `{"labels": null}` (images it does not list get label -1).
- folder: every png/jpg below it, sorted by relative path; labels from its `dataset.json`, else,
  when every image lies in a sub-folder and there are at least two, the sorted top-level folder
  names are the class ids (ImageNet's layout; EDM2's dataset_tool does the same, but also labels
  images at the root as a class of their own: a folder with images at its root is unlabelled here).
- `.npz`: the array under x / images / samples / arr_0 (NCHW, NHWC or NHW; uint8, or float in
  [-1, 1]), labels under labels / y. A stored (uncompressed, `np.savez`) array is memory-mapped; a
  compressed one (`np.savez_compressed`) cannot be read in parts and is loaded into memory whole.

What is checked when the set is opened, before any training (`scan`): every zip member's and file's
header is read without decoding pixels (a PNG's IHDR chunk; other formats through PIL's lazy
`Image.open` of the first 4 KiB), its size and colour compared with the first one's, and a stored
PNG's last 12 bytes must be its IEND chunk (a truncated file fails there). Cost: two small reads per
image (~10 us from the page cache: 2 s for 200 k images, see docs/benchmarks.md, "Image data"),
no pixel decoding. A float `.npz` is range-checked in one pass over its values (NaN and inf
refused; decoded PNG / JPEG pixels are uint8, finite by construction). Without
`resolution`, every image must have the first one's size and colour (grayscale or colour); with
it, each is center-cropped to a square and resized (`resize`), and a set holding any colour image
is read as RGB (grayscale images converted), as EDM2's dataset_tool converts everything to RGB.
Damage the scan cannot see (a corrupt zip member: its CRC-32 is checked at every read; a PNG whose
data does not decode) is a `FileFormatError` naming the file and member when the item is read,
also inside a DataLoader worker (`__getitems__` hands the message back; the stream raises it).

One module of ~410 lines: the three layouts share one index, one decoder and one error path.
"""
import hashlib
import io
import json
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from cmt.errors import FileFormatError
from .archive import FolderFiles, ZipMembers
from .mapstyle import MapStyleSet
from .files import IMAGE_SUFFIXES, NPZ_IMAGE_KEYS, NPZ_LABEL_KEYS, _GRAY_MODES

# How images of another size are brought to `resolution`: EDM's dataset tool's center-crop (square
# crop, Lanczos), or ADM's (guided-diffusion image_datasets.py center_crop_arr: halve with a box
# filter while the short side is >= 2x the target, bicubic to the target, center crop), which
# EDM2's `--transform=center-crop-dhariwal` and MeanFlow's ImageNet pipeline use.
RESIZES = ("center-crop", "adm")
LABELS_FILE = "dataset.json"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HEAD_BYTES = 4096
_LABEL_PAIR = re.compile(rb'\[\s*"((?:[^"\\]|\\.)*)"\s*,\s*(-?\d+)\s*\]')


def resize_image(image, resolution, resize="center-crop"):
    """A PIL image brought to `resolution` x `resolution` (see `RESIZES`)."""
    if image.size == (resolution, resolution):
        return image
    if resize == "adm":
        while min(image.size) >= 2 * resolution:
            image = image.resize(tuple(side // 2 for side in image.size), resample=PIL.Image.Resampling.BOX)
        scale = resolution / min(image.size)
        image = image.resize(tuple(round(side * scale) for side in image.size), resample=PIL.Image.Resampling.BICUBIC)
        left, top = (image.size[0] - resolution) // 2, (image.size[1] - resolution) // 2
        return image.crop((left, top, left + resolution, top + resolution))
    width, height = image.size
    side = min(width, height)
    if (width, height) != (side, side):
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    return image.resize((resolution, resolution), PIL.Image.Resampling.LANCZOS)


def _png_header(head):
    """`(width, height, grayscale)` from a PNG's IHDR chunk, or None for anything else."""
    if len(head) < 26 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return width, height, head[25] in (0, 4)   # colour types 0 (gray) and 4 (gray + alpha)


def _is_image(name):
    return name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("__MACOSX/")


def to_float(images):
    """A batch as the networks take it: uint8 0..255 -> float32 in [-1, 1] (floats as they are)."""
    return images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()


class ImageFiles(MapStyleSet):
    """A user's image set on disk: `dataset[i]` is `(image [C, H, W] uint8 (float32 for a float
    .npz), label)`; `__getitems__(keys)` decodes a batch (what `BatchStream`'s workers call).

    Attributes as `cmt.datasets.ImageData`'s: `name`, `kind` ("images"), `data_shape`, `label_dim`,
    `size`, and `sample`, `tensors`, `reference` (decoding what they return), `batches` (all of it,
    in order, a batch at a time: for statistics over the whole set). `encoder` is None (pixels).
    """

    kind = "images"
    encoder = None
    unlabelled = None   # why the set has no labels, when it has none (for the error that needs them)

    def __init__(self, path, resolution=None, resize="center-crop", name=None, scan=True):
        self.path = Path(path)
        self.name = str(name if name is not None else path)
        if resize not in RESIZES:
            raise ValueError(f"resize {resize!r} is not one of {', '.join(RESIZES)}")
        self.resolution, self.resize = resolution, resize
        self.files = self.array = None
        if self.path.suffix.lower() == ".npz":
            self._open_npz()
        else:
            if self.path.is_dir():
                self.files = FolderFiles(self.path, _is_image)
                where = f"{self.path}: folder has no images"
            else:
                self.files = ZipMembers(self.path, _is_image, extras=(LABELS_FILE,))
                where = f"{self.path}: zip has no images"
            if not len(self.files):
                raise FileFormatError(f"{where} (accepted: {', '.join(IMAGE_SUFFIXES)}, searched recursively)")
            self.labels = self._read_labels()
            self.dtype = np.uint8
            self.data_shape = self._scan() if scan else self._first_shape()
        self.size = len(self.labels)
        known = self.labels[self.labels >= 0]
        self.label_dim = int(known.max()) + 1 if len(known) else 0

    # ---- opening ------------------------------------------------------------------------------
    def _open_npz(self):
        try:
            members = ZipMembers(self.path, lambda name: name.endswith(".npy"))
        except FileFormatError as error:
            raise FileFormatError(f"{self.path}: not a readable .npz file ({error})") from None
        keys = {name[:-4]: index for index, name in enumerate(members.names)}
        key = next((key for key in NPZ_IMAGE_KEYS if key in keys), None)
        if key is None:
            raise FileFormatError(f"{self.path}: no image array; found keys {sorted(keys)}, accepted: "
                                  f"{', '.join(NPZ_IMAGE_KEYS)}")
        array = _npz_member(self.path, members, keys[key])
        self._npz_members = members.names.blob + members.size.tobytes() + members.crc.tobytes()
        if array.ndim == 3:
            array = array[:, None]
        if array.ndim != 4:
            raise FileFormatError(f"{self.path}: array {key!r} has shape {array.shape}; expected [N, C, H, W], "
                                  "[N, H, W, C] or [N, H, W]")
        self.channels_last = array.shape[1] not in (1, 3) and array.shape[-1] in (1, 3)
        shape = array.shape[1:] if not self.channels_last else (array.shape[3], *array.shape[1:3])
        if shape[0] not in (1, 3):
            raise FileFormatError(f"{self.path}: array {key!r} has shape {array.shape}; expected 1 or 3 channels "
                                  "(NCHW or NHWC)")
        if len(array) == 0:
            raise FileFormatError(f"{self.path}: array {key!r} is empty")
        if array.dtype != np.uint8:
            if not np.issubdtype(array.dtype, np.floating):
                raise FileFormatError(f"{self.path}: array {key!r} has dtype {array.dtype}; expected uint8 (0-255) "
                                      "or float in [-1, 1]")
            low, high = np.inf, -np.inf
            for start in range(0, len(array), 4096):   # one pass, a few MB at a time
                part = np.asarray(array[start:start + 4096])
                part_low, part_high = float(part.min()), float(part.max())   # NaN if any is NaN
                if not (np.isfinite(part_low) and np.isfinite(part_high)):
                    rows = ~np.isfinite(part.reshape(len(part), -1)).all(axis=1)
                    raise FileFormatError(f"{self.path}: float array {key!r} holds NaN or inf (image "
                                          f"{start + int(np.flatnonzero(rows)[0])} first); expected values in [-1, 1]")
                low, high = min(low, part_low), max(high, part_high)
            if low < -1.01 or high > 1.01:
                raise FileFormatError(f"{self.path}: float array {key!r} has values in [{low:.3g}, {high:.3g}]; "
                                      "expected [-1, 1] (or store uint8)")
        self.array, self.dtype = array, (np.uint8 if array.dtype == np.uint8 else np.float32)
        resolution = self.resolution
        self.data_shape = (shape[0], resolution, resolution) if resolution else tuple(shape)
        label_key = next((key for key in NPZ_LABEL_KEYS if key in keys), None)
        if label_key is None:
            self.labels = np.full(len(array), -1, np.int64)
            return
        labels = np.asarray(_npz_member(self.path, members, keys[label_key]))
        if labels.ndim == 2:
            labels = labels.argmax(axis=1)
        whole = np.issubdtype(labels.dtype, np.integer) or (np.issubdtype(labels.dtype, np.floating)
                                                            and np.all(labels == np.round(labels)))
        if labels.shape != (len(array),) or not whole:
            raise FileFormatError(f"{self.path}: {label_key!r} must hold {len(array)} integer labels (or one-hot "
                                  f"rows); got shape {labels.shape}, dtype {labels.dtype}")
        self.labels = labels.astype(np.int64)

    def _read_labels(self):
        count = len(self.files)
        raw = self.files.read_other(LABELS_FILE)
        if raw is not None:
            return self._labels_from_json(raw)
        labels = np.full(count, -1, np.int64)
        self.unlabelled = f"no {LABELS_FILE} in {self.path}"
        if isinstance(self.files, FolderFiles):
            self.unlabelled += " and no class sub-folders"
            tops = [name.split("/", 1)[0] if "/" in name else None for name in self.files.names]
            if None not in tops and len(set(tops)) > 1:   # one sub-folder per class: sorted names are the ids
                classes = {top: index for index, top in enumerate(sorted(set(tops)))}
                labels[:] = [classes[top] for top in tops]
        return labels

    def _labels_from_json(self, raw):
        """Labels in the sorted names' order from EDM's dataset.json, read pair by pair: a dict of
        1.28 M names (or json.loads' lists) would cost more memory than the whole index. Images it
        does not list get -1; a file that lists them in another order is looked up by name."""
        source = (f"{self.path}: member {LABELS_FILE}" if isinstance(self.files, ZipMembers)
                  else str(self.path / LABELS_FILE))
        expected = f'{source}: must be {{"labels": [[file name, integer label >= 0], ...]}} or {{"labels": null}}'
        count = len(self.files)
        labels = np.full(count, -1, np.int64)
        if re.fullmatch(rb'\s*\{\s*"labels"\s*:\s*null\s*\}\s*', raw):
            self.unlabelled = f'{source} says {{"labels": null}}'
            return labels
        opening = re.match(rb'\s*\{\s*"labels"\s*:\s*\[\s*', raw)
        if opening is None:
            raise FileFormatError(f"{expected} (it starts {raw[:40]!r})")
        end, position, first = opening.end(), 0, True
        for match in _LABEL_PAIR.finditer(raw, end):
            if raw[end:match.start()].strip() != (b"" if first else b","):
                break   # something other than [name, integer] pairs: refused below
            end, first = match.end(), False
            name = match.group(1)   # compared as UTF-8 bytes, which sort as the names do
            try:
                name = json.loads(b'"' + name + b'"').encode() if b"\\" in name else name
            except ValueError as error:
                raise FileFormatError(f"{expected} ({error})") from None
            if int(match.group(2)) < 0:
                raise FileFormatError(f"{expected} (label {match.group(2).decode()} of {name.decode()})")
            names = self.files.names
            while position < count and names.raw(position) < name:
                position += 1
            if position < count and names.raw(position) == name:
                labels[position] = int(match.group(2))
                position += 1
            else:   # listed out of the sorted order (or an image that is not there): look names up
                return self._labels_by_name(raw, expected)
        if not re.fullmatch(rb'\s*\]\s*\}\s*', raw[end:]):
            raise FileFormatError(f"{expected} (unexpected {raw[end:end + 40]!r})")
        return labels

    def _labels_by_name(self, raw, expected):
        try:
            by_name = {str(name): label for name, label in json.loads(raw)["labels"]}
        except (ValueError, TypeError, KeyError) as error:
            raise FileFormatError(f"{expected} ({error})") from None
        if any(not isinstance(label, int) or isinstance(label, bool) for label in by_name.values()):
            raise FileFormatError(f"{expected} (found a label that is not an integer)")
        labels = np.array([by_name.get(name, -1) for name in self.files.names], np.int64)
        if any(label < 0 for label in by_name.values()):
            raise FileFormatError(f"{expected} (found a negative label)")
        return labels

    def _header(self, index):
        """`(width, height, grayscale)` of an item from its header; truncation of a stored PNG found."""
        head, tail = self.files.probe(index, 64, 12)
        png = _png_header(head)
        if png is not None:
            if tail is not None and tail[4:8] != b"IEND":
                raise FileFormatError(f"{self.files.where(index)}: truncated PNG (it does not end with its IEND chunk)")
            return png
        for data in (self.files.head(index, _HEAD_BYTES), None):
            try:
                with PIL.Image.open(io.BytesIO(data if data is not None else self.files.read(index))) as image:
                    return image.size[0], image.size[1], image.mode in _GRAY_MODES
            except (OSError, SyntaxError, ValueError, PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError) \
                    as error:
                if data is None:
                    raise FileFormatError(f"{self.files.where(index)}: cannot read the image ({error})") from None
        raise AssertionError("unreachable")

    def _scan(self):
        """Every header read (see the module's docstring); the set's `[C, H, W]`."""
        width, height, gray = self._header(0)
        any_colour = not gray
        for index in range(1, len(self.files)):
            w, h, g = self._header(index)
            if self.resolution is None and (w, h) != (width, height):
                raise FileFormatError(
                    f"{self.files.where(index)}: images have different sizes (this one is {w}x{h}, "
                    f"{self.files.names[0]} is {width}x{height}); pass a resolution to center-crop and resize them all")
            if self.resolution is None and g != gray:
                what = {True: "grayscale", False: "colour"}
                raise FileFormatError(
                    f"{self.files.where(index)}: grayscale mixed with colour (this one is {what[g]}, "
                    f"{self.files.names[0]} is {what[gray]}); pass a resolution to read them all as RGB")
            any_colour |= not g
        side = self.resolution
        return (3 if any_colour else 1, side or height, side or width)

    def _first_shape(self):
        width, height, gray = self._header(0)
        side = self.resolution
        return (1 if gray else 3, side or height, side or width)

    # ---- reading ------------------------------------------------------------------------------
    def identity(self):
        """What identifies the set for a resumed run (`cmt.trainers.identity`): the item count and a
        fingerprint of the names, sizes (a zip's and an .npz's members also their CRC-32s, from the
        central directory) and labels; not where it lies. A folder costs one stat per image."""
        digest = hashlib.sha256()
        if self.files is None:
            digest.update(self._npz_members)
        else:
            digest.update(self.files.names.blob)
            if isinstance(self.files, ZipMembers):
                digest.update(self.files.size.tobytes() + self.files.crc.tobytes())
            else:
                digest.update(np.array([os.stat(self.files.path / name).st_size for name in self.files.names],
                                       np.int64).tobytes())
        digest.update(np.ascontiguousarray(self.labels, np.int64).tobytes())
        return {"kind": "images", "count": int(self.size), "fingerprint": digest.hexdigest()}

    def __len__(self):
        return self.size

    def where(self, index):
        return self.files.where(index) if self.files is not None else f"{self.path}: image {index}"

    def read(self, index, flip=False, out=None):
        """Item `index` as `[C, H, W]` (uint8, or float32 for a float .npz), mirrored left-right with
        `flip`, into `out` if given. Damage raises a FileFormatError naming the file (and member)."""
        channels, height, width = self.data_shape
        if out is None:
            out = np.empty(self.data_shape, self.dtype)
        if self.array is not None:
            item = np.asarray(self.array[index])
            item = item.transpose(2, 0, 1) if self.channels_last else item
            if item.shape[1:] != (height, width):
                item = self._resize_array(item)
        else:
            data = self.files.read(index)
            try:
                with PIL.Image.open(io.BytesIO(data)) as image:
                    image.load()
                    target = "L" if channels == 1 else "RGB"
                    converted = image if image.mode == target else image.convert(target)
                    if self.resolution is not None:
                        converted = resize_image(converted, self.resolution, self.resize)
                    pixels = np.asarray(converted)
            except (OSError, SyntaxError, ValueError, PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError) \
                    as error:
                raise FileFormatError(f"{self.where(index)}: cannot decode the image ({error})") from None
            if pixels.shape[:2] != (height, width):
                raise FileFormatError(f"{self.where(index)}: image is {pixels.shape[1]}x{pixels.shape[0]}, the set's "
                                      f"images are {width}x{height} (it changed since the set was opened?)")
            item = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        out[...] = item[:, :, ::-1] if flip else item
        return out

    def _resize_array(self, item):
        side = self.resolution
        if item.dtype == np.uint8:
            image = PIL.Image.fromarray(item[0] if item.shape[0] == 1 else item.transpose(1, 2, 0))
            resized = np.asarray(resize_image(image, side, self.resize))
            return resized[None] if resized.ndim == 2 else resized.transpose(2, 0, 1)
        tensor = torch.tensor(item, dtype=torch.float32)[None]
        return F.interpolate(tensor, size=(side, side), mode="bilinear", antialias=True,
                             align_corners=False).clamp(-1, 1)[0].numpy()

    def __getitem__(self, index):
        return self.read(index), int(self.labels[index])

    def __getitems__(self, keys):
        """A batch for rows of `keys` `[B, 2+]` (index, flip, ...): `{"data": [B, C, H, W], "label": [B]}`,
        or `{"error": message}` (a worker hands its error back as data: it then reaches the training
        process as the same one-line error, not as a worker's traceback)."""
        keys = np.asarray(keys, np.int64).reshape(len(keys), -1)
        try:
            batch = np.empty((len(keys), *self.data_shape), self.dtype)
            for row, key in enumerate(keys):
                self.read(int(key[0]), flip=len(key) > 1 and bool(key[1]), out=batch[row])
        except FileFormatError as error:
            return {"error": str(error)}
        return {"data": torch.from_numpy(batch), "label": torch.from_numpy(self.labels[keys[:, 0]])}

    # ---- what ImageData offers, decoded -------------------------------------------------------
    def as_float(self, data):
        return to_float(data)

    def __repr__(self):
        return (f"ImageFiles({self.name!r}, size={self.size}, data_shape={self.data_shape}, "
                f"label_dim={self.label_dim})")


def _npz_member(path, members, index):
    """The array of one .npz member: memory-mapped when stored, else read whole (never unpickling)."""
    try:
        if members.method[index] == 0:   # stored: the .npy bytes lie in the file as they are
            stream = io.BytesIO(members.head(index, 1 << 16))
            version = np.lib.format.read_magic(stream)
            reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version in reader:
                shape, fortran, dtype = reader[version](stream)
                if dtype.hasobject:
                    raise ValueError("pickle: an object array")
                return np.memmap(path, dtype=dtype, mode="r", offset=members.data_offset(index) + stream.tell(),
                                 shape=shape, order="F" if fortran else "C")
        return np.load(io.BytesIO(members.read(index)), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        detail = ("it holds pickled Python objects, which are refused (their unpickling could run code)"
                  if "pickle" in str(error) else str(error))
        raise FileFormatError(f"{path}: not a readable .npz file: {detail}") from None
