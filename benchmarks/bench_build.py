"""Benchmark of the trajectory builder (`cmt.build_trajectories`, `cmt-build`) and the shard reader;
prints the figures (no pass/fail).

1. Builder overhead: wall time of a build (draw noises, solve, convert, compress, write, verify,
   manifest) over the wall time of the bare solver loop on the same teacher, trajectories and batch
   size, measured alternately in one run (best of --repeats each). Target <= 1.05.
2. Storage: bytes on disk per stored state (kept states + noise + endpoint, all files counted)
   against a raw float16 state. Target <= 1.0.
3. Reader: batches/s of `ShardReader` over the shards against random batches indexed from the same
   tensors held in memory (target >= 0.5), and against the steps/s of a mid-training step
   (forward + backward of the teacher-sized network at the same batch size).

    python benchmarks/bench_build.py [--teacher PATH|mnist|ddpmpp-cifar10] [--num-trajectories 256] [--batch-size 128]
    python benchmarks/bench_build.py --quick          # seconds: small sizes, the script works
    python benchmarks/bench_build.py --teacher ddpmpp-cifar10 --num-trajectories 8 --batch-size 8 \
        --shard-size 8 --no-step-rate                 # EDM's CIFAR-10 network: minutes on a CPU

The default teacher is the built-in `mnist` teacher when it is installed, otherwise the EDM2 network
that `cmt-train diffusion` builds for MNIST (16x16, 32 channels, 10 classes) with random weights:
its cost per call is what matters here, not its samples. `ddpmpp-cifar10` is EDM's (v1) CIFAR-10
teacher network (DDPM++ under EDMPrecond, 56 M parameters, the CMT paper's CIFAR-10 teacher) with
random weights.
"""
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

from cmt.builders.build import Teacher, build_config, build_trajectories
from cmt.builders.inspect import summary
from cmt.manifest import TrajectoryDataset
from cmt.datasets.shards import ShardReader
from cmt.networks import build_network
from cmt.solvers import sample_trajectory
from cmt.teachers import builtin_teacher_path, resolve_teacher
from quick import quick_option

