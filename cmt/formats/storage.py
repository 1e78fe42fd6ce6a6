"""Where shards live and how they are written and read: local paths or any fsspec URL, each shard
written under a temporary name, fsync'ed and renamed into place (a reader never sees half a shard,
two processes never write the same file), and read back whole or by file, into reused memory
(`ShardBuffers`) for local files.
"""
import contextlib
import os
import uuid

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from cmt.errors import MissingDependency, ShardError
from cmt.outputs import naming


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
    with naming(path), _removed_on_failure(fs, temporary):
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


@contextlib.contextmanager
def _removed_on_failure(fs, temporary):
    try:
        yield
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
