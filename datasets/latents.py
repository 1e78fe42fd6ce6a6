"""A latent set made by cmt-encode, read one item at a time: `LatentSet(path)`.

Each shard stores, per image, the VAE posterior's moments (`mean`, `std`, and with flips the
mirrored image's `mean_flip`, `std_flip`) as zarr v3 arrays whose chunks are single rows inside one
shard file (`cmt.builders.encode`); an item is one `pread` of its row per array, found through the
shard file's index (the (offset, size) pairs at its end, crc32c-checked when first read by a
process). Nothing else is held but the labels and those indices, so a process costs the same for
any number of items. An item is a fresh draw from the posterior, `(mean + std * noise) * scale +
bias`, with noise seeded by its key (index, epoch, seed: `cmt.datasets.stream`), as EDM2's
`encode_latents` and MeanFlow's `LatentDist.sample` draw at every use; with stored flips, the key's
flip picks the mirrored moments (zhuyu-cs/MeanFlow `dataset.py`, flip_prob 0.5).

Checks: at open, the manifest's fields (`cmt.manifest.LatentManifest`) and that every shard exists
with its recorded size; each shard file's index crc32c at a process's first read, and each row's
size (and Blosc's own checks, when compressed) at every read; every batch drawn is free of NaN and
inf (an error naming the shard and item). The shards' sha256 are checked by
`cmt-inspect --verify` (reading every byte: not at every start of training).
"""
import json
import os

import google_crc32c
import numcodecs
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem

from cmt.errors import FileFormatError
from cmt.formats import ShardError, decode_zarr_direct, read_files
from cmt.latents import decode_latents, read_latent_record
from cmt.manifest import LatentManifest, shards_fingerprint
from .mapstyle import MapStyleSet


def is_latent_set(spec):
    """True for a `LatentSet` or the folder of a finished cmt-encode latent set."""
    return isinstance(spec, LatentSet) or (isinstance(spec, (str, os.PathLike)) and
                                           read_latent_record(spec) is not None)


class _Rows:
    """Rows of one array of one shard, as `cmt.builders.encode` writes them: a sharding_indexed zarr
    v3 array of one-row chunks (bytes codec, optionally Blosc), its index at the end of the file."""

    def __init__(self, fs, directory, name):
        self.fs, self.directory, self.name = fs, directory, name
        self.meta = None
        self._fd = self._pid = None

    def __getstate__(self):
        return {**self.__dict__, "_fd": None, "_pid": None}

    def _open(self):
        path = f"{self.directory}/{self.name}/zarr.json"
        try:
            meta = json.loads(self.fs.cat_file(path))
            config = meta["codecs"][0]["configuration"]
            shape, chunk = tuple(meta["shape"]), tuple(config["chunk_shape"])
            inner = [codec["name"] for codec in config["codecs"]]
            if (meta["codecs"][0]["name"] != "sharding_indexed" or chunk != (1, *shape[1:])
                    or config.get("index_location", "end") != "end" or inner[0] != "bytes"
                    or inner[1:] not in ([], ["blosc"])):
                raise ValueError("not one-row chunks in one shard file")
            self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
            raise ShardError(f"shard {self.directory}: array {self.name} is not a cmt-encode latent array ({error})") \
                from None
        self.shape, self.blosc = shape, numcodecs.Blosc() if len(inner) > 1 else None
        self.path = f"{self.directory}/{self.name}/c/" + "/".join("0" for _ in shape)
        size = self.fs.size(self.path)
        index_bytes = 16 * shape[0] + 4
        index = self._read(size - index_bytes, index_bytes)
        if len(index) != index_bytes or google_crc32c.value(index[:-4]) != int.from_bytes(index[-4:], "little"):
            raise ShardError(f"shard {self.directory}: the index of {self.name} fails its crc32c (corrupt or truncated)")
        self.index = np.frombuffer(index[:-4], "<u8").reshape(shape[0], 2).astype(np.int64)
        self.row_bytes = int(np.prod(shape[1:])) * self.dtype.itemsize
        self.meta = meta

    def _read(self, offset, count):
        if isinstance(self.fs, LocalFileSystem):
            if self._fd is None or self._pid != os.getpid():
                self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
            return os.pread(self._fd, count, offset)
        return self.fs.cat_file(self.path, start=offset, end=offset + count)

    def read(self, row):
        if self.meta is None:
            self._open()
        offset, count = self.index[row]
        data = self._read(int(offset), int(count))
        try:
            if len(data) != count:
                raise ValueError(f"{len(data)} of {count} bytes")
            raw = data if self.blosc is None else self.blosc.decode(data)
            if len(raw) != self.row_bytes:
                raise ValueError(f"{len(raw)} bytes, not {self.row_bytes}")
        except (ValueError, RuntimeError) as error:
            raise ShardError(f"shard {self.directory}: row {row} of {self.name} cannot be read ({error})") from None
        return np.frombuffer(raw, self.dtype).reshape(self.shape[1:])


