"""Sampling: draw samples from a teacher (ODE solver) or a student (flow-map jumps) and save them.

`generate` is the core (used by the trainers' reports too); `sample(ckpt=..., out=...)` is the
entry point behind `cmt-sample`. Sample `i` starts from the noise of seed `seed + i` (EDM's
convention), so one image can be re-made alone. Images go to a PNG grid, 2-D points to a scatter
plot, and everything to an optional `.npz` (`samples`, `labels`, `seeds`).
"""
from pathlib import Path

import numpy as np
import torch

from cmt.checkpoint import read_safetensors
from cmt.datasets import TOY_NAMES, one_hot_labels, reference_sample
from cmt.edm import SIGMA_GRIDS, SIGMA_MAX, SIGMA_MIN, flow_map_jump, sigma_grid
from cmt.errors import ArgumentError
from cmt.images import save_image_grid, save_scatter
from cmt.solvers import SOLVERS, sample as solve
from cmt.teachers import resolve_teacher

SAMPLERS = ("ode", "flowmap")
# Defaults of `generate` and `sample` (hence of cmt-sample), defined once.
DEFAULT_SOLVER = "dpm++3m"
DEFAULT_STEPS = 16
DEFAULT_GRID = "logsnr"
DEFAULT_BATCH_SIZE = 256


def seed_noise(seeds, data_shape, device="cpu"):
    """Unit-variance noise `[len(seeds), *data_shape]`, row `i` from `torch.Generator` seeded `seeds[i]`."""
    rows = [torch.randn(data_shape, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds]
    return torch.stack(rows).to(device)


def pick_labels(spec, num, label_dim, seed=0):
    """Integer class ids `[num]`: "random" (seeded), "cycle" (0, 1, ..., 0, 1, ...) or one class K;
    all -1 for an unconditional network."""
    if not label_dim:
        return torch.full((num,), -1, dtype=torch.int64)
    if spec == "random":
        return torch.randint(label_dim, (num,), generator=torch.Generator().manual_seed(seed))
    if spec == "cycle":
        return torch.arange(num) % label_dim
    try:
        label = int(spec)
    except ValueError:
        label = -2
    if not 0 <= label < label_dim:
        raise ArgumentError("labels", f"must be 'random', 'cycle' or a class id in [0, {label_dim - 1}], got {spec!r}")
    return torch.full((num,), label, dtype=torch.int64)


def ode_sample(net, noise, sigmas, labels=None, solver=DEFAULT_SOLVER):
    """A teacher's sample: solve the probability-flow ODE from `sigmas[0] * noise` along `sigmas`."""
    return solve(lambda x, sigma, label: net(x, sigma, label), noise, sigmas, solver, labels)


def flow_map_sample(net, noise, sigmas, labels=None, generator=None):
    """A student's few-step sample along `sigmas` (e.g. `[80, 0]` or `[80, mid, 0]`).

    A flow-map network (`net.flow_map`) jumps deterministically from each sigma to the next. A
    consistency network jumps to the endpoint every time and is re-noised to the next sigma with
    fresh noise from `generator` (the multistep consistency sampler).
    """
    sigmas = [float(sigma) for sigma in sigmas]
    x = sigmas[0] * noise
    for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
        if getattr(net, "flow_map", False):
            denoised = net(x, sigma, labels, target_sigma=next_sigma)
            x = flow_map_jump(x, sigma, next_sigma, denoised)
        else:
            x = net(x, sigma, labels)
            if next_sigma > 0:
                fresh = torch.randn(x.shape, generator=generator, device="cpu").to(x.device)
                x = x + next_sigma * fresh
    return x


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
    return [sigma_max, 0.0] if steps == 1 else [sigma_max, mid_sigma, 0.0]


@torch.no_grad()
def generate(net, seeds, labels, *, sampler="ode", solver=DEFAULT_SOLVER, steps=DEFAULT_STEPS, grid=DEFAULT_GRID,
             sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, mid_sigma=None, batch_size=DEFAULT_BATCH_SIZE, device=None):
    """Samples `[len(seeds), *net.data_shape]` (float32, CPU) for integer `labels` `[len(seeds)]`.

    `sampler="ode"`: `solver` over `steps` steps of the `grid` sigmas. `sampler="flowmap"`: 1 step
    `[sigma_max, 0]` or 2 steps `[sigma_max, mid_sigma, 0]`.
    """
    device = torch.device(device or next(net.parameters()).device)
    sigmas = sampler_sigmas(sampler, steps, grid=grid, sigma_min=sigma_min, sigma_max=sigma_max, mid_sigma=mid_sigma)
    net = net.to(device).eval()
    outputs = []
    for start in range(0, len(seeds), batch_size):
        batch_seeds = seeds[start:start + batch_size]
        noise = seed_noise(batch_seeds, net.data_shape, device)
        batch_labels = one_hot_labels(labels[start:start + batch_size], net.label_dim)
        batch_labels = None if batch_labels is None else batch_labels.to(device)
        if sampler == "ode":
            x = ode_sample(net, noise, sigmas, batch_labels, solver)
        else:
            generator = torch.Generator().manual_seed(int(batch_seeds[0]) + 1_000_003)
            x = flow_map_sample(net, noise, sigmas, batch_labels, generator)
        outputs.append(x.float().cpu())
    return torch.cat(outputs)


def save_samples(samples, path, labels=None, reference=None, nrow=None):
    """Images `[N, C, H, W]` -> PNG grid; 2-D points `[N, 2]` -> scatter (over `reference` if given)."""
    if samples.ndim == 2 and samples.shape[1] == 2:
        return save_scatter(samples, path, reference=reference)
    return save_image_grid(samples.clamp(-1, 1), path, nrow=nrow)


def toy_reference(identity):
    """The data's reference points behind a 2-D scatter, when the checkpoint records its toy data."""
    path = Path(identity["path"])
    if path.suffix != ".safetensors" or identity["config"].get("architecture") != "mlp":
        return None
    data = read_safetensors(path)[2].get("data", "")
    return reference_sample(data[4:]) if data.startswith("toy:") and data[4:] in TOY_NAMES else None


def _check_sampling(*, sampler, solver, steps, grid, sigma_min, sigma_max, mid_sigma, num, seed, batch_size):
    """What `sample` checks before it loads a network."""
    choices = {"sampler": (sampler, SAMPLERS), "solver": (solver, tuple(SOLVERS)), "grid": (grid, SIGMA_GRIDS)}
    for argument, (value, valid) in choices.items():
        if value not in valid:
            raise ArgumentError(argument, f"{value!r} is not one of {', '.join(valid)}")
    for argument, value, least in (("steps", steps, 1), ("num", num, 1), ("seed", seed, 0), ("batch_size", batch_size, 1)):
        if int(value) != value or value < least:
            raise ArgumentError(argument, f"must be an integer >= {least}, got {value!r}")
    for argument, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("mid_sigma", mid_sigma)):
        if value is not None and not value > 0:
            raise ArgumentError(argument, f"must be > 0, got {value!r}")
    if not sigma_min < sigma_max:
        raise ArgumentError("sigma_min", f"{sigma_min} must be below sigma_max {sigma_max}")
    sampler_sigmas(sampler, steps, grid=grid, sigma_min=sigma_min, sigma_max=sigma_max, mid_sigma=mid_sigma)


