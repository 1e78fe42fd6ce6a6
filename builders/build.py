"""Run a teacher once over many noises and store its whole ODE trajectories as a dataset.

Trajectory i is a function of (seed, i) alone: its noise and label come from a generator seeded
with `trajectory_seed(seed, i)`, and batches are cut from consecutive indices inside a shard, so a
shard's bytes do not depend on how many processes built it (same batch size, device and threads).
Shards are dealt round-robin to ranks; each is encoded in memory, written under a temporary name,
fsync'ed and renamed, then a small sidecar JSON records its count and checksum. Rank 0 writes the
manifest from the sidecars once every rank is done. A re-run keeps every shard whose sidecar
checksum verifies and rebuilds the rest; `build-config.json`, written first, makes a re-run with
another configuration fail before anything is touched.
"""
import concurrent.futures
import os
import signal
import time

import numpy as np
import torch
import tqdm
from accelerate import PartialState

from cmt.formats import (FORMATS, ShardError, checksum, encode_shard, open_location, read_files,
                                  remove_temporaries, shard_name, write_atomic)
from cmt.manifest import (BUILD_CONFIG, FORMAT_NAME, FORMAT_VERSION, MANIFEST, TrajectoryDataset,
                                   config_hash, read_json, sidecar_name, write_json)
from cmt.edm import sigma_grid
from cmt.solvers import SOLVERS, sample_trajectory

STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}
# Crash test hook: SIGKILL the build right after this many shards are renamed into place, before
# their sidecars are written (the worst moment for a resume).
KILL_AFTER_SHARDS = "CMT_BUILD_KILL_AFTER_SHARDS"
DERIVED_KEYS = ("sigmas", "kept_sigmas", "steps")


class NonFiniteTrajectories(RuntimeError):
    """The teacher produced NaN or inf; the message names the trajectory indices."""


class Teacher:
    """What the builder needs of a teacher: `denoiser(x, sigma, labels_one_hot)`, shapes, identity.

    identity: JSON-able description stored in the manifest (`name`, `path`, `sha256`, `config`...);
    everything but `path` is part of the build configuration, as is `guidance` (`describe()` of a
    `cmt.guidance` denoiser, or None).
    """

    def __init__(self, denoiser, data_shape, label_dim, identity, dtype=torch.float32, device="cpu", guidance=None):
        self.denoiser = denoiser
        self.guidance = guidance
        self.data_shape = tuple(data_shape)
        self.label_dim = int(label_dim)
        self.identity = dict(identity)
        self.dtype = dtype
        self.device = torch.device(device)


def trajectory_seed(seed, index):
    """The 64-bit generator seed of trajectory `index` of a dataset with `seed`."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def draw_inputs(indices, seed, data_shape, label_dim, labels):
    """`(noise [B, *shape] float32, labels [B] int64, seeds [B] uint64)` for trajectory `indices`.

    labels: "random" (drawn per trajectory after its noise), an int class, or None (-1, unconditional).
    """
    noises, classes, seeds = [], [], []
    for index in indices:
        seeds.append(trajectory_seed(seed, index))
        generator = torch.Generator().manual_seed(seeds[-1])
        noises.append(torch.randn(data_shape, generator=generator, dtype=torch.float32))
        if labels == "random":
            classes.append(int(torch.randint(label_dim, (), generator=generator)))
        else:
            classes.append(-1 if labels is None else int(labels))
    return torch.stack(noises), torch.tensor(classes, dtype=torch.int64), np.array(seeds, dtype=np.uint64)


def solver_steps(solver, nfe, grid):
    """Solver steps for `nfe` denoiser calls (Heun: 2 per step, 1 for a final step to sigma = 0)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; valid: {', '.join(SOLVERS)}")
    if nfe < 1:
        raise ValueError(f"--nfe must be >= 1, got {nfe}")
    if solver != "heun":
        return nfe
    steps = (nfe + 1) // 2 if grid == "karras" else nfe // 2
    if steps < 1 or (2 * steps - (grid == "karras")) != nfe:
        parity = "odd (2 * steps - 1)" if grid == "karras" else "even (2 * steps)"
        raise ValueError(f"heun on the {grid} grid makes an {parity} number of calls; --nfe {nfe} is not possible")
    return steps


def parse_states(states, steps):
    """`--states all|LIST` -> sorted grid indices in [0, steps] (negative ones count from the end)."""
    if states == "all":
        return list(range(steps + 1))
    try:
        indices = {int(item) for item in str(states).split(",") if item.strip()}
    except ValueError:
        raise ValueError(f"--states must be 'all' or a comma-separated list of state indices, got {states!r}") from None
    bad = [index for index in indices if not -steps - 1 <= index <= steps]
    if not indices or bad:
        raise ValueError(f"--states {states!r}: indices must lie in [0, {steps}] (or count back from -1); bad: {bad}")
    return sorted({index % (steps + 1) for index in indices})


