"""Benchmark of a CMT mid-training step; prints the figures (no pass/fail).

Three contenders, alternating in rounds (the order rotates from round to round, so a change of
machine load hits all of them), each round `--steps` timed optimizer steps after `--warmup`:

- mid: the step of `cmt-train mid`, through the trainer itself (`loop.Trainer.fit`: Accelerate,
  the objective, the guard, the lr schedule, the EMA, the logs) with the batches of `ShardReader`
  as `mid_train` makes it (workers "auto", stored dtype, default cache). Its per-step wall time is
  the log's `sec_per_step` at `--log-every 1`.
- bare: a plain PyTorch loop on the same network and a batch already in memory: forward (the
  same objective), backward, Adam, an EMA update. `step_vs_bare` = mid / bare; target <= 1.10.
- official: the official CMT design (sony/cmt `DPMSolverLoss`), which in every step runs the
  teacher's 16-step DPM-Solver++ from fresh noise for batch / 16 trajectories and trains on their
  16 states; same student, batch and distance. `mid_vs_official` = mid / official; target <= 0.75.

    python benchmarks/bench_mid.py [--teacher PATH|mnist] [--batch-size 128] [--steps 10] [--rounds 5]
    python benchmarks/bench_mid.py --quick            # seconds: small sizes, the script works

The default teacher is the built-in `mnist` teacher when it is installed, otherwise the EDM2 network
that `cmt-train diffusion` builds for MNIST (16x16, 32 channels, 10 classes) with random weights:
only its cost per call matters here. The last line holds the median ratios as name=value pairs.
"""
import copy
import functools
import inspect
import statistics
import tempfile
import time
from pathlib import Path

import click
import torch

from cmt.builders.build import Teacher, build_trajectories
from cmt.datasets import one_hot_labels
from cmt.datasets.shards import ShardReader, auto_workers
from cmt.edm import SIGMA_MIN, sigma_grid
from cmt.networks import build_network
from cmt.solvers import sample_trajectory
from cmt.teachers import builtin_teacher_path, resolve_teacher
from cmt.trainers import loop, run_files
from cmt.trainers.distances import squared_l2
from cmt.trainers.mid import endpoint_loss, mid_train
from cmt.trainers.students import student_config
from quick import quick_option

MNIST_SIZED = dict(architecture="edm2", img_resolution=16, img_channels=1, label_dim=10, model_channels=32,
                   channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
DEFAULT_WORKERS = inspect.signature(mid_train).parameters["workers"].default   # mid-training's reader workers
QUICK = {"steps": 3, "warmup": 1, "num_trajectories": 64, "rounds": 2}
ADAM_BETAS = loop.TRAIN_DEFAULTS["betas"]
EMA_BETA = 0.999


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


def bare_steps(student, batch, steps, warmup, device, next_batch=None):
    """Seconds per step of a plain loop: forward, backward, Adam, EMA update (a batch already on
    the device, or `next_batch()` for each step: the official design's online targets)."""
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-4, betas=ADAM_BETAS)
    times = []
    for step in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        step_batch = batch if next_batch is None else next_batch()
        loss = endpoint_loss(student, step_batch, Context(), distance=squared_l2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), student.parameters()):
                p_ema.lerp_(p, 1 - EMA_BETA)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


