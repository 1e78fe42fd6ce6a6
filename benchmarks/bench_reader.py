"""Benchmark of the trajectory-shard reader at scale; prints the figures (no pass/fail).

A synthetic set of noise-like 3x64x64 float16 trajectories (17 states: the exact teacher of a
Gaussian, whose states stay Gaussian noise, the hardest case for compression) is written by the
project's own builder (`build_trajectories`) in every layout: zarr with each `--compression`, and
WebDataset. Then, side by side in interleaved rounds (the order of the contenders rotates from
round to round, so a change of machine load hits all of them):

1. `ShardReader` with `cache_bytes=0` (every epoch read from storage), one process, batch 128,
   the training access pattern (`exclude_endpoint`, shuffled shards and samples, stored dtype),
   against the same reader walking an `np.memmap` of the same states (the same code gathers the
   same batches; only reading and decoding differ): states/s, at the default thread settings
   and at one thread (torch and Blosc). Target >= 0.5. Beside it the same reader checking size
   and crc32c on every re-read (`verify="crc32c"`) instead of sizes only (the default, "once").
2. WebDataset shards against zarr. Target >= 0.5.
3. 2 DataLoader workers against none (the machine's free cores decide this one).
4. Peak RSS of a reader process (a subprocess each, two epochs) over a set of 1x, 2x, 4x its cache
   budget, in shards an eighth of `--shard-size` (so the budget spans several shards, as the
   default budget does): flat is the goal.

    python benchmarks/bench_reader.py [--num-trajectories 4096] [--shard-size 512] [--rounds 5]
    python benchmarks/bench_reader.py --quick      # under 2 minutes: small sizes, the script works

The last line holds the ratios as name=value pairs.
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numcodecs.blosc
import numpy as np
import torch

from cmt.builders.build import Teacher, build_trajectories
from cmt.datasets.shards import READ_FIELDS, ShardReader
from cmt.formats import COMPRESSIONS, DEFAULT_COMPRESSION
from cmt.manifest import TrajectoryDataset
from quick import quick_option

SHAPE = (3, 64, 64)
QUICK = {"num_trajectories": 256, "shard_size": 64, "rounds": 3, "batches": 48}
DEFAULT_THREADS = (torch.get_num_threads(), numcodecs.blosc.get_nthreads())


def gaussian_teacher(data_std=0.5):
    """The exact denoiser of N(0, data_std^2 I): its trajectories are scaled Gaussian noise."""
    def denoiser(x, sigma, labels=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return x * (data_std ** 2 / (sigma ** 2 + data_std ** 2))
    identity = {"kind": "gaussian", "name": "gaussian-3x64x64", "sha256": "0" * 64,
                "config": {"architecture": "gaussian", "data_std": data_std}}
    return Teacher(denoiser, SHAPE, 0, identity)


def build(root, num_trajectories, shard_size, fmt, compression, suffix=""):
    out = root / ((fmt if fmt == "wds" else f"zarr-{compression}") + suffix)
    build_trajectories(teacher=gaussian_teacher(), out=out, nfe=16, num_trajectories=num_trajectories, batch_size=256,
                       shard_size=shard_size, format=fmt, compression=compression if fmt == "zarr" else None,
                       progress=False, log=lambda message: None)
    return out


class MemmapReader(ShardReader):
    """The reader's own batch pattern over np.memmap'ed arrays: the baseline of reading without a
    format (the same units, orders, samples and gathering; `_load` only slices the memmaps)."""

    def __init__(self, path, memmaps, batch_size, **options):
        super().__init__(path, batch_size, **options)
        self.memmaps = memmaps
        self.firsts = np.cumsum([0] + [entry["count"] for entry in self.dataset.shards])

    def _load(self, unit, cache, buffers=None):
        shard, _, _ = unit
        rows = slice(self.firsts[shard], self.firsts[shard + 1])
        return {"states": self.memmaps["states"][rows], "endpoint": self.memmaps["endpoint"][rows],
                "index": self.memmaps["index"][rows], "label": self.memmaps["label"][rows],
                "sigmas": self.memmaps["sigmas"]}


def write_memmaps(dataset_path, root):
    """The dataset's arrays as .npy files, opened as memmaps (the page cache holds them, as it holds
    the shards)."""
    dataset = TrajectoryDataset(dataset_path)
    shards = [dataset.read_shard(entry, fields=READ_FIELDS) for entry in dataset.shards]
    memmaps = {}
    for key in READ_FIELDS:
        value = shards[0][key] if key == "sigmas" else np.concatenate([shard[key] for shard in shards])
        np.save(root / f"{key}.npy", value)
        memmaps[key] = np.load(root / f"{key}.npy", mmap_mode="r")
    return memmaps


def set_threads(threads):
    torch.set_num_threads(threads[0])
    numcodecs.blosc.set_nthreads(threads[1])


def pull(stream, batches):
    """States per second of `batches` batches of a running stream."""
    started = time.perf_counter()
    states = sum(len(next(stream)["index"]) for _ in range(batches))
    return states / (time.perf_counter() - started)


def rss_child(path, max_trajectories, cache_bytes, epochs):
    """(In a subprocess) read `epochs` epochs of the first `max_trajectories`; print peak RSS."""
    dataset = TrajectoryDataset(path, max_trajectories=max_trajectories)
    reader = ShardReader(dataset, 128, seed=0, cache_bytes=cache_bytes, dtype=None, exclude_endpoint=True,
                         endless=False)
    for _ in range(epochs):
        for _ in reader:
            pass
    print(json.dumps({"peak_rss": peak_rss_of_this_process(), "cache_used": reader.cache.used}))


def peak_rss_of_this_process():
    """Bytes: VmHWM of /proc/self/status (ru_maxrss would carry the parent's peak over the exec)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss(path, max_trajectories, cache_bytes):
    result = subprocess.run([sys.executable, __file__, "--rss-child", json.dumps([str(path), max_trajectories,
                                                                                 cache_bytes, 2])],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def median_spread(values):
    return statistics.median(values), (min(values), max(values))


@click.command()
@quick_option(QUICK)
@click.option("--num-trajectories", type=click.IntRange(min=8), default=4096)
@click.option("--shard-size", type=click.IntRange(min=1), default=512)
@click.option("--batch-size", type=click.IntRange(min=1), default=128)
@click.option("--rounds", type=click.IntRange(min=1), default=5, help="Interleaved rounds.")
@click.option("--batches", type=click.IntRange(min=1), default=256,
              help="Batches per contender and round (two shards of 512 at batch 128).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Where to write the data sets (default: a temporary folder, removed after).")
@click.option("--rss-child", default=None, hidden=True)
def main(num_trajectories, shard_size, batch_size, rounds, batches, out, rss_child):
    if rss_child is not None:
        return rss_child_main(rss_child)
    with tempfile.TemporaryDirectory(prefix="bench-reader-") as scratch:
        root = Path(out or scratch)
        root.mkdir(parents=True, exist_ok=True)
        run(root, num_trajectories, shard_size, batch_size, rounds, batches)


def rss_child_main(arguments):
    rss_child(*json.loads(arguments))


def run(root, num_trajectories, shard_size, batch_size, rounds, batches):
    started = time.perf_counter()
    sets = {f"zarr-{compression}": build(root, num_trajectories, shard_size, "zarr", compression)
            for compression in COMPRESSIONS}
    sets["wds"] = build(root, num_trajectories, shard_size, "wds", None)
    memmaps = write_memmaps(sets[f"zarr-{DEFAULT_COMPRESSION}"], root)
    raw = memmaps["states"].nbytes + memmaps["endpoint"].nbytes
    print(f"{num_trajectories} trajectories x 17 states of {'x'.join(map(str, SHAPE))} float16 in shards of "
          f"{shard_size}, batch {batch_size}; built in {time.perf_counter() - started:.0f} s; "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; default threads torch "
          f"{DEFAULT_THREADS[0]}, blosc {DEFAULT_THREADS[1]}")
    for name, path in sets.items():
        size = sum(entry["bytes"] for entry in TrajectoryDataset(path).shards)
        print(f"  {name:10s} {size / 2**20:8.1f} MiB on disk ({size / raw:.3f} x the raw states + endpoints)")

    options = dict(seed=0, cache_bytes=0, dtype=None, exclude_endpoint=True)
    default = f"zarr-{DEFAULT_COMPRESSION}"
    contenders = {"memmap": lambda: MemmapReader(sets[default], memmaps, batch_size, **options)}
    contenders.update({name: (lambda path=path: ShardReader(path, batch_size, **options)) for name, path in sets.items()})
    contenders["no-prefetch"] = lambda: ShardReader(sets[default], batch_size, prefetch=False, **options)
    contenders["crc32c"] = lambda: ShardReader(sets[default], batch_size, verify="crc32c", **options)
    contenders["workers2"] = lambda: ShardReader(sets[default], batch_size, num_workers=2, **options)
    streams = {name: iter(make()) for name, make in contenders.items()}
    for stream in streams.values():   # start-up (worker processes, the first shard) is not throughput
        next(stream)
    thread_settings = {"default": DEFAULT_THREADS, "1thread": (1, 1)}
    rates = {(name, threads): [] for name in streams for threads in thread_settings}
    for round_number in range(rounds):
        names = list(streams)
        names = names[round_number % len(names):] + names[:round_number % len(names)]
        for threads, setting in thread_settings.items():
            set_threads(setting)
            for name in names:
                if name in ("wds", "workers2", "no-prefetch") and threads != "default":
                    continue   # measured at the default settings only
                rates[name, threads].append(pull(streams[name], batches))
        set_threads(DEFAULT_THREADS)
        print(f"  round {round_number}: " + ", ".join(f"{name} {rates[name, 'default'][-1]:,.0f}"
                                                      for name in streams) + " states/s (default threads)")
    del streams

    def ratios(name, base="memmap", threads="default", base_threads=None):
        values = [a / b for a, b in zip(rates[name, threads], rates[base, base_threads or threads])]
        return median_spread(values)

    figures = {}
    print(f"{'contender':14s} {'states/s (median)':>18s} {'x memmap (median, min-max)':>30s} {'1 thread x memmap':>22s}")
    for name in contenders:
        rate = statistics.median(rates[name, "default"])
        ratio, spread = ratios(name)
        line = f"{name:14s} {rate:18,.0f} {ratio:12.3f} ({spread[0]:.3f}-{spread[1]:.3f})"
        if rates[name, "1thread"]:
            one, one_spread = ratios(name, threads="1thread")
            line += f" {one:12.3f} ({one_spread[0]:.3f}-{one_spread[1]:.3f})"
        print(line)
    figures["reader_vs_memmap"] = ratios(default)[0]
    figures["reader_vs_memmap_1thread"] = ratios(default, threads="1thread")[0]
    for compression in COMPRESSIONS:
        if compression != DEFAULT_COMPRESSION:
            figures[f"{compression}_vs_memmap"] = ratios(f"zarr-{compression}")[0]
    figures["no_prefetch_vs_prefetch"] = ratios("no-prefetch", base=default)[0]
    figures["crc32c_vs_once"] = ratios("crc32c", base=default)[0]
    figures["wds_vs_zarr"] = ratios("wds", base=default)[0]
    figures["workers2_vs_workers0"] = ratios("workers2", base=default)[0]
    print(f"WebDataset / zarr ({DEFAULT_COMPRESSION}) = {figures['wds_vs_zarr']:.3f}; 2 workers / none = "
          f"{figures['workers2_vs_workers0']:.3f} on {os.cpu_count()} cores")

    # Peak RSS over 1x, 2x, 4x the cache budget (a quarter of the set), on a copy of the set in
    # shards an eighth of the size, so that the budget holds several of them (the default budget,
    # a quarter of the machine's memory, holds many).
    rss_shard = max(1, shard_size // 8)
    rss_set = build(root, num_trajectories, rss_shard, "zarr", DEFAULT_COMPRESSION, suffix="-rss")
    dataset = TrajectoryDataset(rss_set)
    quarter = max(1, num_trajectories // 4)
    per_trajectory = sum(value.nbytes for key, value in dataset.read_shard(dataset.shards[0], fields=READ_FIELDS).items()
                         if key != "sigmas") / dataset.shards[0]["count"]
    budget = int(quarter * per_trajectory) + (1 << 20)
    print(f"  peak RSS (VmHWM of a subprocess, two epochs), shards of {rss_shard} trajectories "
          f"({rss_shard * per_trajectory / 2**20:.1f} MiB decoded), cache budget {budget / 2**20:.0f} MiB")
    peaks = {}
    for times in (1, 2, 4):
        result = peak_rss(rss_set, min(num_trajectories, quarter * times), budget)
        peaks[times] = result["peak_rss"]
        print(f"  {times}x the budget: peak RSS {peaks[times] / 2**20:.0f} MiB, cache held "
              f"{result['cache_used'] / 2**20:.0f} MiB")
    # A reader holds its cache plus the two shards in flight (read and decoded into two reused sets
    # of buffers): at 1x the set is the cache, from 2x on the two small shards come on top.
    figures["rss_4x_vs_1x"] = peaks[4] / peaks[1]
    figures["rss_4x_vs_2x"] = peaks[4] / peaks[2]
    print(" ".join(f"{name}={value:.3f}" for name, value in figures.items()))


if __name__ == "__main__":
    main()
