"""SiT / DiT students on a GPU (issue 25): the cost of a mid-training step and of a MeanFlow
post-training step (with its JVP) at ImageNet-256 sizes, and of a trajectory build from a SiT-XL/2-
shaped teacher; prints its figures (docs/gpu.md). Random weights: only the cost matters.

For each `--sizes` (default SiT-B/4, MeanFlow's MF-B/4, and SiT-XL/2) on `--latent-side`^2 x 4
latents with 1000 classes, at `--batch-size` (256, MeanFlow's and the CMT paper's), and each
`--precisions` (fp32: TF32 off; tf32: TF32 matmuls; bf16: autocast):
1. mid: CMT mid-training's endpoint objective (`cmt.trainers.mid.endpoint_loss`, the consistency
   student) on a batch of states already on the device, backward, Adam, EMA update;
2. meanflow: MeanFlow post-training's objective (`cmt.trainers.meanflow.meanflow_loss` with the
   imagenet256-meanflow recipe's settings: guided velocity, JVP, adaptive weight), backward, Adam,
   EMA. post_train runs it in float32 (TF32 allowed) and refuses bf16, so under bf16 the figure is
   the same objective written out plainly (`bench_mid.bare_meanflow_loss`) under bf16 autocast:
   what bf16 would cost, for comparison.
Each: s/step (median after `--warmup`), samples/s, peak GPU memory, and the attention kernels that
ran (`torch.profiler` of one step: flash, memory-efficient, cuDNN or math SDPA; under the JVP SiT
uses the math kernel, the only one with forward-mode AD). A batch that does not fit is split into
micro-batches (halved until it fits; gradients accumulate): the figure names the micro-batch.
3. build: `cmt-build`'s `build_trajectories` of `--build-trajectories` 16-step DPM-Solver++(3M)
   trajectories of a random SiT-XL/2-shaped teacher (the builder's batch `--build-batch`), in fp32
   and TF32: trajectories/s.

    python benchmarks/gpu_sit.py                 # one GPU; minutes
    python benchmarks/gpu_sit.py --quick         # any machine: a tiny SiT (bench_mid.TINY_SIT), seconds

The last line holds the figures as name=value pairs.
"""
import contextlib
import copy
import functools
import statistics
import tempfile
import time
from pathlib import Path

import click
import torch

from bench_mid import MEANFLOW_OPTIONS, bare_meanflow_loss, sit_network_config
from cmt.builders.build import Teacher, build_trajectories
from cmt.edm import SIGMA_MIN
from cmt.networks import build_network
from cmt.trainers.distances import squared_l2
from cmt.trainers.loop import Context
from cmt.trainers.meanflow import meanflow_loss
from cmt.trainers.mid import endpoint_loss
from cmt.trainers.students import frozen_weight_norm, student_config
from quick import quick_option

PRECISIONS = ("fp32", "tf32", "bf16")
EMA_BETA = 0.9999
CLASSES = 1000
QUICK = {"sizes": "sit-tiny/2", "latent_side": 8, "batch_size": 4, "steps": 1, "warmup": 0, "precisions": "fp32,bf16",
         "build_size": "sit-tiny/2", "build_trajectories": 4, "build_batch": 4}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def precision(name, device):
    """TF32 on for tf32 (off otherwise), bf16 autocast for bf16."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = name == "tf32"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=name == "bf16"):
        yield


def random_batch(net, n, device, generator):
    x = torch.randn((n, *net.data_shape), generator=generator, device=device)
    labels = torch.randint(CLASSES, (n,), generator=generator, device=device)
    sigma = torch.exp(torch.randn(n, generator=generator, device=device) * 1.2 - 0.4)
    return {"data": x, "state": x + sigma[:, None, None, None] * torch.randn_like(x), "sigma": sigma, "endpoint": x,
            "label": labels}


def objective_of(kind, precision_name):
    """`loss(net, batch, ctx) -> scalar` of a step kind at a precision."""
    if kind == "mid":
        return lambda net, batch, ctx: endpoint_loss(net, batch, ctx, distance=squared_l2).mean()
    if precision_name != "bf16":   # post_train's own objective (float32 inside, TF32 as allowed)
        objective = functools.partial(meanflow_loss, t_max=1.0, **MEANFLOW_OPTIONS)
        return lambda net, batch, ctx: objective(net, batch, ctx)[0].mean()

    def plain(net, batch, ctx):
        labels = torch.nn.functional.one_hot(batch["label"], CLASSES).float()
        return bare_meanflow_loss(net, batch["data"], labels, ctx.generator, t_max=1.0, **MEANFLOW_OPTIONS)
    return plain


def train_steps(net, kind, precision_name, batch_size, micro, steps, warmup, device):
    """(median s/step, peak bytes) of `steps` optimizer steps of `batch_size` in micro-batches of `micro`."""
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.95))
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    objective = objective_of(kind, precision_name)
    generator = torch.Generator(device).manual_seed(0)
    ctx = Context(step=0, max_steps=steps, generator=generator, device=device, accelerator=None)
    batches = [random_batch(net, micro, device, generator) for _ in range(batch_size // micro)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(warmup + steps):
        synchronize(device)
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for batch in batches:
            with precision(precision_name, device), frozen_weight_norm(net):
                loss = objective(net, batch, ctx) * (micro / batch_size)
            loss.backward()
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - EMA_BETA)
        synchronize(device)
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return statistics.median(times[warmup:]), peak


def attention_kernels(net, kind, precision_name, device, micro):
    """The SDPA kernels one step (forward, JVP, backward) ran, from the profiler's op names."""
    objective = objective_of(kind, precision_name)
    generator = torch.Generator(device).manual_seed(1)
    batch = random_batch(net, min(micro, 4), device, generator)
    ctx = Context(step=0, max_steps=1, generator=generator, device=device, accelerator=None)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                          if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as profiler:
        with precision(precision_name, device), frozen_weight_norm(net):
            loss = objective(net, batch, ctx)
        loss.backward()
        synchronize(device)
    net.zero_grad(set_to_none=True)
    names = {event.key.replace("aten::", "") for event in profiler.key_averages()
             if "scaled_dot_product" in event.key and not event.key.endswith("scaled_dot_product_attention")}
    return ",".join(sorted(names)) or "none"


