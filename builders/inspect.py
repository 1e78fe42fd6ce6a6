"""Summarise, verify, preview and measure a trajectory dataset made by `build_trajectories` (cmt-build).

    inspect_trajectories("shards/")                     # {"summary": teacher, solver, grid, count, shapes, bytes}
    inspect_trajectories("shards/", verify=True)        # + every checksum, decode and NaN/inf scan
    inspect_trajectories("shards/", stats=True)         # + per state: mean / std against what its sigma predicts
    inspect_trajectories("shards/", preview="t.png")    # + a PNG: rows trajectories, columns states
    inspect_trajectories("shards/", preview="t.png", vae="stabilityai/sd-vae-ft-mse")  # latent sets: decoded
    inspect_trajectories("latents/")                    # a cmt-encode latent set: its summary (verify, preview too)

The `cmt-inspect` command prints the same report (or, with --json, the dict as JSON).
"""
import math
from pathlib import Path

import numpy as np
import torch

from cmt.edm import SIGMA_DATA
from cmt.errors import ArgumentError
from cmt.datasets.latents import LatentSet
from cmt.formats import ShardError, checksum, read_files
from cmt.images import READABLE_CELL, save_image_grid, save_scatter, save_trajectory_grid, sigma_label
from cmt.latents import EDM2_VAE, LatentCodec, decode_latents, read_latent_record
from cmt.manifest import BUILD_CONFIG, MANIFEST, LatentManifest, TrajectoryDataset, sidecar_name
from cmt.options import checked_keywords, document_keywords

ITEM_BYTES = {"float16": 2, "float32": 4}


# What each keyword of `inspect_trajectories` means: its docstring and cmt-inspect's help
# (`cmt.options.document_keywords`).
INSPECT_HELP = {
    "path": "A trajectory dataset (cmt-build) or latent set (cmt-encode): a directory or fsspec URL.",
    "verify": "Check every checksum, decode every shard and scan for NaN/inf; the command exits 1 on any fault.",
    "stats": "Per state mean and std against what its sigma predicts.",
    "preview": "Write a PNG of some trajectories (rows; a scatter for 2-D points).",
    "preview_count": "Trajectories (rows) in an image preview.",
    "vae": "Latent datasets (EDM2 img512 teachers): the diffusers AutoencoderKL that decodes the preview, a local "
           "directory or a hub id such as stabilityai/sd-vae-ft-mse.",
}


@document_keywords(INSPECT_HELP)
@checked_keywords
def inspect_trajectories(path, *, verify=False, stats=False, preview=None, preview_count=8, vae=None):
    """The report on the trajectory dataset (or cmt-encode latent set) at `path` as a dict.

    Always `{"summary": {...}}` (see `summary`); with `stats`, `"stats"`: per kept state its mean and
    std against the prediction; with `preview`, `"preview"`: the `Path` written (rows are
    trajectories of images, or a scatter of 2-D points); with `verify`, `"verify"`: `{"ok",
    "faults", "shards"}`.

    Raises `ArgumentError` naming `path` (not a finished dataset), `preview`, `preview_count` or
    `vae`; `cmt.formats.ShardError` when a shard that stats or preview reads is broken (verify
    collects those as faults instead).
    """
    if read_latent_record(path) is not None:
        return inspect_latents(path, verify=verify, stats=stats, preview=preview, preview_count=preview_count, vae=vae)
    try:
        dataset = TrajectoryDataset(path)
    except (FileNotFoundError, ValueError, KeyError) as error:
        raise ArgumentError("path", str(error)) from None
    if vae is not None and not preview:
        raise ArgumentError("preview", "the vae decodes the preview of a latent dataset; give a preview path "
                                       "(OUT.png) too")
    if preview_count < 1:
        raise ArgumentError("preview_count", f"must be >= 1, got {preview_count}")
    codec = latent_codec(dataset, vae) if preview else None
    report = {"summary": summary(dataset)}
    if stats:
        report["stats"] = state_statistics(dataset)
    if preview:
        report["preview"] = Path(save_preview(dataset, preview, count=preview_count, codec=codec))
    if verify:
        faults = find_faults(dataset)
        report["verify"] = {"ok": not faults, "faults": faults, "shards": len(dataset.shards)}
    return report