def mid_steps(student, shards, batch_size, steps, warmup, workers, out):
    """Seconds per step of the trainer's loop on `ShardReader` batches (median of the log's
    sec_per_step after the warm-up)."""
    config = loop.TrainConfig(out=out, max_steps=warmup + steps, batch_size=batch_size, lr=1e-4, log_every=1,
                              ckpt_every=10**9, progress=False, ema_beta=EMA_BETA)
    trainer = loop.Trainer(config)
    batches = ShardReader(shards, trainer.micro_batch_size, seed=trainer.shared_seed_for(0), num_workers=workers,
                          exclude_endpoint=True, dtype=None)
    trainer.fit(student, functools.partial(endpoint_loss, distance=squared_l2), batches)
    records = run_files.read_log(out)
    return statistics.median(record["sec_per_step"] for record in records[warmup:])


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@click.command()
@quick_option(QUICK)
@click.option("--teacher", default=None, help="Teacher name or checkpoint [default: mnist, or an MNIST-sized EDM2].")
@click.option("--batch-size", type=click.IntRange(min=16), default=128, help="Targets (states) per step.")
@click.option("--nfe", type=click.IntRange(min=1), default=16, help="Teacher solver steps (the official design's).")
@click.option("--steps", type=click.IntRange(min=1), default=10, help="Timed steps per contender and round.")
@click.option("--warmup", type=click.IntRange(min=0), default=2)
@click.option("--rounds", type=click.IntRange(min=1), default=5, help="Rounds of the three contenders in turn.")
@click.option("--num-trajectories", type=click.IntRange(min=1), default=512, help="Trajectories in the shards.")
@click.option("--workers", default=DEFAULT_WORKERS, help="Shard reader workers (auto: as cmt-train mid).")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu")
def main(teacher, batch_size, nfe, steps, warmup, rounds, num_trajectories, workers, device):
    workers = auto_workers() if workers == "auto" else int(workers)
    teacher, identity = load_teacher(teacher)
    teacher = teacher.eval().requires_grad_(False).to(device)
    torch.manual_seed(0)
    student = build_network(student_config(teacher.config, sigma_min=SIGMA_MIN)).train()
    student.load_state_dict(teacher.state_dict())
    print(f"teacher {identity.get('name') or identity.get('path')}: {teacher.config['architecture']}, "
          f"data {tuple(teacher.data_shape)}, {teacher.label_dim} classes; batch {batch_size} targets; "
          f"device {device}, {torch.get_num_threads()} threads, {workers} reader workers; {rounds} rounds of "
          f"{steps} steps (+{warmup} warm-up) per contender")

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
        fixed = {key: value.to(device).float() if value.is_floating_point() else value.to(device)
                 for key, value in next(iter(ShardReader(shards, batch_size, seed=0, exclude_endpoint=True))).items()}
        generator = torch.Generator(device).manual_seed(0)
        contenders = {
            "mid": lambda k: mid_steps(copy.deepcopy(student), shards, batch_size, steps, warmup, workers,
                                       Path(root) / f"mid-{k}"),
            "bare": lambda k: bare_steps(copy.deepcopy(student).to(device), fixed, steps, warmup, device),
            "official": lambda k: bare_steps(copy.deepcopy(student).to(device), None, steps, warmup, device,
                                             lambda: online_batch(teacher, nfe, batch_size, device, generator)),
        }
        times = {name: [] for name in contenders}
        for k in range(rounds):
            names = list(contenders)[k % 3:] + list(contenders)[:k % 3]
            for name in names:
                times[name].append(contenders[name](k))
            print(f"  round {k}: " + ", ".join(f"{name} {times[name][-1]:.4f} s/step" for name in contenders))

    def ratio(name, base):
        values = [a / b for a, b in zip(times[name], times[base])]
        return statistics.median(values), min(values), max(values)

    print(f"{'contender':44s} {'s/step (median)':>16s} {'targets/s':>10s}")
    labels = {"mid": "cmt-train mid step (trainer + ShardReader)", "bare": "bare loop (fwd, bwd, Adam, EMA)",
              "official": f"teacher {nfe}-step solver in each step (official)"}
    for name in contenders:
        median = statistics.median(times[name])
        print(f"{labels[name]:44s} {median:16.4f} {batch_size / median:10.1f}")
    step, mid_official = ratio("mid", "bare"), ratio("mid", "official")
    print(f"mid step / bare step = {step[0]:.3f} median of {rounds} rounds (spread {step[1]:.3f}-{step[2]:.3f}; "
          f"target <= 1.10)")
    print(f"mid step / official step = {mid_official[0]:.3f} (spread {mid_official[1]:.3f}-{mid_official[2]:.3f}; "
          f"target <= 0.75)")
    print(f"step_vs_bare={step[0]:.3f} mid_vs_official={mid_official[0]:.3f}")


if __name__ == "__main__":
    main()
