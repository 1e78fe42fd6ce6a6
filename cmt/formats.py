"""On-disk layouts of a trajectory dataset: one zarr v3 group or one WebDataset tar per shard.

A shard is encoded in memory into its files (`{relative path: bytes}`), checksummed, then written
under a temporary name in the dataset directory, fsync'ed and renamed into place, so a reader never
sees half a shard and two processes never write the same file. Both layouts hold the same arrays
(see the README, "Trajectory datasets"):

    index [n] int64, seed [n] uint64, label [n] int64 (-1 = none),
    noise [n, *shape], states [n, S, *shape], sigmas [S] float64, endpoint [n, *shape]

- zarr: `shard-000000.zarr/`, one group; every array is a single v3 shard file (`shards=`) holding
  chunks of whole trajectories, compressed with Blosc (`COMPRESSIONS`: lz4 level 5 + byte shuffle
  by default, zstd level 5 + bit shuffle, the only choice of datasets built before the option, or
  none; `SHUFFLES` for the shuffle filter, bit shuffle in every set that records none).
- wds: `shard-000000.tar.gz`, one sample per trajectory (`{index:09d}.states.npy`, ...), gzip'ed.

The checksum of a one-file shard is the sha256 of the file (what `sha256sum` prints); of a zarr
group, the sha256 over its files in sorted order (`path \\n size(8 bytes) content` each).
`fingerprint` is the cheap check of bytes already verified once (`cmt.manifest.TrajectoryDataset`).

Zarr shards are decoded by `decode_zarr_direct`, a small reader of exactly the layout `encode_shard`
writes (checked field by field, zarr's own API for anything else): see there for why.
"""
import gzip
import hashlib
import io
import json
import os
import tarfile
import uuid

import fsspec
import google_crc32c
import numcodecs
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
# Blosc codecs of zarr shards, by the name `cmt-build --compression` takes. Trajectory states are
# noise-like: zstd stores them in ~15% fewer bytes than lz4 and decodes several times slower; lz4 stores an
# incompressible block raw and still shrinks the compressible parts (flat image backgrounds, the
# float16 exponent bytes); docs/benchmarks.md, "Reader", has the figures.
COMPRESSIONS = ("lz4", "zstd", "none")
DEFAULT_COMPRESSION = "lz4"
# What a dataset whose manifest names no compression used (every one built before the option).
LEGACY_COMPRESSION = "zstd"
# Blosc's shuffle filter, by the name a manifest records. A new set takes its codec's default: lz4
# with the byte shuffle (the float16 high bytes, sign and exponent, end up together and compress;
# undoing it runs 2-5x faster than the bit shuffle: 20 against 3.9 GB/s on noise-like states, 6.1
# against 2.8 on MNIST trajectories, for 4% more bytes there; docs/benchmarks.md, "Reader"), zstd
# with the bit shuffle (its sets read as before, the same bytes and configuration hash).
SHUFFLES = ("shuffle", "bitshuffle", "noshuffle")
DEFAULT_SHUFFLE = {"lz4": "shuffle", "zstd": "bitshuffle", "none": None}
# What a dataset whose manifest names no shuffle used (every one built before the field, lz4 or zstd).
LEGACY_SHUFFLE = "bitshuffle"


def compressor(compression, shuffle=None):
    """zarr's Blosc codec for `compression` (None for "none") with the `shuffle` filter (None: the
    compression's `DEFAULT_SHUFFLE`)."""
    if compression == "none":
        return None
    return BloscCodec(cname=compression, clevel=5, shuffle=shuffle or DEFAULT_SHUFFLE[compression])


COMPRESSOR = compressor(LEGACY_COMPRESSION, LEGACY_SHUFFLE)
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

