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
  (Run when the batch holds at least one trajectory's states: batch >= nfe.)

With `--meanflow` (the default for `--sit`), two more, on random latents and labels of the data's
shape: MeanFlow post-training of the flow-map student (the teacher's weights, a zero-initialised
`target_sigma` input), with the imagenet256-meanflow recipe's objective settings (guidance omega 1,
kappa 0.5, label dropout 0.1, adaptive weight; t up to 1 for a SiT, sampled from t = 1):
- meanflow: its step through the trainer (`loop.Trainer.fit` over `RandomBatches`, the objective
  `cmt.trainers.meanflow.meanflow_loss`: guided velocity, JVP, gradient forward).
- meanflow_bare: the same objective written out here in plain PyTorch on a batch already in memory
  (`bare_meanflow_loss`), with Adam and the EMA update. `meanflow_vs_bare` = meanflow / meanflow_bare.

    python benchmarks/bench_mid.py [--teacher PATH|mnist] [--batch-size 128] [--steps 10] [--rounds 5]
    python benchmarks/bench_mid.py --sit sit-b/4 --batch-size 16 --nfe 16 --num-trajectories 16 \
        --steps 2 --warmup 1 --rounds 3            # a SiT-B/4-shaped student on 32x32x4 latents
    python benchmarks/bench_mid.py --quick            # seconds: small sizes, the script works

