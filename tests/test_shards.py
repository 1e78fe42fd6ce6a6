"""The shard reader: exact samples, epochs, ranks, workers, pairs, and named errors for bad shards."""
import collections
import gzip
import io
import json
import shutil

import numpy as np
import pytest
import torch
import zarr

from cmt import formats, manifest
from cmt.formats import storage, zarr_direct
from cmt.builders.build import build_trajectories
from cmt.datasets.shards import READ_FIELDS, ShardReader, default_cache_bytes
from cmt.errors import ArgumentError, FileFormatError
from cmt.formats import COMPRESSIONS, ShardError
from cmt.manifest import TrajectoryDataset
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


# ---- the data path at scale: direct decoding, integrity once per process, the cache budget --------

def small_arrays(count=9, shape=(3, 8, 8), states=5, seed=0):
    rng = np.random.default_rng(seed)
    return {"index": np.arange(count, dtype=np.int64), "seed": rng.integers(0, 2**63, count).astype(np.uint64),
            "label": np.zeros(count, np.int64), "noise": rng.standard_normal((count, *shape)).astype(np.float16),
            "states": rng.standard_normal((count, states, *shape)).astype(np.float16),
            "sigmas": np.linspace(80, 0.002, states), "endpoint": np.zeros((count, *shape), np.float16)}


CODECS = [(compression, shuffle) for compression in COMPRESSIONS
          for shuffle in ((None,) if compression == "none" else formats.SHUFFLES)]


@pytest.mark.parametrize("compression, shuffle", CODECS)
def test_direct_zarr_decoding_equals_zarr_byte_for_byte(compression, shuffle, monkeypatch):
    buffers = formats.ShardBuffers()   # reused over the shapes below, as the reader reuses it
    for count, shape in ((9, (3, 8, 8)), (1, (2,)), (40, (3, 64, 64)), (7, (3, 8, 8))):   # one chunk, many, partial last
        arrays = small_arrays(count, shape, seed=count)
        files = formats.encode_shard(arrays, "zarr", compression=compression, shuffle=shuffle)
        if compression != "none":
            codecs = json.loads(files["states/zarr.json"])["codecs"][0]["configuration"]["codecs"]
            assert codecs[1]["configuration"]["shuffle"] == shuffle
        reference = zarr_direct._decode_zarr_api(files, formats.FIELDS)
        with monkeypatch.context() as patched:   # no field may fall back to zarr's API
            patched.setattr(zarr_direct, "_decode_zarr_api", lambda *args: pytest.fail("fell back to zarr"))
            direct = formats.decode_shard(files, "zarr")
            # Read as the reader reads them: files in reused buffers (uint8 arrays), decoded into reused arrays.
            held = {key: np.frombuffer(buffers.get(f"{key}/file", len(data)), np.uint8) if not key.endswith(".json")
                    else data for key, data in files.items()}
            for key, data in files.items():
                if not key.endswith(".json"):
                    held[key][:] = np.frombuffer(data, np.uint8)
            into_buffers = formats.decode_shard(held, "zarr", buffers=buffers)
        for name in formats.FIELDS:
            for decoded in (direct, into_buffers):
                assert decoded[name].dtype == reference[name].dtype and decoded[name].shape == reference[name].shape
                assert decoded[name].tobytes() == reference[name].tobytes() == \
                    np.ascontiguousarray(arrays[name]).tobytes()
    # A layout the direct reader does not know (zarr's own default chunking) is read by zarr.
    store = {}
    group = zarr.create_group(store=zarr.storage.MemoryStore(store))
    for name in formats.FIELDS:
        group.create_array(name, data=arrays[name], chunks=(1, *arrays[name].shape[1:]))
    other = formats.decode_shard({key: value.to_bytes() for key, value in store.items()}, "zarr")
    assert all(np.array_equal(other[name], arrays[name]) for name in formats.FIELDS)


