"""EDM's (v1) CIFAR-10 teacher on a GPU (issue 24): the builder against the bare solver loop, then
mid-training as `--recipe cifar10` runs it; prints its figures (docs/gpu.md).

1. Build: EDM's DDPM++ CIFAR-10 network under EDMPrecond (`bench_build.DDPMPP_CIFAR10`, the init
   kwargs of edm-cifar10-32x32-uncond-vp.pkl: 56 M parameters) with random weights, saved as a
   checkpoint, solves `--num-trajectories` (2048) trajectories of 16 DPM-Solver++(3M) steps on the
   logSNR grid 80 -> 0.002 (the recipe's targets, `cmt.builders.teacher.RECIPE_TARGETS`) by
   `build_trajectories` (cmt-build's function, reading the checkpoint file) into zarr shards, and
   by a bare loop that keeps nothing, alternately: trajectories/s and peak GPU memory of each, and
   their ratio.
2. Mid-training: `cmt.mid_train(data=those shards, recipe="cifar10", max_steps=300)`: the recipe's
   every setting (batch 128, RAdam, lr 2e-4 linear, EMA 0.999, dropout 0.2, LPIPS-VGG at 32x32, fp32;
   docs/recipes.md) on sony/cmt's ECMPrecond student of the teacher's weights: s/step from its log
   (the median of the logged steps after the first), images/s and the run's peak GPU memory.

LPIPS needs torchvision's VGG16 ImageNet weights (`vgg16-397923af.pth` in `$CMT_CACHE/lpips` or
torch hub's checkpoints; the GPU machine has no internet, so copy it there) and the `lpips`
package's heads. `--lpips-trunk auto` uses the cached file when there is one, else random trunk
weights in a temporary cache (the same layers: the same time; the figure is a time, not a quality).

    python benchmarks/gpu_edm.py                 # one GPU: about 5 minutes on an H100 (estimate)
    python benchmarks/gpu_edm.py --quick         # any machine: a tiny network, seconds

The last line holds the figures as name=value pairs.
"""
import os
import tempfile
from pathlib import Path

import click
import numpy as np
import torch

import cmt
from cmt.checkpoint import save_network
from cmt.download import cache_dir
from cmt.lpips import TRUNK_URLS, cached_lpips, vgg16_features
from cmt.trainers.run_files import read_log
from bench_build import DDPMPP_CIFAR10, random_edm_teacher
from gpu_data_path import bare_loop, peak_memory
from quick import quick_option

SIZES = {
    "ddpmpp-cifar10": DDPMPP_CIFAR10,
    # The same layout at a width and depth that runs in seconds on a CPU (32x32: LPIPS-VGG needs >= 16 px).
    "tiny": dict(DDPMPP_CIFAR10, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[16]),
}


def lpips_trunk(choice, scratch):
    """Which VGG16 trunk LPIPS will load: 'cache' (the real file, wherever cmt.lpips finds it), or
    'random' (random weights under torchvision's name in a temporary $CMT_CACHE); 'auto': the cached
    file when there is one."""
    name = TRUNK_URLS["vgg"].rsplit("/", 1)[-1]
    cached = any(path.is_file() for path in (cache_dir() / "lpips" / name,
                                             Path(torch.hub.get_dir()) / "checkpoints" / name))
    if choice == "cache" or (choice == "auto" and cached):
        return "cache"
    os.environ["CMT_CACHE"] = str(Path(scratch) / "cmt-cache")
    (cache_dir() / "lpips").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save({f"features.{key}": value for key, value in vgg16_features().state_dict().items()},
               cache_dir() / "lpips" / name)
    cached_lpips.cache_clear()
    return "random"