def sample(*, ckpt, out, sampler="ode", solver=DEFAULT_SOLVER, steps=DEFAULT_STEPS, grid=DEFAULT_GRID,
           sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, mid_sigma=None, num=64, seed=0, labels="random", npz=None,
           batch_size=DEFAULT_BATCH_SIZE, device=None):
    """Sample a teacher or a student checkpoint to a PNG (and optionally an .npz); `cmt-sample`.

    ckpt: a checkpoint (.safetensors, training .pt, EDM2 .pkl), a built-in teacher (mnist,
    toy:checkerboard, toy:8gaussians, toy:moons) or an EDM2 preset. out: the PNG (image grid, or
    scatter plot of 2-D data). sampler "ode" solves the teacher's ODE with `solver` over `steps`
    steps of the `grid` sigmas; "flowmap" makes 1 or 2 jumps of a student (2: via `mid_sigma`).
    Sample i uses seed `seed + i`; labels: "random", "cycle" or a class id K (ignored by an
    unconditional network). npz: also save samples, labels and seeds there. device: default cuda
    if available, else cpu.

    Returns `{"out": Path, "npz": Path or None, "seeds": [...], "labels": tensor [num],
    "samples": tensor, "identity": the checkpoint's record (cmt.teachers.resolve_teacher)}`.
    """
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ArgumentError("out", f"{out}: the output must be a .png file")
    npz = None if npz is None else Path(npz)
    if npz is not None and npz.suffix.lower() != ".npz":
        raise ArgumentError("npz", f"{npz}: must end in .npz")
    _check_sampling(sampler=sampler, solver=solver, steps=steps, grid=grid, sigma_min=sigma_min,
                    sigma_max=sigma_max, mid_sigma=mid_sigma, num=num, seed=seed, batch_size=batch_size)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        net, identity = resolve_teacher(ckpt, device=device)
    except ArgumentError:
        raise
    except (ValueError, FileNotFoundError) as error:
        raise ArgumentError("ckpt", str(error)) from None
    sample_labels = pick_labels(labels, num, net.label_dim, seed)
    seeds = list(range(seed, seed + num))
    samples = generate(net, seeds, sample_labels, sampler=sampler, solver=solver, steps=steps, grid=grid,
                       sigma_min=sigma_min, sigma_max=sigma_max, mid_sigma=mid_sigma,
                       batch_size=batch_size, device=device)
    save_samples(samples, out, reference=toy_reference(identity))
    if npz is not None:
        npz.parent.mkdir(parents=True, exist_ok=True)
        np.savez(npz, samples=samples.numpy(), labels=sample_labels.numpy(), seeds=np.array(seeds, dtype=np.int64))
    return {"out": out, "npz": npz, "seeds": seeds, "labels": sample_labels, "samples": samples, "identity": identity}
