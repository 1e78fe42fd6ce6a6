"""Benchmark of users' image data at scale (issue 28); prints the figures (no pass/fail).

A synthetic EDM-format zip of 64x64 RGB PNGs (stored members `00000/img00000000.png`, as EDM2's
dataset_tool names them, and a dataset.json of labels) is written at two sizes, `--small` and
`--large` images, fast: `--distinct` different PNG byte strings (smooth random colour fields plus
noise, ~9 KB each) repeated under the many names. Then:

1. Throughput at batch 128, in interleaved rounds (the order rotates from round to round): the
   streamed loader (`BatchStream` over `ImageFiles`, the stream `cmt-train diffusion / post` draw)
   with 0 workers (a decoding thread) and with `auto` workers, against a bare loop that reads the
   same members of the same batches with one `zipfile.ZipFile` and decodes them with PIL into a
   preallocated uint8 batch. Images/s, median and spread; goal >= 0.8x the bare loop.
2. Peak RSS of a fresh process per size (VmHWM of a subprocess that opens the set, with its header
   scan, and draws `--rss-batches` batches with 0 workers; and with `auto` workers, the largest
   worker's too): goal, the large set costs <= 1.1x the small one. Also the open (scan) time.
3. The latent encoder (`encode_dataset`, cmt-encode) against the VAE's bare encode loop on the same
   batches (preloaded float tensors, posterior mean and std, nothing kept): images/s, goal >= 0.9x,
   with a small random SD-shaped AutoencoderKL (4 levels, 8x down) on `--encode-count` images of the
   small zip, on this CPU.

    OMP_NUM_THREADS=1 python benchmarks/bench_images.py          # 20k and 200k images, 1.7 GiB of scratch, ~6 minutes
    python benchmarks/bench_images.py --quick                     # a minute: small sizes, the script works

The last line holds the figures as name=value pairs.
"""
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import click
import numpy as np
import PIL.Image
import torch

from cmt.datasets.images import ImageFiles
from cmt.datasets.stream import BatchStream, decoding_workers
from quick import quick_option

QUICK = {"small": 400, "large": 4000, "distinct": 64, "rounds": 2, "batches": 3, "rss_batches": 4,
         "encode_count": 64, "encode_rounds": 1}
SIDE = 64