def _chunking(value, rows_per_chunk=None):
    """Chunks of whole trajectories (about CHUNK_BYTES, or `rows_per_chunk` rows) inside one v3
    shard spanning the array."""
    if value.ndim == 1:
        return value.shape, None
    per_trajectory = value[0].nbytes
    count = rows_per_chunk or CHUNK_BYTES // max(per_trajectory, 1)
    count = max(1, min(value.shape[0], count))
    chunks = (count, *value.shape[1:])
    shards = (-(-value.shape[0] // count) * count, *value.shape[1:])
    return chunks, shards


def _encode_zarr(arrays, attributes, compression=LEGACY_COMPRESSION, shuffle=LEGACY_SHUFFLE, fields=FIELDS,
                 rows_per_chunk=None):
    files = {}
    group = zarr.create_group(store=MemoryStore(files), attributes=attributes)
    codec = compressor(compression, shuffle)
    for name in fields:
        value = np.ascontiguousarray(arrays[name])
        chunks, shards = _chunking(value, rows_per_chunk)
        group.create_array(name, data=value, chunks=chunks, shards=shards, compressors=codec)
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


def encode_shard(arrays, fmt, attributes=None, compression=None, shuffle=None, fields=FIELDS, rows_per_chunk=None):
    """The files `{relative path: bytes}` of one shard; a one-file shard has the single key "".

    compression: zarr's codec (`COMPRESSIONS`; None: `LEGACY_COMPRESSION`, the bytes of earlier
    builds); shuffle: its Blosc filter (`SHUFFLES`; None: `LEGACY_SHUFFLE`, likewise); WebDataset
    shards are gzip'ed, always. fields: the arrays (a trajectory set's `FIELDS`, or a latent set's,
    zarr only); rows_per_chunk: rows per zarr chunk (None: about `CHUNK_BYTES`; a latent set reads
    one row at a time, so 1)."""
    missing = [name for name in fields if name not in arrays]
    if missing:
        raise ValueError(f"shard arrays lack {missing}")
    if fmt == "zarr":
        return _encode_zarr(arrays, dict(attributes or {}), compression or LEGACY_COMPRESSION,
                            shuffle or LEGACY_SHUFFLE, fields, rows_per_chunk)
    if tuple(fields) != FIELDS:
        raise ValueError("WebDataset shards hold trajectory sets only")
    return _encode_wds(arrays, dict(attributes or {}))


class ShardBuffers:
    """Memory reused from one shard read to the next: the files' bytes and the decoded arrays.

    Why: reading a file into a new bytes object, or decoding into a new array, writes pages the
    process has never touched, and the kernel's page faults then cost more than the copy itself
    (a 50 MiB file from the page cache: 2 GB/s into new memory, 14 GB/s into reused; see
    docs/benchmarks.md, "Reader"). What `read_files` / `decode_zarr_direct` return with these
    buffers are views of them, valid until the next read that uses the same ShardBuffers: the
    reader alternates two (the shard being cut, the one the prefetch thread reads)."""

    # Headroom on a buffer's first allocation and on growing it: the next shard's compressed file
    # is rarely the same size to the byte.
    SLACK = 1 / 16

    def __init__(self):
        self.buffers = {}

    def get(self, key, nbytes):
        """A writable uint8 array of `nbytes` bytes (a view of the buffer kept for `key`)."""
        buffer = self.buffers.get(key)
        if buffer is None or buffer.nbytes < nbytes:
            buffer = self.buffers[key] = np.empty(int(nbytes * (1 + self.SLACK)) + 64, np.uint8)
        return buffer[:nbytes]

    def array(self, key, shape, dtype):
        dtype = np.dtype(dtype)
        return self.get(key, int(np.prod(shape)) * dtype.itemsize).view(dtype).reshape(shape)

    @property
    def nbytes(self):
        return sum(buffer.nbytes for buffer in self.buffers.values())


def _decode_zarr_api(files, fields):
    prototype = default_buffer_prototype().buffer
    store = MemoryStore({key: prototype.from_bytes(data) for key, data in files.items()}, read_only=True)
    group = zarr.open_group(store, mode="r")
    return {name: group[name][...] for name in fields}


# The codec entries `_encode_zarr` writes, as zarr 3 spells them in zarr.json; `decode_zarr_direct`
# reads exactly these and hands anything else to zarr.
_BYTES_CODEC = {"name": "bytes", "configuration": {"endian": "little"}}
_INDEX_CODECS = [_BYTES_CODEC, {"name": "crc32c"}]
_NO_CHUNK = np.uint64(2**64 - 1)   # the sharding index's (offset, nbytes) of a chunk never written


class _Unexpected(Exception):
    """The zarr metadata is not the layout `_encode_zarr` writes: decode with zarr's API instead."""


def _inner_codec(codecs):
    """`(decode(data, out) or None for raw bytes)` of the codec chain `[bytes, blosc?]`."""
    if not codecs or codecs[0] != _BYTES_CODEC or len(codecs) > 2:
        raise _Unexpected
    if len(codecs) == 1:
        return None
    blosc = codecs[1]
    if blosc.get("name") != "blosc":
        raise _Unexpected
    codec = numcodecs.Blosc()   # decoding reads cname / shuffle / typesize from each block's header
    return lambda data, out: codec.decode(data, out=out)


def _fill(dtype, fill_value):
    if isinstance(fill_value, str) or fill_value is None:
        raise _Unexpected   # NaN / Infinity / hex spellings: zarr knows them
    return np.array(fill_value, dtype=dtype)


def _decode_zarr_array(meta, files, name, buffers=None):
    """One array of a shard written by `_encode_zarr`: chunks of whole rows along the first axis,
    either one plain chunk (1-D arrays) or one v3 shard file spanning the array. buffers: a
    `ShardBuffers` to decode a sharded (multi-dimensional) array into."""
    if (meta.get("zarr_format") != 3 or meta.get("node_type") != "array" or meta.get("storage_transformers")
            or meta.get("chunk_key_encoding") != {"name": "default", "configuration": {"separator": "/"}}
            or meta.get("chunk_grid", {}).get("name") != "regular"):
        raise _Unexpected
    try:
        dtype = np.dtype(meta["data_type"]).newbyteorder("<")
    except TypeError:
        raise _Unexpected from None
    if dtype.kind not in "iuf":
        raise _Unexpected
    shape = tuple(meta["shape"])
    outer = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
    fill = _fill(dtype, meta.get("fill_value"))
    codecs = meta.get("codecs") or []
    if len(shape) == 0 or len(outer) != len(shape) or outer[1:] != shape[1:] or outer[0] < shape[0]:
        raise _Unexpected   # more than one outer chunk: not our layout
    key = f"{name}/c/" + "/".join("0" for _ in shape)
    if len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed":
        config = codecs[0]["configuration"]
        inner = tuple(config["chunk_shape"])
        if (config.get("index_location", "end") != "end" or config.get("index_codecs") != _INDEX_CODECS
                or len(inner) != len(shape) or inner[1:] != shape[1:] or outer[0] % inner[0]):
            raise _Unexpected
        decode = _inner_codec(config.get("codecs"))
    else:
        inner = outer
        decode = _inner_codec(codecs)
        config = None
    rows = inner[0]
    count = outer[0] // rows
    chunk_bytes = int(np.prod(inner)) * dtype.itemsize
    data = files.get(key)
    if data is None:   # zarr writes no chunk that is all fill value
        return np.full(shape, fill, dtype)
    if config is None:
        spans = [(0, len(data))]
    else:
        index_bytes = 16 * count
        if len(data) < index_bytes + 4:
            raise _Unexpected
        index = data[-index_bytes - 4:-4]
        if google_crc32c.value(index) != int.from_bytes(bytes(data[-4:]), "little"):
            raise ValueError(f"{key}: the shard index fails its crc32c")
        spans = np.frombuffer(index, "<u8").reshape(count, 2)
    if decode is None and config is not None and np.array_equal(
            np.asarray(spans, dtype=np.uint64), np.stack([np.arange(count, dtype=np.uint64) * chunk_bytes,
                                                          np.full(count, chunk_bytes, np.uint64)], 1)):
        # Uncompressed chunks in order, end to end: the array is the file's bytes (read-only), no copy.
        return np.frombuffer(data, dtype, count=int(np.prod(outer)))[: int(np.prod(shape))].reshape(shape)
    if buffers is not None and config is not None:
        out = buffers.array(f"{name}/decoded", (count * rows, *shape[1:]), dtype)
    else:
        out = np.empty((count * rows, *shape[1:]), dtype)
    flat = out.reshape(-1).view(np.uint8)
    for chunk, (offset, nbytes) in enumerate(spans):
        target = flat[chunk * chunk_bytes:(chunk + 1) * chunk_bytes]
        if offset == _NO_CHUNK and nbytes == _NO_CHUNK:
            out[chunk * rows:(chunk + 1) * rows] = fill
            continue
        offset, nbytes = int(offset), int(nbytes)
        if offset + nbytes > len(data):
            raise ValueError(f"{key}: chunk {chunk} lies beyond the end of the file")
        piece = memoryview(data)[offset:offset + nbytes]
        if decode is None:
            if nbytes != chunk_bytes:
                raise ValueError(f"{key}: chunk {chunk} has {nbytes} bytes, not {chunk_bytes}")
            target[:] = np.frombuffer(piece, np.uint8)
        else:
            decode(piece, target)
    return out[: shape[0]]


def decode_zarr_direct(files, fields=FIELDS, buffers=None):
    """The arrays `fields` of a zarr shard written by `_encode_zarr`, decoded straight from the
    files: every chunk by numcodecs' Blosc into one numpy array per field, an uncompressed
    array as a view of its file's bytes. buffers: a `ShardBuffers` to decode the multi-dimensional
    arrays into (views of it then, valid until its next use), instead of new arrays.

    Written by hand because zarr's API (an asyncio pipeline with a store, a codec pipeline and
    per-chunk buffers) costs more than the decoding itself on whole-shard reads; what it reads is
    the documented v3 layout (zarr.json; a sharding_indexed file is its chunks followed by an index
    of (offset, nbytes) uint64 pairs and that index's crc32c, (2^64-1, 2^64-1) for a chunk never
    written; a missing chunk file is all fill value). Any metadata outside what `_encode_zarr`
    writes goes to zarr's API (`tests/test_shards.py` checks both agree, byte for byte)."""
    arrays, fallback = {}, []
    for name in fields:
        try:
            arrays[name] = _decode_zarr_array(json.loads(files[f"{name}/zarr.json"]), files, name, buffers)
        except (_Unexpected, KeyError, TypeError, AttributeError):
            fallback.append(name)
    if fallback:
        arrays.update(_decode_zarr_api(files, fallback))
    return {name: arrays[name] for name in fields}


def _decode_zarr(files, fields=FIELDS, buffers=None):
    return decode_zarr_direct(files, fields, buffers)


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


def decode_shard(files, fmt, fields=FIELDS, buffers=None):
    """The arrays `fields` of a shard from its files (as `encode_shard` gives them). buffers: a
    `ShardBuffers` for the decoded zarr arrays (see there)."""
    if fmt == "zarr":
        return _decode_zarr(files, fields, buffers)
    arrays = _decode_wds(files)
    return {name: arrays[name] for name in fields}


def _crc32c_library():
    """`crc32c_value(pointer, size)` of the Google CRC32C library that google_crc32c wraps, called
    through ctypes, or None where it cannot be found (then `google_crc32c.value` is used).

    Why by hand: google_crc32c releases the GIL only for a `bytes` object, and the reader's files are
    read into reused numpy buffers (`ShardBuffers`); holding the GIL there would stall the batches
    cut in the main thread while the prefetch thread checks the next shard. A ctypes call releases
    the GIL; it is the same function of the same library (`tests/test_shards.py` checks they agree)."""
    import ctypes
    import ctypes.util
    import glob
    here = os.path.dirname(google_crc32c.__file__)
    for path in [*sorted(glob.glob(os.path.join(here + ".libs", "libcrc32c*.so*"))), ctypes.util.find_library("crc32c")]:
        if not path:
            continue
        try:
            function = ctypes.CDLL(path).crc32c_value
        except (OSError, AttributeError):
            continue
        function.argtypes, function.restype = (ctypes.c_void_p, ctypes.c_size_t), ctypes.c_uint32
        return function
    return None


_CRC32C_VALUE = _crc32c_library()
# Below this size the GIL is not worth releasing (google_crc32c's own threshold).
_CRC32C_NOGIL_BYTES = 1 << 20


def crc32c(data):
    """The crc32c of bytes or a contiguous uint8 array, without holding the GIL on large arrays."""
    if isinstance(data, np.ndarray) and data.nbytes >= _CRC32C_NOGIL_BYTES and _CRC32C_VALUE is not None:
        if not data.flags.c_contiguous:
            data = np.ascontiguousarray(data)
        return int(_CRC32C_VALUE(data.ctypes.data, data.nbytes))
    return google_crc32c.value(data)


def fingerprint(data):
    """`(size, crc32c)` of a file's bytes: the check of bytes whose sha256 was verified before.

    Why it is enough on a re-read: the sha256 at the first read ties the bytes to the manifest;
    afterwards the question is only whether they changed since, and a changed size (truncation,
    a replaced file) or crc32c catches every change the sha256 would catch but one in 2^32 random
    corruptions: every burst of up to 32 flipped bits always, any truncation or extension always.
    What it does not catch is a deliberate edit that keeps the crc32c (a forged file between two
    reads of one process); the sha256 of the next process's first read does. crc32c runs at
    memory speed (a CPU instruction: ~11 GB/s here, sha256 ~1.7 GB/s)."""
    return len(data), crc32c(data)


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


def read_files(fs, path, keys=None, buffers=None):
    """The files of a shard as written by `write_atomic`; ShardError if it is missing.

    keys: read only these files of a zarr group (relative paths; those that do not exist are left
    out, as zarr leaves out a chunk of fill values), without listing it. buffers: a `ShardBuffers`
    to read a local shard's large files into (then uint8 arrays viewing it, not bytes)."""
    if keys is not None and fs.isdir(path):
        files = {}
        for key in keys:
            try:
                files[key] = _cat(fs, f"{path}/{key}", buffers, key)
            except FileNotFoundError:
                pass
        return files
    if not fs.exists(path):
        raise ShardError(f"shard {path} is missing")
    if not fs.isdir(path):
        return {"": _cat(fs, path, buffers, "")}
    prefix = path.rstrip("/") + "/"
    return {name[len(prefix):]: _cat(fs, name, buffers, name[len(prefix):]) for name in fs.find(path)}


# Files read into `ShardBuffers` from this size on (small ones gain nothing); metadata (zarr.json) never.
BUFFERED_FILE_BYTES = 1 << 16


def _cat(fs, path, buffers=None, key=None):
    if isinstance(fs, LocalFileSystem):   # one read into one buffer, without fsspec's layers
        # (Mapping the file instead measured slower: the gathers then take the page faults.)
        with open(path, "rb", buffering=0) as file:
            size = os.fstat(file.fileno()).st_size
            if buffers is None or size < BUFFERED_FILE_BYTES or key.endswith(".json"):
                return file.read()
            target, count = buffers.get(f"{key}/file", size), 0
            while count < size:   # one read(2) returns at most ~2 GiB
                got = file.readinto(target[count:])
                if not got:   # the file shrank since the stat: its size now differs from the recorded one
                    break
                count += got
            return target[:count]
    return fs.cat_file(path)


def files_bytes(files):
    return sum(len(data) for data in files.values())
