"""The JSON files of a trajectory dataset, and opening one for reading.

    build-config.json   what determines the shards (teacher hash, solver, grid, seed, ...) and its
                        hash; written first, so a re-run with another configuration is refused
    shard-000000.json   sidecar of one finished shard: name, first index, count, sha256, bytes
    manifest.json       written last, once every shard is done: the whole description, with the
                        sidecars' entries under "shards"

A dataset is complete when its manifest exists; readers use nothing else. A latent set made by
cmt-encode (`cmt.builders.encode`) has the same files, its manifest says "dataset": "cmt-latents"
(`LatentManifest` opens it; `LATENT_FIELDS` are its shards' arrays).

One module of ~410 lines: the two kinds of manifest share their fields, checks and upgrades.
"""
import hashlib
import itertools
import json

import numpy as np

from cmt.errors import ArgumentError, FileFormatError
from cmt.latents import LATENT_DATASET
from cmt.formats import (FIELDS, LEGACY_COMPRESSION, LEGACY_SHUFFLE, SHARD_FORMATS, ShardError, checksum, decode_shard,
                         files_bytes, fingerprint, open_location, read_files, shard_format, write_atomic)

# manifest.json and build-config.json say what they are with "dataset" and "dataset_version"; the
# shards' storage format (zarr or wds, the --format option) is "format". Version 1 files called the
# storage format "layout" and themselves "format" / "format_version"; `upgrade_manifest` reads them.
DATASET_NAME = "cmt-trajectories"
DATASET_VERSION = 2
MANIFEST = "manifest.json"
BUILD_CONFIG = "build-config.json"


# How a reader checks shards (`TrajectoryDataset.read_files`): the sha256 at a process's first read,
# then on re-reads the sizes only ("once", the default: the "once per shard per process";
# shards are written once and never change in place), sizes and crc32c ("crc32c": any later
# change but one in 2^32 random corruptions, ~15% of an uncached read), or the sha256 every time.
VERIFY_MODES = ("once", "crc32c", "sha256")


def check_verify(verify):
    """The verify mode of `verify` (True: "once"; False: None); ArgumentError naming it otherwise."""
    if verify is True:
        return "once"
    if verify is False or verify is None:
        return None
    if verify not in VERIFY_MODES:
        raise ArgumentError("verify", f"one of {', '.join(VERIFY_MODES)} (or True / False), got {verify!r}")
    return verify


