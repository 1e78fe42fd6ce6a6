"""How every command writes its files: one atomic write path, one file mode, one naming scheme for
files made during a run.

Every local file is written under a temporary name beside it and renamed into place (`atomic_path`):
a reader sees the old file or the new one, and a failed write (a full disk) leaves no temporary
behind and raises an OSError naming the file (`cmt.cli.common` prints it as one line, e.g. "no space
left on device: PATH"). Writers that hide the OSError are unwrapped: torch.save reports a failed
write as a RuntimeError ("unexpected pos ..."), safetensors as a SafetensorError ("... (os error
28)"); `write_torch` and `write_safetensors` raise the OSError instead. A file appended to (a run's
log.jsonl) names itself the same way (`naming`). Some writers create their files 0600
(`tempfile.mkstemp`, safetensors' `save_file`); every output here gets the mode of a file made by
`open()` under the process's umask (usually 0644), so outputs can be shared like any other. (Shards
on fsspec storage have their own atomic writer, `cmt.formats.storage.write_atomic`: object stores
rename by copying.)
"""
import contextlib
import errno
import os
import re
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

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
def naming(path):
    """Inside the block, an OSError without a file name (a full disk in the middle of a write) gets
    `path` as its file name, so the one line the commands print says which file."""
    try:
        yield
    except OSError as error:
        if error.filename is None and error.errno is not None:   # OSError() picks the subclass of the errno
            raise OSError(error.errno, error.strerror or os.strerror(error.errno), str(path)) from error
        raise


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside `path` (same suffix, so writers that infer a format from it work) to
    write to; when the block ends it replaces `path` with the default file mode. On any failure the
    temporary is removed, and an OSError without a file name gets `path` as its file name."""
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.partial{path.suffix}")
    with naming(path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            yield temporary
            with open(temporary, "rb+") as handle:   # on disk before the rename: a crash leaves old or new
                os.fsync(handle.fileno())
            use_default_mode(temporary)
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
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


class _WriteErrors:
    """A binary file for a writer that turns the file's OSError into its own exception (torch.save's
    zip writer: "unexpected pos"): `error` keeps the first OSError, which `write_torch` raises."""

    def __init__(self, handle):
        self.handle, self.error = handle, None

    def write(self, data):
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def __getattr__(self, name):
        return getattr(self.handle, name)


def write_torch(path, obj):
    """`torch.save(obj)` (read back with `torch.load(weights_only=True)`), atomically (`atomic_path`)."""
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        writer = _WriteErrors(handle)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise
    return Path(path)


def write_safetensors(path, tensors, metadata=None):
    """safetensors' `save_file`, atomically (`atomic_path`); its I/O errors (reported as a
    SafetensorError "... (os error N)") are raised as the OSError they are."""
    with atomic_path(path) as temporary:
        try:
            save_file(tensors, str(temporary), metadata=metadata)
        except SafetensorError as error:
            code = re.search(r"os error (\d+)", str(error))
            if code is None and "I/O error" not in str(error):
                raise
            number = int(code.group(1)) if code else errno.EIO
            raise OSError(number, os.strerror(number)) from error
    return Path(path)