def distinct_pngs(count, seed=0):
    """`count` different 64x64 RGB PNGs: smooth random colour fields (upsampled 8x8 noise) plus pixel noise."""
    rng = np.random.default_rng(seed)
    pngs = []
    for _ in range(count):
        field = PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((SIDE, SIDE),
                                                                                          PIL.Image.BICUBIC)
        array = np.clip(np.asarray(field, np.int16) + rng.integers(-12, 13, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        PIL.Image.fromarray(array).save(buffer, "png")
        pngs.append(buffer.getvalue())
    return pngs


def write_zip(path, count, pngs):
    names = [f"{index // 1000:05d}/img{index:08d}.png" for index in range(count)]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for index, name in enumerate(names):
            archive.writestr(name, pngs[index % len(pngs)])
        archive.writestr("dataset.json", json.dumps({"labels": [[name, index % 1000] for index, name in
                                                                enumerate(names)]}))
    return path


class BareLoop:
    """The same members of the same batches, one ZipFile, PIL into a preallocated uint8 batch."""

    def __init__(self, path, stream):
        self.archive = zipfile.ZipFile(path)
        self.names = sorted(name for name in self.archive.namelist() if name.endswith(".png"))
        self.stream, self.batch = stream, 0
        self.out = np.empty((stream.batch_size, 3, SIDE, SIDE), np.uint8)

    def __next__(self):
        keys = self.stream.batch_keys(self.batch)
        self.batch += 1
        for row, index in enumerate(keys[:, 0]):
            with PIL.Image.open(io.BytesIO(self.archive.read(self.names[index]))) as image:
                self.out[row] = np.asarray(image.convert("RGB")).transpose(2, 0, 1)
        return self.out


def pull(stream, batches, batch_size):
    started = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * batch_size / (time.perf_counter() - started)


def median_spread(values):
    return statistics.median(values), min(values), max(values)


def peak_rss(path, batches, workers):
    result = subprocess.run([sys.executable, __file__, "--rss-child", json.dumps([str(path), batches, workers])],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def vm_hwm(pid="self"):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def rss_child(path, batches, workers):
    """(In a subprocess) open the set, draw `batches` batches of 128; print peak RSS and open time."""
    started = time.perf_counter()
    data = ImageFiles(path)
    opened = time.perf_counter() - started
    stream = BatchStream(data, 128, seed=0, workers=workers)
    for _ in range(batches):
        next(stream)
    workers_peak = 0
    iterator = stream._iterator
    for process in getattr(iterator, "_workers", []):
        workers_peak = max(workers_peak, vm_hwm(process.pid))
    print(json.dumps({"peak_rss": vm_hwm(), "worker_peak_rss": workers_peak, "open_s": opened, "size": data.size,
                      "index_bytes": data.files.names.offsets.nbytes + len(data.files.names.blob)
                      + sum(getattr(data.files, key).nbytes for key in ("offset", "csize", "size", "method", "crc"))
                      + data.labels.nbytes}))
    stream.close()


def tiny_sd_vae(path):
    """A random AutoencoderKL laid out as SD's VAE (4 levels, 8x down, 4 latent channels), small."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 64, 64, 64),
                        layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=SIDE)
    vae.save_pretrained(path)
    return path


def bench_encoder(root, pngs, count, batch_size, rounds, workers):
    """(images/s of encode_dataset, of the bare VAE loop) per round, interleaved."""
    from cmt.builders.encode import encode_dataset
    from cmt.latents import load_vae
    subset = write_zip(root / "encode-source.zip", count, pngs)
    small = ImageFiles(subset)
    vae_dir = tiny_sd_vae(root / "vae")
    vae = load_vae(vae_dir)
    pixels = [torch.from_numpy(np.stack([small[index][0] for index in range(start, min(start + batch_size, count))]))
              .float() / 127.5 - 1 for start in range(0, count, batch_size)]
    encoded, bare = [], []
    for round_number in range(rounds):
        order = ["encode", "bare"] if round_number % 2 == 0 else ["bare", "encode"]
        for name in order:
            started = time.perf_counter()
            if name == "encode":
                encode_dataset(source=subset, out=root / f"latents-{round_number}", vae=str(vae_dir),
                               batch_size=batch_size, shard_size=count, workers=workers, progress=False,
                               log=lambda line: None)
                encoded.append(count / (time.perf_counter() - started))
            else:
                with torch.no_grad():
                    for batch in pixels:
                        posterior = vae.encode(batch.clamp(-1, 1) * 0.5 + 0.5)["latent_dist"]
                        posterior.mean.numpy(), posterior.std.numpy()
                bare.append(count / (time.perf_counter() - started))
        print(f"  encoder round {round_number}: cmt-encode {encoded[-1]:.1f} images/s, bare VAE loop "
              f"{bare[-1]:.1f} images/s")
    return encoded, bare


@click.command()
@quick_option(QUICK)
@click.option("--small", type=click.IntRange(min=200), default=20_000, help="Images in the small zip.")
@click.option("--large", type=click.IntRange(min=200), default=200_000, help="Images in the large zip.")
@click.option("--distinct", type=click.IntRange(min=1), default=512, help="Different PNGs repeated under the names.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128)
@click.option("--rounds", type=click.IntRange(min=1), default=5, help="Interleaved rounds.")
@click.option("--batches", type=click.IntRange(min=1), default=40, help="Batches per contender and round.")
@click.option("--rss-batches", type=click.IntRange(min=1), default=50)
@click.option("--encode-count", type=click.IntRange(min=8), default=1024, help="Images the encoder benchmark encodes.")
@click.option("--encode-batch", type=click.IntRange(min=1), default=32)
@click.option("--encode-rounds", type=click.IntRange(min=1), default=3)
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Where to write the zips (default: a temporary folder, removed after).")
@click.option("--rss-child", "rss_args", default=None, hidden=True)
def main(small, large, distinct, batch_size, rounds, batches, rss_batches, encode_count, encode_batch, encode_rounds,
         out, rss_args):
    if rss_args is not None:
        return rss_child(*json.loads(rss_args))
    with tempfile.TemporaryDirectory(prefix="bench-images-") as scratch:
        root = Path(out or scratch)
        root.mkdir(parents=True, exist_ok=True)
        run(root, small, large, distinct, batch_size, rounds, batches, rss_batches, encode_count, encode_batch,
            encode_rounds)


def run(root, small, large, distinct, batch_size, rounds, batches, rss_batches, encode_count, encode_batch,
        encode_rounds):
    started = time.perf_counter()
    pngs = distinct_pngs(distinct)
    zips = {count: write_zip(root / f"images-{count}.zip", count, pngs) for count in (small, large)}
    auto = decoding_workers("auto")
    print(f"64x64 PNG zips of {small} and {large} images ({distinct} distinct PNGs, mean "
          f"{np.mean([len(p) for p in pngs]) / 1024:.1f} KiB; {zips[large].stat().st_size / 2**30:.2f} GiB) written in "
          f"{time.perf_counter() - started:.0f} s; {os.cpu_count()} cores, auto workers = {auto}, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    figures = {}

    # 1. Throughput on the small set.
    data = ImageFiles(zips[small])
    contenders = {"streamed, 0 workers": BatchStream(data, batch_size, seed=0, workers=0),
                  f"streamed, auto ({auto}) workers": BatchStream(data, batch_size, seed=0, workers="auto")}
    contenders["bare PIL loop"] = BareLoop(zips[small], BatchStream(data, batch_size, seed=0))
    for stream in contenders.values():   # start-up (worker processes) is not throughput
        next(stream)
    rates = {name: [] for name in contenders}
    for round_number in range(rounds):
        names = list(contenders)
        names = names[round_number % len(names):] + names[:round_number % len(names)]
        for name in names:
            rates[name].append(pull(contenders[name], batches, batch_size))
        print(f"  round {round_number}: " + ", ".join(f"{name} {rates[name][-1]:,.0f}" for name in contenders)
              + " images/s")
    for stream in contenders.values():
        getattr(stream, "close", lambda: None)()
    bare = rates["bare PIL loop"]
    print(f"{'loader':28s} {'images/s (median, min-max)':>30s} {'x bare (median, min-max)':>28s}")
    for name, values in rates.items():
        rate = median_spread(values)
        ratio = median_spread([a / b for a, b in zip(values, bare)])
        print(f"{name:28s} {rate[0]:12,.0f} ({rate[1]:,.0f}-{rate[2]:,.0f}) {ratio[0]:12.3f} "
              f"({ratio[1]:.3f}-{ratio[2]:.3f})")
    names = list(contenders)
    figures["stream0_vs_bare"] = median_spread([a / b for a, b in zip(rates[names[0]], bare)])[0]
    figures["stream_auto_vs_bare"] = median_spread([a / b for a, b in zip(rates[names[1]], bare)])[0]
    figures["bare_images_per_s"] = statistics.median(bare)

    # 2. Peak RSS of a fresh process per size.
    peaks = {}
    for workers in (0, "auto"):
        for count in (small, large):
            peaks[workers, count] = peak_rss(zips[count], rss_batches, workers)
            result = peaks[workers, count]
            print(f"  {count:>7} images, {workers} workers: peak RSS {result['peak_rss'] / 2**20:.0f} MiB"
                  + (f" (a worker: {result['worker_peak_rss'] / 2**20:.0f} MiB)" if result["worker_peak_rss"] else "")
                  + f"; opening (index + header scan) {result['open_s']:.2f} s; index {result['index_bytes'] / 2**20:.1f} MiB")
    figures["rss_large_vs_small"] = peaks[0, large]["peak_rss"] / peaks[0, small]["peak_rss"]
    figures["rss_large_vs_small_auto"] = peaks["auto", large]["peak_rss"] / peaks["auto", small]["peak_rss"]
    if peaks["auto", small]["worker_peak_rss"]:
        figures["worker_rss_large_vs_small"] = (peaks["auto", large]["worker_peak_rss"]
                                                / peaks["auto", small]["worker_peak_rss"])
    figures["open_s_large"] = peaks[0, large]["open_s"]

    # 3. The latent encoder against the bare VAE loop.
    count = min(encode_count, small)
    encoded, bare_vae = bench_encoder(root, pngs, count, encode_batch, encode_rounds, "auto")
    ratio = median_spread([a / b for a, b in zip(encoded, bare_vae)])
    print(f"cmt-encode {statistics.median(encoded):.1f} images/s, bare VAE loop {statistics.median(bare_vae):.1f} "
          f"images/s: {ratio[0]:.3f}x ({ratio[1]:.3f}-{ratio[2]:.3f}); {count} images at batch {encode_batch}")
    figures["encode_vs_bare"] = ratio[0]
    print(" ".join(f"{name}={value:.4g}" for name, value in figures.items()))


if __name__ == "__main__":
    main()
