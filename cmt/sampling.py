"""Sampling: draw samples from a teacher (ODE solver) or a student (flow-map jumps) and save them.

`generate` is the core (used by the trainers' reports too); `sample(ckpt=..., out=...)` is the
entry point behind `cmt-sample`. Sample `i` starts from the noise of seed `seed + i` (EDM's
convention), so one image can be re-made alone. Images go to a PNG grid, 2-D points to a scatter
plot, and everything to an optional `.npz` (`samples`, `labels`, `seeds`).

One module of ~410 lines: the samplers of each kind of network and the entry point that picks
among them by the model's record change together.
"""
from pathlib import Path

import numpy as np
import torch

from tqdm.auto import tqdm

from cmt.checkpoint import network_record, reading_once
from cmt.datasets import TOY_NAMES, one_hot_labels, reference_sample
from cmt.distributed import distributed_state, map_batches
from cmt.edm import SIGMA_GRIDS, SIGMA_MAX, SIGMA_MIN, TWO_STEP_SIGMA, sigma_grid, sigma_to_t
from cmt.errors import ArgumentError, NonFiniteSamples, local_path_only
from cmt.flags import renamed_keywords
from cmt.images import MAX_GRID_IMAGES, READABLE_CELL, save_image_grid, save_scatter
from cmt.labels import LABELS_HELP, parse_labels, pick_labels
from cmt.latents import LatentCodec
from cmt.metrics import POINT_METRIC_MAX_SAMPLES, embedded_metric, metric_note, too_few_for_a_metric
from cmt.options import checked_keywords, document_keywords
from cmt.outputs import write_npz
from cmt.seeds import derive_seed
from cmt.solvers import SOLVERS, flow_map_step, sample as solve
from cmt.teachers import resolve_teacher, teacher_label_dropout

SAMPLERS = ("ode", "flowmap")
# How a student's few steps go, which its record says (`student_sampler`): "consistency" jumps to
# sigma 0 and re-noises to the next sigma with fresh noise (ECT / ECD students, CMT endpoint
# students); "flowmap" jumps from each sigma to the next (CMT flow-map and MeanFlow students; in
# linear time this is MeanFlow's z_r = z_t - (t - r) u, from t = sigma_max / (1 + sigma_max)).
STUDENT_SAMPLERS = ("consistency", "flowmap")
# The time a flow-map student's jumps are taken in (its record's "time"; none: "sigma"). "sigma": EDM
# sigma from sigma_max (every student of the project's sigma-space networks). "t": MeanFlow's own
# time from t_max = 1, pure noise (sigma = infinity, which sigma space cannot start from), z_r = z_t -
# (t - r) u(z_t, t, r), for a network with a native `average_velocity(z, t, r, labels)` (SiT):
# 1 step t = 1 -> 0 (Gsunshine/meanflow meanflow.py `_default_schedule`: [1.0, 0.0]); 2 steps
# t = 1 -> 0.5 -> 0 (zhuyu-cs/MeanFlow meanflow_sampler.py: `linspace(1, 0, num_steps + 1)`; the JAX
# code has no 2-step default, it takes `sampling.sampling_timesteps`, None in configs/default.py).
SAMPLING_TIMES = ("sigma", "t")
MEANFLOW_T_MAX = 1.0
MEANFLOW_MID_SIGMA = 1.0   # t = 0.5

def fresh_noise_seed(seed, jump):
    """The seed of sample `seed`'s fresh noise before jump `jump` of multistep consistency sampling
    (32 bits: `cmt.seeds`)."""
    return derive_seed(seed, int(jump) + 1, bits=32)

# Defaults of `generate` and `sample` (hence of cmt-sample), defined once.
DEFAULT_SOLVER = "dpm++3m"
DEFAULT_STEPS = 16
DEFAULT_GRID = "logsnr"
DEFAULT_BATCH_SIZE = 256


