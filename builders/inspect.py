"""cmt-inspect: summarise, verify, preview and measure a trajectory dataset made by cmt-build.

    cmt-inspect shards/                      # teacher, solver, grid, count, shapes, bytes, compression
    cmt-inspect shards/ --verify             # every checksum, decode and NaN/inf scan; exit 1 on a fault
    cmt-inspect shards/ --stats              # per state: mean / std against what its sigma predicts
    cmt-inspect shards/ --preview traj.png   # rows are trajectories, columns states (scatter for 2-D)
    cmt-inspect shards/ --preview traj.png --vae stabilityai/sd-vae-ft-mse   # latent sets: decoded
    cmt-inspect shards/ --json               # the same as one JSON document
"""
import json
import math
import sys

import click
import numpy as np
import torch

from cmt.formats import ShardError
from cmt.manifest import BUILD_CONFIG, MANIFEST, TrajectoryDataset, sidecar_name
from cmt.edm import SIGMA_DATA

ITEM_BYTES = {"float16": 2, "float32": 4}


def summary(dataset):
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
        "path": dataset.url, "layout": manifest["layout"], "format_version": manifest["format_version"],
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


def verify(dataset):
    """Every fault found: unreadable shards, checksum or count mismatches, wrong indices, NaN/inf."""
    faults = []
    for entry in dataset.shards:
        path = dataset.shard_path(entry)
        try:
            arrays = dataset.read_shard(entry)
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
    """The VAE codec of a latent dataset (None for pixels and points); bad or missing --vae: one UsageError."""
    from cmt.latents import EDM2_VAE, LatentCodec

    encoder = dataset.manifest["teacher"].get("encoder")
    if encoder is None or encoder.get("kind") == "standard_rgb":
        if vae is not None:
            raise click.UsageError("--vae: this dataset's teacher has no latent encoder (it works on pixels or "
                                   "points); leave --vae out")
        return None
    if vae is None:
        raise click.UsageError(
            f"--preview: this dataset holds VAE latents {dataset.manifest['data_shape']} ({encoder.get('kind')}); "
            f"decode them with --vae DIR_OR_HUB_ID: the hub id {encoder.get('vae_name') or EDM2_VAE} (EDM2's VAE) "
            "or a local diffusers AutoencoderKL directory")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return LatentCodec.from_encoder_info(encoder, vae=vae, device=device)
    except (ImportError, OSError, ValueError) as error:
        raise click.BadParameter(str(error), param_hint="--vae") from None


def decoded_trajectories(codec, states, sigmas, sigma_data, max_states=8):
    """`[N, S', 3, H, W]` images in [-1, 1] of latent trajectories `[N, S, C, h, w]`, at most `max_states`
    states spread over each (the noise and the endpoint always).

    Each state is divided by sqrt(1 + sigma^2 / sigma_data^2) before decoding, as `save_trajectory_grid`
    does for pixels: that is the variance-preserving state at the same signal-to-noise ratio, so the VAE
    sees latents at the data's scale and noise fades into the image along the row. The raw state at
    sigma = 80 would be 160x too large for the decoder, and a denoised estimate would need the teacher.
    """
    columns = np.unique(np.linspace(0, len(sigmas) - 1, min(len(sigmas), max_states)).round().astype(int))
    scale = torch.tensor([math.sqrt(1 + sigmas[column] ** 2 / sigma_data ** 2) for column in columns])
    latents = torch.from_numpy(states[:, columns]) / scale.reshape(1, -1, 1, 1, 1)
    images = codec.decode(latents.flatten(0, 1).to(codec.vae.device)).cpu()
    return images.reshape(*latents.shape[:2], *images.shape[1:])


def save_preview(dataset, path, count=8, points=2000, codec=None):
    """Images: `count` trajectories as rows, states as columns. 2-D: one scatter panel per state.
    Latents (`codec`, a `cmt.latents.LatentCodec`): up to 8 states per row, decoded to pixels."""
    from cmt.images import save_image_grid, save_scatter, save_trajectory_grid
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
        images = decoded_trajectories(codec, states, sigmas, sigma_data)
        return save_image_grid(images.flatten(0, 1), path, nrow=images.shape[1])
    if len(shape) == 3:
        return save_trajectory_grid(states, path, sigmas=sigmas)
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
    raise click.UsageError(f"--preview draws images [C, H, W] or 2-D points; this dataset holds shape {shape}")


