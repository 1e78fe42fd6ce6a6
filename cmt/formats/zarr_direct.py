"""A small reader of exactly the zarr v3 layout `cmt.formats.zarr_layout` writes, straight into
numpy arrays (see `decode_zarr_direct` for why it is written by hand); anything else goes to zarr's
own API.
"""
import json

import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import MemoryStore

from cmt.formats.base import FIELDS


def _decode_zarr_api(files, fields):
    prototype = default_buffer_prototype().buffer
    store = MemoryStore({key: prototype.from_bytes(data) for key, data in files.items()}, read_only=True)
    group = zarr.open_group(store, mode="r")
    return {name: group[name][...] for name in fields}


# The codec entries `cmt.formats.zarr_layout.encode` writes, as zarr 3 spells them in zarr.json; `decode_zarr_direct`
# reads exactly these and hands anything else to zarr.
_BYTES_CODEC = {"name": "bytes", "configuration": {"endian": "little"}}
_INDEX_CODECS = [_BYTES_CODEC, {"name": "crc32c"}]
_NO_CHUNK = np.uint64(2**64 - 1)   # the sharding index's (offset, nbytes) of a chunk never written


class _Unexpected(Exception):
    """The zarr metadata is not the layout `cmt.formats.zarr_layout.encode` writes: decode with zarr's API instead."""


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
    """One array of a shard written by `cmt.formats.zarr_layout.encode`: chunks of whole rows along the first axis,
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
    """The arrays `fields` of a zarr shard written by `cmt.formats.zarr_layout.encode`, decoded straight from the
    files: every chunk by numcodecs' Blosc into one numpy array per field, an uncompressed
    array as a view of its file's bytes. buffers: a `ShardBuffers` to decode the multi-dimensional
    arrays into (views of it then, valid until its next use), instead of new arrays.

    Written by hand because zarr's API (an asyncio pipeline with a store, a codec pipeline and
    per-chunk buffers) costs more than the decoding itself on whole-shard reads; what it reads is
    the documented v3 layout (zarr.json; a sharding_indexed file is its chunks followed by an index
    of (offset, nbytes) uint64 pairs and that index's crc32c, (2^64-1, 2^64-1) for a chunk never
    written; a missing chunk file is all fill value). Any metadata outside what `cmt.formats.zarr_layout.encode`
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
