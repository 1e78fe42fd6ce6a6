"""Why MeanFlow post-training from CMT flow-map weights degraded on the toy (issue 10); prints figures.

For each start (flow-map mid-training with `--velocity-share` 0, pairs only, and 0.25, the default,
whose diagonal rows fit u(z, t, t) to the teacher's velocity; or the checkpoints given as --init):
1. the average velocity u(z_t, t, r) and its time derivative du/dt along the teacher's ODE (what
   MeanFlow's target v - (t - r) du/dt takes from the network, by a JVP), each against the
   teacher's own flow map from a 256-step solve, as a relative RMS error over the solve's times,
   for r = 0 and r at sigma 0.4; and the diagonal u(z_t, t, t) against the teacher's velocity
   (what MeanFlow's r = t rows, 0.75 of its batch, regress onto);
2. MeanFlow post-training from it under the toy recipe (and with --variants all, variants of it),
   for each post-training seed: the 1- and 2-step energy distance (8000 samples, the teacher's
   beside it) at step 0 and at the end.

    python benchmarks/bench_meanflow_drift.py                     # both starts, 3 post-training seeds
    python benchmarks/bench_meanflow_drift.py --init runs/claim/checkerboard/seed0/mid-flowmap/mid.pt --variants all
    python benchmarks/bench_meanflow_drift.py --velocity-shares 0.25 --variants all --variant-seeds 0,1,2
    python benchmarks/bench_meanflow_drift.py --quick             # small starts: ~1 minute

Starts are made as bench_claim's default budget does (2000 trajectories, 1000 flow-map mid-training
steps, seed 0). The last line holds the figures as name=value pairs.
"""
import json
import math
import tempfile
from pathlib import Path

import click
import torch

import cmt
from cmt.checkpoint import load_network
from cmt.edm import sigma_to_t, x_to_z
from cmt.metrics import embedded_metric
from cmt.sampling import flow_map_sample
from cmt.solvers import sample, sample_trajectory
from cmt.teachers import resolve_teacher
from cmt.trainers.mid import FLOWMAP_VELOCITY_SHARE, teacher_velocity
from cmt.trainers.students import average_velocity
from quick import quick_option

DATA = "toy:checkerboard"
MID_SIGMA = 0.821
# name: post_train options over the toy recipe (lr 1e-5, batch 1024 since 2026-12-03, norm_p 0,
# equal_share 0.75, logit-normal(-0.4, 1.0)); "cifar10": MeanFlow's CIFAR-10 time sampler
# (Gsunshine/py-meanflow meanflow/scripts/cifar10_v0.sh: P_mean -2.0, P_std 2.0, ratio of r != t 0.75).
# The variants keep the batch they were measured at (docs/claim.md).
BEFORE = {"batch_size": 256}   # the toy recipe's MeanFlow batch until 2026-12-03
VARIANTS = {
    "recipe": {},
    "batch 256": BEFORE,
    "lr 3e-6": {**BEFORE, "lr": 3e-6},
    "equal_share 0": {**BEFORE, "equal_share": 0.0},
    "equal_share 0.25": {**BEFORE, "equal_share": 0.25},
    "cifar10 sampler": {**BEFORE, "p_mean": -2.0, "p_std": 2.0, "equal_share": 0.25},
    # Whether the 1-step drift comes from rarely sampling the 1-step jump (t near t_max): t, the
    # larger of two draws, is above 0.9 in 7.1% (p_mean 0.4) and 10.2% (p_std 1.6) of the rows,
    # against 0.9% in the recipe.
    "p_mean 0.4": {**BEFORE, "p_mean": 0.4},
    "p_std 1.6": {**BEFORE, "p_std": 1.6},
    "equal_share 0.9": {**BEFORE, "equal_share": 0.9},
    "p_std 1.6 lr 3e-6": {**BEFORE, "p_std": 1.6, "lr": 3e-6},
    # Whether it is gradient noise from the conditional velocity e - x: the teacher's velocity instead.
    "velocity teacher": {**BEFORE, "velocity": "teacher"},
}


