"""The latent data path on a GPU (issue 28): cmt-encode against the bare VAE loop, then ECT post-training
of an EDM2-img512-XS-sized student on those latents; prints its figures (docs/gpu.md).

1. Encode: `--count` random `--side`-px images (an .npz of uint8, memory-mapped) through an
   AutoencoderKL of the SD VAE's architecture (stabilityai/sd-vae-ft-mse's config: 128-256-512-512
   channels, 2 layers per block, 4 latent channels; random weights, nothing is downloaded) by
   `encode_dataset` (the cmt-encode library entry) into a latent set, and by a bare loop over the
   same batches already on the device (posterior mean and std, nothing kept), alternately:
   images/s of each and the peak GPU memory.
2. Post-training: a random student of EDM2-img512-XS's architecture (NVlabs/edm2 train_edm2.py
   preset edm2-img512-xs: 128 channels, channel_mult 1-2-3-4, 3 blocks, attention at 16 and 8,
   1000 classes) at the latents' resolution, saved as a checkpoint and post-trained with ECT by
   `cmt.post_train(init=..., data=LATENT_SET, method="ect")` (the library entry point, unchanged)
   for `--steps` steps: s/step from its log, images/s, peak GPU memory. Then the same stream
   (`data_batches`, as post_train draws it) and the same objective in a bare loop that times how
   long each step waits for its batch: the data-wait share (target < 5%).

    python benchmarks/gpu_latents.py                 # one GPU: a few minutes
    python benchmarks/gpu_latents.py --quick         # any machine: tiny networks, seconds

The last line holds the figures as name=value pairs.
"""
import functools
import json
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

import cmt
from cmt.builders.encode import encode_dataset
from cmt.checkpoint import save_network
from cmt.latents import load_vae
from cmt.networks import build_network
from cmt.trainers.data import data_batches, training_data
from cmt.trainers.distances import make_distance
from cmt.trainers.batches import to_device as _to_device
from cmt.trainers.loop import Context
from cmt.trainers.run_files import read_log
from cmt.trainers.ect import consistency_training_loss
from quick import quick_option

# stabilityai/sd-vae-ft-mse config.json (the SD VAE), and a tiny one of the same layout for --quick.
VAES = {
    "sd": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
    "tiny": dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4),
}
STUDENTS = {   # at the latents' resolution (set below)
    "edm2-img512-xs": dict(architecture="edm2", img_channels=4, label_dim=1000, model_channels=128,
                           channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[16, 8], dropout=0.0),
    "tiny": dict(architecture="edm2", img_channels=4, label_dim=1000, model_channels=16, channel_mult=[1, 2],
                 num_blocks=1, attn_resolutions=[], dropout=0.0),
}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device, function):
    """(seconds, peak bytes allocated on the device) of `function()`."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    started = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - started, torch.cuda.max_memory_allocated() if device.type == "cuda" else 0


def make_vae(path, size):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, **VAES[size]).save_pretrained(path)
    return path


def bare_encode(vae, images, batch_size, device):
    """The VAE posterior of every batch (EDM2's [0, 1] pixels), on the device already: nothing else."""
    with torch.no_grad():
        for batch in images.split(batch_size):
            posterior = vae.encode(batch)["latent_dist"]
            posterior.mean.sum().item(), posterior.std.sum().item()


def data_wait(data, student, batch_size, steps, device):
    """(seconds per step, data-wait share) of ECT steps on `data`'s stream, timed from the loop."""
    stream = data_batches(data, batch_size, seed=0)
    net = student.to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    objective = functools.partial(consistency_training_loss, distance=make_distance("huber", net.data_shape),
                                  stage=11, weighting="gap")
    ctx = Context(step=0, max_steps=steps, generator=torch.Generator(device), device=device, accelerator=None)
    waited = total = 0.0
    for step in range(steps + 2):   # two warm-up steps (worker start, kernels) are not counted
        synchronize(device)
        started = time.perf_counter()
        batch = _to_device(next(stream), device)
        got = time.perf_counter()
        ctx.step = step
        ctx.generator.manual_seed(step)
        loss, _ = objective(net, batch, ctx)
        optimizer.zero_grad(set_to_none=True)
        loss.mean().backward()
        optimizer.step()
        synchronize(device)
        if step >= 2:
            waited += got - started
            total += time.perf_counter() - started
    stream.close()
    return total / steps, waited / total


@click.command(context_settings={"show_default": True})
@click.option("--count", type=click.IntRange(min=8), default=2048, help="Random images to encode.")
@click.option("--side", type=click.IntRange(min=16), default=256, help="Their size (latents: side / 8).")
@click.option("--vae-size", type=click.Choice(list(VAES)), default="sd")
@click.option("--student", type=click.Choice(list(STUDENTS)), default="edm2-img512-xs")
@click.option("--encode-batch", type=click.IntRange(min=1), default=64)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, help="Post-training batch.")
@click.option("--steps", type=click.IntRange(min=1), default=100, help="Post-training steps.")
@click.option("--repeats", type=click.IntRange(min=1), default=2, help="Alternating runs of each encoder.")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu")
@quick_option({"count": 32, "side": 64, "vae_size": "tiny", "student": "tiny", "encode_batch": 16, "batch_size": 8,
               "steps": 3, "repeats": 1})
