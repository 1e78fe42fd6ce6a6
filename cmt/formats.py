"""On-disk layouts of a trajectory dataset: one zarr v3 group or one WebDataset tar per shard.

A shard is encoded in memory into its files (`{relative path: bytes}`), checksummed, then written
under a temporary name in the dataset directory, fsync'ed and renamed into place, so a reader never
sees half a shard and two processes never write the same file. Both layouts hold the same arrays
(see the README, "Trajectory datasets"):

    index [n] int64, seed [n] uint64, label [n] int64 (-1 = none),
    noise [n, *shape], states [n, S, *shape], sigmas [S] float64, endpoint [n, *shape]

- zarr: `shard-000000.zarr/`, one group; every array is a single v3 shard file (`shards=`) holding
  chunks of whole trajectories, compressed with Blosc zstd + bit shuffle.
- wds: `shard-000000.tar.gz`, one sample per trajectory (`{index:09d}.states.npy`, ...), gzip'ed.

The checksum of a one-file shard is the sha256 of the file (what `sha256sum` prints); of a zarr
group, the sha256 over its files in sorted order (`path \\n size(8 bytes) content` each).
"""
import gzip
import hashlib
import io
import json
import os
import tarfile
import uuid

import fsspec
import numpy as np
import webdataset
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.codecs import BloscCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import MemoryStore

from cmt.errors import FileFormatError, MissingDependency

FORMATS = ("zarr", "wds")
EXTENSIONS = {"zarr": ".zarr", "wds": ".tar.gz"}
FIELDS = ("index", "seed", "label", "noise", "states", "sigmas", "endpoint")
COMPRESSOR = BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")
# Chunks of whole trajectories of about this size compress well and still decode one at a time.
CHUNK_BYTES = 1 << 18


class ShardError(FileFormatError):
    """A shard that is missing, truncated or corrupt; the message names it."""


def shard_name(shard, fmt):
    return f"shard-{shard:06d}{EXTENSIONS[fmt]}"


def open_location(url):
    """`(fs, root)` for a local path or any fsspec URL (`memory://`, `file://`, `s3://` ...)."""
    try:
        fs, root = fsspec.core.url_to_fs(str(url))
    except ImportError as error:
        protocol = str(url).split("://", 1)[0]
        extra = {"s3": " (pip install 'cmt[s3]', or pip install s3fs)"}.get(protocol, "")
        raise MissingDependency(f"{url}: the {protocol}:// protocol needs a package that is not installed{extra}: "
                                f"{error}") from None
    return fs, root.rstrip("/")


# ---- encoding ---------------------------------------------------------------------------------