def teacher_flow_map_errors(net, teacher, num=2000, substeps=16):
    """Relative RMS error of u and of du/dt along the teacher's trajectories, per target time."""
    noise = torch.randn(num, 2, generator=torch.Generator().manual_seed(5))
    sigmas = torch.exp(torch.linspace(math.log(80.0), math.log(0.002), 16 * substeps + 1, dtype=torch.float64))
    with torch.no_grad():
        trajectory = sample_trajectory(lambda x, s, l: teacher(x, s, l), noise, sigmas.tolist(), "dpm++3m")
    sigma = trajectory.sigmas.float()
    t = sigma_to_t(sigma)
    z = torch.stack([x_to_z(state, s) for state, s in zip(trajectory.states.float(), sigma)])
    z[-1], t[-1] = trajectory.states[-1].float(), 0.0   # the endpoint is clean data, t = 0
    errors = {}
    for name, end in (("r=0", len(sigma) - 1), ("r=sigma0.4", 8 * substeps)):
        r = torch.full((num,), float(t[end]))
        value, slope = [], []
        for i in range(1, end - 1):
            exact = (z[i] - z[end]) / (t[i] - t[end])
            before, after = (z[i - 1] - z[end]) / (t[i - 1] - t[end]), (z[i + 1] - z[end]) / (t[i + 1] - t[end])
            exact_slope = (before - after) / (t[i - 1] - t[i + 1])
            tangent = (z[i - 1] - z[i + 1]) / (t[i - 1] - t[i + 1])   # dz/dt along the solve
            times = torch.full((num,), float(t[i]))
            with torch.no_grad():
                u, du = torch.func.jvp(lambda z_, t_: average_velocity(net, z_, t_, r), (z[i], times),
                                       (tangent, torch.ones_like(times)))
            value.append(float((u - exact).square().sum(1).mean() / exact.square().sum(1).mean()) ** 0.5)
            slope.append(float((du - exact_slope).square().sum(1).mean() / exact_slope.square().sum(1).mean()) ** 0.5)
        errors[name] = {"u": float(torch.tensor(value).median()), "du_dt": float(torch.tensor(slope).median())}
    diagonal = []
    for i in range(0, len(sigma) - 1, substeps):   # the stored times of a 16-step solve
        times = torch.full((num,), float(t[i]))
        velocity = teacher_velocity(teacher, trajectory.states[i].float(), torch.full((num,), float(sigma[i])))
        with torch.no_grad():
            u = average_velocity(net, z[i], times, times)
        diagonal.append(float((u - velocity).square().sum(1).mean() / velocity.square().sum(1).mean()) ** 0.5)
    errors["r=t"] = {"u": float(torch.tensor(diagonal).median())}
    return errors


def energy_distances(net, noise):
    """1- and 2-step energy distance of a flow-map network from `80 * noise`."""
    with torch.no_grad():
        return tuple(embedded_metric(DATA, flow_map_sample(net, noise, sigmas))["energy_distance"]
                     for sigmas in ([80.0, 0.0], [80.0, MID_SIGMA, 0.0]))