def test_crc32c_of_reused_buffers_equals_google_crc32c():
    import google_crc32c
    data = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8)   # above the GIL-release size
    for piece in (data, data[:100], data[1:]):
        assert formats.crc32c(piece) == formats.crc32c(piece.tobytes()) == google_crc32c.value(piece.tobytes())
    assert formats.fingerprint(data) == (len(data), google_crc32c.value(data.tobytes()))


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_uncached_reads_into_reused_buffers_give_the_cached_batches(compression, tmp_path, monkeypatch):
    """Every epoch read again into two alternating sets of buffers (files and decoded arrays): the
    batches are those of a reader that keeps every shard, with and without the prefetch thread."""
    monkeypatch.setattr(storage, "BUFFERED_FILE_BYTES", 1)   # the test's small files go through the buffers too
    out = tmp_path / compression
    build_trajectories(teacher=gmm_teacher(seed=3), out=out, num_trajectories=23, batch_size=8, shard_size=5, nfe=4,
                       compression=compression, progress=False, log=lambda message: None)
    for options in ({}, {"prefetch": False}, {"pairs": True}, {"with_trajectory": True}):
        cached = iter(ShardReader(out, 7, seed=1, cache_bytes=1 << 40, dtype=None, **options))
        uncached = ShardReader(out, 7, seed=1, cache_bytes=0, dtype=None, **options)
        stream = iter(uncached)
        batches = []
        for _ in range(3 * 23 * 5 // 7):   # three epochs
            batch, expected = next(stream), next(cached)
            assert batch.keys() == expected.keys() and all(torch.equal(batch[key], expected[key]) for key in batch)
            batches.append(batch)
        assert uncached.cache.used == 0
    # A batch handed out stays as it was after later shards were read into the same buffers.
    again = iter(ShardReader(out, 7, seed=1, cache_bytes=1 << 40, dtype=None, with_trajectory=True))
    for batch in batches:
        expected = next(again)
        assert all(torch.equal(batch[key], expected[key]) for key in batch)


def test_a_shard_index_that_fails_its_crc32c_is_refused():
    files = formats.encode_shard(small_arrays(), "zarr", compression="none")
    key = next(key for key in files if key.startswith("states/c/"))
    data = bytearray(files[key])
    data[-10] ^= 0x01   # inside the index of (offset, nbytes) pairs
    with pytest.raises(ValueError, match="crc32c"):
        formats.decode_shard({**files, key: bytes(data)}, "zarr")


def test_the_sha256_is_checked_once_per_shard_and_a_later_change_is_still_caught(dataset, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    hashed, summed = [], []
    monkeypatch.setattr(manifest, "checksum", lambda files: hashed.append(1) or formats.checksum(files))
    monkeypatch.setattr(manifest, "fingerprint", lambda data: summed.append(1) or formats.fingerprint(data))
    once, crc = TrajectoryDataset(copy), TrajectoryDataset(copy)
    first = [once.read_shard(entry) for entry in once.shards]
    again = [once.read_shard(entry) for entry in once.shards]
    assert len(hashed) == len(once.shards) and not summed   # the re-reads checked sizes, not the sha256
    for one, two in zip(first, again):
        assert all(np.array_equal(one[key], two[key]) for key in one)
    for _ in range(2):
        [crc.read_shard(entry, verify="crc32c") for entry in crc.shards]
    assert len(hashed) == 2 * len(once.shards) and summed   # sha256 once, then crc32c
    path = copy / once.shards[0]["name"]
    victim = next(p for p in sorted(path.rglob("*")) if p.is_file() and p.stat().st_size > 64 and "states" in str(p)) \
        if path.is_dir() else path
    content = bytearray(victim.read_bytes())
    content[len(content) // 3] ^= 0x04   # one flipped bit
    victim.write_bytes(bytes(content))
    with pytest.raises(ShardError, match="changed since its sha256 was verified"):
        crc.read_shard(crc.shards[0], verify="crc32c")
    with pytest.raises(ShardError, match="sha256"):   # a check on every read sees it too
        once.read_shard(once.shards[0], verify="sha256")
    try:   # "once": the sizes agree; only the format's own check (gzip's CRC) can see the bit
        once.read_shard(once.shards[0])
        assert once.format == "zarr"
    except ShardError as error:
        assert once.format == "wds" and "cannot be decoded" in str(error)
    victim.write_bytes(bytes(content[:-5]))   # truncated
    for data, verify in ((once, True), (crc, "crc32c")):
        with pytest.raises(ShardError, match=data.shards[0]["name"]):
            data.read_shard(data.shards[0], verify=verify)
    with pytest.raises(ShardError, match="sha256"):   # a new process (object) checks the sha256 again
        TrajectoryDataset(copy).read_shard(TrajectoryDataset(copy).shards[0])
    with pytest.raises(ValueError, match="verify"):
        once.read_shard(once.shards[1], verify="md5")


def test_the_cache_never_holds_more_than_its_budget(dataset):
    data = TrajectoryDataset(dataset)
    shard_bytes = sum(value.nbytes for value in data.read_shard(data.shards[0], fields=READ_FIELDS).values())
    budget = 2 * shard_bytes + shard_bytes // 2   # room for two of the five shards
    unlimited = iter(ShardReader(dataset, 10, seed=4, cache_bytes=1 << 40))
    reader = ShardReader(dataset, 10, seed=4, cache_bytes=budget)
    stream = iter(reader)
    for _ in range(3 * 15):   # three epochs
        batch, expected = next(stream), next(unlimited)
        assert all(torch.equal(batch[key], expected[key]) for key in batch)
        assert reader.cache.used <= budget
    assert 0 < reader.cache.used and 2 <= len(reader.cache.arrays) < len(data.shards)   # some shards, not all
    uncached = ShardReader(dataset, 10, seed=4, cache_bytes=0)
    stream = iter(uncached)
    for _ in range(20):
        next(stream)
    assert uncached.cache.used == 0 and not uncached.cache.arrays
    with pytest.raises(ValueError, match="cache_bytes"):
        ShardReader(dataset, 10, cache_bytes=-1)
    assert ShardReader(dataset, 10).cache_bytes == default_cache_bytes(1) > 0


def test_batches_in_the_stored_dtype_and_the_same_samples_without_prefetch(dataset):
    stored_dtype = ShardReader(dataset, 16, seed=2, dtype=None, endless=False)
    plain = ShardReader(dataset, 16, seed=2, dtype=None, endless=False, prefetch=False)
    for one, two in zip(stored_dtype, plain):
        assert one["state"].dtype == torch.float32   # this fixture stores float32
        assert all(torch.equal(one[key], two[key]) for key in one)


def test_old_zstd_datasets_resume_with_their_compression_and_their_config_hash(tmp_path):
    teacher = gmm_teacher(seed=2)
    options = dict(teacher=teacher, num_trajectories=12, batch_size=4, shard_size=4, nfe=4, progress=False,
                   log=lambda message: None)
    legacy = build_trajectories(out=tmp_path / "legacy", compression="zstd", **options)
    config = json.loads(legacy["build_config"].read_text())
    assert "compression" not in config["config"]   # the configuration of a build before the option
    assert TrajectoryDataset(legacy["out"]).compression == "zstd"
    zarr_json = json.loads((legacy["shards"][0] / "states" / "zarr.json").read_text())
    assert json.dumps(zarr_json).count('"zstd"') == 1
    # Re-run without the option: it resumes (and extends) the zstd set, not refuse it as another one.
    extended = build_trajectories(out=tmp_path / "legacy", **{**options, "num_trajectories": 16})
    manifest_after = json.loads(extended["manifest"].read_text())
    assert manifest_after["config_hash"] == config["config_hash"] and manifest_after["count"] == 16
    new = build_trajectories(out=tmp_path / "new", **options)
    new_manifest = json.loads(new["manifest"].read_text())
    assert new_manifest["compression"] == formats.DEFAULT_COMPRESSION != "zstd"
    assert new_manifest["config_hash"] != config["config_hash"]
    for a, b in zip(stored(legacy["out"])["states"], stored(new["out"])["states"][:16]):
        np.testing.assert_array_equal(a, b)   # the same trajectories, only stored another way
    with pytest.raises(ValueError, match="compression"):
        build_trajectories(out=tmp_path / "bad", compression="gzip", **options)


def test_lz4_bitshuffle_sets_of_earlier_builds_resume_with_their_settings_and_hash(tmp_path, monkeypatch):
    """Sets built with lz4 before the shuffle field used the bit shuffle and record no shuffle: a resume
    or extension keeps both (same bytes, same configuration hash); a new lz4 set records its shuffle."""
    teacher = gmm_teacher(seed=2)
    options = dict(teacher=teacher, num_trajectories=8, batch_size=4, shard_size=4, nfe=4, progress=False,
                   log=lambda message: None)
    with monkeypatch.context() as earlier:   # the lz4 of the build before the field
        earlier.setitem(formats.DEFAULT_SHUFFLE, "lz4", "bitshuffle")
        old = build_trajectories(out=tmp_path / "old", compression="lz4", **options)
    config = json.loads(old["build_config"].read_text())
    assert config["config"]["compression"] == "lz4" and "shuffle" not in config["config"]
    assert TrajectoryDataset(old["out"]).shuffle == "bitshuffle"

    def shuffles(result):
        return {json.loads((shard / "states" / "zarr.json").read_text())["codecs"][0]["configuration"]["codecs"][1]
                ["configuration"]["shuffle"] for shard in result["shards"]}

    for compression, count in ((None, 12), ("lz4", 16)):   # with or without naming the compression again
        extended = build_trajectories(out=tmp_path / "old", compression=compression, **{**options, "num_trajectories": count})
        manifest_after = json.loads(extended["manifest"].read_text())
        assert manifest_after["config_hash"] == config["config_hash"] and manifest_after["count"] == count
        assert "shuffle" not in manifest_after and shuffles(extended) == {"bitshuffle"}
    new = build_trajectories(out=tmp_path / "new", **options)
    new_manifest = json.loads(new["manifest"].read_text())
    assert new_manifest["compression"] == "lz4" and new_manifest["shuffle"] == formats.DEFAULT_SHUFFLE["lz4"] == "shuffle"
    assert new_manifest["config_hash"] != config["config_hash"] and shuffles(new) == {"shuffle"}
    np.testing.assert_array_equal(stored(old["out"])["states"][:8], stored(new["out"])["states"])
    # Resuming the new set keeps its shuffle; another compression on either is another configuration.
    assert json.loads(build_trajectories(out=tmp_path / "new", **options)["manifest"].read_text())["config_hash"] \
        == new_manifest["config_hash"]
    with pytest.raises(ValueError, match="compression"):
        build_trajectories(out=tmp_path / "old", compression="zstd", **options)


# ---- the formats table: a new layout is one module and one registry line -------------------------

def npz_encode(arrays, attributes, compression, shuffle, fields, rows_per_chunk):
    """A layout written by a newcomer: every field of a shard in one uncompressed .npz file."""
    buffer = io.BytesIO()
    np.savez(buffer, **{name: arrays[name] for name in fields})
    return {"": buffer.getvalue()}


def npz_decode(files, fields, buffers):
    with np.load(io.BytesIO(bytes(files[""]))) as contents:
        return {name: contents[name] for name in fields}


NPZ = formats.ShardFormat(name="npz", extension=".npz", encode=npz_encode, decode=npz_decode, fields=formats.FIELDS)


def test_a_shard_format_registered_from_outside_builds_verifies_and_reads(tmp_path, monkeypatch):
    monkeypatch.setitem(formats.SHARD_FORMATS, "npz", NPZ)
    teacher = gmm_teacher(label_dim=4, components=3, seed=1)
    common = dict(teacher=teacher, num_trajectories=12, batch_size=8, shard_size=5, nfe=4, labels="random",
                  dtype="float32", progress=False, log=lambda message: None)
    build_trajectories(out=tmp_path / "npz", format="npz", **common)
    build_trajectories(out=tmp_path / "zarr", format="zarr", **common)
    assert sorted(path.name for path in (tmp_path / "npz").glob("shard-*.npz")) == \
        ["shard-000000.npz", "shard-000001.npz", "shard-000002.npz"]
    for key in ("states", "endpoint", "label", "index", "sigmas"):
        np.testing.assert_array_equal(stored(tmp_path / "npz")[key], stored(tmp_path / "zarr")[key])
    samples, _ = collect(ShardReader(tmp_path / "npz", 8, seed=2, endless=False))
    assert sample_keys(samples, tmp_path / "npz") == collections.Counter({(i, s): 1 for i in range(12) for s in range(5)})
    with pytest.raises(ArgumentError, match="compression"):   # its compression is its own
        build_trajectories(out=tmp_path / "other", format="npz", compression="lz4", **common)


def test_an_unknown_shard_format_is_refused_by_name(dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    manifest_path = copy / manifest.MANIFEST
    content = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**content, "format": "parquet"}))
    with pytest.raises(FileFormatError, match="'format' must be the shard format \\(zarr, wds\\); found str \"parquet\""):
        TrajectoryDataset(copy)
    with pytest.raises(ShardError, match="unknown shard format 'parquet'; known: zarr, wds"):
        formats.decode_shard({"": b""}, "parquet")
