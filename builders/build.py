"""Run a teacher once over many noises and store its whole ODE trajectories as a dataset.

Trajectory i is a function of (seed, i) alone: its noise and label come from a generator seeded
with `trajectory_seed(seed, i)`, and batches are cut from consecutive indices inside a shard, so a
shard's bytes do not depend on how many processes built it (same batch size, device and threads).
Shards are dealt round-robin to ranks; each is encoded in memory, written under a temporary name,
fsync'ed and renamed, then a small sidecar JSON records its count and checksum. Rank 0 writes the
manifest from the sidecars once every rank is done. A re-run keeps every shard whose sidecar
checksum verifies and rebuilds the rest; `build-config.json`, written first, makes a re-run with
another configuration fail before anything is touched.

`build_trajectories(teacher=..., out=..., ...)` is the entry point (the `cmt-build` command calls
it); `build_config` and `build` are its two halves: the configuration that fixes every byte, and
the writing of a configured dataset.
"""
import inspect
import time
from pathlib import Path

import numpy as np
import torch

from cmt.datasets import TOY_NAMES
from cmt.distributed import distributed_state
from cmt.edm import RHO, SIGMA_GRIDS, SIGMA_MAX, SIGMA_MIN, sigma_grid
from cmt.errors import ArgumentError
from cmt.formats import (COMPRESSIONS, DEFAULT_COMPRESSION, DEFAULT_SHUFFLE, LEGACY_COMPRESSION, LEGACY_SHUFFLE, SHARD_FORMATS, SHUFFLES, encode_shard, open_location, shard_format)
from cmt.labels import LABELS_HELP, parse_labels
from cmt.manifest import (BUILD_CONFIG, DATASET_NAME, DATASET_VERSION, MANIFEST, TrajectoryDataset, dataset_compression, dataset_shuffle, read_json, upgrade_manifest, write_json)
from cmt.metrics import embedded_metric, metric_sample_count
from cmt.options import checked_keywords, document_keywords
from cmt.solvers import FLOW_MAP, SOLVERS, sample_trajectory
from cmt.teachers import RECIPE_TEACHERS
from cmt.builders.plan import (CONFIG_OPTIONS, DEFAULT_SOLVER, STORAGE_DTYPES, build_config_hash, check_output, draw_inputs, parse_states, shard_plan, solver_steps)
from cmt.builders.sharding import write_shards
from cmt.builders.teacher import Teacher, load_teacher, recipe_teacher

# Data sets with an embedded-data metric (`cmt.metrics.embedded_metric`), for eval_teacher.
EVAL_DATA = ("mnist", *(f"toy:{name}" for name in TOY_NAMES))


class NonFiniteTrajectories(RuntimeError):
    """The teacher produced NaN or inf; the message names the trajectory indices."""


