"""What a build is before any teacher call: its configuration (`build_config`: every option that
fixes the dataset's bytes, with its hash), the seeds and inputs of each trajectory, the solver's
steps and the kept states, the shard plan, and the check of an output folder against an earlier
build's configuration (`check_output`)."""

import numpy as np
import torch

from cmt.errors import ArgumentError
from cmt.formats import shard_name
from cmt.manifest import BUILD_CONFIG, config_hash, read_json, upgrade_manifest
from cmt.options import differences
from cmt.seeds import derive_seed
from cmt.solvers import FLOW_MAP, SOLVERS

STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}
# The ODE solver of a diffusion teacher when none is named (the official CMT targets', DPM-Solver++(3M)).
DEFAULT_SOLVER = "dpm++3m"
DERIVED_KEYS = ("sigmas", "kept_sigmas", "steps")
# The options that fix the dataset's bytes (`build_config`); the others say where it goes and how
# the build runs.
CONFIG_OPTIONS = ("solver", "nfe", "grid", "sigma_max", "sigma_min", "rho", "num_trajectories", "batch_size", "seed",
                  "labels", "format", "shard_size", "dtype", "states", "compression")


def trajectory_seed(seed, index):
    """The 64-bit generator seed of trajectory `index` of a dataset with `seed`."""
    return derive_seed(seed, index, bits=64)


def draw_inputs(indices, seed, data_shape, label_dim, labels):
    """`(noise [B, *shape] float32, labels [B] int64, seeds [B] uint64)` for trajectory `indices`.

    labels: "random" (drawn per trajectory after its noise), "cycle" (index % label_dim), an int
    class, or None (-1, unconditional).
    """
    noises, classes, seeds = [], [], []
    for index in indices:
        seeds.append(trajectory_seed(seed, index))
        generator = torch.Generator().manual_seed(seeds[-1])
        noises.append(torch.randn(data_shape, generator=generator, dtype=torch.float32))
        if labels == "random":
            classes.append(int(torch.randint(label_dim, (), generator=generator)))
        elif labels == "cycle":
            classes.append(index % label_dim)
        else:
            classes.append(-1 if labels is None else int(labels))
    return torch.stack(noises), torch.tensor(classes, dtype=torch.int64), np.array(seeds, dtype=np.uint64)


def solver_steps(solver, nfe, grid):
    """Solver steps for `nfe` denoiser calls (Heun: 2 per step, 1 for a final step to sigma = 0; a
    flow map's jumps: 1 each)."""
    if solver not in SOLVERS and solver != FLOW_MAP:
        raise ArgumentError("solver", f"unknown solver {solver!r}; valid: {', '.join(SOLVERS)}, {FLOW_MAP}")
    if nfe < 1:
        raise ArgumentError("nfe", f"must be >= 1, got {nfe}")
    if solver != "heun":
        return nfe
    steps = (nfe + 1) // 2 if grid == "karras" else nfe // 2
    if steps < 1 or (2 * steps - (grid == "karras")) != nfe:
        parity = "odd (2 * steps - 1)" if grid == "karras" else "even (2 * steps)"
        raise ArgumentError("nfe", f"heun on the {grid} grid makes an {parity} number of calls; {nfe} is not possible")
    return steps


def parse_states(states, steps):
    """`states`: "all" or a list "0,4,8" -> sorted grid indices in [0, steps] (negative ones count from the end)."""
    if states == "all":
        return list(range(steps + 1))
    try:
        indices = {int(item) for item in str(states).split(",") if item.strip()}
    except ValueError:
        raise ArgumentError("states", f"must be 'all' or a comma-separated list of state indices, got {states!r}") \
            from None
    bad = [index for index in indices if not -steps - 1 <= index <= steps]
    if not indices or bad:
        raise ArgumentError("states", f"{states!r}: indices must lie in [0, {steps}] (or count back from -1); "
                                      f"bad: {bad}")
    return sorted({index % (steps + 1) for index in indices})


def shard_plan(config):
    """`[(shard, name, first_index, count)]` for the whole dataset."""
    count, size = config["count"], config["shard_size"]
    return [(shard, shard_name(shard, config["format"]), first, min(size, count - first))
            for shard, first in enumerate(range(0, count, size))]


def trajectory_config(config):
    """What fixes every trajectory's bytes: the configuration but the count. Trajectory i depends
    on (seed, i) alone, so a set built with more trajectories starts with the same ones."""
    return {key: value for key, value in config.items() if key != "count"}


def build_config_hash(config):
    """The hash recorded in build-config.json and the manifest: of `trajectory_config(config)`, so
    the sets of one configuration share it whatever their size."""
    return config_hash(trajectory_config(config))


def check_output(fs, root, url, config):
    """Refuse an output that holds something else. Returns "new" (nothing there yet), "resume" (it
    holds this configuration) or "extend" (it holds fewer trajectories of this configuration: the
    build adds the rest; a smaller count than the recorded one is refused)."""
    path = f"{root}/{BUILD_CONFIG}"
    if fs.exists(path):
        existing = read_json(fs, path)
        recorded = upgrade_manifest(existing.get("config", {}))
        if trajectory_config(recorded) != trajectory_config(config):
            changes = [f"{name}: {str(before)[:60]} -> {str(after)[:60]}"
                       for name, before, after in differences(recorded, config, missing=None) if name != "count"]
            # derived values (the grid, the kept sigmas) only repeat what the options already say
            stated = [change for change in changes if change.split(":")[0] not in DERIVED_KEYS] or changes
            changes = "; ".join(stated[:8])
            raise ArgumentError("out", f"{url} holds a dataset built with another configuration ({changes}); "
                                       "re-run with the same options to resume it (or with a larger "
                                       "num_trajectories to extend it), or choose a new output")
        if config["count"] < recorded.get("count", 0):
            raise ArgumentError("num_trajectories", f"{url} holds (or is building) {recorded['count']} trajectories "
                                                    f"of this configuration; a set only grows: give at least "
                                                    f"{recorded['count']}, or choose a new output")
        return "extend" if config["count"] > recorded.get("count", 0) else "resume"
    if fs.exists(root) and fs.ls(root, detail=False):
        raise ArgumentError("out", f"{url} exists, is not empty and holds no {BUILD_CONFIG}: not a cmt-build "
                                   "output; choose a new output")
    return "new"
