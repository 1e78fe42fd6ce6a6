"""Benchmark of a CMT mid-training step; prints the figures (no pass/fail).

1. Targets from shards against targets made online: the step time of `cmt-train mid` (a batch of
   stored states and endpoints from `ShardReader`, one student forward and backward, an Adam step)
   over the step time of the official CMT design (sony/cmt `DPMSolverLoss`), which in every step
   runs the teacher's 16-step DPM-Solver++ from fresh noise for batch / 16 trajectories and trains
   on their 16 states; same student, same batch of targets, same distance. Target <= 0.75.
2. Data wait: the share of the shard-reading step spent waiting for the next batch, with the
   default reader workers of `cmt-train mid`. Target < 5%.

    python benchmarks/bench_mid.py [--teacher PATH|mnist] [--batch-size 128] [--steps 20] [--device cpu]
    python benchmarks/bench_mid.py --quick            # seconds: small sizes, the script works

The default teacher is the built-in `mnist` teacher when it is installed, otherwise the EDM2 network
that `cmt-train diffusion` builds for MNIST (16x16, 32 channels, 10 classes) with random weights:
only its cost per call matters here.
"""
import inspect
import tempfile
import time
from pathlib import Path

import click
import torch

from cmt.builders.build import Teacher, build_trajectories
from cmt.datasets import one_hot_labels
from cmt.datasets.shards import ShardReader
from cmt.edm import SIGMA_MIN, sigma_grid
from cmt.networks import build_network
from cmt.solvers import sample_trajectory
from cmt.teachers import builtin_teacher_path, resolve_teacher
from cmt.trainers.distances import squared_l2
from cmt.trainers.mid import endpoint_loss, mid_train
from cmt.trainers.students import student_config

