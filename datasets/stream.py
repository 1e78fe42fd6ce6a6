"""Training batches from a map-style data set that decodes on demand: endless, split across ranks,
decoded by DataLoader workers (or a prefetch thread), pinned, and resumable exactly.

Order (as EDM2's `InfiniteSampler` and torch's `DistributedSampler` draw: without replacement,
epoch by epoch): epoch e is the permutation `default_rng([seed, e])` of all N items, the same on
every rank; rank r takes every world_size-th item of it from the r-th, N // world_size of them (the
last N % world_size of an epoch are left out, so the ranks never overlap and stay in step). A
rank's batches cut its items of epoch 0, 1, 2, ... one after the other, so batch k of rank r is a
function of (seed, r, world_size, batch size, k) alone: what `state_dict` saves is k, and a resumed
stream repeats an uninterrupted one exactly, whatever the number of workers. Each item's key
carries its own randomness: `(index, flip, epoch, seed)`; flip (`xflip`: mirrored left-right with
probability 1/2, MeanFlow's `RandomHorizontalFlip` in Gsunshine/meanflow utils/input_pipeline.py; off by
default, as in EDM2's training and in the CMT runs, whose EDM augment pipe is off too: sony/cmt's
run_cmt_cifar.sh, run_cmt_afhq.sh, run_cmt_ffhq.sh and run_cmt+ecm_*.sh pass --augment=0.0 and no
--xflip, so none of its geometric augmentations is reproduced here) is drawn per epoch and item
(`default_rng([seed, epoch, 1])`), and a data set that draws more per item (a latent set's
posterior sample) seeds it from the key.

A data set plugs in with `__len__` and `__getitems__(keys [B, 4]) -> {"data", "label"}` or
`{"error": message}`: a worker hands its error back as data and the stream raises it as a
`FileFormatError`, so a damaged image stops training with one line naming it, not a worker's traceback.
"""
import concurrent.futures
import os

import numpy as np
import torch

from cmt.errors import ArgumentError, FileFormatError
from .mapstyle import as_is

# DataLoader workers per rank for workers="auto": decoding is the work, so every core a rank has
# but one (the training process's) decodes, up to MAX_AUTO_WORKERS.
MAX_AUTO_WORKERS = 8


def available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def decoding_workers(workers="auto", local_ranks=1):
    """The worker count `workers` asks for: an int >= 0 as it is, "auto" from the cores per rank."""
    if workers == "auto":
        return max(0, min(MAX_AUTO_WORKERS, available_cores() // max(1, local_ranks) - 1))
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ArgumentError("workers", f"must be 'auto' or an integer >= 0, got {workers!r}")
    return workers


class _Keys:
    """The batch sampler of the DataLoader: the stream's key arrays from batch `start` on."""

    def __init__(self, stream, start):
        self.stream, self.start = stream, start

    def __iter__(self):
        batch = self.start
        while True:
            yield self.stream.batch_keys(batch)
            batch += 1


class BatchStream:
    """An endless iterator of `{"data", "label"}` batches of `batch_size` items of `dataset`.

    seed: the same on every rank (the ranks split one permutation per epoch). workers: DataLoader
    worker processes ("auto": `decoding_workers`); 0 decodes in a background thread of this
    process, one batch ahead. xflip: mirror items left-right at random. pin_memory (None: when CUDA
    is available) and prefetch (batches each worker decodes ahead) are the DataLoader's.
    """

    def __init__(self, dataset, batch_size, seed, *, rank=0, world_size=1, workers=0, xflip=False, pin_memory=None,
                 prefetch=2):
        if batch_size < 1:
            raise ArgumentError("batch_size", f"must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ArgumentError("rank", f"{rank} is not in [0, {world_size})")
        self.dataset, self.batch_size, self.seed = dataset, int(batch_size), int(seed)
        self.rank, self.world_size = rank, world_size
        self.per_rank = len(dataset) // world_size
        if self.per_rank < 1:
            raise ArgumentError("data", f"{getattr(dataset, 'name', 'the data set')} holds {len(dataset)} items, "
                                        f"fewer than the {world_size} processes")
        self.workers = decoding_workers(workers)
        self.xflip = bool(xflip)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch = prefetch
        self.batches = 0          # batches handed out: the whole state
        self._iterator = None
        self._epoch = None        # (epoch, this rank's indices, flips) of the last epoch cut

    # ---- the order ----------------------------------------------------------------------------
    def _epoch_items(self, epoch):
        if self._epoch is None or self._epoch[0] != epoch:
            size = len(self.dataset)
            order = np.random.default_rng([self.seed, epoch]).permutation(size)
            mine = order[self.rank::self.world_size][:self.per_rank]
            flips = np.random.default_rng([self.seed, epoch, 1]).integers(0, 2, size, dtype=np.int64)[mine] \
                if self.xflip else np.zeros(len(mine), np.int64)
            self._epoch = (epoch, mine, flips)
        return self._epoch[1:]

    def batch_keys(self, batch):
        """The keys `[batch_size, 4]` (index, flip, epoch, seed) of this rank's batch number `batch`."""
        parts = []
        position, end = batch * self.batch_size, (batch + 1) * self.batch_size
        while position < end:
            epoch, offset = divmod(position, self.per_rank)
            items, flips = self._epoch_items(epoch)
            count = min(end - position, self.per_rank - offset)
            rows = np.empty((count, 4), np.int64)
            rows[:, 0], rows[:, 1] = items[offset:offset + count], flips[offset:offset + count]
            rows[:, 2], rows[:, 3] = epoch, self.seed
            parts.append(rows)
            position += count
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    # ---- the iterator -------------------------------------------------------------------------
    def _start(self):
        if self.workers > 0:
            loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=_Keys(self, self.batches),
                                                 num_workers=self.workers, collate_fn=as_is,
                                                 pin_memory=self.pin_memory, prefetch_factor=self.prefetch)
            return iter(loader)
        return self._threaded(self.batches)

    def _threaded(self, start):
        """Batches decoded one ahead in a background thread (PIL and zlib release the GIL)."""
        def load(batch):
            result = self.dataset.__getitems__(self.batch_keys(batch))
            if self.pin_memory and "data" in result:
                result = {key: value.pin_memory() for key, value in result.items()}
            return result

        with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cmt-decode") as pool:
            pending, batch = pool.submit(load, start), start
            while True:
                batch += 1
                upcoming = pool.submit(load, batch)
                yield pending.result()
                pending = upcoming

    def __iter__(self):
        return self

    def __next__(self):
        if self._iterator is None:
            self._iterator = self._start()
        batch = next(self._iterator)
        if "error" in batch:
            self.close()
            raise FileFormatError(batch["error"])
        self.batches += 1
        return batch

    def close(self):
        """Stop the workers (or the thread); the next batch starts them again where the stream is."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None and hasattr(iterator, "close"):
            iterator.close()
        elif iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def state_dict(self):
        return {"batches": self.batches}

    def load_state_dict(self, state):
        self.close()
        self.batches = int(state["batches"])
