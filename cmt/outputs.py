"""How every command writes its files: one file mode, one naming scheme for files made during a run.

Files are written under a temporary name and renamed into place (a reader sees the old file or the
new one). Some writers create their files 0600 (`tempfile.mkstemp`, and safetensors' `save_file`,
which writes through a private temporary file); every output here then gets the mode of a file
made by `open()` under the process's umask (usually 0644), so outputs can be shared like any other.
"""
import os
from pathlib import Path

import numpy as np

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


def write_npz(path, **arrays):
    """`np.savez(path, **arrays)` through a temporary name and a rename, with the default file mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(partial, **arrays)
    use_default_mode(partial)
    os.replace(partial, path)
    return path
