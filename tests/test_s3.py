"""Object storage for real: cmt-build, cmt-inspect and cmt-train mid against a local S3 endpoint.

moto's ThreadedMotoServer speaks the S3 protocol on 127.0.0.1 (a free port, started and stopped
here); s3fs reaches it through the standard AWS environment (AWS_ENDPOINT_URL, test credentials),
as a user reaches MinIO or any S3-compatible store (README, "Trajectory datasets").
"""
import socket

import pytest
from click.testing import CliRunner

from conftest import TEACHER

from cmt.builders.build import build_trajectories
from cmt.checkpoint import save_network
from cmt.cli import build, inspect, train
from cmt.networks import build_network

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

BUCKET = "cmt-test"
BUILD = ["--nfe", "4", "--num-trajectories", "24", "--batch-size", "8", "--shard-size", "8", "--labels", "none",
         "--no-progress"]


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint():
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def bucket(endpoint, monkeypatch):
    """A fresh bucket; s3fs configured by the environment only, as the README says."""
    for name, value in (("AWS_ENDPOINT_URL", endpoint), ("AWS_ACCESS_KEY_ID", "testing"),
                        ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    if fs.exists(BUCKET):
        fs.rm(BUCKET, recursive=True)
    fs.mkdir(BUCKET)
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_network(tmp_path_factory.mktemp("s3-teacher") / "toy.safetensors", build_network(TEACHER))


def test_build_inspect_and_mid_train_through_s3(bucket, teacher, tmp_path):
    url = f"s3://{BUCKET}/toy-shards"

    class Interrupted(Exception):
        pass

    def stop_at_shard_1(shard):
        if shard == 1:
            raise Interrupted

    with pytest.raises(Interrupted):   # an interrupted build: shard 0 and 1 in the bucket, no manifest
        build_trajectories(teacher=str(teacher), out=url, nfe=4, num_trajectories=24, batch_size=8, shard_size=8,
                           labels=None, progress=False, log=lambda message: None, on_shard_written=stop_at_shard_1)
    assert bucket.exists(f"{BUCKET}/toy-shards/shard-000000.zarr") and not bucket.exists(f"{BUCKET}/toy-shards/manifest.json")
    unfinished = CliRunner().invoke(inspect.main, [url])
    assert unfinished.exit_code == 1 and "has not finished" in unfinished.output

    resumed = CliRunner().invoke(build.main, ["--teacher", str(teacher), "--out", url, *BUILD])
    assert resumed.exit_code == 0, resumed.output
    assert "1 kept" in resumed.output and bucket.exists(f"{BUCKET}/toy-shards/manifest.json")
    assert not bucket.glob(f"{BUCKET}/toy-shards/*.tmp-*")

    verified = CliRunner().invoke(inspect.main, [url, "--verify"])
    assert verified.exit_code == 0 and "all checksums match" in verified.output, verified.output

    out = tmp_path / "mid"
    trained = CliRunner().invoke(train.main, ["mid", "--data", url, "--out", str(out), "--max-steps", "2",
                                              "--batch-size", "8", "--workers", "0", "--num-samples", "16",
                                              "--no-progress"])
    assert trained.exit_code == 0, trained.output
    assert (out / "mid.pt").is_file()

    # a damaged object: same size, other bytes; --verify names it and exits 1
    victim = sorted(path for path in bucket.find(f"{BUCKET}/toy-shards/shard-000002.zarr"))[-1]
    data = bytearray(bucket.cat_file(victim))
    data[len(data) // 2] ^= 0xFF
    bucket.pipe_file(victim, bytes(data))
    damaged = CliRunner().invoke(inspect.main, [url, "--verify"])
    assert damaged.exit_code == 1 and "shard-000002.zarr" in damaged.output and "FAULT" in damaged.output
    # and a shortened one stops mid-training before its first step
    bucket.pipe_file(victim, bytes(data[:-5]))
    refused = CliRunner().invoke(train.main, ["mid", "--data", url, "--out", str(tmp_path / "mid2"), "--max-steps",
                                              "2", "--batch-size", "8", "--workers", "0", "--no-progress"])
    assert refused.exit_code == 1 and "shard-000002.zarr" in refused.output and "Traceback" not in refused.output
    assert not (tmp_path / "mid2" / "log.jsonl").exists()
