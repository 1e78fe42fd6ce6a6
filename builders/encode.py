"""Encode an image set once through a VAE into a latent set (`encode_dataset`, the `cmt-encode` command).

What EDM2's `dataset_tool.py encode` and MeanFlow's `prepare_dataset.py` do, with the builder's
conventions (`cmt.builders.build`): the VAE posterior's moments (mean and std, EDM2's raw latents)
of every image, with `flips` also of the image mirrored left-right (zhuyu-cs/MeanFlow
`preprocess_imagenet/main_cache.py` stores `moments_flip`), go into zarr shards of consecutive
items; the manifest records the VAE (name, config, sha256 of its weights) and the scaling that
turns a posterior draw into the networks' data (`cmt.latents.SCALINGS`: EDM2's per-channel
`raw_mean`/`raw_std` to mean 0, std 0.5, with the VAE on [0, 1] pixels; or Stable Diffusion's
x 0.18215 with the VAE on [-1, 1] pixels, MeanFlow's), so training, sampling and evaluation decode
through the same VAE. Grayscale images are repeated to RGB (the SD VAE takes colour).

Item i of the set depends on the image, the VAE and the batch it is encoded in (batches are
consecutive items of one shard: the same bytes under any number of processes, on one device
type); shards are dealt round-robin to ranks, written under a temporary name and renamed, each
recorded by a sidecar with its checksum; rank 0 writes manifest.json last. A re-run resumes
(shards whose checksum verifies are kept); one with other options is refused before anything is
written. Layout (README, "Latent sets"):

    out/build-config.json   the configuration, written first
    out/shard-000000.zarr/  index [n] int64, label [n] int64, mean [n, C, h, w], std [n, C, h, w]
                            (+ mean_flip, std_flip): one row per zarr chunk (read one at a time)
    out/shard-000000.json   its sidecar
    out/manifest.json       written last: dataset "cmt-latents", count, data_shape, label_dim, dtype,
                            encoder {kind, scaling, scale, bias, pixel_range, vae_name, vae_sha256},
                            flips, source, shards [...]
"""
import hashlib
import inspect
import json
import time
from pathlib import Path

import numpy as np
import torch

from cmt.datasets.images import ImageFiles
from cmt.datasets.mapstyle import as_is
from cmt.datasets.resolve import ImageData, ToyData, resolve_data
from cmt.datasets.stream import decoding_workers
from cmt.distributed import distributed_state
from cmt.errors import ArgumentError, FileFormatError
from cmt.formats import COMPRESSIONS, encode_shard, open_location, shard_name
from cmt.latents import EDM2_VAE, LATENT_DATASET, SCALINGS, LatentCodec, load_vae, scaling_record
from cmt.manifest import BUILD_CONFIG, LATENT_VERSION, MANIFEST, config_hash, latent_fields, read_json, write_json
from cmt.builders.sharding import write_shards
from cmt.builders.plan import STORAGE_DTYPES
from cmt.options import checked_keywords, differences, document_keywords


# What each keyword of `encode_dataset` means: its docstring and cmt-encode's help
# (`cmt.options.document_keywords`).
ENCODE_HELP = {
    "source": "The images: a folder, an EDM dataset .zip or an .npz (as --data takes them).",
    "out": "Output directory (resumable: re-run the same command after a crash).",
    "vae": "The diffusers AutoencoderKL: a local directory or a hub id (SD's VAE stabilityai/sd-vae-ft-mse is EDM2's "
           "and MeanFlow's); in Python also an `AutoencoderKL` object.",
    "scaling": "edm2: EDM2's per-channel statistics, the VAE on [0, 1] pixels; sd: x 0.18215, the VAE on [-1, 1] "
               "pixels (MeanFlow's).",
    "resolution": "Bring every image to this size first [default: as they are].",
    "resize": "How --resolution is reached: center-crop (EDM's dataset tool) or adm (ADM's, ImageNet).",
    "flips": "Also encode every image mirrored left-right (training draws one of the two at random).",
    "batch_size": "Images per VAE call (part of the configuration: it can change the last bits).",
    "shard_size": "Images per shard.",
    "dtype": "Stored moments: float32 (as EDM2 stores them) or float16.",
    "compression": "Blosc codec of the shards (the moments are noise-like: lz4 saves ~5%).",
    "workers": "Image decoding processes: auto (every core but one) or a number.",
    "device": "The VAE's device [default: this rank's accelerator, cuda if available, else cpu].",
    "progress": "tqdm progress bar.",
    "log": "(Python) Where the summary lines go.",
}


