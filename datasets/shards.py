"""Batches of trajectory states from a `cmt-build` dataset (zarr or WebDataset shards).

    reader = ShardReader("shards/", batch_size=128, seed=0, num_workers=2)
    for batch in reader:   # endless; a new order every epoch
        batch["state"], batch["sigma"], batch["endpoint"], batch["label"], batch["index"]

Each sample is one stored state of one trajectory with that trajectory's endpoint. With
`pairs=True` a sample is two states of the same trajectory, the second later on the solve
(smaller sigma), given as `target_state` / `target_sigma` (for flow-map / mean-flow objectives);
with `with_trajectory=True` every sample also carries its trajectory's `states` / `sigmas`.

Work is split by shards: once per reader (seeded by `seed`, which must be the same on every rank:
a reader built under a process group checks that it is), the shards are dealt round-robin to every
reader process of every rank (`rank * num_workers + worker`), so the deals partition the shards;
when there are fewer shards than reader processes, each shard is dealt in strided parts. A process reads its shards whole (the
arrays it yields only: never the noise; the sha256 checked on its first read of a shard, the
sizes after, or what `verify` asks, see `cmt.manifest.TrajectoryDataset`), keeps them decoded in memory up to
`cache_bytes`, and in every epoch (seeded by (seed, epoch)) walks them in a new order, each shard's
samples shuffled and cut into batches; a background thread reads and decodes the next shard while
the current one is cut. So each trajectory is seen once per epoch over all processes, a process
holds at most its cache plus two shards, and the stream depends only on (seed, rank, world_size,
num_workers): a restarted run sees the same batches.
"""
import concurrent.futures
import itertools
import math
import os

import numpy as np
import torch

from cmt.errors import ArgumentError, FileFormatError
from cmt.formats import ShardBuffers, ShardError
from cmt.manifest import TrajectoryDataset, check_verify

# The arrays a batch is gathered from (a shard's noise is never read by the reader).
READ_FIELDS = ("index", "label", "states", "sigmas", "endpoint")
# The share of the machine's memory that the decoded-shard caches of all reader processes on it
# may hold together, by default.
CACHE_SHARE = 0.25


def physical_memory():
    """Bytes of memory of this machine (0 when the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def local_processes(world_size=1):
    """Training processes on this machine: LOCAL_WORLD_SIZE (torchrun, accelerate) or, failing
    that, all of them."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    except ValueError:
        return max(1, world_size)


# Reader worker processes pay off only when cores are left over for them: on fewer free cores per
# rank they take cores from the network and add a copy of every batch between processes (measured
# slower than none on 2 cores; docs/benchmarks.md, "Reader").
AUTO_WORKERS, MIN_CORES_FOR_WORKERS = 2, 4


def available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def auto_workers(local_ranks=1):
    """Reader processes per rank for `workers="auto"`: `AUTO_WORKERS` when each rank on this machine
    has at least `MIN_CORES_FOR_WORKERS` cores, else none."""
    return AUTO_WORKERS if available_cores() // max(1, local_ranks) >= MIN_CORES_FOR_WORKERS else 0


def default_cache_bytes(reader_processes):
    """Decoded-shard cache of one reader process by default: `CACHE_SHARE` of the machine's memory
    over the reader processes on it (ranks on the machine x max(workers, 1))."""
    return int(physical_memory() * CACHE_SHARE) // max(1, reader_processes)


def _process_group():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _default_rank():
    if _process_group():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def check_same_seed(seed, world_size):
    """Every rank of the process group was given the same `seed` (one small all-gather; nothing
    without a group): with per-rank seeds the deals overlap, some shards are read twice and others
    never, and a corrupt unread shard goes unnoticed."""
    if world_size < 2 or not _process_group() or torch.distributed.get_world_size() != world_size:
        return
    seeds = [None] * world_size
    torch.distributed.all_gather_object(seeds, int(seed))
    if len(set(seeds)) > 1:
        raise ValueError(f"ShardReader: the ranks were given different seeds ({seeds}); the shards are dealt from "
                         "one permutation that every rank must share (pass the run's seed, not a per-rank one)")