The default teacher is the built-in `mnist` teacher when it is installed, otherwise the EDM2 network
that `cmt-train diffusion` builds for MNIST (16x16, 32 channels, 10 classes) with random weights:
only its cost per call matters here. `--sit SIZE`: a SiT of that size (cmt.networks.sit.SIT_PRESETS)
with random weights on `--latent-side` x `--latent-side` x 4 latents and 1000 classes (ImageNet-256's
SD-VAE latents). The last line holds the median ratios as name=value pairs.
"""
import copy
import functools
import inspect
import shutil
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
from cmt.trainers.config import TRAIN_DEFAULTS, TrainConfig
from cmt.trainers.batches import RandomBatches
from cmt.trainers.distances import squared_l2
from cmt.networks.sit import sit_config
from cmt.trainers.meanflow import MF_T_MAX, meanflow_loss
from cmt.trainers.mid import endpoint_loss, mid_train
from cmt.trainers.recipes import RECIPES
from cmt.trainers.students import average_velocity, frozen_weight_norm, student_config
from quick import quick_option

MNIST_SIZED = dict(architecture="edm2", img_resolution=16, img_channels=1, label_dim=10, model_channels=32,
                   channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
DEFAULT_WORKERS = inspect.signature(mid_train).parameters["workers"].default   # mid-training's reader workers
QUICK = {"steps": 3, "warmup": 1, "num_trajectories": 64, "rounds": 2}
ADAM_BETAS = TRAIN_DEFAULTS["betas"]
EMA_BETA = 0.999


# The objective settings of MeanFlow's recipe (Gsunshine/meanflow configs/default.py).
MEANFLOW_RECIPE = RECIPES["imagenet256-meanflow"]["post"]["meanflow"]
MEANFLOW_OPTIONS = {key: MEANFLOW_RECIPE[key] for key in ("p_mean", "p_std", "equal_share", "norm_p", "norm_eps",
                                                          "cfg_omega", "cfg_kappa", "label_dropout")}


# A SiT smaller than SiT's own sizes, for the quick forms (the scripts work; no figure of interest).
TINY_SIT = {"sit-tiny/2": dict(depth=2, hidden_size=64, num_heads=2, patch_size=2)}


def sit_network_config(size, latent_side, classes=1000):
    """The config of a SiT of `size` (cmt.networks.sit.SIT_PRESETS, or `TINY_SIT`) on side^2 x 4 latents."""
    shape = (4, latent_side, latent_side)
    if size in TINY_SIT:
        return {"architecture": "sit", "data_shape": list(shape), "label_dim": classes, **TINY_SIT[size]}
    return sit_config(size, data_shape=shape, label_dim=classes)


def load_teacher(spec, sit=None, latent_side=32, classes=1000):
    if sit is not None:
        torch.manual_seed(0)
        net = build_network(sit_network_config(sit, latent_side, classes))
        return net, {"kind": "random", "name": f"{sit}-shaped", "config": net.config}
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


def timed_steps(student, loss_of_step, steps, warmup, device):
    """Median seconds per step of a plain loop: `loss_of_step()`, backward, Adam, EMA update (the
    first `warmup` steps not counted)."""
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-4, betas=ADAM_BETAS)
    times = []
    for step in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        loss = loss_of_step()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), student.parameters()):
                p_ema.lerp_(p, 1 - EMA_BETA)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


def bare_steps(student, batch, steps, warmup, device, next_batch=None):
    """Seconds per step of the plain endpoint loop (a batch already on the device, or `next_batch()`
    for each step: the official design's online targets)."""
    return timed_steps(student, lambda: endpoint_loss(student, batch if next_batch is None else next_batch(), Context(),
                                                      distance=squared_l2).mean(), steps, warmup, device)


def mid_steps(student, shards, batch_size, steps, warmup, workers, out):
    """Seconds per step of the trainer's loop on `ShardReader` batches (median of the log's
    sec_per_step after the warm-up)."""
    config = TrainConfig(out=out, max_steps=warmup + steps, batch_size=batch_size, lr=1e-4, log_every=1,
                              ckpt_every=10**9, progress=False, ema_beta=EMA_BETA)
    trainer = loop.Trainer(config)
    batches = ShardReader(shards, trainer.micro_batch_size, seed=trainer.shared_seed_for(0), num_workers=workers,
                          exclude_endpoint=True, dtype=None)
    trainer.fit(student, functools.partial(endpoint_loss, distance=squared_l2), batches)
    return logged_seconds_per_step(out, warmup)


def logged_seconds_per_step(out, warmup):
    """The median of a run's logged sec_per_step after the warm-up; then the run folder goes, before the
    final training state (2 GB for a SiT-B/4) is written back to disk while the next contender runs."""
    records = run_files.read_log(out)
    shutil.rmtree(out)
    return statistics.median(record["sec_per_step"] for record in records[warmup:])


def bare_meanflow_loss(net, x, labels, generator, *, t_max, p_mean, p_std, equal_share, norm_p, norm_eps, cfg_omega,
                       cfg_kappa, label_dropout):
    """MeanFlow's loss in plain PyTorch (Gsunshine/meanflow meanflow.py `forward`, as the paper writes
    it): logit-normal (t, r), a share with r = t; z = (1 - t) x + t e; the guided velocity omega v +
    (1 - omega - kappa) u(z, t, t | none) + kappa u(z, t, t | y), v itself for the dropped labels; du/dt
    by a JVP along (v_g, 1, 0) without gradient; |u - (v_g - (t - r) du/dt)|^2 with the adaptive weight."""
    n = x.shape[0]
    draws = torch.sigmoid(torch.randn(2, n, generator=generator, device=x.device) * p_std + p_mean)
    t, r = draws.max(0).values.clamp(max=t_max), draws.min(0).values
    r = torch.where(torch.arange(n, device=x.device) < int(n * equal_share), t, torch.minimum(r, t))
    e = torch.randn(x.shape, generator=generator, device=x.device)
    view = (-1,) + (1,) * (x.ndim - 1)
    z, v = (1 - t.view(view)) * x + t.view(view) * e, e - x
    dropped = torch.arange(n, device=x.device) < int((torch.rand(n, generator=generator, device=x.device)
                                                       < label_dropout).sum())
    with torch.no_grad():
        uncond = average_velocity(net, z, t, t, torch.zeros_like(labels))
        cond = average_velocity(net, z, t, t, labels)
    guided = cfg_omega * v + (1 - cfg_omega - cfg_kappa) * uncond + cfg_kappa * cond
    v_g = torch.where(dropped.view(view), v, guided)
    labels = labels * (~dropped)[:, None].to(labels.dtype)
    with torch.no_grad():
        _, du_dt = torch.func.jvp(lambda z, t, r: average_velocity(net, z, t, r, labels), (z, t, r),
                                  (v_g, torch.ones_like(t), torch.zeros_like(r)))
    target = v_g - (t - r).view(view) * du_dt
    error = (average_velocity(net, z, t, r, labels) - target).square().flatten(1).sum(1)
    return (error / (error.detach() + norm_eps) ** norm_p).mean()


def random_latents(n, generator, data_shape, label_dim, device="cpu"):
    """Random data of the student's shape and integer labels: only the cost of a step matters."""
    return {"data": torch.randn((n, *data_shape), generator=generator).to(device),
            "label": torch.randint(label_dim, (n,), generator=generator).to(device) if label_dim
            else torch.full((n,), -1, device=device)}


def bare_meanflow_steps(student, batch, steps, warmup, device, t_max):
    """Seconds per step of a plain MeanFlow loop: the loss above, backward, Adam, EMA update."""
    labels = torch.nn.functional.one_hot(batch["label"], student.label_dim).float() if student.label_dim else None
    generator = torch.Generator(device).manual_seed(0)

    def loss():
        with frozen_weight_norm(student):   # EDM2 normalises its weights in place, which a JVP refuses
            return bare_meanflow_loss(student, batch["data"], labels, generator, t_max=t_max, **MEANFLOW_OPTIONS)
    return timed_steps(student, loss, steps, warmup, device)


def meanflow_steps(student, batch_size, steps, warmup, out, t_max):
    """Seconds per step of MeanFlow post-training's objective through the trainer's loop (median of
    the log's sec_per_step after the warm-up), on fresh random latents each step."""
    config = TrainConfig(out=out, max_steps=warmup + steps, batch_size=batch_size, lr=1e-4, log_every=1,
                              ckpt_every=10**9, progress=False, ema_beta=EMA_BETA, mixed_precision="no")
    trainer = loop.Trainer(config)
    batches = RandomBatches(lambda n, generator: random_latents(n, generator, student.data_shape,
                                                                     student.label_dim),
                                 trainer.micro_batch_size, seed=0)
    trainer.fit(student, functools.partial(meanflow_loss, t_max=t_max, **MEANFLOW_OPTIONS), batches)
    return logged_seconds_per_step(out, warmup)


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@click.command()
@quick_option(QUICK)
@click.option("--teacher", default=None, help="Teacher name or checkpoint [default: mnist, or an MNIST-sized EDM2].")
@click.option("--sit", default=None, help="A SiT size (sit-b/4, ...; sit-tiny/2 for a quick check): random teacher and "
                                         "students of that shape.")
@click.option("--latent-side", type=click.IntRange(min=2), default=32, help="--sit: latents of this side x 4 channels.")
@click.option("--meanflow/--no-meanflow", default=None, help="Also time MeanFlow post-training [default: with --sit].")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, help="Targets (states) per step.")
@click.option("--nfe", type=click.IntRange(min=1), default=16, help="Teacher solver steps (the official design's).")
@click.option("--steps", type=click.IntRange(min=1), default=10, help="Timed steps per contender and round.")
@click.option("--warmup", type=click.IntRange(min=0), default=2)
@click.option("--rounds", type=click.IntRange(min=1), default=5, help="Rounds of the contenders in turn.")
@click.option("--num-trajectories", type=click.IntRange(min=1), default=512, help="Trajectories in the shards.")
@click.option("--workers", default=DEFAULT_WORKERS, help="Shard reader workers (auto: as cmt-train mid).")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu")
def main(teacher, sit, latent_side, meanflow, batch_size, nfe, steps, warmup, rounds, num_trajectories, workers,
         device):
    workers = auto_workers() if workers == "auto" else int(workers)
    meanflow = sit is not None if meanflow is None else meanflow
    teacher, identity = load_teacher(teacher, sit, latent_side)
    teacher = teacher.eval().requires_grad_(False).to(device)
    torch.manual_seed(0)
    student = build_network(student_config(teacher.config, sigma_min=SIGMA_MIN)).train()
    student.load_state_dict(teacher.state_dict())
    flow_student = build_network(student_config(teacher.config, flow_map=True)).train()
    flow_student.load_state_dict(teacher.state_dict(), strict=False)   # + the zero-initialised target input
    # a SiT is sampled from t = 1 (cmt.sampling.student_sampler(time="t")): its training covers t up to 1
    t_max = 1.0 if hasattr(flow_student, "average_velocity") else MF_T_MAX
    official = batch_size >= nfe
    print(f"teacher {identity.get('name') or identity.get('path')}: {teacher.config['architecture']}, "
          f"{sum(p.numel() for p in teacher.parameters()) / 1e6:.1f} M parameters, "
          f"data {tuple(teacher.data_shape)}, {teacher.label_dim} classes; batch {batch_size} targets; "
          f"device {device}, {torch.get_num_threads()} threads, {workers} reader workers; {rounds} rounds of "
          f"{steps} steps (+{warmup} warm-up) per contender")

    with tempfile.TemporaryDirectory() as root:
        shards = Path(root) / "shards"
        started = time.perf_counter()
        builder_teacher = Teacher(teacher, teacher.data_shape, teacher.label_dim, {**identity, "path": "benchmark"},
                                  device=device)
        build_trajectories(teacher=builder_teacher, out=shards, nfe=nfe, num_trajectories=num_trajectories,
                           batch_size=min(256, num_trajectories), shard_size=128,
                           labels="random" if teacher.label_dim else None, progress=False, log=lambda message: None)
        print(f"built {num_trajectories} trajectories x {nfe + 1} states in {time.perf_counter() - started:.1f} s "
              "(once, before training)")
        fixed = {key: value.to(device).float() if value.is_floating_point() else value.to(device)
                 for key, value in next(iter(ShardReader(shards, batch_size, seed=0, exclude_endpoint=True))).items()}
        generator = torch.Generator(device).manual_seed(0)
        contenders = {
            "mid": lambda k: mid_steps(copy.deepcopy(student), shards, batch_size, steps, warmup, workers,
                                       Path(root) / f"mid-{k}"),
            "bare": lambda k: bare_steps(copy.deepcopy(student).to(device), fixed, steps, warmup, device),
        }
        if official:
            contenders["official"] = lambda k: bare_steps(copy.deepcopy(student).to(device), None, steps, warmup,
                                                          device, lambda: online_batch(teacher, nfe, batch_size,
                                                                                       device, generator))
        else:
            print(f"official: skipped (batch {batch_size} < nfe {nfe}: not one trajectory's states per step)")
        if meanflow:
            latents = random_latents(batch_size, torch.Generator().manual_seed(1), flow_student.data_shape,
                                     flow_student.label_dim, device)
            contenders["meanflow"] = lambda k: meanflow_steps(copy.deepcopy(flow_student), batch_size, steps, warmup,
                                                              Path(root) / f"meanflow-{k}", t_max)
            contenders["meanflow_bare"] = lambda k: bare_meanflow_steps(copy.deepcopy(flow_student).to(device),
                                                                        latents, steps, warmup, device, t_max)
        times = {name: [] for name in contenders}
        names = list(contenders)
        for k in range(rounds):
            for name in names[k % len(names):] + names[:k % len(names)]:
                times[name].append(contenders[name](k))
            print(f"  round {k}: " + ", ".join(f"{name} {times[name][-1]:.4f} s/step" for name in contenders),
                  flush=True)

    def ratio(name, base):
        values = [a / b for a, b in zip(times[name], times[base])]
        return statistics.median(values), min(values), max(values)

    print(f"{'contender':48s} {'s/step (median)':>16s} {'spread':>17s} {'samples/s':>10s}")
    labels = {"mid": "cmt-train mid step (trainer + ShardReader)", "bare": "bare loop (fwd, bwd, Adam, EMA)",
              "official": f"teacher {nfe}-step solver in each step (official)",
              "meanflow": "MeanFlow post step (trainer, JVP, CFG target)",
              "meanflow_bare": "bare MeanFlow loop (same objective, plain)"}
    for name in contenders:
        median = statistics.median(times[name])
        print(f"{labels[name]:48s} {median:16.4f} {min(times[name]):8.4f}-{max(times[name]):.4f} "
              f"{batch_size / median:10.2f}")
    step = ratio("mid", "bare")
    print(f"mid step / bare step = {step[0]:.3f} median of {rounds} rounds (spread {step[1]:.3f}-{step[2]:.3f}; "
          f"target <= 1.10)")
    pairs = [f"step_vs_bare={step[0]:.3f}"]
    if official:
        mid_official = ratio("mid", "official")
        print(f"mid step / official step = {mid_official[0]:.3f} (spread {mid_official[1]:.3f}-"
              f"{mid_official[2]:.3f}; target <= 0.75)")
        pairs.append(f"mid_vs_official={mid_official[0]:.3f}")
    if meanflow:
        mf = ratio("meanflow", "meanflow_bare")
        print(f"MeanFlow post step / bare MeanFlow step = {mf[0]:.3f} (spread {mf[1]:.3f}-{mf[2]:.3f}; "
              "target <= 1.10)")
        pairs.append(f"meanflow_vs_bare={mf[0]:.3f}")
    print(" ".join(pairs))


if __name__ == "__main__":
    main()
