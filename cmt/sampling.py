"""cmt-sample: draw samples from a teacher (ODE solver) or a student (flow-map jumps) and save them.

Sample `i` starts from the noise of seed `seed + i` (EDM's convention), so one image can be
re-made alone and its seed is printed. Images go to a PNG grid, 2-D points to a scatter plot,
and everything to an optional `.npz` (`samples`, `labels`, `seeds`).
"""
from pathlib import Path

import click
import numpy as np
import torch

from cmt.edm import SIGMA_MAX, SIGMA_MIN, flow_map_jump, sigma_grid
from cmt.datasets import one_hot_labels
from cmt.images import save_image_grid, save_scatter
from cmt.solvers import SOLVERS, sample as solve

SAMPLERS = ("ode", "flowmap")


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
        raise ValueError(f"labels must be 'random', 'cycle' or a class id in [0, {label_dim - 1}], got {spec!r}")
    return torch.full((num,), label, dtype=torch.int64)


def ode_sample(net, noise, sigmas, labels=None, solver="dpm++3m"):
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


@torch.no_grad()
def generate(net, seeds, labels, *, sampler="ode", solver="dpm++3m", steps=16, grid="logsnr",
             sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, mid_sigma=None, batch_size=256, device=None):
    """Samples `[len(seeds), *net.data_shape]` (float32, CPU) for integer `labels` `[len(seeds)]`.

    `sampler="ode"`: `solver` over `steps` steps of the `grid` sigmas. `sampler="flowmap"`: 1 step
    `[sigma_max, 0]` or 2 steps `[sigma_max, mid_sigma, 0]`.
    """
    device = torch.device(device or next(net.parameters()).device)
    if sampler == "ode":
        sigmas = sigma_grid(grid, steps, sigma_min=sigma_min, sigma_max=sigma_max)
    elif sampler == "flowmap":
        if steps not in (1, 2) or (steps == 2 and mid_sigma is None):
            raise ValueError("the flow-map sampler takes 1 step, or 2 steps with a mid sigma")
        sigmas = [sigma_max, 0.0] if steps == 1 else [sigma_max, mid_sigma, 0.0]
    else:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
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


def _format_seeds(seeds):
    if len(seeds) > 1 and all(b - a == 1 for a, b in zip(seeds[:-1], seeds[1:])):
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(str(seed) for seed in seeds)


@click.command(context_settings={"show_default": True})
@click.option("--ckpt", required=True,
              help="A checkpoint (.safetensors, training .pt, EDM2 .pkl), a built-in teacher "
                   "(mnist, toy:checkerboard, toy:8gaussians, toy:moons) or an EDM2 preset.")
@click.option("--sampler", type=click.Choice(SAMPLERS), default="ode",
              help="ode: solve the teacher's ODE; flowmap: 1-/2-step jumps of a student.")
@click.option("--solver", type=click.Choice(sorted(SOLVERS)), default="dpm++3m", help="ODE solver.")
@click.option("--steps", type=click.IntRange(min=1), default=16, help="Solver steps (flowmap: 1 or 2).")
@click.option("--grid", type=click.Choice(["logsnr", "karras"]), default="logsnr",
              help="Sigma grid of the ODE solver (logsnr: the CMT trajectories' grid).")
@click.option("--sigma-min", type=click.FloatRange(min=0, min_open=True), default=SIGMA_MIN)
@click.option("--sigma-max", type=click.FloatRange(min=0, min_open=True), default=SIGMA_MAX)
@click.option("--mid-sigma", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Flowmap 2-step: the intermediate sigma.")
@click.option("--num", type=click.IntRange(min=1), default=64, help="Number of samples.")
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Sample i uses seed + i.")
@click.option("--labels", "labels_spec", default="random",
              help="Class labels of a conditional network: random, cycle, or a class id K.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="PNG: image grid, or scatter plot for 2-D data.")
@click.option("--npz", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also save samples, labels and seeds here.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, help="Samples per network batch.")
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
def main(ckpt, sampler, solver, steps, grid, sigma_min, sigma_max, mid_sigma, num, seed, labels_spec,
         out, npz, batch_size, device):
    """Sample a teacher or a student checkpoint to a PNG (and optionally an .npz)."""
    from cmt.teachers import resolve_teacher

    if out.suffix.lower() != ".png":
        raise click.BadParameter(f"{out}: the output must be a .png file", param_hint="--out")
    if npz is not None and npz.suffix.lower() != ".npz":
        raise click.BadParameter(f"{npz}: must end in .npz", param_hint="--npz")
    if sampler == "flowmap" and (steps > 2 or (steps == 2 and mid_sigma is None)):
        raise click.UsageError("--sampler flowmap takes --steps 1, or --steps 2 with --mid-sigma")
    if not sigma_min < sigma_max:
        raise click.BadParameter(f"--sigma-min {sigma_min} must be below --sigma-max {sigma_max}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        net, identity = resolve_teacher(ckpt, device=device)
    except (ValueError, FileNotFoundError) as error:
        raise click.BadParameter(str(error), param_hint="--ckpt") from None
    try:
        labels = pick_labels(labels_spec, num, net.label_dim, seed)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--labels") from None
    seeds = list(range(seed, seed + num))
    samples = generate(net, seeds, labels, sampler=sampler, solver=solver, steps=steps, grid=grid,
                       sigma_min=sigma_min, sigma_max=sigma_max, mid_sigma=mid_sigma,
                       batch_size=batch_size, device=device)
    reference = _toy_reference(identity)
    save_samples(samples, out, reference=reference)
    if npz is not None:
        npz.parent.mkdir(parents=True, exist_ok=True)
        np.savez(npz, samples=samples.numpy(), labels=labels.numpy(), seeds=np.array(seeds, dtype=np.int64))
    click.echo(f"{num} samples of {identity['path']} -> {out}" + (f", {npz}" if npz else ""))
    click.echo(f"seeds {_format_seeds(seeds)}")


def _toy_reference(identity):
    """The data's reference points behind a 2-D scatter, when the checkpoint records its toy data."""
    path = Path(identity["path"])
    if path.suffix != ".safetensors" or identity["config"].get("architecture") != "mlp":
        return None
    from cmt.checkpoint import read_safetensors
    from cmt.datasets import TOY_NAMES, reference_sample

    data = read_safetensors(path)[2].get("data", "")
    return reference_sample(data[4:]) if data.startswith("toy:") and data[4:] in TOY_NAMES else None


if __name__ == "__main__":
    main()