class LatentSet(MapStyleSet):
    """A cmt-encode latent set: `dataset[i]` is `(latent [C, H, W] float32, label)`, the posterior's
    mean; `__getitems__(keys)` draws a batch (what `BatchStream` calls).

    Attributes as the other data sets': `name`, `kind` ("latents"), `data_shape` (the latents'),
    `label_dim`, `size`; `encoder`: the record of the VAE and scaling that decode its items
    (`cmt.latents.decode_latents`), `flips`: whether mirrored moments are stored, `source`: what was
    encoded. sample: draw from the posterior (EDM2's and MeanFlow's way); False: the mean only.
    """

    kind = "latents"

    def __init__(self, path, sample=True):
        try:
            self.store = LatentManifest(path)
            self.store.check_shards_present()
        except FileFormatError as error:
            raise FileFormatError(str(error)) from None
        manifest = self.store.manifest
        self.path, self.name = str(path), str(path)
        self.data_shape = tuple(manifest["data_shape"])
        self.encoder, self.flips, self.source = manifest["encoder"], manifest["flips"], manifest["source"]
        self.sample_posterior = bool(sample)
        self.firsts = np.array([entry["first_index"] for entry in self.store.shards], np.int64)
        self.labels = np.concatenate([self._labels(entry) for entry in self.store.shards])
        self.size = len(self.labels)
        self.label_dim = int(manifest["label_dim"])
        self.scale = np.asarray(self.encoder["scale"], np.float32).reshape(-1, 1, 1)
        self.bias = np.asarray(self.encoder["bias"], np.float32).reshape(-1, 1, 1)
        directories = [self.store.shard_path(entry) for entry in self.store.shards]
        self.rows = {field: [_Rows(self.store.fs, directory, field) for directory in directories]
                     for field in self.store.fields if field not in ("index", "label")}

    def _labels(self, entry):
        path = self.store.shard_path(entry)
        files = read_files(self.store.fs, path, keys=["label/zarr.json", "label/c/0"])
        try:
            labels = decode_zarr_direct(files, ("label",))["label"]
        except (KeyError, ValueError) as error:
            raise ShardError(f"shard {path}: its labels cannot be read ({error})") from None
        if len(labels) != entry["count"]:
            raise ShardError(f"shard {path} holds {len(labels)} labels, the manifest says {entry['count']}")
        return np.asarray(labels, np.int64)

    def identity(self):
        """What identifies the set for a resumed run: its encoding's configuration hash, the count and
        a fingerprint of its shards (`cmt.manifest.shards_fingerprint`), not where it lies."""
        return {"kind": "latents", "config_hash": self.store.manifest.get("config_hash"), "count": int(self.size),
                "fingerprint": shards_fingerprint(self.store.shards)}

    def __len__(self):
        return self.size

    def _shard_row(self, index):
        shard = int(np.searchsorted(self.firsts, index, side="right")) - 1
        return shard, index - int(self.firsts[shard])

    def _nonfinite(self, items, indices):
        """The error message for the first of `items` `[B, ...]` (of items `indices`) holding NaN or
        inf, naming its shard, or None. One pass over the batch as it is drawn (~1 ms for 256 latents
        of 4 x 32 x 32: well below their reads)."""
        bad = ~np.isfinite(items.reshape(len(items), -1)).all(axis=1)
        if not bad.any():
            return None
        index = int(indices[int(np.flatnonzero(bad)[0])])
        shard, row = self._shard_row(index)
        return (f"shard {self.store.shard_path(self.store.shards[shard])}: item {index} (row {row}) holds NaN or inf "
                "in its stored moments (mean / std); re-encode the set (cmt-encode)")

    def moments(self, index, flip=False):
        """`(mean, std)` of item `index` (of its mirrored image with `flip`), as stored."""
        shard, row = self._shard_row(index)
        suffix = "_flip" if flip else ""
        if flip and not self.flips:
            raise FileFormatError(f"{self.path}: holds no mirrored moments (encode it with flips to draw them)")
        return self.rows["mean" + suffix][shard].read(row), self.rows["std" + suffix][shard].read(row)

    def read(self, index, flip=False, epoch=0, seed=0, out=None):
        """Item `index`: a posterior draw seeded by (seed, epoch, index), or its mean."""
        mean, std = self.moments(index, flip)
        latent = mean.astype(np.float32)
        if self.sample_posterior:
            noise = np.random.default_rng([seed, epoch, index]).standard_normal(latent.shape, np.float32)
            latent = latent + std.astype(np.float32) * noise
        if out is None:
            out = np.empty(self.data_shape, np.float32)
        np.multiply(latent, self.scale, out=out)
        out += self.bias
        return out

    def __getitem__(self, index):
        item = self.read(index)
        message = self._nonfinite(item[None], [index])
        if message is not None:
            raise FileFormatError(message)
        return item, int(self.labels[index])

    def __getitems__(self, keys):
        keys = np.asarray(keys, np.int64).reshape(len(keys), -1)
        batch = np.empty((len(keys), *self.data_shape), np.float32)
        try:
            for row, key in enumerate(keys):
                flip, epoch, seed = (list(key[1:4]) + [0, 0, 0])[:3]
                self.read(int(key[0]), bool(flip), int(epoch), int(seed), out=batch[row])
        except FileFormatError as error:
            return {"error": str(error)}
        message = self._nonfinite(batch, keys[:, 0])
        if message is not None:
            return {"error": message}
        return {"data": torch.from_numpy(batch), "label": torch.from_numpy(self.labels[keys[:, 0]])}

    def decode(self, latents, vae=None, device="cpu"):
        """Images in [-1, 1] of latents through the recorded VAE (or `vae`, a directory or hub id)."""
        return decode_latents(latents, self.encoder, vae=vae, device=device)

    def __repr__(self):
        return f"LatentSet({self.name!r}, size={self.size}, data_shape={self.data_shape}, label_dim={self.label_dim})"