def parse_labels(labels, label_dim):
    """`--labels random|none|CLASS` -> "random", None or an int, checked against the teacher."""
    if labels in (None, "none"):
        if label_dim:
            raise ValueError(f"the teacher is class-conditional ({label_dim} classes): give --labels random or a class")
        return None
    if not label_dim:
        raise ValueError(f"--labels {labels}: the teacher is unconditional; leave --labels out")
    if labels == "random":
        return "random"
    try:
        label = int(labels)
    except ValueError:
        raise ValueError(f"--labels must be 'random', 'none' or a class in [0, {label_dim}), got {labels!r}") from None
    if not 0 <= label < label_dim:
        raise ValueError(f"--labels {label}: class out of range [0, {label_dim})")
    return label


def build_config(teacher, *, solver="dpm++3m", nfe=16, grid="logsnr", sigma_min=0.002, sigma_max=80.0, rho=7.0,
                 num_trajectories, batch_size, seed=0, labels="random", fmt="zarr", shard_size=1000, dtype="float16",
                 states="all"):
    """The JSON configuration that fixes every byte of the dataset (checked, with clear errors)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    for flag, value in (("--num-trajectories", num_trajectories), ("--batch-size", batch_size),
                        ("--shard-size", shard_size)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    steps = solver_steps(solver, nfe, grid)
    sigmas = sigma_grid(grid, steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    kept = parse_states(states, steps)
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "layout": fmt,
        "teacher": {key: value for key, value in teacher.identity.items() if key != "path"},
        "guidance": teacher.guidance,
        "solver": solver, "nfe": nfe, "steps": steps, "grid": grid, "sigma_min": sigma_min, "sigma_max": sigma_max,
        **({"rho": rho} if grid == "karras" else {}),
        "sigmas": sigmas.tolist(), "kept_states": kept, "kept_sigmas": [float(sigmas[index]) for index in kept],
        "seed": seed, "labels": parse_labels(labels, teacher.label_dim), "label_dim": teacher.label_dim,
        "data_shape": list(teacher.data_shape), "dtype": dtype,
        "count": num_trajectories, "shard_size": shard_size, "batch_size": batch_size,
    }


def shard_plan(config):
    """`[(shard, name, first_index, count)]` for the whole dataset."""
    count, size = config["count"], config["shard_size"]
    return [(shard, shard_name(shard, config["layout"]), first, min(size, count - first))
            for shard, first in enumerate(range(0, count, size))]


def _differences(old, new, prefix=""):
    keys = sorted(set(old) | set(new))
    found = []
    for key in keys:
        if isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
            found += _differences(old[key], new[key], f"{prefix}{key}.")
        elif old.get(key) != new.get(key):
            found.append(f"{prefix}{key}: {str(old.get(key))[:60]} -> {str(new.get(key))[:60]}")
    return found


def check_output(fs, root, url, config):
    """Refuse an output that holds something else; True if it already holds this configuration."""
    path = f"{root}/{BUILD_CONFIG}"
    if fs.exists(path):
        existing = read_json(fs, path)
        if existing.get("config_hash") != config_hash(config):
            changes = _differences(existing.get("config", {}), config)
            # derived values (the grid, the kept sigmas) only repeat what the options already say
            stated = [change for change in changes if change.split(":")[0] not in DERIVED_KEYS] or changes
            changes = "; ".join(stated[:8])
            raise ValueError(f"{url} holds a dataset built with another configuration ({changes}); "
                             "re-run with the same options to resume it, or choose a new --out")
        return True
    if fs.exists(root) and fs.ls(root, detail=False):
        raise ValueError(f"{url} exists, is not empty and holds no {BUILD_CONFIG}: not a cmt-build output; "
                         "choose a new --out")
    return False


def shard_is_done(fs, root, name, first, count):
    """True when the shard's sidecar exists and its checksum and count match the files."""
    sidecar = f"{root}/{sidecar_name(name)}"
    if not fs.exists(sidecar):
        return False
    entry = read_json(fs, sidecar)
    if (entry.get("name"), entry.get("first_index"), entry.get("count")) != (name, first, count):
        return False
    try:
        return checksum(read_files(fs, f"{root}/{name}")) == entry.get("sha256")
    except ShardError:
        return False


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