@click.command(context_settings={"show_default": True})
@click.option("--size", type=click.Choice(list(SIZES)), default="ddpmpp-cifar10")
@click.option("--num-trajectories", type=click.IntRange(min=1), default=2048)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, help="Trajectories per solver batch.")
@click.option("--mid-steps", type=click.IntRange(min=2), default=300)
@click.option("--mid-batch-size", type=click.IntRange(min=1), default=128, help="The recipe's batch.")
@click.option("--repeats", type=click.IntRange(min=1), default=2, help="Alternating runs of each side.")
@click.option("--lpips-trunk", "trunk", type=click.Choice(["auto", "cache", "random"]), default="auto")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu")
@quick_option({"size": "tiny", "num_trajectories": 16, "batch_size": 8, "mid_steps": 2, "mid_batch_size": 16,
               "repeats": 1})
def main(size, num_trajectories, batch_size, mid_steps, mid_batch_size, repeats, trunk, device):
    device = torch.device(device)
    figures = {}
    with tempfile.TemporaryDirectory(prefix="gpu-edm-") as scratch:
        root = Path(scratch)
        net = random_edm_teacher(SIZES[size]).to(device).requires_grad_(False)
        teacher = save_network(root / "teacher.safetensors", net)
        params = sum(p.numel() for p in net.parameters())
        print(f"{size}: {params / 1e6:.1f} M parameters, data {list(net.data_shape)}, {num_trajectories} trajectories "
              f"in batches of {batch_size}, 16 steps, device "
              f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}", flush=True)
        builds, bares = [], []
        for repeat in range(repeats):
            out = root / f"build{repeat}"
            builds.append(peak_memory(device, lambda: cmt.build_trajectories(
                teacher=str(teacher), out=str(out), num_trajectories=num_trajectories, batch_size=batch_size,
                shard_size=max(batch_size, num_trajectories // 8), seed=0, progress=False, log=lambda line: None)))
            bares.append(peak_memory(device, lambda: bare_loop(net, num_trajectories, batch_size, net.label_dim,
                                                               device)))
            print(f"  run {repeat}: cmt-build {builds[-1][0]:.2f} s, bare solver loop {bares[-1][0]:.2f} s", flush=True)
        build_s, bare_s = min(seconds for seconds, _ in builds), min(seconds for seconds, _ in bares)
        build_mem, bare_mem = max(memory for _, memory in builds), max(memory for _, memory in bares)
        print(f"build: cmt-build {num_trajectories / build_s:.1f} trajectories/s, peak {build_mem / 2**30:.2f} GiB; "
              f"bare loop {num_trajectories / bare_s:.1f} trajectories/s, peak {bare_mem / 2**30:.2f} GiB")
        figures["build_vs_bare"] = build_s / bare_s
        figures["build_trajectories_per_s"] = num_trajectories / build_s
        figures["build_memory_vs_bare"] = build_mem / bare_mem if bare_mem else 0.0
        del net

        used = lpips_trunk(trunk, scratch)
        print(f"mid-training: recipe cifar10, batch {mid_batch_size}, {mid_steps} steps, LPIPS-VGG trunk: {used}",
              flush=True)
        log_every = max(1, mid_steps // 6)
        seconds, memory = peak_memory(device, lambda: cmt.mid_train(
            data=root / "build0", recipe="cifar10", out=root / "mid", max_steps=mid_steps, batch_size=mid_batch_size,
            log_every=log_every, ckpt_every=mid_steps, num_samples=64, progress=False))
        records = [record for record in read_log(root / "mid") if "sec_per_step" in record]
        step_s = float(np.median([record["sec_per_step"] for record in records[1:] or records]))
        print(f"mid_train: {step_s:.3f} s/step ({mid_batch_size / step_s:.0f} states/s) from its log, peak "
              f"{memory / 2**30:.2f} GiB, {seconds:.1f} s in all (with start-up and final sampling)")
        figures["mid_s_per_step"] = step_s
        figures["mid_states_per_s"] = mid_batch_size / step_s
        figures["mid_peak_gib"] = memory / 2**30
    print(" ".join(f"{name}={value:.4g}" for name, value in figures.items()))


if __name__ == "__main__":
    main()
