"""The data path on a GPU (issue 13): the builder against the bare solver loop, and a mid-training
step's share of time spent waiting for shards; prints its figures (docs/gpu.md).

1. Build: an EDM2-img64-S-sized teacher (random weights, the architecture of NVlabs/edm2's
   `edm2-img64-s` preset: 192 channels, channel_mult 1-2-3-4, 3 blocks, attention at 16 and 8,
   1000 classes) solves 16-step DPM-Solver++(3M) trajectories on the GPU, by `build_trajectories`
   into zarr shards and by a bare loop that keeps nothing, alternately: trajectories/s and peak GPU
   memory of each (`torch.cuda.max_memory_allocated`).
2. Mid-training from those shards at batch 256 (`ShardReader` as `cmt-train mid` builds it, stored
   dtype, upcast on the device): a loop of forward, backward and Adam on the student, timing how
   long each step waits for its batch; the data-wait share is waiting / step time (target < 5%).

    python benchmarks/gpu_data_path.py                 # one GPU: a few minutes
    python benchmarks/gpu_data_path.py --quick         # any machine: a tiny network, seconds

The last line holds the figures as name=value pairs.
"""
import tempfile
import time
from pathlib import Path

import click
import torch

from cmt.builders.build import Teacher, build_trajectories
from cmt.datasets.shards import ShardReader, auto_workers
from cmt.edm import SIGMA_MAX, SIGMA_MIN, sample_lognormal_sigmas, sigma_grid
from cmt.networks import build_network
from cmt.solvers import sample_trajectory
from cmt.trainers.distances import squared_l2
from quick import quick_option

SIZES = {
    "edm2-img64-s": dict(architecture="edm2", img_resolution=64, img_channels=3, label_dim=1000, model_channels=192,
                         channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[16, 8], dropout=0.0),
    "tiny": dict(architecture="edm2", img_resolution=16, img_channels=3, label_dim=10, model_channels=16,
                 channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0),
}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(device, function):
    """(seconds, peak bytes allocated on the device) of `function()`."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    started = time.perf_counter()
    function()
    synchronize(device)
    seconds = time.perf_counter() - started
    return seconds, torch.cuda.max_memory_allocated() if device.type == "cuda" else 0


def bare_loop(net, count, batch_size, label_dim, device):
    sigmas = sigma_grid("logsnr", 16, SIGMA_MIN, SIGMA_MAX)
    generator = torch.Generator(device).manual_seed(0)
    for start in range(0, count, batch_size):
        size = min(batch_size, count - start)
        noise = torch.randn(size, *net.data_shape, generator=generator, device=device)
        labels = None if not label_dim else torch.nn.functional.one_hot(
            torch.randint(label_dim, (size,), generator=generator, device=device), label_dim).float()
        with torch.inference_mode():
            sample_trajectory(net, noise, sigmas, "dpm++3m", labels)


def time_mid_steps(net, path, batch_size, steps, device):
    """(seconds per step, data-wait share) of forward + backward + Adam on batches read from shards."""
    reader = ShardReader(path, batch_size, seed=0, num_workers=auto_workers(1), cache_bytes=0, dtype=None,
                         exclude_endpoint=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    generator = torch.Generator(device).manual_seed(0)
    stream = iter(reader)
    waited = total = 0.0
    for step in range(steps + 2):   # two warm-up steps (first shard, kernels) are not counted
        synchronize(device)
        started = time.perf_counter()
        batch = next(stream)
        state = batch["state"].to(device, non_blocking=True).float()
        endpoint = batch["endpoint"].to(device, non_blocking=True).float()
        label = torch.nn.functional.one_hot(batch["label"].clamp(min=0).to(device), net.label_dim).float()
        got = time.perf_counter()
        sigma = sample_lognormal_sigmas(state.shape[0], -1.1, 2.0, generator=generator, device=device)
        loss = squared_l2(net(state, sigma, label), endpoint).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        synchronize(device)
        if step >= 2:
            waited += got - started
            total += time.perf_counter() - started
    return total / steps, waited / total


@click.command(context_settings={"show_default": True})
@click.option("--size", type=click.Choice(list(SIZES)), default="edm2-img64-s")
@click.option("--num-trajectories", type=click.IntRange(min=1), default=512)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, help="Trajectories per solver batch.")
@click.option("--mid-batch-size", type=click.IntRange(min=1), default=256, help="States per mid-training step.")
@click.option("--mid-steps", type=click.IntRange(min=1), default=50)
@click.option("--repeats", type=click.IntRange(min=1), default=2, help="Alternating runs of each side.")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu")
@quick_option({"size": "tiny", "num_trajectories": 32, "batch_size": 16, "mid_batch_size": 32, "mid_steps": 3,
               "repeats": 1})
def main(size, num_trajectories, batch_size, mid_batch_size, mid_steps, repeats, device):
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    net = build_network(SIZES[size]).to(device)
    with torch.no_grad():
        net.unet.out_gain.fill_(1.0)   # a zero gain would make the output trivial
    net.eval().requires_grad_(False)
    teacher = Teacher(net, net.data_shape, net.label_dim, {"kind": "random", "name": size, "config": SIZES[size]},
                      device=device)
    params = sum(p.numel() for p in net.parameters())
    print(f"{size}: {params / 1e6:.1f} M parameters, data {list(net.data_shape)}, {num_trajectories} trajectories "
          f"in batches of {batch_size}, 16 steps, device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    figures = {}
    with tempfile.TemporaryDirectory(prefix="gpu-data-path-") as scratch:
        builds, bares = [], []
        for repeat in range(repeats):
            out = Path(scratch) / f"build{repeat}"
            builds.append(peak_memory(device, lambda: build_trajectories(
                teacher=teacher, out=str(out), num_trajectories=num_trajectories, batch_size=batch_size,
                shard_size=max(batch_size, num_trajectories // 4), seed=0, progress=False)))
            bares.append(peak_memory(device, lambda: bare_loop(net, num_trajectories, batch_size, net.label_dim, device)))
            print(f"  run {repeat}: cmt-build {builds[-1][0]:.2f} s, bare solver loop {bares[-1][0]:.2f} s")
        build_s, bare_s = min(seconds for seconds, _ in builds), min(seconds for seconds, _ in bares)
        build_mem, bare_mem = max(memory for _, memory in builds), max(memory for _, memory in bares)
        print(f"build: cmt-build {num_trajectories / build_s:.1f} trajectories/s, peak {build_mem / 2**30:.2f} GiB; "
              f"bare loop {num_trajectories / bare_s:.1f} trajectories/s, peak {bare_mem / 2**30:.2f} GiB")
        figures["build_vs_bare"] = build_s / bare_s
        figures["build_trajectories_per_s"] = num_trajectories / build_s
        figures["build_memory_vs_bare"] = build_mem / bare_mem if bare_mem else 0.0
        student = build_network(SIZES[size]).to(device).train()
        seconds, share = time_mid_steps(student, Path(scratch) / "build0", mid_batch_size, mid_steps, device)
        print(f"mid-training from shards, batch {mid_batch_size}: {seconds * 1e3:.1f} ms/step, waiting for data "
              f"{100 * share:.2f}% of it (target < 5%)")
        figures["mid_step_s"], figures["data_wait_share"] = seconds, share
    print(" ".join(f"{name}={value:.4g}" for name, value in figures.items()))


if __name__ == "__main__":
    main()