def summary(dataset):
    """What the dataset holds and how it is stored (the report's "summary"), from its manifest and file sizes."""
    manifest, fs = dataset.manifest, dataset.fs
    count, shape, kept = manifest["count"], manifest["data_shape"], manifest["kept_states"]
    stored_states = count * (len(kept) + 2)  # the kept states, the noise, the endpoint
    values = stored_states * math.prod(shape)
    files = [dataset.shard_path(entry) for entry in dataset.shards]
    files += [f"{dataset.root}/{name}" for name in (MANIFEST, BUILD_CONFIG)]
    files += [f"{dataset.root}/{sidecar_name(entry['name'])}" for entry in dataset.shards]
    on_disk = sum(fs.du(path) for path in files if fs.exists(path))
    teacher = manifest["teacher"]
    return {
        "path": dataset.url, "format": manifest["format"], "dataset_version": manifest["dataset_version"],
        "teacher": {key: teacher.get(key) for key in ("kind", "name", "path", "sha256", "preset") if teacher.get(key)}
        | {"architecture": teacher.get("config", {}).get("architecture")},
        "solver": manifest["solver"], "nfe": manifest["nfe"], "grid": manifest["grid"],
        "sigma_max": manifest["sigma_max"], "sigma_min": manifest["sigma_min"], "sigmas": manifest["sigmas"],
        "kept_states": kept, "kept_sigmas": manifest["kept_sigmas"],
        "count": count, "shards": len(dataset.shards), "seed": manifest["seed"], "labels": manifest["labels"],
        "label_dim": manifest["label_dim"],
        "shapes": {"noise": [count, *shape], "states": [count, len(kept), *shape], "sigmas": [len(kept)],
                   "endpoint": [count, *shape], "label": [count], "index": [count], "seed": [count]},
        "dtypes": {"noise": manifest["dtype"], "states": manifest["dtype"], "endpoint": manifest["dtype"],
                   "sigmas": "float64", "label": "int64", "index": "int64", "seed": "uint64"},
        "bytes_on_disk": on_disk,
        "bytes_per_stored_state": on_disk / stored_states,
        "compression_ratio": values * ITEM_BYTES[manifest["dtype"]] / on_disk,
        "size_vs_float16": on_disk / (values * 2),
        "teacher_eval": manifest.get("teacher_eval"),
    }


def find_faults(dataset):
    """Every fault found: unreadable shards, checksum or count mismatches, wrong indices, NaN/inf."""
    faults = []
    for entry in dataset.shards:
        path = dataset.shard_path(entry)
        try:
            arrays = dataset.read_shard(entry, check_finite=False)   # the scan below lists them all
        except ShardError as error:
            faults.append(str(error))
            continue
        expected = np.arange(entry["first_index"], entry["first_index"] + entry["count"])
        if not np.array_equal(arrays["index"], expected):
            faults.append(f"shard {path}: trajectory indices are not {expected[0]}..{expected[-1]}")
        for name in ("noise", "states", "endpoint", "sigmas"):
            bad = ~np.isfinite(arrays[name]).reshape(len(arrays[name]), -1).all(1) if arrays[name].ndim > 1 \
                else ~np.isfinite(arrays[name])
            if bad.any():
                where = arrays["index"][bad] if name != "sigmas" else np.flatnonzero(bad)
                faults.append(f"shard {path}: NaN/inf in {name} of {'trajectories' if name != 'sigmas' else 'positions'} "
                              f"{', '.join(map(str, where[:10]))}")
    return faults