# What each keyword of `build_trajectories` means: its docstring and cmt-build's help
# (`cmt.options.document_keywords`).
BUILD_HELP = {
    "teacher": "A checkpoint of ours (path), a built-in name (mnist, toy:NAME), 'edm2' or 'edm' with --teacher-ckpt, "
               "an EDM2 or EDM preset, an official .pkl, a SiT size with --teacher-ckpt, or a flow-map student (a CMT "
               "flow-map or MeanFlow checkpoint, a MeanFlow-port .pt) sampled by its own --nfe jumps; in Python also "
               "a `Teacher` (an in-memory denoiser with its shape and identity, then no teacher_ckpt / guidance / "
               "guide_ckpt) [default: the --recipe's].",
    "out": "Output directory or fsspec URL (file://, memory://, s3:// ...).",
    "recipe": "A recipe of docs/recipes.md: its official teacher when --teacher is not given ("
              + ", ".join(f"{name}: {teacher}" for name, teacher in RECIPE_TEACHERS.items())
              + ", downloaded once into the cache); the defaults are its solver settings.",
    "teacher_ckpt": "For --teacher edm2 / edm: an official .pkl, its .safetensors export or a preset.",
    "guidance": "Guidance weight: autoguidance with --guide-ckpt, else classifier-free (conditional teachers); 1 is "
                "no guidance (cmt.guidance.apply_guidance) [default: unguided].",
    "guide_ckpt": "The guiding network for autoguidance (path, preset or built-in name).",
    "solver": f"ODE solver of a diffusion teacher ({', '.join(SOLVERS)}); {FLOW_MAP}: a flow-map teacher's own "
              f"jumps along the grid [default: {DEFAULT_SOLVER}, or {FLOW_MAP} for a flow-map teacher].",
    "nfe": "Denoiser calls per trajectory.",
    "grid": "Sigma grid: logsnr (geometric, the official CMT grid) or karras (EDM, ends at 0).",
    "sigma_max": "The grid's first sigma (the noise's).",
    "sigma_min": "The grid's last nonzero sigma.",
    "rho": "Karras grid exponent.",
    "num_trajectories": "Trajectories in the set; a larger number into an existing set adds the new ones.",
    "batch_size": "Trajectories per teacher batch (part of the configuration).",
    "seed": "Trajectory i depends on (seed, i) only.",
    "labels": LABELS_HELP + " random is drawn per trajectory.",
    "format": f"Shard format: {', '.join(SHARD_FORMATS)} (zarr: v3 groups; wds: WebDataset .tar.gz, gzip'ed always).",
    "shard_size": "Trajectories per shard.",
    "dtype": f"Stored states: {', '.join(STORAGE_DTYPES)}.",
    "states": "Solver states to keep: all, or grid indices like 0,4,8,12,16 (noise and endpoint are always kept).",
    "compression": f"Blosc codec of zarr shards ({', '.join(COMPRESSIONS)}; lz4, byte shuffle: the fastest to read; "
                   "zstd, bit shuffle: ~15% smaller on noise-like states, ~2x slower to read) [default: the one --out "
                   f"was built with (zstd for sets built before the option), else {DEFAULT_COMPRESSION}].",
    "eval_teacher": "Score the endpoints with the embedded-data metric of --eval-data (stored in the manifest).",
    "eval_data": f"Data set for --eval-teacher ({', '.join(EVAL_DATA)}) [default: the built-in teacher's name].",
    "progress": "tqdm progress bar.",
    "log": "(Python) Where the summary lines go.",
    "on_shard_written": "(Python) on_shard_written(shard) is called (from the writer thread) once shard number "
                        "`shard` is in place, before its sidecar is written.",
}


