"""The zarr layout of a shard: `shard-000000.zarr/`, one v3 group; every array is a single v3 shard
file (`shards=`) holding chunks of whole rows (trajectories), compressed with Blosc (`COMPRESSIONS`:
lz4 level 5 + byte shuffle by default, zstd level 5 + bit shuffle, the only choice of datasets built
before the option, or none; `SHUFFLES` for the shuffle filter, bit shuffle in every set that records
none). Decoded by `cmt.formats.zarr_direct`.
"""
import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.storage import MemoryStore

from cmt.formats.base import FIELDS, ShardFormat
from cmt.formats.zarr_direct import decode_zarr_direct

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


# Chunks of whole trajectories of about this size compress well and still decode one at a time.
CHUNK_BYTES = 1 << 18




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


def encode(arrays, attributes, compression=LEGACY_COMPRESSION, shuffle=LEGACY_SHUFFLE, fields=FIELDS,
                 rows_per_chunk=None):
    files = {}
    group = zarr.create_group(store=MemoryStore(files), attributes=attributes)
    codec = compressor(compression, shuffle)
    for name in fields:
        value = np.ascontiguousarray(arrays[name])
        chunks, shards = _chunking(value, rows_per_chunk)
        group.create_array(name, data=value, chunks=chunks, shards=shards, compressors=codec)
    return {key: buffer.to_bytes() for key, buffer in files.items()}


def decode(files, fields=FIELDS, buffers=None):
    return decode_zarr_direct(files, fields, buffers)


FORMAT = ShardFormat(name="zarr", extension=".zarr", encode=encode, decode=decode, fields=None,
                     compressions=COMPRESSIONS, by_field=True)