QUICK = {"num_trajectories": 64, "repeats": 1, "reader_batches": 50}
MNIST_SIZED = dict(architecture="edm2", img_resolution=16, img_channels=1, label_dim=10, model_channels=32,
                   channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
# EDM's DDPM++ CIFAR-10 network under EDMPrecond (NVlabs/edm train.py --arch=ddpmpp: SongUNet, positional
# embedding, standard encoder and decoder, channel_mult_noise 1, resample_filter 1,1, 128 channels,
# channel_mult 2,2,2, SongUNet's defaults of 4 blocks and attention at 16; --augment 0.12 adds
# augment_dim 9; --dropout 0.13): the init kwargs edm-cifar10-32x32-uncond-vp.pkl records.
DDPMPP_CIFAR10 = dict(architecture="edm", precond="EDMPrecond", img_resolution=32, img_channels=3, label_dim=0,
                      model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                      decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                      channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13)
RANDOM_TEACHERS = {"ddpmpp-cifar10": DDPMPP_CIFAR10}


def random_edm_teacher(config, seed=0):
    """An EDM (v1) network with random weights; the layers EDM initialises to zero (each block's second
    convolution, the output convolutions) get small random values, so the states are not trivial."""
    torch.manual_seed(seed)
    net = build_network(config).eval()
    with torch.no_grad():
        for parameter in net.parameters():
            if parameter.ndim > 1 and not parameter.any():
                parameter.normal_(0, 0.2 / parameter[0].numel() ** 0.5)
    return net


def load(teacher):
    if teacher in RANDOM_TEACHERS:
        net = random_edm_teacher(RANDOM_TEACHERS[teacher])
        identity = {"kind": "random", "name": f"{teacher}-random", "config": RANDOM_TEACHERS[teacher]}
        net.requires_grad_(False)
        return net, Teacher(net, net.data_shape, net.label_dim, identity)
    if teacher is None and builtin_teacher_path("mnist").is_file():
        teacher = "mnist"
    if teacher is None:
        torch.manual_seed(0)
        net = build_network(MNIST_SIZED).eval()
        with torch.no_grad():
            net.unet.out_gain.fill_(1.0)  # a zero gain would make the network's output trivial
        identity = {"kind": "random", "name": "edm2-mnist-sized-random", "config": MNIST_SIZED}
    else:
        net, identity = resolve_teacher(teacher)
    net.requires_grad_(False)
    return net, Teacher(net, net.data_shape, net.label_dim, identity)


class TimedDenoiser:
    """The teacher, with the seconds spent inside its calls added up."""

    def __init__(self, net):
        self.net, self.seconds = net, 0.0

    def __call__(self, x, sigma, labels=None):
        started = time.perf_counter()
        denoised = self.net(x, sigma, labels)
        self.seconds += time.perf_counter() - started
        return denoised


def bare_loop(net, config):
    """What a user would write without the builder: draw, solve, keep nothing."""
    generator = torch.Generator().manual_seed(0)
    count, batch_size, shape = config["count"], config["batch_size"], config["data_shape"]
    for start in range(0, count, batch_size):
        size = min(batch_size, count - start)
        noise = torch.randn(size, *shape, generator=generator)
        labels = None
        if config["label_dim"]:
            labels = torch.nn.functional.one_hot(torch.randint(config["label_dim"], (size,), generator=generator),
                                                 config["label_dim"]).float()
        with torch.inference_mode():
            sample_trajectory(net, noise, config["sigmas"], solver=config["solver"], labels=labels)


def timed(function):
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def reader_rates(reader, batches_per_epoch, warm_batches):
    """(first epoch, later epochs) batches/s of one reader: decoding from storage, then from its cache."""
    stream = iter(reader)
    next(stream)  # start-up (worker processes) is not throughput
    started = time.perf_counter()
    for _ in range(batches_per_epoch - 1):
        next(stream)
    cold = (batches_per_epoch - 1) / (time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(warm_batches):
        next(stream)
    return cold, warm_batches / (time.perf_counter() - started)


def memory_rate(dataset, batch_size, batches):
    """Random batches gathered from the whole dataset held in memory, converted like the reader's."""
    shards = [dataset.read_shard(entry) for entry in dataset.shards]
    arrays = {key: np.concatenate([shard[key] for shard in shards]) for key in ("states", "endpoint", "label", "index")}
    sigmas = shards[0]["sigmas"]
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for _ in range(batches):
        rows = rng.integers(len(arrays["index"]), size=batch_size)
        positions = rng.integers(len(sigmas), size=batch_size)
        {"state": torch.from_numpy(arrays["states"][rows, positions]).float(),
         "sigma": torch.from_numpy(sigmas[positions]).float(),
         "endpoint": torch.from_numpy(arrays["endpoint"][rows]).float(),
         "label": torch.from_numpy(arrays["label"][rows]), "index": torch.from_numpy(arrays["index"][rows])}
    return batches / (time.perf_counter() - started)


def training_step_rate(net_config, batch_size, steps=3):
    """Forward + backward + Adam step of a fresh network like the teacher, at the reader's batch size."""
    net = build_network(net_config).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    shape = tuple(net.data_shape)
    x, sigma = torch.randn(batch_size, *shape), torch.rand(batch_size) * 5 + 0.01
    labels = torch.nn.functional.one_hot(torch.zeros(batch_size, dtype=torch.int64), net.label_dim).float() \
        if net.label_dim else None
    def step():
        loss = (net(x, sigma, labels) - x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    step()
    return steps / sum(timed(step) for _ in range(steps))


@click.command()
@quick_option(QUICK)
@click.option("--teacher", default=None, help="A teacher path, a built-in name, or ddpmpp-cifar10 (EDM's CIFAR-10 "
                                               "network, random weights) (default: see the module doc).")
@click.option("--num-trajectories", type=int, default=256)
@click.option("--batch-size", type=int, default=64)
@click.option("--nfe", type=int, default=16)
@click.option("--shard-size", type=int, default=64)
@click.option("--format", "fmt", type=click.Choice(["zarr", "wds"]), default="zarr")
@click.option("--repeats", type=int, default=3, help="Alternating runs of each side; the best of each is used.")
@click.option("--reader-batches", type=int, default=1000)
@click.option("--reader-batch-size", type=int, default=128)
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Where to build (default: a temporary folder).")
@click.option("--step-rate/--no-step-rate", default=True,
              help="Time a mid-training step of the teacher's network at the reader's batch size (minutes for "
                   "ddpmpp-cifar10 on a CPU).")
def main(teacher, num_trajectories, batch_size, nfe, shard_size, fmt, repeats, reader_batches, reader_batch_size, out,
         step_rate):
    net, model = load(teacher)
    options = dict(nfe=nfe, num_trajectories=num_trajectories, batch_size=batch_size, shard_size=shard_size,
                   format=fmt)
    config = build_config(model, **options)
    print(f"teacher {model.identity.get('name') or model.identity.get('path')}, data {list(model.data_shape)}, "
          f"{num_trajectories} trajectories, batch {batch_size}, nfe {nfe}, {fmt} shards of {shard_size}, "
          f"{torch.get_num_threads()} threads")
    root = Path(out or tempfile.mkdtemp(prefix="bench-build-"))
    with torch.inference_mode():  # warm-up: first calls allocate and pick kernels
        net(torch.zeros(batch_size, *model.data_shape), torch.ones(batch_size),
            torch.zeros(batch_size, model.label_dim) if model.label_dim else None)
    bare_times, build_times, ratios = [], [], []
    for repeat in range(repeats):
        # alternate the two sides, so a change of machine load hits both
        timed_net = TimedDenoiser(net)
        bare_times.append((timed(lambda: bare_loop(timed_net, config)), timed_net.seconds))
        model.denoiser = timed_net = TimedDenoiser(net)
        target = root / f"run{repeat}"
        wall = timed(lambda: build_trajectories(teacher=model, out=str(target), **options, progress=False,
                                                log=lambda message: None))
        build_times.append((wall, timed_net.seconds))
        ratios.append(build_times[-1][0] / bare_times[-1][0])
        print(f"  run {repeat}: bare solver loop {bare_times[-1][0]:.2f} s ({bare_times[-1][1]:.2f} s in the teacher), "
              f"cmt-build {build_times[-1][0]:.2f} s ({build_times[-1][1]:.2f} s in the teacher): {ratios[-1]:.3f}")
    best_bare, best_build = min(wall for wall, _ in bare_times), min(wall for wall, _ in build_times)
    teacher = min(seconds for _, seconds in bare_times + build_times)
    own_bare = min(wall - seconds for wall, seconds in bare_times)
    own_build = min(wall - seconds for wall, seconds in build_times)
    print(f"builder overhead: {best_build / best_bare:.3f} best against best, {float(np.median(ratios)):.3f} median of "
          f"the pairs, {min(ratios):.3f} to {max(ratios):.3f} over the {len(ratios)} pairs (target <= 1.05)")
    print(f"  time outside the teacher: bare loop {own_bare:.2f} s, cmt-build {own_build:.2f} s; with the teacher's "
          f"best {teacher:.2f} s on both sides the ratio is {(teacher + own_build) / (teacher + own_bare):.3f}")

    dataset = TrajectoryDataset(str(root / "run0"))
    info = summary(dataset)
    print(f"storage: {info['bytes_per_stored_state']:.1f} bytes per stored state, raw float16 "
          f"{int(np.prod(model.data_shape)) * 2} bytes: {info['size_vs_float16']:.3f} (target <= 1.0)")

    per_epoch = len(dataset) * len(dataset.manifest["kept_states"]) // reader_batch_size
    uncached = None
    if per_epoch < 2:   # a reader rate needs whole batches in an epoch (the builder's figures above stand)
        print(f"reader: {len(dataset)} trajectories make {per_epoch} batches of {reader_batch_size} per epoch; skipped")
    else:
        from_memory = memory_rate(dataset, reader_batch_size, reader_batches)
        print(f"reader, batch {reader_batch_size} ({per_epoch} batches per epoch): in-memory indexing "
              f"{from_memory:.0f} batches/s")
        for workers in (0, 2):
            cold, warm = reader_rates(ShardReader(dataset, reader_batch_size, seed=0, num_workers=workers), per_epoch,
                                      reader_batches)
            print(f"  ShardReader, {workers} workers: first epoch (decoding) {cold:.0f} batches/s = "
                  f"{cold / from_memory:.2f} x in-memory; later epochs (cached) {warm:.0f} batches/s = "
                  f"{warm / from_memory:.2f} x (target >= 0.5)")
        uncached = reader_rates(ShardReader(dataset, reader_batch_size, seed=0, cache_bytes=0), per_epoch,
                                reader_batches)[1]
        print(f"  ShardReader, 0 workers, cache_bytes=0 (every epoch decoded again): {uncached:.0f} batches/s = "
              f"{uncached / from_memory:.2f} x in-memory")
    if step_rate:
        steps_per_s = training_step_rate(net.config, reader_batch_size)
        print(f"  a mid-training step (forward + backward + Adam, batch {reader_batch_size}, this machine): "
              f"{steps_per_s:.2f} steps/s" + ("" if uncached is None else
                                              f"; the uncached reader with 0 workers delivers "
                                              f"{uncached / steps_per_s:.0f} x that"))
    print(f"build_vs_bare={float(np.median(ratios)):.3f}")

if __name__ == "__main__":
    main()