@document_keywords(BUILD_HELP)
@checked_keywords
def build_trajectories(*, teacher=None, out, recipe=None, teacher_ckpt=None, guidance=None, guide_ckpt=None,
                       solver=None, nfe=16, grid="logsnr", sigma_max=SIGMA_MAX, sigma_min=SIGMA_MIN, rho=RHO,
                       num_trajectories=1000, batch_size=256, seed=0, labels=None, format="zarr", shard_size=1000,
                       dtype="float16", states="all", compression=None, eval_teacher=False, eval_data=None,
                       progress=True, log=print, on_shard_written=None):
    """Build (or resume) a dataset of teacher ODE trajectories at `out`; the `cmt-build` options as keywords.

    A flow-map student as the teacher (a CMT flow-map or MeanFlow checkpoint of any family, an
    official MeanFlow-port .pt) is sampled by its own `nfe`-step jumps along the grid (solver
    "flowmap": each stored state is the network's jump from the previous one), as the CMT paper's
    ImageNet-256 run used a small MeanFlow model as the multi-step teacher of MF-XL/2. A recipe's
    solver settings are `RECIPE_TARGETS`; one line says what it set and which given settings differ.
    A zarr set's Blosc shuffle filter is the one `out` was built with when it holds a set of this
    compression (bit shuffle for sets that record none), else the compression's
    `cmt.formats.DEFAULT_SHUFFLE`.

    Returns `{"out", "manifest", "build_config", "shards" (locations), "count", "teacher_eval"}`:
    `Path`s for a local `out`, URL strings otherwise; `teacher_eval` (rank 0) is the figure stored
    in the manifest, or None. Bad input raises `ArgumentError` naming the keyword; a teacher that
    produces NaN or inf raises `NonFiniteTrajectories`.
    """
    if not str(out or ""):
        raise ArgumentError("out", "give an output directory or fsspec URL")
    if solver is not None and solver not in SOLVERS and solver != FLOW_MAP:
        raise ArgumentError("solver", f"unknown solver {solver!r}; valid: {', '.join(SOLVERS)}, {FLOW_MAP}")
    if isinstance(guidance, str):   # KEYWORDS lets post_train's words through
        raise ArgumentError("guidance", f"a weight (a number >= 0; None: unguided), got {guidance!r}")
    state = distributed_state()
    teacher = recipe_teacher(recipe, teacher, dict(solver=solver, nfe=nfe, grid=grid, sigma_max=sigma_max,
                                                   sigma_min=sigma_min), log if state.is_main_process else None)
    if isinstance(teacher, Teacher):
        for name, value in (("teacher_ckpt", teacher_ckpt), ("guidance", guidance), ("guide_ckpt", guide_ckpt)):
            if value is not None:
                raise ArgumentError(name, "applies to a teacher given by path or name, not to an in-memory Teacher")
        model = teacher
    else:
        try:
            model = load_teacher(teacher, teacher_ckpt=teacher_ckpt, guidance=guidance, guide_ckpt=guide_ckpt,
                                 device=state.device)
        except ArgumentError as error:   # the recipe's teacher (offline: where to put its file) is the recipe's fault
            if recipe is None or error.argument != "teacher" or teacher != RECIPE_TEACHERS.get(recipe):
                raise
            raise ArgumentError("recipe", f"its teacher {teacher}: {error.message}") from None
    if eval_teacher:
        eval_data = eval_data or model.identity.get("name")
        if eval_data not in EVAL_DATA:
            raise ArgumentError("eval_data", f"the embedded-data metric exists for {', '.join(EVAL_DATA)}; give one "
                                             f"of them (got {eval_data!r})")
        points = eval_data.startswith("toy:")
        shape = tuple(model.data_shape)
        if (shape != (2,)) if points else (len(shape) != 3 or shape[0] != 1):
            raise ArgumentError("eval_data", f"{eval_data} scores {'2-D points' if points else 'grayscale images'}; "
                                             f"the teacher makes data of shape {shape}")
    shuffle = None
    if format in SHARD_FORMATS and shard_format(format).compressions:
        recorded = recorded_codec(out)
        if recorded is not None and compression in (None, recorded[0]):
            compression, shuffle = recorded   # resume / extend a set with its own codec settings
    config = build_config(model, solver=solver, nfe=nfe, grid=grid, sigma_max=sigma_max, sigma_min=sigma_min, rho=rho,
                          num_trajectories=num_trajectories, batch_size=batch_size, seed=seed, labels=labels,
                          format=format, shard_size=shard_size, dtype=dtype, states=states, compression=compression,
                          shuffle=shuffle)
    manifest = build(out, model, config, eval_data=eval_data if eval_teacher else None, progress=progress, log=log,
                     on_shard_written=on_shard_written)
    return {"out": _location(out), "manifest": _location(out, MANIFEST), "build_config": _location(out, BUILD_CONFIG),
            "shards": [_location(out, name) for _, name, _, _ in shard_plan(config)], "count": config["count"],
            "teacher_eval": (manifest or {}).get("teacher_eval")}


# The one place the defaults of the build options are written: build_trajectories' signature
# (build_config and the cmt-build command read them from here).
DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(build_trajectories).parameters.items()
            if parameter.default is not inspect.Parameter.empty}


