"""The JSON files of a trajectory dataset, and opening one for reading.

    build-config.json   what determines the shards (teacher hash, solver, grid, seed, ...) and its
                        hash; written first, so a re-run with another configuration is refused
    shard-000000.json   sidecar of one finished shard: name, first index, count, sha256, bytes
    manifest.json       written last, once every shard is done: the whole description, with the
                        sidecars' entries under "shards"

A dataset is complete when its manifest exists; readers use nothing else.
"""
import hashlib
import json

from cmt.formats import (EXTENSIONS, ShardError, checksum, decode_shard, files_bytes, open_location, read_files,
                         write_atomic)

FORMAT_NAME = "cmt-trajectories"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BUILD_CONFIG = "build-config.json"


def canonical_json(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def config_hash(config):
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


def write_json(fs, path, value):
    """Write JSON through a temporary name and a rename, so a reader sees the old file or the new one."""
    write_atomic(fs, path, {"": (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()})


def read_json(fs, path):
    with fs.open(path, "rb") as file:
        return json.loads(file.read())


def sidecar_name(shard_name):
    for extension in EXTENSIONS.values():
        if shard_name.endswith(extension):
            return shard_name[: -len(extension)] + ".json"
    raise ValueError(f"not a shard name: {shard_name}")


class TrajectoryDataset:
    """A finished dataset: its manifest and checked access to its shards."""

    def __init__(self, url):
        self.url = str(url)
        self.fs, self.root = open_location(self.url)
        manifest_path = f"{self.root}/{MANIFEST}"
        if not self.fs.exists(manifest_path):
            hint = (" (the build has not finished: re-run the same cmt-build command to complete it)"
                    if self.fs.exists(f"{self.root}/{BUILD_CONFIG}") else "")
            raise FileNotFoundError(f"{self.url}: no {MANIFEST}; not a finished cmt-build dataset{hint}")
        self.manifest = read_json(self.fs, manifest_path)
        if self.manifest.get("format") != FORMAT_NAME or self.manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{manifest_path}: format {self.manifest.get('format')!r} version "
                             f"{self.manifest.get('format_version')!r}; this reader reads {FORMAT_NAME} {FORMAT_VERSION}")
        self.format = self.manifest["layout"]
        self.shards = self.manifest["shards"]

    def __len__(self):
        return self.manifest["count"]

    def shard_path(self, entry):
        return f"{self.root}/{entry['name']}"

    def read_files(self, entry, verify=True):
        """The shard's files; ShardError naming it if missing or (with `verify`) its checksum differs."""
        path = self.shard_path(entry)
        files = read_files(self.fs, path)
        if verify and checksum(files) != entry["sha256"]:
            raise ShardError(f"shard {path} is corrupt or truncated: sha256 {checksum(files)[:16]}... "
                             f"({files_bytes(files)} bytes), the manifest has {entry['sha256'][:16]}... "
                             f"({entry['bytes']} bytes)")
        return files

    def read_shard(self, entry, verify=True):
        """The arrays of one shard (see `cmt.formats`), checked against the manifest."""
        path = self.shard_path(entry)
        files = self.read_files(entry, verify)
        try:
            arrays = decode_shard(files, self.format)
        except Exception as error:
            raise ShardError(f"shard {path} cannot be decoded: {type(error).__name__}: {error}") from error
        if len(arrays["index"]) != entry["count"]:
            raise ShardError(f"shard {path} holds {len(arrays['index'])} trajectories, the manifest says {entry['count']}")
        return arrays