def state_statistics(dataset):
    """Per kept state: mean and std over all values, against x_sigma = x0 + sigma * n, which has the
    endpoints' mean and std sqrt(std(x0)^2 + sigma^2)."""
    sums = sums_sq = None
    endpoint_sum = endpoint_sq = 0.0
    values = 0
    for entry in dataset.shards:
        arrays = dataset.read_shard(entry)
        states = arrays["states"].astype(np.float64)
        flat = states.transpose(1, 0, *range(2, states.ndim)).reshape(states.shape[1], -1)
        sums = flat.sum(1) if sums is None else sums + flat.sum(1)
        sums_sq = (flat ** 2).sum(1) if sums_sq is None else sums_sq + (flat ** 2).sum(1)
        endpoint = arrays["endpoint"].astype(np.float64)
        endpoint_sum += endpoint.sum()
        endpoint_sq += (endpoint ** 2).sum()
        values += flat.shape[1]
    data_mean = endpoint_sum / values
    data_var = max(endpoint_sq / values - data_mean ** 2, 0.0)
    rows = []
    for position, (index, sigma) in enumerate(zip(dataset.manifest["kept_states"], dataset.manifest["kept_sigmas"])):
        mean = sums[position] / values
        std = math.sqrt(max(sums_sq[position] / values - mean ** 2, 0.0))
        predicted = math.sqrt(data_var + sigma ** 2)
        rows.append({"state": index, "sigma": sigma, "mean": mean, "predicted_mean": data_mean, "std": std,
                     "predicted_std": predicted, "std_ratio": std / predicted})
    return rows


def latent_codec(dataset, vae):
    """The VAE codec of a latent dataset (None for pixels and points); a bad or missing `vae`: ArgumentError."""
    encoder = dataset.manifest["teacher"].get("encoder")
    if encoder is None or encoder.get("kind") == "standard_rgb":
        if vae is not None:
            raise ArgumentError("vae", "this dataset's teacher has no latent encoder (it works on pixels or points); "
                                       "leave the vae out")
        return None
    if vae is None:
        raise ArgumentError(
            "vae", f"this dataset holds VAE latents {dataset.manifest['data_shape']} ({encoder.get('kind')}); the "
                   f"preview decodes them with a VAE: the hub id {encoder.get('vae_name') or EDM2_VAE} (EDM2's VAE) "
                   "or a local diffusers AutoencoderKL directory")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return LatentCodec.from_encoder_info(encoder, vae=vae, device=device)
    except (ImportError, OSError, ValueError) as error:
        raise ArgumentError("vae", str(error)) from None


def decoded_trajectories(codec, states, sigmas, sigma_data, max_states=8, with_columns=False):
    """`[N, S', 3, H, W]` images in [-1, 1] of latent trajectories `[N, S, C, h, w]`, at most `max_states`
    states spread over each (the noise and the endpoint always).

    Each state is divided by sqrt(1 + sigma^2 / sigma_data^2) before decoding, as `save_trajectory_grid`
    does for pixels: that is the variance-preserving state at the same signal-to-noise ratio, so the VAE
    sees latents at the data's scale and noise fades into the image along the row. The raw state at
    sigma = 80 would be 160x too large for the decoder, and a denoised estimate would need the teacher.
    with_columns: also return the state indices shown.
    """
    columns = np.unique(np.linspace(0, len(sigmas) - 1, min(len(sigmas), max_states)).round().astype(int))
    scale = torch.tensor([math.sqrt(1 + sigmas[column] ** 2 / sigma_data ** 2) for column in columns])
    latents = torch.from_numpy(states[:, columns]) / scale.reshape(1, -1, 1, 1, 1)
    images = codec.decode(latents.flatten(0, 1).to(codec.vae.device)).cpu()
    images = images.reshape(*latents.shape[:2], *images.shape[1:])
    return (images, columns.tolist()) if with_columns else images