def build_config(teacher, shuffle=None, **options):
    """The JSON configuration that fixes every byte of the dataset (checked, with clear errors).

    options: any of `CONFIG_OPTIONS` (the `build_trajectories` keywords of the same names); the
    ones left out take `build_trajectories`' defaults. shuffle: the Blosc shuffle filter of zarr
    shards (`cmt.formats.SHUFFLES`; None: the compression's `DEFAULT_SHUFFLE`); what
    `build_trajectories` passes when it resumes a set, no option of its own."""
    unknown = sorted(set(options) - set(CONFIG_OPTIONS))
    if unknown:
        raise TypeError(f"build_config() got unexpected options {unknown}; it takes {', '.join(CONFIG_OPTIONS)}")
    settings = {name: DEFAULTS[name] for name in CONFIG_OPTIONS} | options
    solver, nfe, grid, states = settings["solver"], settings["nfe"], settings["grid"], settings["states"]
    flow_map = bool(getattr(teacher, "flow_map", False))
    if solver is None:
        solver = FLOW_MAP if flow_map else DEFAULT_SOLVER
    if flow_map and solver != FLOW_MAP:
        raise ArgumentError("solver", f"the teacher is a flow-map network: it is sampled by its own jumps along the "
                                      f"grid ({FLOW_MAP}), not by the ODE solver {solver}; leave solver out")
    if solver == FLOW_MAP and not flow_map:
        raise ArgumentError("solver", f"{FLOW_MAP} takes a flow-map teacher (a CMT flow-map or MeanFlow student); "
                                      f"this one is a diffusion denoiser: use an ODE solver ({', '.join(SOLVERS)})")
    sigma_min, sigma_max, rho = settings["sigma_min"], settings["sigma_max"], settings["rho"]
    if settings["format"] not in SHARD_FORMATS:
        raise ArgumentError("format", f"must be one of {', '.join(SHARD_FORMATS)}, got {settings['format']!r}")
    compression, codecs = settings["compression"], shard_format(settings["format"]).compressions
    if codecs:
        compression = compression or DEFAULT_COMPRESSION
        if compression not in codecs:
            raise ArgumentError("compression", f"must be one of {', '.join(codecs)}, got {compression!r}")
    elif compression is not None:
        raise ArgumentError("compression", f"applies to zarr shards; {settings['format']} shards compress their own "
                                           "way (WebDataset: gzip)")
    if compression in (None, "none"):
        if shuffle is not None:
            raise ArgumentError("shuffle", f"applies to Blosc-compressed zarr shards, not to compression {compression}")
    else:
        shuffle = shuffle or DEFAULT_SHUFFLE[compression]
        if shuffle not in SHUFFLES:
            raise ArgumentError("shuffle", f"must be one of {', '.join(SHUFFLES)}, got {shuffle!r}")
    if settings["dtype"] not in STORAGE_DTYPES:
        raise ArgumentError("dtype", f"must be one of {', '.join(STORAGE_DTYPES)}, got {settings['dtype']!r}")
    for name in ("num_trajectories", "batch_size", "shard_size"):
        if settings[name] < 1:
            raise ArgumentError(name, f"must be >= 1, got {settings[name]}")
    if settings["seed"] < 0:
        raise ArgumentError("seed", f"must be >= 0, got {settings['seed']}")
    if grid not in SIGMA_GRIDS:
        raise ArgumentError("grid", f"unknown sigma grid {grid!r}; valid: {', '.join(SIGMA_GRIDS)}")
    if not 0 < sigma_min < sigma_max:
        raise ArgumentError("sigma_min", f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    steps = solver_steps(solver, nfe, grid)
    sigmas = sigma_grid(grid, steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    kept = parse_states(states, steps)
    return {
        "dataset": DATASET_NAME, "dataset_version": DATASET_VERSION, "format": settings["format"],
        "teacher": {key: value for key, value in teacher.identity.items() if key != "path"},
        "guidance": teacher.guidance,
        "solver": solver, "nfe": nfe, "steps": steps, "grid": grid, "sigma_min": sigma_min, "sigma_max": sigma_max,
        **({"rho": rho} if grid == "karras" else {}),
        "sigmas": sigmas.tolist(), "kept_states": kept, "kept_sigmas": [float(sigmas[index]) for index in kept],
        "seed": settings["seed"], "labels": parse_labels(settings["labels"], teacher.label_dim, teacher.label_dropout),
        "label_dim": teacher.label_dim, "data_shape": list(teacher.data_shape), "dtype": settings["dtype"],
        "count": settings["num_trajectories"], "shard_size": settings["shard_size"],
        "batch_size": settings["batch_size"],
        # Recorded when it is not the one codec of earlier builds, so their configuration (and its
        # hash) reads the same as before: a missing field is zstd (`dataset_compression`).
        **({"compression": compression} if compression not in (None, LEGACY_COMPRESSION) else {}),
        # Likewise the shuffle filter: a missing field is the bit shuffle of earlier builds (`dataset_shuffle`).
        **({"shuffle": shuffle} if shuffle not in (None, LEGACY_SHUFFLE) else {}),
    }


def recorded_codec(out):
    """`(compression, shuffle)` of the zarr dataset being built at `out` (its build-config.json;
    zstd and bit shuffle when it names none), or None when there is none there yet (or it holds
    WebDataset shards)."""
    fs, root = open_location(out)
    path = f"{root}/{BUILD_CONFIG}"
    if not fs.exists(path):
        return None
    recorded = read_json(fs, path)
    config = upgrade_manifest(recorded.get("config", {})) if isinstance(recorded, dict) else {}
    if not isinstance(config, dict) or dataset_compression(config) is None:
        return None
    return dataset_compression(config), dataset_shuffle(config)



def _location(out, name=None):
    """`out` (or `out/name`) as a `Path` when it is local, as the URL string otherwise."""
    text = str(out).rstrip("/")
    if "://" in text:
        return f"{text}/{name}" if name else text
    return Path(text) / name if name else Path(text)


def make_shard(teacher, config, first, count, progress=None):
    """The arrays of trajectories `first .. first + count - 1` (batches of `batch_size` from `first`)."""
    storage = STORAGE_DTYPES[config["dtype"]]
    shape, kept = tuple(config["data_shape"]), config["kept_states"]
    arrays = {
        "index": np.arange(first, first + count, dtype=np.int64), "seed": np.empty(count, np.uint64),
        "label": np.empty(count, np.int64), "noise": np.empty((count, *shape), storage),
        "states": np.empty((count, len(kept), *shape), storage), "sigmas": np.array(config["kept_sigmas"]),
        "endpoint": np.empty((count, *shape), storage),
    }
    bad = []
    for start in range(0, count, config["batch_size"]):
        stop = min(start + config["batch_size"], count)
        indices = range(first + start, first + stop)
        noise, labels, seeds = draw_inputs(indices, config["seed"], shape, config["label_dim"], config["labels"])
        one_hot = None
        if config["label_dim"]:
            one_hot = torch.nn.functional.one_hot(labels, config["label_dim"]).to(teacher.device, teacher.dtype)
        with torch.inference_mode():
            trajectory = sample_trajectory(teacher.denoiser, noise.to(teacher.device, teacher.dtype), config["sigmas"],
                                           solver=config["solver"], labels=one_hot, keep=kept)
        positions = [trajectory.indices.index(index) for index in kept]
        states = trajectory.states[positions].transpose(0, 1).to("cpu", torch.float32).numpy().astype(storage)
        endpoint = trajectory.states[-1].to("cpu", torch.float32).numpy().astype(storage)
        finite = (np.isfinite(states).reshape(len(indices), -1).all(1)
                  & np.isfinite(endpoint).reshape(len(indices), -1).all(1))
        bad += [indices[row] for row in np.flatnonzero(~finite)]
        arrays["seed"][start:stop] = seeds
        arrays["label"][start:stop] = labels.numpy()
        arrays["noise"][start:stop] = noise.numpy().astype(storage)
        arrays["states"][start:stop] = states
        arrays["endpoint"][start:stop] = endpoint
        if progress is not None:
            progress.update(stop - start)
    if bad:  # the whole shard is solved first, so the error names all of its broken trajectories
        raise NonFiniteTrajectories(
            f"the teacher produced NaN or inf (or values beyond {config['dtype']}) for {len(bad)} trajector"
            f"{'y' if len(bad) == 1 else 'ies'}: {', '.join(map(str, bad[:20]))}{' ...' if len(bad) > 20 else ''}")
    return arrays


def build(out, teacher, config, *, eval_data=None, progress=True, log=print, on_shard_written=None):
    """Build (or finish) the dataset `config` of `teacher` at `out`; returns the manifest (rank 0) or None.

    The writing half of `build_trajectories` (see there for eval_data, log and on_shard_written)."""
    state = distributed_state()
    fs, root = open_location(out)
    started = time.time()
    mode = check_output(fs, root, out, config)  # on every rank, before anyone writes
    state.wait_for_everyone()
    if state.is_main_process and mode != "resume":
        if mode == "extend" and fs.exists(f"{root}/{MANIFEST}"):
            # Until the new shards are in, the set is unfinished (a partial last shard is rebuilt full).
            fs.rm(f"{root}/{MANIFEST}")
        fs.makedirs(root, exist_ok=True)
        write_json(fs, f"{root}/{BUILD_CONFIG}", {"config": config, "config_hash": build_config_hash(config)})
    state.wait_for_everyone()

    plan = shard_plan(config)
    written = write_shards(
        fs, root, plan, lambda first, count, bar: make_shard(teacher, config, first, count, progress=bar),
        lambda arrays, first: encode_shard(arrays, config["format"], {"first_index": first, "count": len(arrays["index"])},
                                           compression=dataset_compression(config), shuffle=dataset_shuffle(config)),
        unit="traj", command="cmt-build", progress=progress, on_placed=on_shard_written)
    if written.entries is None:
        return None
    entries = written.entries
    previous = read_json(fs, f"{root}/{MANIFEST}") if fs.exists(f"{root}/{MANIFEST}") else {}
    manifest = {**config, "config_hash": build_config_hash(config), "teacher": teacher.identity, "shards": entries,
                "bytes": sum(entry["bytes"] for entry in entries)}
    if "teacher_eval" in previous:
        manifest["teacher_eval"] = previous["teacher_eval"]
    write_json(fs, f"{root}/{MANIFEST}", manifest)
    if eval_data is not None:
        manifest["teacher_eval"] = evaluate_endpoints(out, eval_data)
        write_json(fs, f"{root}/{MANIFEST}", manifest)
        log(f"teacher baseline on {eval_data}: " + ", ".join(f"{key} = {value:.6g}" for key, value in
                                                             manifest["teacher_eval"]["metrics"].items()))
    elapsed = time.time() - started
    built = sum(item[3] for item in written.made)
    stored_states = config["count"] * (len(config["kept_states"]) + 2)
    raw = stored_states * int(np.prod(config["data_shape"])) * 2
    log(f"cmt-build: {config['count']} trajectories in {len(plan)} shards at {out} "
        f"({len(written.made)} shards built by this rank, {written.kept} kept from an earlier run); "
        f"{manifest['bytes']} bytes = {manifest['bytes'] / stored_states:.1f} bytes per stored state "
        f"({manifest['bytes'] / raw:.3f} x raw float16); {elapsed:.1f} s"
        + (f", {built / elapsed:.1f} trajectories/s on rank 0" if built else ""))
    return manifest


def evaluate_endpoints(out, data):
    """The embedded-data metric (`cmt.metrics.embedded_metric`) of the endpoints in the dataset (`scored`:
    how many, `cmt.metrics.metric_sample_count`)."""
    dataset = TrajectoryDataset(out)
    endpoints = torch.cat([torch.from_numpy(dataset.read_shard(entry)["endpoint"].astype(np.float32))
                           for entry in dataset.shards])
    metrics = embedded_metric(data, endpoints)
    if not metrics:
        raise ArgumentError("eval_data", f"no built-in metric for data {data!r} (toy:NAME and mnist have one)")
    return {"data": str(data), "count": len(endpoints), "scored": metric_sample_count(data, len(endpoints)),
            "metrics": {key: float(value) for key, value in metrics.items()}}
