"""What every sharded builder shares (`cmt-build`'s trajectories, `cmt-encode`'s latents): shards dealt
to ranks round-robin, the ones an earlier run finished kept, each new one made while the previous is
encoded and placed on a writer thread, placed atomically and then vouched for by its sidecar."""
import concurrent.futures
import dataclasses

import tqdm

from cmt.distributed import distributed_state
from cmt.errors import ShardError
from cmt.formats import checksum, files_bytes, read_files, remove_temporaries, write_atomic
from cmt.manifest import read_json, sidecar_name, write_json


def shard_is_done(fs, root, name, first, count):
    """True when the shard's sidecar exists and its checksum and count match the files."""
    sidecar = f"{root}/{sidecar_name(name)}"
    if not fs.exists(sidecar):
        return False
    entry = read_json(fs, sidecar)
    if (entry.get("name"), entry.get("first_index"), entry.get("count")) != (name, first, count):
        return False
    try:
        return checksum(read_files(fs, f"{root}/{name}")) == entry.get("sha256")
    except ShardError:
        return False


def place_shard(fs, root, name, first, count, files, on_placed=None):
    """Write a shard's encoded `files` atomically, then its sidecar; returns the sidecar entry.
    on_placed() runs between the two: the moment a crash is worst for a resume (the shard in place,
    no sidecar to vouch for it), where the resume tests kill the build."""
    write_atomic(fs, f"{root}/{name}", files)
    if on_placed is not None:
        on_placed()
    entry = {"name": name, "first_index": first, "count": count, "sha256": checksum(files),
             "bytes": files_bytes(files)}
    write_json(fs, f"{root}/{sidecar_name(name)}", entry)
    return entry


@dataclasses.dataclass
class Written:
    """What `write_shards` did: this rank's shards (`mine`), those it made (`made`), and on rank 0
    the sidecar entries of the whole plan (None on the other ranks)."""
    mine: list
    made: list
    entries: list = None

    @property
    def kept(self):
        return len(self.mine) - len(self.made)


def write_shards(fs, root, plan, make, encode, *, unit, command, progress=True, on_placed=None):
    """Make and place this rank's shards of `plan` (`(shard, name, first, count)` rows) that are not
    done: `make(first, count, bar) -> arrays` (the expensive part, with a tqdm bar in `unit`s), then
    `encode(arrays, first) -> files` and `place_shard` on a writer thread, overlapping the next
    `make`. on_placed(shard): see `place_shard`. Waits for every rank; rank 0 then reads every
    sidecar of the plan."""
    state = distributed_state()
    mine = plan[state.process_index::state.num_processes]
    made = [item for item in mine if not shard_is_done(fs, root, item[1], item[2], item[3])]
    bar = tqdm.tqdm(total=sum(item[3] for item in mine), initial=sum(item[3] for item in mine if item not in made),
                    unit=unit, desc=f"{command} rank {state.process_index}/{state.num_processes}",
                    disable=not (progress and state.is_main_process), dynamic_ncols=True)

    def encode_and_place(shard, name, first, arrays):
        files = encode(arrays, first)
        return place_shard(fs, root, name, first, len(arrays["index"]), files,
                           None if on_placed is None else lambda: on_placed(shard))

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as writer:
        pending = None
        for shard, name, first, count in made:
            remove_temporaries(fs, f"{root}/{name}")
            arrays = make(first, count, bar)
            if pending is not None:
                pending.result()
            pending = writer.submit(encode_and_place, shard, name, first, arrays)
        if pending is not None:
            pending.result()
    bar.close()
    state.wait_for_everyone()
    written = Written(mine, made)
    if state.is_main_process:
        written.entries = []
        for _, name, first, count in plan:
            entry = read_json(fs, f"{root}/{sidecar_name(name)}")
            if (entry["name"], entry["first_index"], entry["count"]) != (name, first, count):
                raise ShardError(f"{root}/{sidecar_name(name)} does not describe shard {name} ({first}, {count})")
            written.entries.append(entry)
    return written