def _chunking(value):
    """Chunks of whole trajectories (about CHUNK_BYTES) inside one v3 shard spanning the array."""
    if value.ndim == 1:
        return value.shape, None
    per_trajectory = value[0].nbytes
    count = max(1, min(value.shape[0], CHUNK_BYTES // max(per_trajectory, 1)))
    chunks = (count, *value.shape[1:])
    shards = (-(-value.shape[0] // count) * count, *value.shape[1:])
    return chunks, shards


def _encode_zarr(arrays, attributes):
    files = {}
    group = zarr.create_group(store=MemoryStore(files), attributes=attributes)
    for name in FIELDS:
        value = np.ascontiguousarray(arrays[name])
        chunks, shards = _chunking(value)
        group.create_array(name, data=value, chunks=chunks, shards=shards, compressors=COMPRESSOR)
    return {key: buffer.to_bytes() for key, buffer in files.items()}


def _encode_wds(arrays, attributes):
    stream = io.BytesIO()
    # Fixed mtime and owner: the same trajectories give byte-identical tars.
    with webdataset.TarWriter(stream, mtime=0, user="cmt", group="cmt") as writer:
        for row, index in enumerate(arrays["index"]):
            writer.write({
                "__key__": f"{int(index):09d}",
                "noise.npy": arrays["noise"][row],
                "states.npy": arrays["states"][row],
                "sigmas.npy": arrays["sigmas"],
                "endpoint.npy": arrays["endpoint"][row],
                "label.cls": int(arrays["label"][row]),
                "json": {"index": int(index), "seed": int(arrays["seed"][row]),
                         "label": int(arrays["label"][row]), **attributes},
            })
    return {"": gzip.compress(stream.getvalue(), compresslevel=1, mtime=0)}


def encode_shard(arrays, fmt, attributes=None):
    """The files `{relative path: bytes}` of one shard; a one-file shard has the single key ""."""
    missing = [name for name in FIELDS if name not in arrays]
    if missing:
        raise ValueError(f"shard arrays lack {missing}")
    encode = {"zarr": _encode_zarr, "wds": _encode_wds}[fmt]
    return encode(arrays, dict(attributes or {}))


def _decode_zarr(files):
    prototype = default_buffer_prototype().buffer
    store = MemoryStore({key: prototype.from_bytes(data) for key, data in files.items()}, read_only=True)
    group = zarr.open_group(store, mode="r")
    return {name: group[name][...] for name in FIELDS}


def _decode_wds(files):
    samples = {}
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(files[""])), mode="r:") as tar:
        for member in tar:
            key, field = member.name.split(".", 1)
            samples.setdefault(key, {})[field] = tar.extractfile(member).read()
    keys = sorted(samples)

    def stack(field):
        return np.stack([np.load(io.BytesIO(samples[key][field])) for key in keys])

    labels = [int(samples[key]["label.cls"]) for key in keys]
    indices = [int(key) for key in keys]
    seeds = [int(json.loads(samples[key]["json"])["seed"]) for key in keys]
    return {
        "index": np.array(indices, dtype=np.int64), "seed": np.array(seeds, dtype=np.uint64),
        "label": np.array(labels, dtype=np.int64), "noise": stack("noise.npy"),
        "states": stack("states.npy"), "sigmas": np.load(io.BytesIO(samples[keys[0]]["sigmas.npy"])),
        "endpoint": stack("endpoint.npy"),
    }


def decode_shard(files, fmt):
    """The arrays of a shard from its files (as `encode_shard` gives them)."""
    decode = {"zarr": _decode_zarr, "wds": _decode_wds}[fmt]
    return decode(files)


def checksum(files):
    if set(files) == {""}:
        return hashlib.sha256(files[""]).hexdigest()
    digest = hashlib.sha256()
    for key in sorted(files):
        digest.update(key.encode() + b"\n" + len(files[key]).to_bytes(8, "little"))
        digest.update(files[key])
    return digest.hexdigest()


# ---- files ------------------------------------------------------------------------------------

def _write_file(fs, path, data):
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    else:
        fs.pipe_file(path, data)


def _fsync_directory(fs, path):
    if isinstance(fs, LocalFileSystem):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _rename(fs, source, destination):
    if isinstance(fs, LocalFileSystem):
        os.replace(source, destination)  # atomic for a file, and for a directory onto a missing name
        _fsync_directory(fs, os.path.dirname(destination))
    elif fs.isdir(source):
        # Object stores have no directories to rename: copy each object, then remove the temporaries
        # (s3fs's recursive mv trips on the directory's own prefix). Readers wait for the manifest.
        for name in fs.find(source):
            fs.copy(name, destination + name[len(source):])
        fs.rm(source, recursive=True)
    else:
        fs.mv(source, destination)


def write_atomic(fs, path, files):
    """Write `files` as `path` (a file for the key "", else a directory): temporary name, fsync, rename."""
    temporary = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        if set(files) == {""}:
            _write_file(fs, temporary, files[""])
        else:
            for key, data in files.items():
                _write_file(fs, f"{temporary}/{key}", data)
            for directory in sorted({os.path.dirname(f"{temporary}/{key}") for key in files}, key=len, reverse=True):
                _fsync_directory(fs, directory)
        if fs.exists(path):  # an unverified leftover of an earlier run
            fs.rm(path, recursive=True)
        _rename(fs, temporary, path)
    except BaseException:
        if fs.exists(temporary):
            fs.rm(temporary, recursive=True)
        raise


def remove_temporaries(fs, path):
    """Remove what a killed writer of `path` left behind."""
    for leftover in fs.glob(f"{path}.tmp-*"):
        fs.rm(leftover, recursive=True)


def read_files(fs, path):
    """The files of a shard as written by `write_atomic`; ShardError if it is missing."""
    if not fs.exists(path):
        raise ShardError(f"shard {path} is missing")
    if not fs.isdir(path):
        return {"": fs.cat_file(path)}
    prefix = path.rstrip("/") + "/"
    return {name[len(prefix):]: fs.cat_file(name) for name in fs.find(path)}


def files_bytes(files):
    return sum(len(data) for data in files.values())
