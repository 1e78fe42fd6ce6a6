"""Work split across the processes of `accelerate launch` (or torchrun), for the commands that are
not training loops: the builder deals shards, sampling and evaluation deal batches.

A job is cut into the same batches whatever the number of processes; rank r takes batches r,
r + world, ...; the results are gathered back in batch order. Every batch is then computed exactly
as in a single process, so the gathered result is the same, bit for bit (same device and threads).
"""
import atexit
import os

import torch
from accelerate import PartialState
from accelerate.utils import gather_object


def distributed_state():
    """accelerate's process state; processes launched on a machine without CUDA (or with
    ACCELERATE_USE_CPU=true) join one CPU (gloo) group instead of each running alone."""
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    state = PartialState(cpu=use_cpu or (launched and not torch.cuda.is_available()))
    if launched:
        atexit.unregister(_leave_group)   # once, however often the state is asked for
        atexit.register(_leave_group)
    return state


def _leave_group():
    """Destroy the process group before the interpreter exits: a gloo group left alive was seen to
    abort one rank at exit ("terminate called without an active exception") after all its work."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def batch_starts(total, batch_size):
    """The first index of each batch of a job of `total` items."""
    return list(range(0, total, batch_size))


def map_batches(function, total, batch_size, state=None, progress=None):
    """`function(start, stop)` for this rank's batches of `range(total)`, gathered on every rank in
    batch order: a list with one result per batch. `progress`: a tqdm bar updated by batch sizes."""
    starts = batch_starts(total, batch_size)
    rank, world = (0, 1) if state is None else (state.process_index, state.num_processes)
    mine = []
    for position in range(rank, len(starts), world):
        start = starts[position]
        stop = min(start + batch_size, total)
        mine.append((position, function(start, stop)))
        if progress is not None:
            progress.update((stop - start) * world)
    if world == 1:
        return [result for _, result in mine]
    gathered = gather_object(mine)   # every rank's list, concatenated
    return [result for _, result in sorted(gathered, key=lambda item: item[0])]