def save_preview(dataset, path, count=8, points=2000, codec=None):
    """Images: `count` trajectories as rows, states as columns. 2-D: one scatter panel per state.
    Latents (`codec`, a `cmt.latents.LatentCodec`): up to 8 states per row, decoded to pixels."""
    shape = dataset.manifest["data_shape"]
    wanted = count if len(shape) == 3 else points
    parts, total = [], 0
    for entry in dataset.shards:
        if total >= wanted:
            break
        parts.append(dataset.read_shard(entry)["states"][: wanted - total].astype(np.float32))
        total += len(parts[-1])
    states = np.concatenate(parts)
    sigmas = dataset.manifest["kept_sigmas"]
    sigma_data = dataset.manifest["teacher"].get("config", {}).get("sigma_data", SIGMA_DATA)
    if codec is not None:
        images, columns = decoded_trajectories(codec, states, sigmas, sigma_data, with_columns=True)
        return save_image_grid(images.flatten(0, 1), path, nrow=images.shape[1], min_cell=READABLE_CELL,
                               column_labels=[sigma_label(sigmas[column]) for column in columns])
    if len(shape) == 3:
        return save_trajectory_grid(states, path, sigmas=sigmas, min_cell=READABLE_CELL, label=True)
    if shape == [2]:
        # Like the image grid: each state divided by its expected scale sqrt(1 + sigma^2 / sigma_data^2),
        # so every panel is at the data's scale and shares one set of axes.
        columns = np.unique(np.linspace(0, len(sigmas) - 1, min(len(sigmas), 6)).round().astype(int))
        panels = []
        for column in columns:
            scale = math.sqrt(1 + sigmas[column] ** 2 / sigma_data ** 2)
            title = f"sigma = {sigmas[column]:.3g}" + (f" (/ {scale:.3g})" if scale > 1.01 else "")
            panels.append((states[:, column] / scale, title))
        return save_scatter(panels, path)
    raise ArgumentError("preview", f"draws images [C, H, W] or 2-D points; this dataset holds shape {shape}")


# ---- latent sets (cmt-encode) ------------------------------------------------------------------

def inspect_latents(path, *, verify=False, stats=False, preview=None, preview_count=8, vae=None):
    """The report on the cmt-encode latent set at `path`: `{"summary"}` (what it holds and how:
    source, VAE, scaling, shapes, bytes), with `verify` every shard's sha256 against the manifest,
    with `preview` a PNG of the first items' posterior means decoded through the recorded VAE (or `vae`)."""
    try:
        store = LatentManifest(path)
    except (FileNotFoundError, ValueError) as error:
        raise ArgumentError("path", str(error)) from None
    if stats:
        raise ArgumentError("stats", "applies to trajectory sets (per-state statistics); this is a latent set")
    manifest = store.manifest
    count, shape = manifest["count"], manifest["data_shape"]
    on_disk = sum(store.fs.du(store.shard_path(entry)) for entry in store.shards if store.fs.exists(store.shard_path(entry)))
    moments = 2 * (1 + manifest["flips"]) * count * math.prod(shape) * ITEM_BYTES[manifest["dtype"]]
    encoder = manifest["encoder"]
    report = {"summary": {
        "path": store.url, "dataset": manifest["dataset"], "dataset_version": manifest["dataset_version"],
        "format": manifest["format"], "count": count, "shards": len(store.shards), "data_shape": shape,
        "label_dim": manifest["label_dim"], "flips": manifest["flips"], "dtype": manifest["dtype"],
        "encoder": {key: encoder.get(key) for key in ("kind", "scaling", "vae_name", "vae_sha256", "scale", "bias",
                                                      "pixel_range")},
        "source": manifest["source"], "compression": manifest.get("compression"),
        "arrays": {field: [count, *shape] for field in store.fields if field not in ("index", "label")},
        "bytes_on_disk": on_disk, "bytes_per_item": on_disk / max(count, 1),
        "compression_ratio": moments / max(on_disk, 1)}}
    if preview:
        data = LatentSet(path, sample=False)
        latents = data.decode_indices(range(min(preview_count, data.size)))[0]
        try:
            images = decode_latents(latents, data.encoder, vae=vae)
        except (ImportError, OSError, ValueError) as error:
            raise ArgumentError("vae", f"{error} (pass the VAE that encoded the set)") from None
        report["preview"] = Path(save_image_grid(images, preview, min_cell=READABLE_CELL))
    if verify:
        faults = []
        for entry in store.shards:
            where = store.shard_path(entry)
            try:
                files = read_files(store.fs, where)
            except ShardError as error:
                faults.append(str(error))
                continue
            if checksum(files) != entry["sha256"]:
                faults.append(f"shard {where} is corrupt or truncated: its sha256 differs from the manifest's")
        report["verify"] = {"ok": not faults, "faults": faults, "shards": len(store.shards)}
    return report