@document_keywords(ENCODE_HELP)
@checked_keywords
def encode_dataset(*, source, out, vae=EDM2_VAE, scaling="edm2", resolution=None, resize="center-crop", flips=False,
                   batch_size=32, shard_size=4096, dtype="float32", compression="none", workers="auto", device=None,
                   progress=True, log=print):
    """Encode the images at `source` into a latent set at `out`; the `cmt-encode` options as keywords.

    Returns `{"out", "manifest", "count", "shards", "data_shape", "encoder"}`. Bad options and a VAE
    whose latents do not fit raise `ArgumentError` naming the keyword; a damaged image raises
    `FileFormatError` naming it.
    """
    if not str(out or ""):
        raise ArgumentError("out", "give an output directory")
    if scaling not in SCALINGS:
        raise ArgumentError("scaling", f"{scaling!r} is not one of {', '.join(SCALINGS)}")
    if dtype not in STORAGE_DTYPES:
        raise ArgumentError("dtype", f"must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    if compression not in COMPRESSIONS:
        raise ArgumentError("compression", f"must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if int(value) != value or value < 1:
            raise ArgumentError(name, f"must be an integer >= 1, got {value!r}")
    state = distributed_state()
    device = torch.device(device or (state.device if state.num_processes > 1 or torch.cuda.is_available() else "cpu"))
    images = open_source(source, resolution, resize)
    codec, vae_record = load_codec(vae, scaling, images.data_shape, device)
    latent_shape = vae_record.pop("latent_shape")
    config = json.loads(json.dumps({   # as it reads back from build-config.json (lists, not tuples)
        "dataset": LATENT_DATASET, "dataset_version": LATENT_VERSION, "format": "zarr",
        "source": {"path": str(Path(str(source)).resolve()), "count": images.size,
                   "data_shape": list(images.data_shape), "resolution": resolution, "resize": resize,
                   "bytes": _source_bytes(source)},
        "encoder": {**codec.describe(), "scaling": scaling, **vae_record},
        "flips": bool(flips), "dtype": dtype, "count": images.size, "data_shape": latent_shape,
        "label_dim": images.label_dim, "shard_size": int(shard_size), "batch_size": int(batch_size),
        "compression": compression,
    }))
    manifest = write_latent_set(out, images, codec, config, workers=workers, progress=progress, log=log)
    plan = _plan(config)
    return {"out": Path(str(out)), "manifest": Path(str(out)) / MANIFEST, "count": config["count"],
            "shards": [Path(str(out)) / name for _, name, _, _ in plan], "data_shape": config["data_shape"],
            "encoder": config["encoder"], "written": manifest is not None}


# The one place the defaults of the options are written (the command reads them from here).
DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(encode_dataset).parameters.items()
            if parameter.default is not inspect.Parameter.empty}


def open_source(source, resolution, resize):
    """The image set to encode (a user's folder, zip or .npz), checked (one header scan)."""
    try:
        images = resolve_data(source, resolution, resize)
    except ValueError as error:
        raise ArgumentError("source", str(error)) from None
    if isinstance(images, (ToyData, ImageData)) or not isinstance(images, ImageFiles):
        raise ArgumentError("source", f"{source}: encode a folder, an EDM dataset zip or an .npz of images (not a "
                                      "built-in data set)")
    return images


def _source_bytes(source):
    path = Path(str(source))
    return path.stat().st_size if path.is_file() else None


def load_codec(vae, scaling, image_shape, device):
    """`(LatentCodec, {vae_name, vae_sha256, vae_config, latent_shape})` for `vae` and `scaling`,
    checked against the images: the scaling's channels, and a resolution the VAE's downsampling divides."""
    name = vae if isinstance(vae, (str, Path)) else getattr(getattr(vae, "config", None), "_name_or_path", None)
    if isinstance(vae, (str, Path)) and Path(str(vae)).exists():
        name = str(Path(str(vae)).resolve())   # a local directory: found again from any working directory
    if isinstance(vae, (str, Path)):
        try:
            vae = load_vae(vae, device=device)
        except (ImportError, OSError, ValueError) as error:
            raise ArgumentError("vae", str(error)) from None
    else:
        vae = vae.eval().requires_grad_(False).to(device)
    config = dict(getattr(vae, "config", {}))
    channels = int(config.get("latent_channels", 4))
    factor = 2 ** (len(config.get("block_out_channels", (0,) * 4)) - 1)
    record = scaling_record(scaling, channels)
    if len(record["scale"]) != channels:
        raise ArgumentError("vae", f"{name} makes {channels}-channel latents; the {scaling} scaling has statistics "
                                   f"for {len(record['scale'])} channels (EDM2's SD VAE): use --scaling sd or the SD VAE")
    height, width = image_shape[1:]
    if height % factor or width % factor:
        raise ArgumentError("vae", f"{name} downsamples by {factor}; the images are {width}x{height}, not a multiple "
                                   "of it (pass a resolution that is)")
    if config.get("in_channels", 3) != 3:
        raise ArgumentError("vae", f"{name} takes {config.get('in_channels')}-channel images; cmt-encode feeds RGB")
    codec = LatentCodec(vae, record["scale"], record["bias"], vae_name=str(name), pixel_range=record["pixel_range"])
    digest = hashlib.sha256()
    for key, tensor in sorted(vae.state_dict().items()):
        digest.update(key.encode() + b"\n" + tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return codec, {"vae_name": str(name), "vae_sha256": digest.hexdigest(),
                   "vae_config": {key: value for key, value in config.items() if not key.startswith("_")},
                   "latent_shape": [channels, height // factor, width // factor]}


def _plan(config):
    count, size = config["count"], config["shard_size"]
    return [(shard, shard_name(shard, "zarr"), first, min(size, count - first))
            for shard, first in enumerate(range(0, count, size))]


def _check_output(fs, root, url, config):
    """Refuse an output that holds something else; True when it holds this configuration (resume)."""
    path = f"{root}/{BUILD_CONFIG}"
    if fs.exists(path):
        recorded = read_json(fs, path).get("config", {})
        if recorded != config:
            changes = "; ".join(f"{name}: {str(before)[:60]} -> {str(after)[:60]}"
                                for name, before, after in differences(recorded, config, missing=None)[:8])
            raise ArgumentError("out", f"{url} holds a latent set encoded with another configuration ({changes}); "
                                       "re-run with the same options to resume it, or choose a new output")
        return True
    if fs.exists(root) and fs.ls(root, detail=False):
        raise ArgumentError("out", f"{url} exists, is not empty and holds no {BUILD_CONFIG}: not a cmt-encode "
                                   "output; choose a new output")
    return False


def encode_shard_arrays(images, codec, config, first, count, workers, progress=None):
    """The arrays of items `first .. first + count - 1`, in VAE batches of `batch_size` from `first`."""
    storage = STORAGE_DTYPES[config["dtype"]]
    shape = tuple(config["data_shape"])
    arrays = {"index": np.arange(first, first + count, dtype=np.int64),
              "label": images.labels[first:first + count].astype(np.int64)}
    for field in latent_fields(config["flips"])[2:]:
        arrays[field] = np.empty((count, *shape), storage)
    keys = [np.arange(start, min(start + config["batch_size"], first + count))[:, None]
            for start in range(first, first + count, config["batch_size"])]
    loader = torch.utils.data.DataLoader(images, batch_sampler=keys, num_workers=workers, collate_fn=as_is,
                                         pin_memory=codec.vae.device.type == "cuda")
    device = codec.vae.device
    row = 0
    for batch in loader:
        if "error" in batch:
            raise FileFormatError(batch["error"])
        pixels = batch["data"].to(device, non_blocking=True)
        pixels = pixels.float() / 127.5 - 1 if pixels.dtype == torch.uint8 else pixels.float()
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        size = len(pixels)
        views = [("", pixels)] + ([("_flip", pixels.flip(-1))] if config["flips"] else [])
        for suffix, view in views:
            mean, std = codec.moments(view)
            arrays["mean" + suffix][row:row + size] = mean.cpu().numpy()
            arrays["std" + suffix][row:row + size] = std.cpu().numpy()
        row += size
        if progress is not None:
            progress.update(size)
    bad = [int(first + i) for i in np.flatnonzero(~np.isfinite(arrays["mean"]).reshape(count, -1).all(1))]
    if bad:
        raise FileFormatError(f"the VAE produced NaN or inf latents for images {', '.join(map(str, bad[:10]))} of "
                              f"{images.name}")
    return arrays


def write_latent_set(out, images, codec, config, *, workers="auto", progress=True, log=print):
    """Encode (or finish) the latent set `config` at `out`; the manifest on rank 0, else None."""
    state = distributed_state()
    fs, root = open_location(out)
    started = time.time()
    resume = _check_output(fs, root, out, config)   # on every rank, before anyone writes
    state.wait_for_everyone()
    if state.is_main_process and not resume:
        fs.makedirs(root, exist_ok=True)
        write_json(fs, f"{root}/{BUILD_CONFIG}", {"config": config, "config_hash": config_hash(config)})
    state.wait_for_everyone()
    plan = _plan(config)
    workers = decoding_workers(workers, state.num_processes)
    written = write_shards(
        fs, root, plan, lambda first, count, bar: encode_shard_arrays(images, codec, config, first, count, workers,
                                                                      progress=bar),
        lambda arrays, first: encode_shard(arrays, "zarr", {"first_index": first, "count": len(arrays["index"])},
                                           compression=config["compression"], shuffle=None,
                                           fields=latent_fields(config["flips"]), rows_per_chunk=1),
        unit="img", command="cmt-encode", progress=progress)
    if written.entries is None:
        return None
    entries = written.entries
    manifest = {**config, "config_hash": config_hash(config), "shards": entries,
                "bytes": sum(entry["bytes"] for entry in entries)}
    write_json(fs, f"{root}/{MANIFEST}", manifest)
    elapsed = time.time() - started
    encoded = sum(item[3] for item in written.made)
    log(f"cmt-encode: {config['count']} images of {images.name} into {len(plan)} shards at {out} "
        f"({len(written.made)} encoded by this rank, {written.kept} kept from an earlier run); latents "
        f"{config['data_shape']} ({config['encoder']['scaling']} scaling, {config['encoder']['vae_name']}"
        f"{', with flips' if config['flips'] else ''}), {manifest['bytes']:,} bytes; {elapsed:.1f} s"
        + (f", {encoded / elapsed:.1f} images/s on rank 0" if encoded else ""))
    return manifest