def _print_summary(info, echo):
    teacher = info["teacher"]
    echo(f"{info['path']}  ({info['layout']}, format version {info['format_version']})")
    echo(f"  teacher   {teacher.get('name') or teacher.get('path')} ({teacher.get('kind')}, "
         f"{teacher.get('architecture')}, sha256 {str(teacher.get('sha256'))[:12]})")
    echo(f"  solver    {info['solver']}, nfe {info['nfe']}, {info['grid']} grid from sigma {info['sigma_max']:g} "
         f"to {info['sigma_min']:g} ({len(info['sigmas'])} sigmas)")
    echo(f"  kept      {len(info['kept_states'])} states {info['kept_states']}")
    echo("  sigmas    " + ", ".join(f"{sigma:.4g}" for sigma in info["kept_sigmas"]))
    labels = "none" if info["labels"] is None else info["labels"]
    echo(f"  count     {info['count']} trajectories in {info['shards']} shards; seed {info['seed']}; "
         f"labels {labels} ({info['label_dim']} classes)")
    for name, shape in info["shapes"].items():
        echo(f"  {name:<9} {shape} {info['dtypes'][name]}")
    echo(f"  on disk   {info['bytes_on_disk']:,} bytes, {info['bytes_per_stored_state']:.1f} bytes per stored state; "
         f"compression {info['compression_ratio']:.2f}x, {info['size_vs_float16']:.3f} of raw float16")
    if info["teacher_eval"]:
        metrics = ", ".join(f"{key} {value:.5g}" for key, value in info["teacher_eval"]["metrics"].items())
        echo(f"  teacher   baseline on {info['teacher_eval']['data']}: {metrics}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("path")
@click.option("--verify", "do_verify", is_flag=True, help="Check every checksum and scan for NaN/inf; exit 1 on any fault.")
@click.option("--stats", is_flag=True, help="Per state mean and std against what its sigma predicts.")
@click.option("--preview", type=click.Path(dir_okay=False), default=None, help="Write a PNG of some trajectories.")
@click.option("--preview-count", type=int, default=8, show_default=True, help="Trajectories (rows) in an image preview.")
@click.option("--vae", default=None, metavar="DIR_OR_HUB_ID",
              help="Latent datasets (EDM2 img512 teachers): the diffusers AutoencoderKL that decodes the preview, "
                   "a local directory or a hub id such as stabilityai/sd-vae-ft-mse.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")
def main(path, do_verify, stats, preview_count, preview, vae, as_json):
    """Summarise the trajectory dataset at PATH (a directory or fsspec URL)."""
    try:
        dataset = TrajectoryDataset(path)
    except (FileNotFoundError, ValueError, KeyError) as error:
        raise click.ClickException(str(error)) from None
    if vae is not None and not preview:
        raise click.UsageError("--vae decodes the --preview of a latent dataset; give --preview OUT.png too")
    codec = latent_codec(dataset, vae) if preview else None
    echo = (lambda *args, **kwargs: None) if as_json else click.echo
    report = {"summary": summary(dataset)}
    _print_summary(report["summary"], echo)
    try:
        if stats:
            report["stats"] = state_statistics(dataset)
            echo("  state  sigma      mean   (pred)     std   (pred)  std/pred")
            for row in report["stats"]:
                echo(f"  {row['state']:>5} {row['sigma']:>9.4g} {row['mean']:>8.4f} {row['predicted_mean']:>8.4f} "
                     f"{row['std']:>8.4f} {row['predicted_std']:>8.4f} {row['std_ratio']:>8.3f}")
        if preview:
            report["preview"] = str(save_preview(dataset, preview, count=preview_count, codec=codec))
            echo(f"  preview   {report['preview']}")
    except ShardError as error:
        raise click.ClickException(f"{error} (run cmt-inspect --verify for every fault)") from None
    if do_verify:
        faults = verify(dataset)
        report["verify"] = {"ok": not faults, "faults": faults, "shards": len(dataset.shards)}
        for fault in faults:
            echo(f"  FAULT     {fault}", err=True)
        echo(f"  verify    {len(dataset.shards)} shards: " + ("all checksums match, no NaN/inf" if not faults
                                                              else f"{len(faults)} faults"))
    if as_json:
        click.echo(json.dumps(report, indent=2))
    if do_verify and report["verify"]["faults"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