MNIST_SIZED = dict(architecture="edm2", img_resolution=16, img_channels=1, label_dim=10, model_channels=32,
                   channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
DEFAULT_WORKERS = inspect.signature(mid_train).parameters["workers"].default   # mid-training's reader workers
QUICK = {"steps": 3, "warmup": 1, "num_trajectories": 64}


def load_teacher(spec):
    if spec is None and builtin_teacher_path("mnist").is_file():
        spec = "mnist"
    if spec is None:
        torch.manual_seed(0)
        net = build_network(MNIST_SIZED)
        return net, {"kind": "random", "name": "edm2-mnist-sized", "config": net.config}
    return resolve_teacher(spec)


class Context:
    """What the objective reads from the loop's context."""
    accelerator = None
    step = 0


def online_batch(teacher, nfe, batch_size, device, generator):
    """The official design's targets: batch / nfe fresh teacher trajectories, all their states but
    the endpoint, each paired with the endpoint (sony/cmt training/loss.py, DPMSolverLoss)."""
    count = batch_size // nfe
    noise = torch.randn((count, *teacher.data_shape), generator=generator, device=device)
    labels = torch.randint(teacher.label_dim, (count,), generator=generator, device=device) if teacher.label_dim \
        else torch.full((count,), -1, device=device)
    with torch.no_grad():
        trajectory = sample_trajectory(lambda x, sigma, label: teacher(x, sigma, label), noise,
                                       sigma_grid("logsnr", nfe), solver="dpm++3m",
                                       labels=one_hot_labels(labels, teacher.label_dim))
    states, endpoint = trajectory.states[:-1], trajectory.states[-1]    # [nfe, count, ...], [count, ...]
    return {"state": states.flatten(0, 1), "sigma": trajectory.sigmas[:-1].float().to(device).repeat_interleave(count),
            "endpoint": endpoint.repeat(nfe, *[1] * (endpoint.ndim - 1)), "label": labels.repeat(nfe)}


def timed_steps(student, next_batch, steps, warmup, device):
    """Mean seconds per optimizer step and per wait for a batch."""
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-4)
    total = wait = 0.0
    for step in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        batch = {key: value.to(device) for key, value in next_batch().items()}
        synchronize(device)
        waited = time.perf_counter() - start
        loss = endpoint_loss(student, batch, Context(), distance=squared_l2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        synchronize(device)
        if step >= warmup:
            total += time.perf_counter() - start
            wait += waited
    return total / steps, wait / steps


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def quick_sizes(ctx, param, value):
    if value:
        ctx.default_map = {**QUICK, **(ctx.default_map or {})}


@click.command()
@click.option("--quick", is_flag=True, is_eager=True, expose_value=False, callback=quick_sizes,
              help="Small sizes (" + ", ".join(f"{key}={value}" for key, value in QUICK.items()) + ") unless given.")
@click.option("--teacher", default=None, help="Teacher name or checkpoint [default: mnist, or an MNIST-sized EDM2].")
@click.option("--batch-size", type=click.IntRange(min=16), default=128, help="Targets (states) per step.")
@click.option("--nfe", type=click.IntRange(min=1), default=16, help="Teacher solver steps (the official design's).")
@click.option("--steps", type=click.IntRange(min=1), default=20, help="Timed steps per design.")
@click.option("--warmup", type=click.IntRange(min=0), default=3)
@click.option("--num-trajectories", type=click.IntRange(min=1), default=512, help="Trajectories in the shards.")
@click.option("--workers", type=click.IntRange(min=0), default=DEFAULT_WORKERS, help="Shard reader workers.")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu")
def main(teacher, batch_size, nfe, steps, warmup, num_trajectories, workers, device):
    teacher, identity = load_teacher(teacher)
    teacher = teacher.eval().requires_grad_(False).to(device)
    torch.manual_seed(0)
    student = build_network(student_config(teacher.config, sigma_min=SIGMA_MIN)).to(device).train()
    student.load_state_dict(teacher.state_dict())
    print(f"teacher {identity.get('name') or identity.get('path')}: {teacher.config['architecture']}, "
          f"data {tuple(teacher.data_shape)}, {teacher.label_dim} classes; batch {batch_size} targets; "
          f"device {device}, {torch.get_num_threads()} threads")

    with tempfile.TemporaryDirectory() as root:
        shards = Path(root) / "shards"
        started = time.perf_counter()
        builder_teacher = Teacher(teacher, teacher.data_shape, teacher.label_dim, {**identity, "path": "benchmark"},
                                  device=device)
        build_trajectories(teacher=builder_teacher, out=shards, nfe=nfe, num_trajectories=num_trajectories,
                           batch_size=256, shard_size=128, labels="random" if teacher.label_dim else None,
                           progress=False, log=lambda message: None)
        print(f"built {num_trajectories} trajectories x {nfe + 1} states in {time.perf_counter() - started:.1f} s "
              "(once, before training)")
        batches = iter(ShardReader(shards, batch_size, seed=0, num_workers=workers))
        stored, stored_wait = timed_steps(student, lambda: next(batches), steps, warmup, device)

    generator = torch.Generator(device).manual_seed(0)
    online, online_wait = timed_steps(student, lambda: online_batch(teacher, nfe, batch_size, device, generator),
                                      steps, warmup, device)
    print(f"{'design':44s} {'s/step':>8s} {'targets/s':>10s} {'waiting':>8s}")
    print(f"{'targets from shards (cmt-train mid)':44s} {stored:8.4f} {batch_size / stored:10.1f} "
          f"{stored_wait / stored:8.1%}")
    print(f"{f'teacher {nfe}-step solver in each step (official)':44s} {online:8.4f} {batch_size / online:10.1f} "
          f"{online_wait / online:8.1%}")
    print(f"step time ratio shards / online = {stored / online:.3f} (target <= 0.75)")
    print(f"data wait share with {workers} reader workers = {stored_wait / stored:.1%} (target < 5%)")


if __name__ == "__main__":
    main()