def make_start(root, num_trajectories, mid_steps, velocity_share):
    if not (root / "trajectories").exists():
        cmt.build_trajectories(teacher=DATA, out=str(root / "trajectories"), num_trajectories=num_trajectories,
                               nfe=16, seed=0, progress=False)
    out = root / f"mid-share{velocity_share:g}"
    cmt.mid_train(data=str(root / "trajectories"), target="flowmap", out=str(out), max_steps=mid_steps, seed=0,
                  velocity_share=velocity_share, workers=0, num_samples=256, log_every=max(1, mid_steps // 4),
                  progress=False)
    return out / "mid.pt"


@click.command(context_settings={"show_default": True})
@click.option("--init", "inits", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="toy:checkerboard flow-map checkpoints (mid.pt) [default: make one per --velocity-shares].")
@click.option("--velocity-shares", default=f"0,{FLOWMAP_VELOCITY_SHARE}", help="Without --init: the starts made.")
@click.option("--variants", type=click.Choice(["recipe", "all"]), default="recipe",
              help="recipe: the toy recipe only; all: also the variants of it.")
@click.option("--post-seeds", default="0,1,2", help="MeanFlow post-training seeds of the recipe run.")
@click.option("--variant-seeds", default="0", help="MeanFlow post-training seeds of each variant's run.")
@click.option("--steps", type=click.IntRange(min=1), default=250, help="MeanFlow steps per run.")
@click.option("--num-samples", type=click.IntRange(min=100), default=8000)
@click.option("--num-trajectories", type=click.IntRange(min=16), default=2000, help="Without --init.")
@click.option("--mid-steps", type=click.IntRange(min=1), default=1000, help="Without --init.")
@quick_option({"steps": 20, "num_samples": 2000, "num_trajectories": 256, "mid_steps": 100, "post_seeds": "0"})
def main(inits, velocity_shares, variants, post_seeds, variant_seeds, steps, num_samples, num_trajectories, mid_steps):
    torch.set_num_threads(1)
    teacher, _ = resolve_teacher(DATA)
    noise = torch.randn(num_samples, 2, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        teacher_samples = sample(lambda x, s, l: teacher(x, s, l), noise, torch.exp(torch.linspace(
            math.log(80.0), math.log(0.002), 65)).tolist(), "dpm++3m")
    teacher_ed = embedded_metric(DATA, teacher_samples)["energy_distance"]
    print(f"teacher energy distance at {num_samples} samples: {teacher_ed:.5f}")
    seeds = [int(seed) for seed in post_seeds.split(",")]
    figures = {}
    with tempfile.TemporaryDirectory(prefix="bench-mf-drift-") as scratch:
        root = Path(scratch)
        starts = {str(path): path for path in inits} or {
            f"share{share:g}": make_start(root, num_trajectories, mid_steps, share)
            for share in map(float, velocity_shares.split(","))}
        for label, init in starts.items():
            start = load_network(init)
            errors = teacher_flow_map_errors(start, teacher, num=min(2000, num_samples))
            print(f"start {label}: relative RMS error against the teacher's flow map (median over the solve's times)")
            for name, error in errors.items():
                print(f"  {name:11s} u {error['u']:.3f}" + (f"   du/dt {error['du_dt']:.3f}" if "du_dt" in error else ""))
                for key, value in error.items():
                    figures[f"{label}_{'dudt' if key == 'du_dt' else key}_error_{name}"] = value
            first = energy_distances(start, noise)
            print(f"  step 0: 1-step {first[0]:.5f}, 2-step {first[1]:.5f}")
            print(f"  {'variant':18s} {'seed':>4s} {'1-step':>8s} {'2-step':>8s}   after {steps} MeanFlow steps (x step 0)")
            runs = [("recipe", {}, seed) for seed in seeds]
            if variants == "all":
                runs += [(name, options, seed) for name, options in VARIANTS.items() if name != "recipe"
                         for seed in map(int, variant_seeds.split(","))]
            for name, options, seed in runs:
                out = root / "post" / label.replace("/", "_") / f"{name.replace(' ', '-')}-seed{seed}"
                cmt.post_train(init=str(init), method="meanflow", data=DATA, out=str(out), recipe="toy",
                               max_steps=steps, seed=seed, log_every=steps, ckpt_every=steps, num_samples=256,
                               progress=False, **options)
                last = energy_distances(load_network(out / "post.safetensors"), noise)
                print(f"  {name:18s} {seed:4d} {last[0]:8.5f} {last[1]:8.5f}   ({last[0] / first[0]:.2f}, "
                      f"{last[1] / first[1]:.2f})  {json.dumps(options)}", flush=True)
                figures[f"{label}_{name.replace(' ', '_')}_seed{seed}_2step_vs_start"] = last[1] / first[1]
                figures[f"{label}_{name.replace(' ', '_')}_seed{seed}_1step_vs_start"] = last[0] / first[0]
    print(" ".join(f"{name}={value:.3f}" for name, value in figures.items()))


if __name__ == "__main__":
    main()