def write_shard(fs, root, name, first, arrays, config, shards_written):
    """Encode, place atomically, then record the sidecar; returns the sidecar entry."""
    files = encode_shard(arrays, config["layout"], {"first_index": first, "count": len(arrays["index"])})
    write_atomic(fs, f"{root}/{name}", files)
    shards_written.append(name)
    if os.environ.get(KILL_AFTER_SHARDS) and len(shards_written) >= int(os.environ[KILL_AFTER_SHARDS]):
        os.kill(os.getpid(), signal.SIGKILL)
    entry = {"name": name, "first_index": first, "count": len(arrays["index"]), "sha256": checksum(files),
             "bytes": sum(len(data) for data in files.values())}
    write_json(fs, f"{root}/{sidecar_name(name)}", entry)
    return entry


def distributed_state():
    """accelerate's process state; processes launched on a machine without CUDA (or with
    ACCELERATE_USE_CPU=true) join one CPU (gloo) group instead of each running alone."""
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return PartialState(cpu=use_cpu or (launched and not torch.cuda.is_available()))


def build(out, teacher, config, *, eval_data=None, progress=True, log=print):
    """Build (or finish) the dataset `config` of `teacher` at `out`; returns the manifest (rank 0) or None."""
    state = distributed_state()
    fs, root = open_location(out)
    started = time.time()
    resuming = check_output(fs, root, out, config)  # on every rank, before anyone writes
    state.wait_for_everyone()
    if state.is_main_process and not resuming:
        fs.makedirs(root, exist_ok=True)
        write_json(fs, f"{root}/{BUILD_CONFIG}", {"config": config, "config_hash": config_hash(config)})
    state.wait_for_everyone()

    plan = shard_plan(config)
    mine = plan[state.process_index::state.num_processes]
    todo = [item for item in mine if not shard_is_done(fs, root, item[1], item[2], item[3])]
    kept = len(mine) - len(todo)
    bar = tqdm.tqdm(total=sum(item[3] for item in mine), initial=sum(item[3] for item in mine if item not in todo),
                    unit="traj", desc=f"cmt-build rank {state.process_index}/{state.num_processes}",
                    disable=not (progress and state.is_main_process), dynamic_ncols=True)
    shards_written = []
    # Encoding and writing a shard overlaps with the teacher's work on the next one.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as writer:
        pending = None
        for _, name, first, count in todo:
            remove_temporaries(fs, f"{root}/{name}")
            arrays = make_shard(teacher, config, first, count, progress=bar)
            if pending is not None:
                pending.result()
            pending = writer.submit(write_shard, fs, root, name, first, arrays, config, shards_written)
        if pending is not None:
            pending.result()
    bar.close()
    state.wait_for_everyone()
    if not state.is_main_process:
        return None

    entries = []
    for _, name, first, count in plan:
        entry = read_json(fs, f"{root}/{sidecar_name(name)}")
        if (entry["name"], entry["first_index"], entry["count"]) != (name, first, count):
            raise ShardError(f"{root}/{sidecar_name(name)} does not describe shard {name} ({first}, {count})")
        entries.append(entry)
    previous = read_json(fs, f"{root}/{MANIFEST}") if fs.exists(f"{root}/{MANIFEST}") else {}
    manifest = {**config, "config_hash": config_hash(config), "teacher": teacher.identity, "shards": entries,
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
    built = sum(item[3] for item in todo)
    stored_states = config["count"] * (len(config["kept_states"]) + 2)
    raw = stored_states * int(np.prod(config["data_shape"])) * 2
    log(f"cmt-build: {config['count']} trajectories in {len(plan)} shards at {out} "
        f"({len(todo)} shards built by this rank, {kept} kept from an earlier run); "
        f"{manifest['bytes']} bytes = {manifest['bytes'] / stored_states:.1f} bytes per stored state "
        f"({manifest['bytes'] / raw:.3f} x raw float16); {elapsed:.1f} s"
        + (f", {built / elapsed:.1f} trajectories/s on rank 0" if built else ""))
    return manifest


def evaluate_endpoints(out, data):
    """The embedded-data metric (`cmt.metrics.embedded_metric`) of every endpoint in the dataset."""
    from cmt.metrics import embedded_metric
    dataset = TrajectoryDataset(out)
    endpoints = torch.cat([torch.from_numpy(dataset.read_shard(entry)["endpoint"].astype(np.float32))
                           for entry in dataset.shards])
    metrics = embedded_metric(data, endpoints)
    if not metrics:
        raise ValueError(f"--eval-teacher: no built-in metric for data {data!r} (toy:NAME and mnist have one)")
    return {"data": str(data), "count": len(endpoints), "metrics": {key: float(value) for key, value in metrics.items()}}
