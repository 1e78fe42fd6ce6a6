"""The checksums of a shard: the sha256 that ties its files to the manifest, and `fingerprint`, the
cheap check that bytes already verified once have not changed since.

The checksum of a one-file shard is the sha256 of the file (what `sha256sum` prints); of a zarr
group, the sha256 over its files in sorted order (`path \\n size(8 bytes) content` each).
"""
import hashlib
import os

import google_crc32c
import numpy as np


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
