"""The shard reader: exact samples, epochs, ranks, workers, pairs, and named errors for bad shards."""
import collections
import gzip
import shutil

import numpy as np
import pytest
import torch

from cmt.builders.build import build_trajectories
from cmt.formats import ShardError
from cmt.manifest import TrajectoryDataset
from cmt.datasets.shards import ShardReader
from conftest import gmm_teacher


@pytest.fixture(scope="module", params=["zarr", "wds"])
def dataset(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "shards"
    teacher = gmm_teacher(label_dim=4, components=3, seed=1)
    build_trajectories(teacher=teacher, out=out, num_trajectories=30, batch_size=8, shard_size=7, nfe=4,
                       format=request.param, labels="random", dtype="float32", progress=False, log=lambda message: None)
    return out


def stored(path):
    """All stored arrays, concatenated over shards, by trajectory index."""
    data = TrajectoryDataset(path)
    shards = [data.read_shard(entry) for entry in data.shards]
    merged = {key: np.concatenate([shard[key] for shard in shards]) for key in ("states", "endpoint", "label", "index")}
    merged["sigmas"] = shards[0]["sigmas"]
    return merged


def collect(reader):
    batches = list(reader)
    return {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}, batches


def positions(sigma, dataset):
    """Which stored state a sample's sigma is."""
    sigmas = stored(dataset)["sigmas"]
    return np.abs(np.asarray(sigma, dtype=np.float64)[:, None] - sigmas[None]).argmin(1)


def sample_keys(samples, dataset):
    """(trajectory index, state position) of every sample."""
    return collections.Counter(zip(samples["index"].tolist(), positions(samples["sigma"], dataset).tolist()))


def test_one_epoch_yields_every_state_once_with_its_stored_values(dataset):
    truth = stored(dataset)
    samples, batches = collect(ShardReader(dataset, 16, seed=3, endless=False))
    assert [len(batch["index"]) for batch in batches] == [16] * 9 + [6]  # 30 trajectories x 5 states
    assert sample_keys(samples, dataset) == collections.Counter({(i, s): 1 for i in range(30) for s in range(5)})
    rows = samples["index"].numpy()
    np.testing.assert_array_equal(samples["state"].numpy(), truth["states"][rows, positions(samples["sigma"], dataset)])
    np.testing.assert_array_equal(samples["endpoint"].numpy(), truth["endpoint"][rows])
    np.testing.assert_array_equal(samples["label"].numpy(), truth["label"][rows])
    assert samples["state"].dtype == torch.float32 and samples["label"].dtype == torch.int64
    unshuffled, _ = collect(ShardReader(dataset, 16, shuffle=False, endless=False))
    assert unshuffled["index"].tolist() == sorted(unshuffled["index"].tolist())
    assert samples["index"].tolist() != unshuffled["index"].tolist()


def test_endless_stream_reshuffles_every_epoch_and_repeats_for_a_seed(dataset):
    epoch = 15  # 150 samples per epoch, batches of 10
    stream = iter(ShardReader(dataset, 10, seed=0))
    batches = [next(stream) for _ in range(3 * epoch)]
    epochs = [torch.cat([batch["index"] for batch in batches[k * epoch:(k + 1) * epoch]]) for k in range(3)]
    for order in epochs:
        assert collections.Counter(order.tolist()) == collections.Counter({i: 5 for i in range(30)})
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    again = iter(ShardReader(dataset, 10, seed=0, cache_bytes=0))  # read from storage every epoch
    for batch in batches:
        repeat = next(again)
        assert all(torch.equal(repeat[key], batch[key]) for key in batch)
    other = iter(ShardReader(dataset, 10, seed=1))
    assert not all(torch.equal(next(other)["index"], batch["index"]) for batch in batches[:5])


def test_ranks_and_workers_split_the_data_without_overlap(dataset):
    everything = collections.Counter({(i, s): 1 for i in range(30) for s in range(5)})
    for world_size in (2, 3, 8):  # 5 shards: fewer than 8 readers, so shards are split in parts
        seen = collections.Counter()
        for rank in range(world_size):
            samples, _ = collect(ShardReader(dataset, 4, seed=0, rank=rank, world_size=world_size, endless=False))
            seen += sample_keys(samples, dataset)
        assert seen == everything, world_size
    with_workers, _ = collect(ShardReader(dataset, 4, seed=0, num_workers=2, endless=False))
    assert sample_keys(with_workers, dataset) == everything
    stream = iter(ShardReader(dataset, 8, seed=0, rank=1, world_size=2, num_workers=2))
    assert all(len(next(stream)["index"]) == 8 for _ in range(30))  # endless across epochs


def test_k_states_pairs_and_whole_trajectories(dataset):
    truth = stored(dataset)
    samples, _ = collect(ShardReader(dataset, 7, states_per_trajectory=2, endless=False))
    keys = sample_keys(samples, dataset)
    assert len(keys) == 60 and set(keys.values()) == {1}  # two different states of each trajectory
    assert collections.Counter(index for index, _ in keys) == collections.Counter({i: 2 for i in range(30)})

    pairs, _ = collect(ShardReader(dataset, 9, pairs=True, with_trajectory=True, endless=False))
    assert len(pairs["index"]) == 30 * 10  # all 5 * 4 / 2 ordered pairs
    assert (pairs["target_sigma"] < pairs["sigma"]).all()
    rows = pairs["index"].numpy()
    targets = positions(pairs["target_sigma"], dataset)
    np.testing.assert_array_equal(pairs["target_state"].numpy(), truth["states"][rows, targets])
    np.testing.assert_array_equal(pairs["states"].numpy(), truth["states"][rows])
    sigmas = np.broadcast_to(truth["sigmas"].astype(np.float32), (len(rows), 5))
    np.testing.assert_array_equal(pairs["sigmas"].numpy(), sigmas)
    with pytest.raises(ValueError, match="states_per_trajectory"):
        ShardReader(dataset, 4, states_per_trajectory=0)


def test_missing_truncated_or_corrupt_shards_are_named(dataset, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    data = TrajectoryDataset(broken)
    first, second, third = (broken / data.shards[k]["name"] for k in range(3))
    if first.is_dir():  # zarr: flip one byte of the states' shard file; cut another one short
        chunk = next((first / "states").rglob("c/*/*/*"))
        content = bytearray(chunk.read_bytes())
        content[len(content) // 2] ^= 0xFF
        chunk.write_bytes(bytes(content))
        chunk = next((second / "endpoint").rglob("c/*/*"))
        chunk.write_bytes(chunk.read_bytes()[:-7])
        shutil.rmtree(third)
    else:  # wds: a valid gzip of different bytes; a cut-off file; a missing file
        first.write_bytes(gzip.compress(gzip.decompress(first.read_bytes())[:-512] + bytes(512)))
        second.write_bytes(second.read_bytes()[:-100])
        third.unlink()
    for index, what in ((0, "corrupt or truncated"), (1, "corrupt or truncated"), (2, "missing")):
        with pytest.raises(ShardError, match=what) as error:
            data.read_shard(data.shards[index])
        assert data.shards[index]["name"] in str(error.value)
    with pytest.raises(ShardError, match=data.shards[0]["name"]):
        list(ShardReader(broken, 4, shuffle=False, endless=False))


@pytest.mark.parametrize("limit", [17, 7, 1])
def test_max_trajectories_reads_exactly_the_trajectories_below_the_limit(dataset, limit):
    truth = stored(dataset)
    subset = TrajectoryDataset(dataset, max_trajectories=limit)
    assert len(subset) == limit and sum(entry["count"] for entry in subset.shards) == limit
    for workers, rank, world_size in ((0, 0, 1), (2, 0, 1), (0, 1, 2))[: 1 if limit == 1 else 3]:
        samples, _ = collect(ShardReader(subset, 4, seed=5, endless=False, num_workers=workers, rank=rank,
                                         world_size=world_size))
        if world_size > 1:   # the other rank's part completes this one's
            other, _ = collect(ShardReader(subset, 4, seed=5, endless=False, rank=0, world_size=2))
            samples = {key: torch.cat([samples[key], other[key]]) for key in samples}
        assert sample_keys(samples, dataset) == collections.Counter({(i, s): 1 for i in range(limit) for s in range(5)})
        rows = samples["index"].numpy()
        np.testing.assert_array_equal(samples["state"].numpy(),
                                      truth["states"][rows, positions(samples["sigma"], dataset)])
    assert len(TrajectoryDataset(dataset, max_trajectories=1000)) == 30   # more than the set: all of it
    with pytest.raises(ValueError, match="max_trajectories"):
        TrajectoryDataset(dataset, max_trajectories=0)
