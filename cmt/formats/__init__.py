"""On-disk layouts of a trajectory dataset, as a table: one zarr v3 group (`zarr_layout`) or one
WebDataset tar (`wds_layout`) per shard. Each layout is one module with a `FORMAT`
(`base.ShardFormat`); `SHARD_FORMATS` lists them, one line each (docs/design.md, "How to add a shard
format"), and a name that is not there is refused, naming it.

A shard is encoded in memory into its files (`{relative path: bytes}`), checksummed (`checksums`),
then written under a temporary name in the dataset directory, fsync'ed and renamed into place
(`storage`), so a reader never sees half a shard and two processes never write the same file.
Both layouts hold the same arrays (see the README, "Trajectory datasets"):

    index [n] int64, seed [n] uint64, label [n] int64 (-1 = none),
    noise [n, *shape], states [n, S, *shape], sigmas [S] float64, endpoint [n, *shape]

Zarr shards are decoded by `zarr_direct.decode_zarr_direct`, a small reader of exactly the layout
`zarr_layout` writes (checked field by field, zarr's own API for anything else): see there for why.
"""
from cmt.errors import ShardError
from cmt.formats import wds_layout, zarr_layout
from cmt.formats.base import FIELDS, ShardFormat
from cmt.formats.checksums import checksum, crc32c, fingerprint
from cmt.formats.storage import (BUFFERED_FILE_BYTES, ShardBuffers, files_bytes, open_location, read_files,
                                 remove_temporaries, write_atomic)
from cmt.formats.zarr_direct import decode_zarr_direct
from cmt.formats.zarr_layout import (CHUNK_BYTES, COMPRESSIONS, DEFAULT_COMPRESSION, DEFAULT_SHUFFLE,
                                     LEGACY_COMPRESSION, LEGACY_SHUFFLE, SHUFFLES, compressor)

# The shard formats, one line each.
SHARD_FORMATS = {layout.FORMAT.name: layout.FORMAT for layout in (zarr_layout, wds_layout)}
FORMATS = tuple(SHARD_FORMATS)
EXTENSIONS = {name: layout.extension for name, layout in SHARD_FORMATS.items()}


def shard_format(name):
    """The `ShardFormat` called `name`; a ShardError naming it (and the known ones) otherwise."""
    if name not in SHARD_FORMATS:
        raise ShardError(f"unknown shard format {name!r}; known: {', '.join(SHARD_FORMATS)}")
    return SHARD_FORMATS[name]


def shard_name(shard, fmt):
    return f"shard-{shard:06d}{shard_format(fmt).extension}"


def encode_shard(arrays, fmt, attributes=None, compression=None, shuffle=None, fields=FIELDS, rows_per_chunk=None):
    """The files `{relative path: bytes}` of one shard; a one-file shard has the single key "".

    compression: zarr's codec (`COMPRESSIONS`; None: `LEGACY_COMPRESSION`, the bytes of earlier
    builds); shuffle: its Blosc filter (`SHUFFLES`; None: `LEGACY_SHUFFLE`, likewise); WebDataset
    shards are gzip'ed, always. fields: the arrays (a trajectory set's `FIELDS`, or a latent set's,
    zarr only); rows_per_chunk: rows per zarr chunk (None: about `CHUNK_BYTES`; a latent set reads
    one row at a time, so 1)."""
    layout = shard_format(fmt)
    missing = [name for name in fields if name not in arrays]
    if missing:
        raise ValueError(f"shard arrays lack {missing}")
    if layout.fields is not None and tuple(fields) != layout.fields:
        raise ValueError(f"{layout.name} shards hold the fields {', '.join(layout.fields)} only")
    return layout.encode(arrays, dict(attributes or {}), compression or LEGACY_COMPRESSION, shuffle or LEGACY_SHUFFLE,
                         tuple(fields), rows_per_chunk)


def decode_shard(files, fmt, fields=FIELDS, buffers=None):
    """The arrays `fields` of a shard from its files (as `encode_shard` gives them). buffers: a
    `ShardBuffers` for the decoded arrays (see there)."""
    return shard_format(fmt).decode(files, fields, buffers)


__all__ = ["BUFFERED_FILE_BYTES", "CHUNK_BYTES", "COMPRESSIONS", "DEFAULT_COMPRESSION", "DEFAULT_SHUFFLE",
           "EXTENSIONS", "FIELDS", "FORMATS", "LEGACY_COMPRESSION", "LEGACY_SHUFFLE", "SHARD_FORMATS", "SHUFFLES",
           "ShardBuffers", "ShardError", "ShardFormat", "checksum", "compressor", "crc32c", "decode_shard",
           "decode_zarr_direct", "encode_shard", "files_bytes", "fingerprint", "open_location", "read_files",
           "remove_temporaries", "shard_format", "shard_name", "write_atomic"]