def state_choices(num_states, pairs=False, exclude_endpoint=False):
    """What one trajectory offers per epoch under states_per_trajectory "all": its stored states
    (but the endpoint, when excluded and there are others), or with `pairs` its pairs of states."""
    if pairs:
        return num_states * (num_states - 1) // 2
    return num_states - int(bool(exclude_endpoint) and num_states > 1)


class DecodedShards:
    """Decoded shards kept in memory up to a byte budget: the first ones read stay (evicting would
    gain nothing, since every epoch walks all of them). `used` never exceeds `budget`."""

    def __init__(self, budget):
        self.budget, self.used, self.arrays = budget, 0, {}

    def fits(self, size):
        return self.used + size <= self.budget

    def add(self, key, arrays):
        size = sum(value.nbytes for value in arrays.values())
        if self.used + size <= self.budget:
            self.arrays[key] = arrays
            self.used += size


class ShardReader(torch.utils.data.IterableDataset):
    """An endless (or one-epoch) stream of batches over a trajectory dataset.

    seed: the run's seed, the same on every rank (the shards are dealt from one permutation of it;
        each reader process then walks its own shards in its own order).
    states_per_trajectory: "all" (every stored state of every trajectory, once per epoch) or k
        (k states drawn per trajectory and epoch; with `pairs`, k pairs; "all" then means all pairs).
    num_workers: reader processes when iterated directly (a DataLoader is made inside); as the
        dataset of your own DataLoader, use `batch_size=None` there.
    cache_bytes: decoded shards each reader process keeps in memory (0: read every epoch again;
        None: `default_cache_bytes` of the reader processes on this machine).
    dtype: of the states and sigmas yielded; None: as stored (float16 usually: half the bytes
        through the workers' pipes, upcast on the device by the consumer).
    verify: how shards are checked (`cmt.manifest.VERIFY_MODES`; True: "once", the sha256 at this
        process's first read of each shard, its files' sizes on re-reads).
    prefetch: read and decode the next shard in a background thread while batches of the current
        one are cut (file reads, checksums and Blosc decoding run outside the GIL).
    exclude_endpoint: never yield the last stored state (the endpoint itself) as a sample's state;
        for targets that are the endpoint, where it would cost nothing and teach nothing.
    """

    def __init__(self, path, batch_size, *, seed=0, shuffle=True, states_per_trajectory="all", pairs=False,
                 with_trajectory=False, rank=None, world_size=None, num_workers=0, endless=True, verify=True,
                 cache_bytes=None, dtype=torch.float32, exclude_endpoint=False, prefetch=True):
        super().__init__()
        self.dataset = path if isinstance(path, TrajectoryDataset) else TrajectoryDataset(path)
        if batch_size < 1:
            raise ArgumentError("batch_size", f"must be >= 1, got {batch_size}")
        if states_per_trajectory != "all" and (not isinstance(states_per_trajectory, int) or states_per_trajectory < 1):
            raise ArgumentError("states_per_trajectory",
                                f"must be 'all' or a positive int, got {states_per_trajectory!r}")
        self.num_states = len(self.dataset.manifest["kept_states"])
        if pairs and self.num_states < 2:
            raise ArgumentError("pairs", f"pairs of states need at least 2 stored states per trajectory; "
                                         f"{self.dataset.url} has {self.num_states}")
        if rank is None or world_size is None:
            rank, world_size = _default_rank()
        if not 0 <= rank < world_size:
            raise ArgumentError("rank", f"{rank} is not in [0, {world_size})")
        check_same_seed(seed, world_size)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.states_per_trajectory = states_per_trajectory
        self.pairs = pairs
        self.with_trajectory = with_trajectory
        self.rank, self.world_size = rank, world_size
        self.num_workers = num_workers
        self.endless = endless
        self.verify = check_verify(verify)
        if cache_bytes is None:
            cache_bytes = default_cache_bytes(local_processes(world_size) * max(1, num_workers))
        if cache_bytes < 0:
            raise ArgumentError("cache_bytes", f"must be >= 0 (0: no cache), got {cache_bytes}")
        self.cache_bytes = int(cache_bytes)
        self.dtype = dtype
        self.prefetch = prefetch
        self.cache = None   # the DecodedShards of the stream last started in this process
        self.exclude_endpoint = bool(exclude_endpoint) and not pairs and self.num_states > 1

    # -- which shards this reader process reads ---------------------------------------------------
    def _units(self, consumer, consumers):
        """The (shard, part, parts) this consumer reads, the same in every epoch."""
        num_shards = len(self.dataset.shards)
        parts = max(1, math.ceil(consumers / num_shards))
        units = [(shard, part, parts) for shard in range(num_shards) for part in range(parts)]
        if self.shuffle:
            order = np.random.default_rng([self.seed]).permutation(len(units))
            units = [units[k] for k in order]
        return units[consumer::consumers]

    def _unit_bytes(self, unit):
        """Bytes of the decoded arrays of a unit (what the cache would hold of it)."""
        shard, part, parts = unit
        rows = len(range(part, self.dataset.shards[shard]["count"], parts))
        values = int(np.prod(self.dataset.manifest["data_shape"]))
        itemsize = np.dtype(self.dataset.manifest["dtype"]).itemsize
        return rows * ((self.num_states + 1) * values * itemsize + 16) + self.num_states * 8

    def _load(self, unit, cache, buffers=None):
        """The arrays of one unit: its shard's (strided part of) trajectories, decoded.

        buffers: an iterator of `ShardBuffers` to read a unit into when the cache will not keep it
        (the arrays are then views of them, reused by a later load: see `_stream` for why that is
        safe); None: new arrays."""
        if unit in cache.arrays:
            return cache.arrays[unit]
        shard, part, parts = unit
        reuse = buffers is not None and not cache.fits(self._unit_bytes(unit))
        arrays = self.dataset.read_shard(self.dataset.shards[shard], verify=self.verify, fields=READ_FIELDS,
                                         buffers=next(buffers) if reuse else None)
        if parts > 1:
            arrays = {key: (value if key == "sigmas" else value[part::parts].copy()) for key, value in arrays.items()}
        elif reuse:
            return arrays   # views of reused memory: never into the cache
        cache.add(unit, arrays)
        return arrays

    def _samples(self, count, rng):
        """`(row, position[, target_position])` columns of the samples of `count` trajectories."""
        choices = state_choices(self.num_states, self.pairs, self.exclude_endpoint)
        if self.pairs:
            first, second = np.triu_indices(self.num_states, k=1)
        if self.states_per_trajectory == "all" or self.states_per_trajectory >= choices:
            picks = np.tile(np.arange(choices), (count, 1))
        else:
            # k distinct choices per trajectory: the first k of a random permutation of each row
            picks = np.argsort(rng.random((count, choices)), axis=1)[:, : self.states_per_trajectory]
        rows = np.repeat(np.arange(count), picks.shape[1])
        picks = picks.reshape(-1)
        columns = (rows, first[picks], second[picks]) if self.pairs else (rows, picks)
        if self.shuffle:
            order = rng.permutation(len(rows))
            columns = tuple(column[order] for column in columns)
        return columns

    def _gather(self, arrays, columns):
        rows, positions = columns[0], columns[1]
        sample = {
            "state": arrays["states"][rows, positions], "sigma": arrays["sigmas"][positions],
            "endpoint": arrays["endpoint"][rows], "label": arrays["label"][rows], "index": arrays["index"][rows],
        }
        if self.pairs:
            sample["target_state"] = arrays["states"][rows, columns[2]]
            sample["target_sigma"] = arrays["sigmas"][columns[2]]
        if self.with_trajectory:
            sample["states"] = arrays["states"][rows]
            sample["sigmas"] = np.broadcast_to(arrays["sigmas"], (len(rows), len(arrays["sigmas"])))
        return sample

    def _to_torch(self, sample):
        batch = {}
        for key, value in sample.items():
            tensor = torch.from_numpy(np.ascontiguousarray(value))
            if key in ("label", "index"):
                tensor = tensor.to(torch.int64)
            elif self.dtype is not None:
                tensor = tensor.to(self.dtype)
            batch[key] = tensor
        return batch

    def _epoch_units(self, units, consumer):
        """`(epoch, unit)` in the order the stream walks them."""
        for epoch in (itertools.count() if self.endless else [0]):
            order = np.random.default_rng([self.seed, epoch, consumer]).permutation(len(units)) \
                if self.shuffle else range(len(units))
            for k in order:
                yield epoch, units[k]
            yield epoch, None   # the end of an epoch

    def _loaded(self, units, consumer, cache, buffers=None):
        """`(epoch, unit, arrays)` in stream order, the next unit loading in the background."""
        walk = self._epoch_units(units, consumer)
        if not self.prefetch:
            for epoch, unit in walk:
                yield epoch, unit, None if unit is None else self._load(unit, cache, buffers)
            return
        with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cmt-shard-reader") as pool:
            def submit(item):
                epoch, unit = item
                return epoch, unit, None if unit is None else pool.submit(self._load, unit, cache, buffers)
            pending = next((submit(item) for item in walk), None)
            while pending is not None:
                upcoming = next((submit(item) for item in walk), None)   # loads while this one is cut
                epoch, unit, future = pending
                yield epoch, unit, None if future is None else future.result()
                pending = upcoming

    def _stream(self, consumer, consumers):
        units = self._units(consumer, consumers)
        self.cache = cache = DecodedShards(self.cache_bytes)
        # Units the cache does not keep are read and decoded into two sets of buffers in turn (new
        # memory costs page faults on every read: `ShardBuffers`). Two suffice: unit k + 2 starts
        # loading (into unit k's set) only once this loop has asked `_loaded` for unit k + 1, i.e.
        # after every batch of unit k was gathered, and gathers copy (fancy indexing), so no batch
        # or leftover views a unit's arrays. Loads run one at a time (one prefetch thread, or none).
        buffers = itertools.cycle([ShardBuffers(), ShardBuffers()])
        leftover = None  # gathered samples short of a batch, carried into the next shard
        epoch_samples = 0
        for epoch, unit, arrays in self._loaded(units, consumer, cache, buffers):
            if unit is None:
                if self.endless and not epoch_samples:
                    raise ValueError(f"{self.dataset.url}: {len(self.dataset)} trajectories are too few for "
                                     f"{consumers} reader processes (ranks x workers); reader {consumer} gets none")
                epoch_samples = 0
                continue
            rng = np.random.default_rng([self.seed, epoch, *unit])
            columns = self._samples(len(arrays["index"]), rng)
            count, start = len(columns[0]), 0
            epoch_samples += count
            if leftover is not None:
                start = min(count, self.batch_size - len(leftover["index"]))
                head = self._gather(arrays, tuple(column[:start] for column in columns))
                leftover = {key: np.concatenate([leftover[key], head[key]]) for key in head}
                if len(leftover["index"]) < self.batch_size:
                    continue
                yield self._to_torch(leftover)
                leftover = None
            while start + self.batch_size <= count:
                yield self._to_torch(self._gather(arrays, tuple(column[start:start + self.batch_size]
                                                                 for column in columns)))
                start += self.batch_size
            if start < count:
                leftover = self._gather(arrays, tuple(column[start:] for column in columns))
        if leftover is not None:
            yield self._to_torch(leftover)

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        if worker is not None:
            workers = worker.num_workers
            stream = self._stream(self.rank * workers + worker.id, self.world_size * workers)
            return self._handed_back(stream) if self._errors_as_data else stream
        if self.num_workers > 0:
            return self._from_workers()
        return self._stream(self.rank, self.world_size)

    # A damaged shard read by one of this reader's own worker processes: the worker hands the
    # ShardError's message back as a batch `{"error": message}` and the reader raises it here, so
    # the user reads one line naming the shard (torch would re-raise it with the worker's traceback
    # in its message). A DataLoader of the user's own gets the exception as torch passes it.
    _errors_as_data = False

    def _from_workers(self):
        self._errors_as_data = True   # copied into the workers when the loader starts them
        try:
            loader = iter(torch.utils.data.DataLoader(self, batch_size=None, num_workers=self.num_workers,
                                                      persistent_workers=False, pin_memory=torch.cuda.is_available()))
        finally:
            self._errors_as_data = False
        for batch in loader:
            if "error" in batch:
                raise ShardError(batch["error"])
            yield batch

    @staticmethod
    def _handed_back(stream):
        try:
            yield from stream
        except FileFormatError as error:
            yield {"error": str(error)}