def canonical_json(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def config_hash(config):
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


def shards_fingerprint(entries):
    """The sha256 of the shard entries' names, checksums and counts: what a set holds, wherever it lies
    (a rebuilt or extended set has another)."""
    return config_hash([[entry["name"], entry["sha256"], entry["count"]] for entry in entries])


def write_json(fs, path, value):
    """Write JSON through a temporary name and a rename, so a reader sees the old file or the new one."""
    write_atomic(fs, path, {"": (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()})


def read_json(fs, path):
    """The JSON value of the file `path` on `fs`; FileFormatError naming the file if it is not JSON."""
    with fs.open(path, "rb") as file:
        data = file.read()
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FileFormatError(f"{path}: not valid JSON ({error})") from None


_NUMBER = (int, float)
_MANIFEST_FIELDS = {   # field: (accepted types, what it is), every one that a reader uses
    "format": (str, "the shard format"),
    "count": (int, "the number of trajectories"),
    "data_shape": (list, "the shape of one state, a list of positive integers"),
    "label_dim": (int, "the number of classes (0: none)"),
    "shards": (list, "the list of shard entries"),
    "kept_states": (list, "the grid indices of the stored states"),
    "kept_sigmas": (list, "the sigmas of the stored states"),
    "sigmas": (list, "the solver's sigma grid"),
    "sigma_max": (_NUMBER, "the largest sigma"),
    "sigma_min": (_NUMBER, "the smallest sigma"),
    "dtype": (str, "the stored dtype"),
    "teacher": (dict, "the teacher's identity"),
    "solver": (str, "the solver"),
    "nfe": (int, "denoiser calls per trajectory"),
    "grid": (str, "the sigma grid's name"),
    "seed": (int, "the trajectories' seed"),
}
_SHARD_FIELDS = {"name": str, "count": int, "sha256": str, "bytes": int}


def check_manifest(manifest, path):
    """A FileFormatError naming `path` and the field if the manifest lacks a field a reader uses or
    holds it with the wrong type (a hand-edited or foreign file), before anything reads it."""
    if not isinstance(manifest, dict):
        raise FileFormatError(f"{path}: expected a JSON object, found {type(manifest).__name__}")

    def wrong(field, expected, value):
        found = "missing" if value is None else f"{type(value).__name__} {json.dumps(value)[:60]}"
        return FileFormatError(f"{path}: field {field!r} must be {expected}; found {found}")

    for field, (types, expected) in _MANIFEST_FIELDS.items():
        value = manifest.get(field)
        if not isinstance(value, types) or isinstance(value, bool):
            raise wrong(field, expected, value)
    if manifest["format"] not in SHARD_FORMATS:
        raise wrong("format", f"the shard format ({', '.join(SHARD_FORMATS)})", manifest["format"])
    if not manifest["data_shape"] or not all(isinstance(n, int) and n > 0 for n in manifest["data_shape"]):
        raise wrong("data_shape", _MANIFEST_FIELDS["data_shape"][1], manifest["data_shape"])
    if len(manifest["kept_states"]) != len(manifest["kept_sigmas"]):
        raise FileFormatError(f"{path}: 'kept_states' and 'kept_sigmas' differ in length")
    for number, entry in enumerate(manifest["shards"]):
        for field, kind in _SHARD_FIELDS.items():
            value = entry.get(field) if isinstance(entry, dict) else None
            if not isinstance(value, kind) or isinstance(value, bool):
                raise wrong(f"shards[{number}].{field}", kind.__name__, value)
    if sum(entry["count"] for entry in manifest["shards"]) != manifest["count"]:
        raise FileFormatError(f"{path}: the shards hold {sum(e['count'] for e in manifest['shards'])} "
                              f"trajectories, field 'count' says {manifest['count']}")


def sidecar_name(shard_name):
    for layout in SHARD_FORMATS.values():
        if shard_name.endswith(layout.extension):
            return shard_name[: -len(layout.extension)] + ".json"
    raise ValueError(f"not a shard name: {shard_name}")


def upgrade_manifest(manifest):
    """A manifest (or build configuration) in today's field names: version 1's "format":
    "cmt-trajectories", "format_version": 1, "layout": "zarr" become "dataset", "dataset_version"
    and "format"; anything else is returned as it is."""
    if not isinstance(manifest, dict) or manifest.get("format") != DATASET_NAME or "dataset" in manifest:
        return manifest
    upgraded = {key: value for key, value in manifest.items() if key not in ("format", "format_version", "layout")}
    upgraded.update(dataset=DATASET_NAME, dataset_version=DATASET_VERSION if manifest.get("format_version") == 1
                    else manifest.get("format_version"), format=manifest.get("layout"))
    return upgraded


def dataset_compression(manifest):
    """The compression a manifest or build configuration records; `LEGACY_COMPRESSION` for one that
    names none (every dataset built before `--compression`), None for a format of fixed compression
    (WebDataset shards)."""
    if manifest.get("format") not in SHARD_FORMATS or not shard_format(manifest["format"]).compressions:
        return None
    return manifest.get("compression", LEGACY_COMPRESSION)


def dataset_shuffle(manifest):
    """The Blosc shuffle filter a manifest or build configuration records; `LEGACY_SHUFFLE` for one
    that names none (every dataset built before the field), None for uncompressed or WebDataset shards."""
    if dataset_compression(manifest) in (None, "none"):
        return None
    return manifest.get("shuffle", LEGACY_SHUFFLE)


class TrajectoryDataset:
    """A finished dataset: its manifest and checked access to its shards.

    max_trajectories: use only the trajectories with index < N (None: all); shards past N are left
    out and the last one is cut at N when read (`read_shard`), so subsets are prefixes by index.

    Integrity: the first read of a shard by this object (so by each reader process: a DataLoader
    worker has its own copy) checks the manifest's sha256 over all its files; later reads check
    what `verify` asks (`read_files`): by default the files' sizes only, which is what lets an
    uncached reader re-read every epoch at the cost of the read alone; "crc32c" adds each file's
    `cmt.formats.fingerprint` (see there for what it catches).
    """

    def __init__(self, url, max_trajectories=None):
        self.url = str(url)
        self.fs, self.root = open_location(self.url)
        manifest_path = f"{self.root}/{MANIFEST}"
        if not self.fs.exists(manifest_path):
            hint = (" (the build has not finished: re-run the same cmt-build command to complete it)"
                    if self.fs.exists(f"{self.root}/{BUILD_CONFIG}") else "")
            raise FileNotFoundError(f"{self.url}: no {MANIFEST}; not a finished cmt-build dataset{hint}")
        self.manifest = upgrade_manifest(read_json(self.fs, manifest_path))
        if not isinstance(self.manifest, dict) or (self.manifest.get("dataset") != DATASET_NAME
                                                   or self.manifest.get("dataset_version") != DATASET_VERSION):
            found = self.manifest if isinstance(self.manifest, dict) else {}
            raise FileFormatError(f"{manifest_path}: dataset {found.get('dataset')!r} version "
                                  f"{found.get('dataset_version')!r}; this reader reads {DATASET_NAME} 1 and "
                                  f"{DATASET_VERSION}")
        check_manifest(self.manifest, manifest_path)
        self.format = self.manifest["format"]
        self.compression = dataset_compression(self.manifest)
        self.shuffle = dataset_shuffle(self.manifest)
        self.shards = self.manifest["shards"]
        self.verified = {}   # shard name: {file: fingerprint} of the files whose sha256 matched
        self.finite = set()  # (shard name, array) found free of NaN and inf by this object
        self.max_trajectories = max_trajectories
        if max_trajectories is not None:
            if isinstance(max_trajectories, bool) or not isinstance(max_trajectories, int) or max_trajectories < 1:
                raise ValueError(f"max_trajectories must be a positive integer, got {max_trajectories!r}")
            firsts = itertools.accumulate((entry["count"] for entry in self.shards), initial=0)
            self.shards = [{**entry, "count": min(entry["count"], max_trajectories - first)}
                           for entry, first in zip(self.shards, firsts) if first < max_trajectories]

    def __len__(self):
        return sum(entry["count"] for entry in self.shards)

    def identity(self):
        """What identifies the trajectories used (a resumed run checks it, `cmt.trainers.identity`): the
        build's configuration hash, the count and a fingerprint of the shards (`max_trajectories`: of
        the prefix used); not where the set lies."""
        return {"kind": "trajectories", "config_hash": self.manifest.get("config_hash"), "count": len(self),
                "fingerprint": shards_fingerprint(self.shards)}

    def shard_path(self, entry):
        return f"{self.root}/{entry['name']}"

    def check_shards_present(self):
        """Every shard of the manifest exists with its recorded size (a listing, no reading): a
        deleted or truncated shard is a ShardError before training, not minutes into it."""
        for entry in self.shards:
            path = self.shard_path(entry)
            if not self.fs.exists(path):
                raise ShardError(f"shard {path} is missing (listed in {self.root}/{MANIFEST}; cmt-inspect "
                                 "--verify lists every fault)")
            size = self.fs.du(path) if self.fs.isdir(path) else self.fs.size(path)
            if size != entry["bytes"]:
                raise ShardError(f"shard {path} has {size} bytes, the manifest records {entry['bytes']}: it is "
                                 "truncated or was replaced (cmt-inspect --verify checks every checksum)")

    def read_files(self, entry, verify=True, fields=None, buffers=None):
        """The shard's files; ShardError naming it if missing or (with `verify`) its checksum differs.

        verify: one of `VERIFY_MODES` (True is "once"): the sha256 on this object's first read of the
        shard, and on later reads "once" checks the files' sizes, "crc32c" their sizes and crc32c
        (`cmt.formats.fingerprint`), "sha256" the sha256 again; False: nothing. fields: of a zarr
        shard already verified, read only the files of these arrays (None: all files). buffers: a
        `cmt.formats.ShardBuffers` to read a local zarr shard's chunk files into (see there)."""
        mode = check_verify(verify)
        path = self.shard_path(entry)
        by_field = shard_format(self.format).by_field
        buffers = buffers if by_field else None
        known = self.verified.get(entry["name"]) if mode in ("once", "crc32c") else None
        if known is not None and (mode == "once" or all(crc is not None for _, crc in known.values())):
            keys = None if fields is None or not by_field else \
                [key for key in known if key.split("/", 1)[0] in fields or key == "zarr.json"]
            files = read_files(self.fs, path, keys, buffers)
            def unchanged(key):
                data = files.get(key)
                return data is not None and (len(data) == known[key][0] if mode == "once"
                                             else fingerprint(data) == known[key])

            changed = sorted(key for key in (keys if keys is not None else known) if not unchanged(key))
            if changed or (keys is None and set(files) != set(known)):
                what = "size" if mode == "once" else "size or crc32c"
                raise ShardError(f"shard {path} is corrupt or truncated: {', '.join(changed) or 'its files'} changed "
                                 f"since its sha256 was verified by this process ({what} differs)")
            return files
        files = read_files(self.fs, path, buffers=buffers)
        if mode and checksum(files) != entry["sha256"]:
            raise ShardError(f"shard {path} is corrupt or truncated: sha256 {checksum(files)[:16]}... "
                             f"({files_bytes(files)} bytes), the manifest has {entry['sha256'][:16]}... "
                             f"({entry['bytes']} bytes)")
        if mode in ("once", "crc32c"):
            self.verified[entry["name"]] = {key: fingerprint(data) if mode == "crc32c" else (len(data), None)
                                            for key, data in files.items()}
        return files

    def read_shard(self, entry, verify=True, fields=FIELDS, buffers=None, check_finite=True):
        """The arrays `fields` of one shard (see `cmt.formats`), checked against the manifest
        (`verify` as in `read_files`) and for NaN / inf (`check_finite`; False for a caller that
        scans them itself, as `cmt-inspect --verify` does to list every one). Arrays may be read-only
        views of the files' bytes. buffers: a `cmt.formats.ShardBuffers` to read and decode into:
        the arrays then view it, valid until its next use."""
        path = self.shard_path(entry)
        fields = tuple(dict.fromkeys((*fields, "index")))   # the count check needs the indices
        files = self.read_files(entry, verify, fields=fields if set(fields) != set(FIELDS) else None,
                                buffers=buffers)
        try:
            arrays = decode_shard(files, self.format, fields, buffers)
        except Exception as error:
            raise ShardError(f"shard {path} cannot be decoded: {type(error).__name__}: {error}") from error
        if self.max_trajectories is not None and len(arrays["index"]) > entry["count"]:   # the cut last shard
            keep = arrays["index"] < self.max_trajectories
            arrays = {key: value if key == "sigmas" else value[keep] for key, value in arrays.items()}
        if len(arrays["index"]) != entry["count"]:
            raise ShardError(f"shard {path} holds {len(arrays['index'])} trajectories, the manifest says {entry['count']}")
        if check_finite:
            self._check_finite(entry, arrays)
        return arrays

    def _check_finite(self, entry, arrays):
        """ShardError naming the shard, the array and the trajectory if a float array holds NaN or inf
        (cmt-build never writes them: its checksums can match a shard written by other code). Once
        per shard and array per object, as the sha256: later reads are the same bytes (their sizes
        or fingerprints are checked). Cost: one pass over the arrays at the first read, about a
        fifth of the sha256's (float16: a bit test of the exponents, ~2 GB/s)."""
        for name, values in arrays.items():
            if (entry["name"], name) in self.finite or values.dtype.kind != "f":
                continue
            row = first_nonfinite_row(values)
            if row is not None:
                where = (f"sigma {row}" if name == "sigmas" else f"trajectory {int(arrays['index'][row])}"
                         if "index" in arrays else f"row {row}")
                raise ShardError(f"shard {self.shard_path(entry)}: its {name} hold NaN or inf ({where}), though "
                                 "its sha256 matches the manifest (cmt-build never writes them: it refuses a "
                                 "teacher's NaN); rebuild the dataset")
            self.finite.add((entry["name"], name))


# Values per chunk of the non-finite test: its temporaries stay small (a few MB).
_FINITE_CHUNK_VALUES = 1 << 21
# The exponent bits of IEEE float16 / 32 / 64: all ones is inf or NaN.
_EXPONENT_BITS = {2: (np.uint16, 0x7C00), 4: (np.uint32, 0x7F800000), 8: (np.uint64, 0x7FF0000000000000)}


def first_nonfinite_row(values):
    """The first row (index along axis 0) of a float array that holds NaN or inf, or None. The test
    reads the exponent bits (numpy's isfinite converts float16 first: 4x slower), in chunks of rows."""
    rows = np.ascontiguousarray(values).reshape(len(values), -1) if values.ndim else values.reshape(1, 1)
    unsigned, exponent = _EXPONENT_BITS.get(rows.dtype.itemsize, (None, None))
    step = max(1, _FINITE_CHUNK_VALUES // max(1, rows.shape[1]))
    for start in range(0, len(rows), step):
        chunk = rows[start:start + step]
        bad = (~np.isfinite(chunk) if unsigned is None else
               (chunk.view(unsigned) & unsigned(exponent)) == unsigned(exponent)).any(axis=1)
        if bad.any():
            return start + int(np.flatnonzero(bad)[0])
    return None


# ---- latent sets (cmt-encode) ------------------------------------------------------------------

LATENT_VERSION = 1
# A latent set's shard arrays: the item's index in the source set, its label (-1: none), and the
# VAE posterior's moments of the image (and of the image mirrored left-right, with flips).
LATENT_FIELDS = ("index", "label", "mean", "std")
LATENT_FLIP_FIELDS = ("mean_flip", "std_flip")
_LATENT_MANIFEST_FIELDS = {
    "format": (str, "the shard format (zarr)"),
    "count": (int, "the number of items"),
    "data_shape": (list, "the shape of one latent, [C, H, W]"),
    "label_dim": (int, "the number of classes (0: none)"),
    "dtype": (str, "the stored dtype of the moments"),
    "encoder": (dict, "the VAE and scaling record"),
    "flips": (bool, "whether the mirrored images' moments are stored too"),
    "source": (dict, "the encoded image set"),
    "shards": (list, "the list of shard entries"),
}


def latent_fields(flips):
    return LATENT_FIELDS + (LATENT_FLIP_FIELDS if flips else ())


class LatentManifest:
    """A finished latent set: its checked manifest (`.manifest`), its shards, `shard_path`."""

    def __init__(self, url):
        self.url = str(url)
        self.fs, self.root = open_location(self.url)
        path = f"{self.root}/{MANIFEST}"
        if not self.fs.exists(path):
            hint = (" (the encoding has not finished: re-run the same cmt-encode command to complete it)"
                    if self.fs.exists(f"{self.root}/{BUILD_CONFIG}") else "")
            raise FileFormatError(f"{self.url}: no {MANIFEST}; not a finished cmt-encode latent set{hint}")
        manifest = read_json(self.fs, path)
        if not isinstance(manifest, dict) or manifest.get("dataset") != LATENT_DATASET \
                or manifest.get("dataset_version") != LATENT_VERSION:
            found = manifest if isinstance(manifest, dict) else {}
            raise FileFormatError(f"{path}: dataset {found.get('dataset')!r} version {found.get('dataset_version')!r}; "
                                  f"a latent set is {LATENT_DATASET} version {LATENT_VERSION}")
        for field, (kind, expected) in _LATENT_MANIFEST_FIELDS.items():
            value = manifest.get(field)
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                found = "missing" if value is None else f"{type(value).__name__} {json.dumps(value)[:60]}"
                raise FileFormatError(f"{path}: field {field!r} must be {expected}; found {found}")
        if manifest["format"] != "zarr" or len(manifest["data_shape"]) != 3 or \
                not all(isinstance(n, int) and n > 0 for n in manifest["data_shape"]):
            raise FileFormatError(f"{path}: a latent set is zarr shards of [C, H, W] latents; found format "
                                  f"{manifest['format']!r}, data_shape {manifest['data_shape']}")
        encoder = manifest["encoder"]
        if not all(isinstance(encoder.get(key), list) and len(encoder[key]) == manifest["data_shape"][0]
                   for key in ("scale", "bias")):
            raise FileFormatError(f"{path}: field 'encoder' must hold a 'scale' and a 'bias' per latent channel")
        for number, entry in enumerate(manifest["shards"]):
            for field, kind in {**_SHARD_FIELDS, "first_index": int}.items():
                value = entry.get(field) if isinstance(entry, dict) else None
                if not isinstance(value, kind) or isinstance(value, bool):
                    raise FileFormatError(f"{path}: field 'shards[{number}].{field}' must be {kind.__name__}")
        if sum(entry["count"] for entry in manifest["shards"]) != manifest["count"]:
            raise FileFormatError(f"{path}: the shards hold {sum(e['count'] for e in manifest['shards'])} items, "
                                  f"field 'count' says {manifest['count']}")
        self.manifest, self.shards = manifest, manifest["shards"]
        self.fields = latent_fields(manifest["flips"])

    def shard_path(self, entry):
        return f"{self.root}/{entry['name']}"

    def check_shards_present(self):
        """Every shard exists with its recorded size (a listing, no reading): before training."""
        for entry in self.shards:
            path = self.shard_path(entry)
            if not self.fs.exists(path):
                raise ShardError(f"shard {path} is missing (listed in {self.root}/{MANIFEST})")
            size = self.fs.du(path)
            if size != entry["bytes"]:
                raise ShardError(f"shard {path} has {size} bytes, the manifest records {entry['bytes']}: it is "
                                 "truncated or was replaced (cmt-inspect --verify checks every checksum)")