def main(count, side, vae_size, student, encode_batch, batch_size, steps, repeats, device):
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    figures = {}
    with tempfile.TemporaryDirectory(prefix="gpu-latents-") as scratch:
        root = Path(scratch)
        rng = np.random.default_rng(0)
        labels = rng.integers(0, 1000, count)
        labels[0] = 999   # 1000 classes, as the student
        np.savez(root / "images.npz", x=rng.integers(0, 256, (count, 3, side, side), dtype=np.uint8), labels=labels)
        vae_dir = make_vae(root / "vae", vae_size)
        vae = load_vae(vae_dir, device=device)
        images = torch.from_numpy(np.load(root / "images.npz")["x"]).to(device).float() / 255
        print(f"{count} random {side}x{side} images; VAE {vae_size} ({sum(p.numel() for p in vae.parameters()) / 1e6:.1f} M "
              f"parameters), device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
        encodes, bares = [], []
        for repeat in range(repeats):
            out = root / f"latents{repeat}"
            encodes.append(timed(device, lambda: encode_dataset(
                source=root / "images.npz", out=out, vae=str(vae_dir), batch_size=encode_batch,
                shard_size=max(encode_batch, count // 4), device=str(device), progress=False,
                log=lambda line: None)))
            bares.append(timed(device, lambda: bare_encode(vae, images, encode_batch, device)))
            print(f"  run {repeat}: cmt-encode {encodes[-1][0]:.2f} s, bare VAE loop {bares[-1][0]:.2f} s")
        encode_s, bare_s = min(s for s, _ in encodes), min(s for s, _ in bares)
        print(f"encode: cmt-encode {count / encode_s:.1f} images/s (peak {max(m for _, m in encodes) / 2**30:.2f} GiB); "
              f"bare loop {count / bare_s:.1f} images/s (peak {max(m for _, m in bares) / 2**30:.2f} GiB)")
        figures["encode_vs_bare"] = bare_s / encode_s
        figures["encode_images_per_s"] = count / encode_s
        del images, vae

        data = training_data(str(root / "latents0"))
        config = dict(STUDENTS[student], img_resolution=data.data_shape[1])
        torch.manual_seed(0)
        net = build_network(config)
        init = save_network(root / "student.safetensors", net)
        params = sum(p.numel() for p in net.parameters())
        print(f"student {student} at {data.data_shape}: {params / 1e6:.1f} M parameters; ECT, batch {batch_size}, "
              f"{steps} steps (cmt.post_train)")
        seconds, memory = timed(device, lambda: cmt.post_train(
            init=str(init), method="ect", data=str(root / "latents0"), out=root / "post", max_steps=steps,
            batch_size=batch_size, num_samples=8, progress=False, log_every=max(1, steps // 4),
            ckpt_every=steps))
        records = [record for record in read_log(root / "post") if "sec_per_step" in record]
        step_s = float(np.median([record["sec_per_step"] for record in records[1:] or records]))
        print(f"post_train: {step_s:.3f} s/step ({batch_size / step_s:.0f} images/s) from its log, peak "
              f"{memory / 2**30:.2f} GiB, {seconds:.1f} s in all (with start-up and final sampling)")
        figures["post_s_per_step"] = step_s
        figures["post_images_per_s"] = batch_size / step_s
        figures["post_peak_gib"] = memory / 2**30
        loop_s, share = data_wait(data, build_network(config), batch_size, min(steps, 50), device)
        print(f"bare ECT loop on the same stream: {loop_s:.3f} s/step, waiting for data {100 * share:.2f}% of it "
              "(target < 5%)")
        figures["loop_s_per_step"], figures["data_wait_share"] = loop_s, share
        print(json.dumps({"latent_set": data.data_shape, "workers": "auto"}))
    print(" ".join(f"{name}={value:.4g}" for name, value in figures.items()))


if __name__ == "__main__":
    main()