def seed_noise(seeds, data_shape, device="cpu"):
    """Unit-variance noise `[len(seeds), *data_shape]`, row `i` from `torch.Generator` seeded `seeds[i]`."""
    rows = [torch.randn(data_shape, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds]
    return torch.stack(rows).to(device)


def ode_sample(net, noise, sigmas, labels=None, solver=DEFAULT_SOLVER):
    """A teacher's sample: solve the probability-flow ODE from `sigmas[0] * noise` along `sigmas`."""
    return solve(lambda x, sigma, label: net(x, sigma, label), noise, sigmas, solver, labels)


def flow_map_sample(net, noise, sigmas, labels=None, generator=None, fresh_noise=None, renoise=None):
    """A student's few-step sample along `sigmas` (e.g. `[80, 0]` or `[80, mid, 0]`).

    A flow-map network (`net.flow_map`) jumps deterministically from each sigma to the next. A
    consistency network jumps to the endpoint every time and is re-noised to the next sigma with
    fresh noise: `fresh_noise(k)` for the k-th re-noising (per-sample seeds, see `generate`), else
    drawn from `generator` (the multistep consistency sampler). renoise=True samples a flow-map
    network that way too (its jumps to 0 only: an ECT / ECD student started from a flow-map
    checkpoint); None: by `net.flow_map`.
    """
    sigmas = [float(sigma) for sigma in sigmas]
    x = sigmas[0] * noise
    for jump, (sigma, next_sigma) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        flow_map = getattr(net, "flow_map", False)
        if flow_map and not renoise:
            x = flow_map_step(net, x, sigma, next_sigma, labels)
        else:
            x = net(x, sigma, labels, target_sigma=0.0) if flow_map else net(x, sigma, labels)
            if next_sigma > 0:
                fresh = (fresh_noise(jump) if fresh_noise is not None
                         else torch.randn(x.shape, generator=generator, device="cpu")).to(x.device, x.dtype)
                x = x + next_sigma * fresh
    return x


def native_time(net):
    """Whether `net` is a flow map with its own time (`average_velocity(z, t, r, labels)`, SiT), so it
    can be sampled in t from t = 1 (`flow_map_sample_in_t`)."""
    return bool(getattr(net, "flow_map", False)) and callable(getattr(net, "average_velocity", None))


def flow_map_sample_in_t(net, noise, times, labels=None):
    """A flow-map student's few-step sample in MeanFlow's time along `times` (e.g. `[1, 0]` or
    `[1, 0.5, 0]`): z = times[0] * noise (pure noise at t = 1), then z_r = z_t - (t - r) u(z_t, t, r)
    with the network's own `average_velocity`; z at t = 0 is the sample."""
    times = [float(t) for t in times]
    z = times[0] * noise
    for t, r in zip(times[:-1], times[1:]):
        z = z - (t - r) * net.average_velocity(z, t, r, labels).to(z.dtype)
    return z


def sampler_times(steps, *, t_max=MEANFLOW_T_MAX, mid_sigma=MEANFLOW_MID_SIGMA):
    """The times of the flow-map sampler in t: `[t_max, 0]` (1 step) / `[t_max, t(mid_sigma), 0]` (2 steps)."""
    if steps not in (1, 2):
        raise ArgumentError("steps", f"the flow-map sampler takes 1 or 2 steps, got {steps}")
    if not 0 < t_max <= 1:
        raise ValueError(f"t_max must lie in (0, 1], got {t_max}")
    if steps == 1:
        return [t_max, 0.0]
    if mid_sigma is None or not 0 < sigma_to_t(mid_sigma) < t_max:
        raise ArgumentError("mid_sigma", f"the intermediate sigma must be > 0 and its t = sigma / (1 + sigma) below "
                                         f"t_max {t_max:g}, got {mid_sigma}")
    return [t_max, sigma_to_t(float(mid_sigma)), 0.0]


def sampler_sigmas(sampler, steps, *, grid=DEFAULT_GRID, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, mid_sigma=None):
    """The sigmas a sampler walks: the ODE solver's `grid` of `steps` steps, or the flow-map jumps
    `[sigma_max, 0]` (1 step) / `[sigma_max, mid_sigma, 0]` (2 steps)."""
    if sampler == "ode":
        return sigma_grid(grid, steps, sigma_min=sigma_min, sigma_max=sigma_max)
    if sampler != "flowmap":
        raise ArgumentError("sampler", f"{sampler!r} is not one of {', '.join(SAMPLERS)}")
    if steps not in (1, 2):
        raise ArgumentError("steps", f"the flow-map sampler takes 1 or 2 steps, got {steps}")
    if steps == 2 and mid_sigma is None:
        raise ArgumentError("mid_sigma", "the 2-step flow-map sampler needs the intermediate sigma")
    if steps == 2 and not sigma_min < mid_sigma < sigma_max:
        raise ArgumentError("mid_sigma", f"the intermediate sigma must lie between sigma_min {sigma_min:g} and "
                                         f"sigma_max {sigma_max:g}, got {mid_sigma:g}")
    return [sigma_max, 0.0] if steps == 1 else [sigma_max, mid_sigma, 0.0]


def torch_device(spec, argument="device"):
    """`torch.device(spec)`, checked to exist here: ArgumentError naming `argument` otherwise."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise ArgumentError(argument, f"{spec!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        found = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA here"
        raise ArgumentError(argument, f"{spec!r} is not available ({found}); use cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ArgumentError(argument, f"{spec!r} is not available here; use cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ArgumentError(argument, f"{spec!r}: cmt runs on cpu, cuda or mps")
    return device


def check_finite(samples, source):
    """NonFiniteSamples (naming `source`) if any sample holds NaN or inf: say so, plot and score nothing."""
    bad = int((~torch.isfinite(samples.reshape(len(samples), -1))).any(dim=1).sum()) if len(samples) else 0
    if bad:
        raise NonFiniteSamples(f"{source} produced NaN or inf in {bad} of {len(samples)} samples (diverged or "
                               "broken weights); nothing was written")


@torch.no_grad()
def generate(net, seeds, labels, *, sampler="ode", solver=DEFAULT_SOLVER, steps=DEFAULT_STEPS, grid=DEFAULT_GRID,
             sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, mid_sigma=None, batch_size=DEFAULT_BATCH_SIZE, device=None,
             state=None, progress=None, renoise=None, time="sigma", t_max=MEANFLOW_T_MAX):
    """Samples `[len(seeds), *net.data_shape]` (float32, CPU) for integer `labels` `[len(seeds)]`.
    renoise: `flow_map_sample`'s (None: re-noise between the jumps of consistency networks only).

    `sampler="ode"`: `solver` over `steps` steps of the `grid` sigmas. `sampler="flowmap"`: 1 step
    `[sigma_max, 0]` or 2 steps `[sigma_max, mid_sigma, 0]`; a consistency network's re-noising
    draws sample i's noise from seed `fresh_noise_seed(seeds[i], jump)`, so every sample depends
    on its own seed and label only. With `time="t"` (a student whose record says so, `native_time`
    networks only) the flow-map jumps go in MeanFlow's time instead: `[t_max, 0]` or `[t_max,
    t(mid_sigma), 0]` (`sampler_times`, `flow_map_sample_in_t`). state: an accelerate process state
    whose ranks share the batches (`cmt.distributed.map_batches`; every rank must call), None: this
    process alone. progress: a tqdm bar to advance.
    """
    device = torch.device(device or next(net.parameters()).device)
    in_t = sampler == "flowmap" and time == "t"
    if time not in SAMPLING_TIMES:
        raise ValueError(f"unknown sampling time {time!r}; valid: {', '.join(SAMPLING_TIMES)}")
    if in_t and not native_time(net):
        raise ArgumentError("sampler", "sampling in MeanFlow's time t needs a flow-map network with its own "
                                       "average_velocity (SiT); this one jumps in sigma")
    sigmas = (sampler_times(steps, t_max=t_max, mid_sigma=mid_sigma) if in_t else
              sampler_sigmas(sampler, steps, grid=grid, sigma_min=sigma_min, sigma_max=sigma_max, mid_sigma=mid_sigma))
    net = net.to(device).eval()

    def batch(start, stop):
        batch_seeds = seeds[start:stop]
        noise = seed_noise(batch_seeds, net.data_shape, device)
        batch_labels = one_hot_labels(labels[start:stop], net.label_dim)
        batch_labels = None if batch_labels is None else batch_labels.to(device)
        if sampler == "ode":
            x = ode_sample(net, noise, sigmas, batch_labels, solver)
        elif in_t:
            x = flow_map_sample_in_t(net, noise, sigmas, batch_labels)
        else:
            def fresh_noise(jump):
                return seed_noise([fresh_noise_seed(seed, jump) for seed in batch_seeds], net.data_shape, device)
            x = flow_map_sample(net, noise, sigmas, batch_labels, fresh_noise=fresh_noise, renoise=renoise)
        return x.float().cpu()

    return torch.cat(map_batches(batch, len(seeds), batch_size, state=state, progress=progress))


def student_sampler(kind, mid_sigma=TWO_STEP_SIGMA, sigma_max=SIGMA_MAX, time="sigma", t_max=MEANFLOW_T_MAX):
    """The record a student is saved with that says how to sample it (its `"sampler"`): `kind` of
    `STUDENT_SAMPLERS` and the jumps' defaults. time "sigma" (the default): `{"kind", "mid_sigma",
    "sigma_max"}`, the jumps in sigma from sigma_max; time "t" (flow maps only, `SAMPLING_TIMES`):
    `{"kind": "flowmap", "time": "t", "t_max", "mid_sigma", "mid_t"}`, MeanFlow's jumps in t from
    t_max, the 2-step one through mid_t = t(mid_sigma) (`mid_sigma` stays what `cmt-sample
    --mid-sigma` takes)."""
    if kind not in STUDENT_SAMPLERS:
        raise ValueError(f"unknown student sampler {kind!r}; valid: {', '.join(STUDENT_SAMPLERS)}")
    if time == "sigma":
        return {"kind": kind, "mid_sigma": float(mid_sigma), "sigma_max": float(sigma_max)}
    if time != "t" or kind != "flowmap":
        raise ValueError(f"time must be one of {', '.join(SAMPLING_TIMES)} ('t' for flow maps only), got {time!r}")
    sampler_times(2, t_max=t_max, mid_sigma=mid_sigma)   # checked
    return {"kind": kind, "time": "t", "t_max": float(t_max), "mid_sigma": float(mid_sigma),
            "mid_t": sigma_to_t(float(mid_sigma))}


def sampled_t_max(record):
    """The largest time t a student of this sampler record is sampled from (what its training must cover)."""
    if record.get("time") == "t":
        return float(record["t_max"])
    return sigma_to_t(float(record.get("sigma_max", SIGMA_MAX)))


def recorded_sampler(net):
    """How the model says it is sampled (`student_sampler`'s record), or None for a teacher (its ODE).
    Students saved before the record existed: ECT / ECD ones by re-noising, the others by their
    network (a flow map jumps, a consistency network re-noises). A flow map with its own time and no
    record (the MeanFlow port's checkpoints, `cmt.sit_checkpoint`): MeanFlow's sampler in t."""
    record = network_record(net)
    if isinstance(record.get("sampler"), dict):
        return record["sampler"]
    if record.get("method") in ("ect", "ecd"):
        return student_sampler("consistency")
    if record.get("phase") in ("mid", "post"):
        return student_sampler("flowmap" if getattr(net, "flow_map", False) else "consistency")
    if not record and native_time(net):
        return student_sampler("flowmap", mid_sigma=MEANFLOW_MID_SIGMA, time="t")
    return None


def save_samples(samples, path, labels=None, reference=None, nrow=None, title=None, max_images=MAX_GRID_IMAGES,
                 min_cell=READABLE_CELL):
    """A picture of samples people can read: images `[N, C, H, W]` -> a PNG grid of the first
    `max_images`, each enlarged to at least `min_cell` px; 2-D points `[N, 2]` -> a scatter plot
    (over `reference` if given, with `title` and a legend)."""
    if samples.ndim == 2 and samples.shape[1] == 2:
        return save_scatter(samples, path, reference=reference, title=title)
    return save_image_grid(samples.clamp(-1, 1), path, nrow=nrow, max_images=max_images, min_cell=min_cell)


def metric_title(name, metrics):
    """A picture's title: `name` and, on a second line, its metrics (`"energy distance 0.0004, ..."`)."""
    figures = ", ".join(f"{key.replace('_', ' ')} {value:.4g}" for key, value in metrics.items())
    return f"{name}\n{figures}" if figures else name


def toy_data_name(net):
    """`toy:NAME` when the network's record says it was trained on a built-in toy, else None."""
    data = str(network_record(net).get("data", ""))
    return data if data.startswith("toy:") and data[4:] in TOY_NAMES else None


def _check_sampling(*, sampler, solver, steps, grid, sigma_min, sigma_max, mid_sigma, num_samples, seed, batch_size):
    """What `sample` checks before it loads a network."""
    choices = {"sampler": (sampler, SAMPLERS), "solver": (solver, tuple(SOLVERS)), "grid": (grid, SIGMA_GRIDS)}
    for argument, (value, valid) in choices.items():
        if value not in valid:
            raise ArgumentError(argument, f"{value!r} is not one of {', '.join(valid)}")
    for argument, value, least in (("steps", steps, 1), ("num_samples", num_samples, 1), ("seed", seed, 0),
                                   ("batch_size", batch_size, 1)):
        if int(value) != value or value < least:
            raise ArgumentError(argument, f"must be an integer >= {least}, got {value!r}")
    for argument, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("mid_sigma", mid_sigma)):
        if value is not None and not value > 0:
            raise ArgumentError(argument, f"must be > 0, got {value!r}")
    if not sigma_min < sigma_max:
        raise ArgumentError("sigma_min", f"{sigma_min} must be below sigma_max {sigma_max}")
    sampler_sigmas(sampler, steps, grid=grid, sigma_min=sigma_min, sigma_max=sigma_max, mid_sigma=mid_sigma)


def latent_decoder(identity, vae, device):
    """The VAE codec that turns a latent network's samples into pictures (None for pixels and points)."""
    encoder = identity.get("encoder")
    if encoder is None or encoder.get("kind") == "standard_rgb":
        if vae is not None:
            raise ArgumentError("vae", "this network works on pixels or points, not VAE latents; leave the vae out")
        return None
    if vae is None and Path(str(encoder.get("vae_name"))).is_dir():
        vae = encoder["vae_name"]   # the local VAE a cmt-encode latent set recorded (and the network after it)
    if vae is None:
        raise ArgumentError("vae", f"this network makes VAE latents ({encoder.get('kind')}); the picture decodes "
                                   f"them with a VAE: the hub id {encoder.get('vae_name')} or a local diffusers "
                                   "AutoencoderKL directory")
    try:
        return LatentCodec.from_encoder_info(encoder, vae=vae, device=device)
    except (ImportError, OSError, ValueError) as error:
        raise ArgumentError("vae", str(error)) from None


# What each keyword of `sample` means: its docstring and cmt-sample's help (`cmt.options.document_keywords`).
SAMPLE_HELP = {
    "ckpt": "A checkpoint (.safetensors, training .pt, EDM2 .pkl, a run's snapshots/*.safetensors), a built-in "
            f"teacher ({', '.join(['mnist'] + [f'toy:{name}' for name in TOY_NAMES])}) or an EDM2 preset.",
    "out": f"PNG: a grid of the first {MAX_GRID_IMAGES} images (cells of at least {READABLE_CELL} px), or a scatter "
           "plot of 2-D data with the toy metric in its title.",
    "sampler": "ode: solve the teacher's ODE; flowmap: 1-/2-step jumps of a student, as its record says [default: "
               "the model's own, flowmap for a student, ode for a teacher].",
    "solver": "ODE solver.",
    "steps": f"Solver steps (flowmap: 1 or 2) [default: {DEFAULT_STEPS} ODE steps, 2 flow-map steps].",
    "grid": "Sigma grid of the ODE solver (logsnr: the CMT trajectories' grid).",
    "sigma_min": "The ODE grid's last nonzero sigma.",
    "sigma_max": "The ODE grid's first sigma (the noise's).",
    "mid_sigma": "Flowmap 2-step: the intermediate sigma [default: the student's recorded one, as it was trained "
                 f"and reported with, else {TWO_STEP_SIGMA}].",
    "num_samples": f"Number of samples (the grid shows the first {MAX_GRID_IMAGES}).",
    "seed": "Sample i uses seed + i.",
    "labels": LABELS_HELP,
    "npz": "Also save all samples, labels and seeds here (before the picture; latent networks: the latents).",
    "vae": "Latent networks (EDM2 img512): the diffusers AutoencoderKL that decodes the picture, a local directory "
           "or a hub id such as stabilityai/sd-vae-ft-mse.",
    "batch_size": "Samples per network batch.",
    "device": "torch device [default: cuda if available, else cpu].",
    "progress": "tqdm progress bar.",
    "metric": f"2-D samples of a built-in toy: score them with its metric (of the first {POINT_METRIC_MAX_SAMPLES} "
              "samples).",
}


@document_keywords(SAMPLE_HELP)
@renamed_keywords(num="num_samples")
@checked_keywords
def sample(*, ckpt, out, sampler=None, solver=DEFAULT_SOLVER, steps=None, grid=DEFAULT_GRID,
           sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, mid_sigma=None, num_samples=64, seed=0, labels=None,
           npz=None, vae=None, batch_size=DEFAULT_BATCH_SIZE, device=None, progress=True, metric=True):
    """Sample a teacher or a student checkpoint to a PNG (and optionally an .npz); `cmt-sample`.

    "ode" solves the teacher's ODE over the `grid` sigmas; "flowmap" makes the jumps a student's
    record says (`recorded_sampler`: re-noising between consistency jumps, or flow-map jumps; a
    record with time "t", MeanFlow students of SiT, jumps in t from t = 1 through t(mid_sigma),
    `flow_map_sample_in_t`). A 2-D toy's metric scores at most `cmt.metrics.POINT_METRIC_MAX_SAMPLES`
    and none below `cmt.metrics.MIN_METRIC_SAMPLES` (`metric_note` says why). Under
    `accelerate launch` the ranks share the batches and rank 0 writes (the same samples as one
    process).

    Returns `{"out": Path, "npz": Path or None, "seeds": [...], "labels": tensor [num_samples],
    "samples": tensor, "metrics": the toy metric of 2-D samples ({} otherwise), "metric_note": a line
    when the metric was skipped or scored a subset (else None), "identity": the checkpoint's record
    (cmt.teachers.resolve_teacher), "rank": this process's (0 wrote the files)}`.
    """
    local_path_only("out", out)
    if npz is not None:
        local_path_only("npz", npz)
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ArgumentError("out", f"{out}: the output must be a .png file")
    npz = None if npz is None else Path(npz)
    if npz is not None and npz.suffix.lower() != ".npz":
        raise ArgumentError("npz", f"{npz}: must end in .npz")
    check = dict(sampler=sampler, solver=solver, steps=steps, grid=grid, sigma_min=sigma_min, sigma_max=sigma_max,
                 mid_sigma=mid_sigma, num_samples=num_samples, seed=seed, batch_size=batch_size)
    _check_sampling(**{**check, "sampler": sampler or "ode", "steps": 1 if steps is None else steps,
                       "mid_sigma": TWO_STEP_SIGMA if mid_sigma is None else mid_sigma})   # wrong for any model
    state = distributed_state()
    device = device or (str(state.device) if state.num_processes > 1 else
                        "cuda" if torch.cuda.is_available() else "cpu")
    device = str(torch_device(device))
    try:
        with reading_once():
            net, identity = resolve_teacher(ckpt, device=device)
    except ArgumentError:
        raise
    except (ValueError, FileNotFoundError) as error:
        raise ArgumentError("ckpt", str(error)) from None
    recorded = recorded_sampler(net)
    sampler = sampler or ("flowmap" if recorded else "ode")
    if sampler == "ode" and getattr(net, "flow_map", False):
        raise ArgumentError("sampler", "this network is a flow map (a CMT flow-map or MeanFlow student): it is "
                                       "sampled by its jumps, sampler flowmap, not by an ODE solver")
    if steps is None:
        steps = DEFAULT_STEPS if sampler == "ode" else 2
    if mid_sigma is None:
        mid_sigma = (recorded or {}).get("mid_sigma", TWO_STEP_SIGMA)
    _check_sampling(**{**check, "sampler": sampler, "steps": steps, "mid_sigma": mid_sigma})
    time = (recorded or {}).get("time", "sigma") if sampler == "flowmap" else "sigma"
    t_max = float((recorded or {}).get("t_max", MEANFLOW_T_MAX))
    if time == "t":
        if sigma_max != SIGMA_MAX:
            raise ArgumentError("sigma_max", f"does not apply: this student is sampled in MeanFlow's time from t = "
                                             f"{t_max:g} (its record); leave it out")
        sampler_times(steps, t_max=t_max, mid_sigma=mid_sigma)
    codec = latent_decoder(identity, vae, device)
    spec = parse_labels(labels, net.label_dim, teacher_label_dropout(identity, net))   # refused before any work
    sample_labels = pick_labels("none" if spec is None else spec, num_samples, net.label_dim, seed)
    seeds = list(range(seed, seed + num_samples))
    bar = tqdm(total=num_samples, unit="sample", desc="cmt-sample", dynamic_ncols=True,
               disable=not (progress and state.is_main_process))
    samples = generate(net, seeds, sample_labels, sampler=sampler, solver=solver, steps=steps, grid=grid,
                       sigma_min=sigma_min, sigma_max=sigma_max, mid_sigma=mid_sigma,
                       batch_size=batch_size, device=device, state=state, progress=bar,
                       renoise=(recorded or {}).get("kind") == "consistency", time=time, t_max=t_max)
    bar.close()
    check_finite(samples, f"{identity.get('path') or ckpt}")
    toy = toy_data_name(net) if samples.ndim == 2 else None
    skipped = None if toy is None else "--no-metric" if not metric else too_few_for_a_metric(num_samples)
    note = f"metric skipped: {skipped}" if skipped else metric_note(toy, num_samples) if toy is not None else None
    metrics = {}
    if state.is_main_process:
        metrics = embedded_metric(toy, samples) if toy is not None and not skipped else {}
        if npz is not None:   # the samples first: a picture that fails to draw loses nothing
            write_npz(npz, samples=samples.numpy(), labels=sample_labels.numpy(),
                      seeds=np.array(seeds, dtype=np.int64))
        shown = samples if codec is None else codec.decode(samples[:MAX_GRID_IMAGES].to(device)).cpu()
        what = f"{Path(str(identity.get('path') or ckpt)).name}, {sampler} {steps} step{'s' * (steps > 1)}"
        save_samples(shown, out, reference=None if toy is None else reference_sample(toy[4:]),
                     title=metric_title(what, metrics))
    state.wait_for_everyone()
    return {"out": out, "npz": npz, "seeds": seeds, "labels": sample_labels, "samples": samples, "metrics": metrics,
            "metric_note": note, "identity": identity, "sampler": sampler, "steps": steps,
            "rank": state.process_index}