def measure(size, kind, precision_name, args, device):
    """Figures of one step kind; halves the micro-batch on out-of-memory."""
    torch.manual_seed(0)
    teacher = sit_network_config(size, args["latent_side"], CLASSES)
    config = student_config(teacher, flow_map=True) if kind == "meanflow" else \
        student_config(teacher, sigma_min=SIGMA_MIN)
    micro = args["batch_size"]
    while micro >= 1:
        net = build_network(config).to(device).train()
        try:
            seconds, peak = train_steps(net, kind, precision_name, args["batch_size"], micro, args["steps"],
                                        args["warmup"], device)
            kernels = attention_kernels(net, kind, precision_name, device, micro)
            return {"s_per_step": seconds, "samples_per_s": args["batch_size"] / seconds, "peak_gib": peak / 2**30,
                    "micro_batch": micro, "kernels": kernels,
                    "parameters_m": sum(p.numel() for p in net.parameters()) / 1e6}
        except torch.cuda.OutOfMemoryError:
            del net
            torch.cuda.empty_cache()
            micro //= 2
            while micro > 1 and args["batch_size"] % micro:
                micro -= 1
    return None


def build_figures(args, device, root):
    """Trajectories/s of a 16-step build from a random teacher of `build_size`, per precision."""
    torch.manual_seed(0)
    net = build_network(sit_network_config(args["build_size"], args["latent_side"], CLASSES))
    net = net.to(device).eval().requires_grad_(False)
    identity = {"kind": "random", "name": args["build_size"], "config": net.config}
    teacher = Teacher(net, net.data_shape, CLASSES, identity, device=device)
    figures = {}
    for name in ("fp32", "tf32") if device.type == "cuda" else ("fp32",):
        with precision(name, device):
            synchronize(device)
            started = time.perf_counter()
            build_trajectories(teacher=teacher, out=Path(root) / f"build-{name}", nfe=16,
                               num_trajectories=args["build_trajectories"], batch_size=args["build_batch"],
                               shard_size=args["build_trajectories"], progress=False, log=lambda line: None)
            synchronize(device)
        seconds = time.perf_counter() - started
        figures[name] = args["build_trajectories"] / seconds
        print(f"build {args['build_size']}-shaped teacher, 16-step dpm++3m, {args['build_trajectories']} trajectories "
              f"(batch {args['build_batch']}), {name}: {seconds:.1f} s, {figures[name]:.1f} trajectories/s", flush=True)
    return figures


@click.command(context_settings={"show_default": True})
@quick_option(QUICK)
@click.option("--sizes", default="sit-b/4,sit-xl/2", help="SiT sizes (cmt.networks.sit.SIT_PRESETS), comma-separated.")
@click.option("--latent-side", type=click.IntRange(min=2), default=32, help="Latents of this side x 4 channels.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256)
@click.option("--steps", type=click.IntRange(min=1), default=3, help="Timed optimizer steps.")
@click.option("--warmup", type=click.IntRange(min=0), default=1)
@click.option("--precisions", default=",".join(PRECISIONS), help="fp32, tf32 (CUDA only), bf16.")
@click.option("--build-size", default="sit-xl/2", help="The trajectory teacher's size.")
@click.option("--build-trajectories", type=click.IntRange(min=1), default=512)
@click.option("--build-batch", type=click.IntRange(min=1), default=256)
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu")
def main(device, **args):
    device = torch.device(device)
    precisions = [name for name in args["precisions"].split(",") if name]
    unknown = set(precisions) - set(PRECISIONS)
    if unknown:
        raise click.BadParameter(f"unknown precision(s) {sorted(unknown)}; valid: {', '.join(PRECISIONS)}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}; "
          f"latents 4 x {args['latent_side']} x {args['latent_side']}, {CLASSES} classes, batch {args['batch_size']}",
          flush=True)
    pairs = {}
    for size in args["sizes"].split(","):
        for kind in ("mid", "meanflow"):
            for name in precisions:
                key = f"{size.replace('/', '')}_{kind}_{name}"
                if name == "tf32" and device.type != "cuda":
                    print(f"{size} {kind} {name}: skipped (CUDA only)")
                    continue
                found = measure(size, kind, name, args, device)
                if found is None:
                    print(f"{size} {kind} {name}: out of memory even at micro-batch 1", flush=True)
                    continue
                print(f"{size} ({found['parameters_m']:.0f} M) {kind:8s} {name:4s}: {found['s_per_step']:.3f} s/step, "
                      f"{found['samples_per_s']:.1f} samples/s, peak {found['peak_gib']:.2f} GiB, micro-batch "
                      f"{found['micro_batch']}, attention {found['kernels']}", flush=True)
                pairs[f"{key}_s_per_step"] = found["s_per_step"]
                pairs[f"{key}_peak_gib"] = found["peak_gib"]
    with tempfile.TemporaryDirectory(prefix="gpu-sit-") as root:
        for name, value in build_figures(args, device, root).items():
            pairs[f"build_{name}_trajectories_per_s"] = value
    print(" ".join(f"{name}={value:.4g}" for name, value in pairs.items()))


if __name__ == "__main__":
    main()
