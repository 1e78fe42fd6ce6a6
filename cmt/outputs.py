"""How every command writes its files: one atomic write path, one file mode, one naming scheme for
files made during a run.

Every local file is written under a temporary name beside it and renamed into place (`atomic_path`):
a reader sees the old file or the new one, and a failed write (a full disk) leaves no temporary
behind and raises an OSError naming the file (`cmt.cli.common` prints it as one line, e.g. "no space
left on device: PATH"). Some writers create their files 0600 (`tempfile.mkstemp`, safetensors'
`save_file`); every output here gets the mode of a file made by `open()` under the process's umask
(usually 0644), so outputs can be shared like any other. (Shards on fsspec storage have their own
atomic writer, `cmt.formats.storage.write_atomic`: object stores rename by copying.)
"""
import contextlib
import os
import uuid
from pathlib import Path

import numpy as np
import torch

# Files made during a run carry the optimizer step in 7 digits: samples/step-0001000.png,
# snapshots/snapshot-0001000.safetensors (EDM2 writes its snapshots the same way).
STEP_DIGITS = 7


def step_file_name(prefix, step, suffix):
    """`step_file_name("snapshot", 1000, ".safetensors")` -> `snapshot-0001000.safetensors`."""
    return f"{prefix}-{int(step):0{STEP_DIGITS}d}{suffix}"


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def use_default_mode(path):
    """Give `path` the mode a new file gets from `open()`: 0666 minus the umask."""
    os.chmod(path, 0o666 & ~current_umask())
    return path


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside `path` (same suffix, so writers that infer a format from it work) to
    write to; when the block ends it replaces `path` with the default file mode. On any failure the
    temporary is removed, and an OSError without a file name gets `path` as its file name."""
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.partial{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield temporary
        with open(temporary, "rb+") as handle:   # on disk before the rename: a crash leaves old or new
            os.fsync(handle.fileno())
        use_default_mode(temporary)
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:
            raise OSError(error.errno, error.strerror or str(error), str(path)) from error
        raise


def write_npz(path, **arrays):
    """`np.savez(path, **arrays)`, atomically (`atomic_path`)."""
    with atomic_path(path) as temporary:
        np.savez(temporary, **arrays)
    return Path(path)


def write_text(path, text):
    """A text file, atomically (`atomic_path`)."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)
    return Path(path)


def write_torch(path, obj):
    """`torch.save(obj)` (read back with `torch.load(weights_only=True)`), atomically (`atomic_path`)."""
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        torch.save(obj, handle)
    return Path(path)
