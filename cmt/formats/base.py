"""What every shard format provides (`ShardFormat`) and the arrays of a trajectory shard (`FIELDS`)."""
import dataclasses
from typing import Callable, Optional

FIELDS = ("index", "seed", "label", "noise", "states", "sigmas", "endpoint")


@dataclasses.dataclass(frozen=True)
class ShardFormat:
    """A shard layout. name: what `cmt-build --format` and the manifest call it; extension: of a
    shard's name (`shard-000000{extension}`).
    encode: `(arrays, attributes, compression, shuffle, fields, rows_per_chunk) -> {relative path: bytes}`
        (a one-file shard has the single key "").
    decode: `(files, fields, buffers) -> {field: array}` (buffers: a `ShardBuffers` to decode into, or None).
    fields: the only field set it holds (None: any, e.g. a latent set's).
    compressions: the codecs `cmt-build --compression` may choose for it (empty: its own, fixed).
    by_field: a shard is a file (or files) per field, so a reader can read the files of some fields
        only, into reused memory (`ShardBuffers`)."""
    name: str
    extension: str
    encode: Callable
    decode: Callable
    fields: Optional[tuple] = None
    compressions: tuple = ()
    by_field: bool = False
