"""inspect_trajectories / cmt-inspect: summary, --json, --verify (checksums and NaN/inf), --stats, --preview."""
import functools
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from cmt.builders.build import build_trajectories
from cmt.builders.inspect import inspect_trajectories
from cmt.cli.inspect import main
from cmt.errors import ArgumentError
from cmt.formats import checksum, encode_shard, open_location, write_atomic
from cmt.images import LABEL_HEIGHT
from cmt.manifest import TrajectoryDataset, read_json, write_json
from conftest import gmm_teacher, invoke_command


def make(out, data_shape=(2,), count=300, fmt="zarr", nfe=6):
    build_trajectories(teacher=gmm_teacher(data_shape, seed=2), out=out, num_trajectories=count, batch_size=100, shard_size=100, nfe=nfe,
                       format=fmt, progress=False, log=lambda message: None)
    return out


@pytest.fixture(scope="module")
def points(tmp_path_factory):
    return make(tmp_path_factory.mktemp("inspect") / "points")


inspect = functools.partial(invoke_command, main)   # cmt-inspect in this process: `(exit code, output)`


def test_summary_and_json(points):
    code, text = inspect(points)
    assert code == 0
    for expected in ("gmm-test", "dpm++3m, nfe 6, logsnr grid from sigma 80 to 0.002", "300 trajectories in 3 shards",
                     "states    [300, 7, 2] float16", "bytes per stored state"):
        assert expected in text, expected
    code, text = inspect(points, "--json")
    info = json.loads(text)["summary"]
    on_disk = sum(path.stat().st_size for path in points.rglob("*") if path.is_file())
    assert info["bytes_on_disk"] == on_disk
    assert info["size_vs_float16"] == pytest.approx(on_disk / (300 * 9 * 2 * 2))
    assert info["shapes"]["states"] == [300, 7, 2] and info["dtypes"]["states"] == "float16"
    assert info["kept_sigmas"][0] == 80 and info["count"] == 300
    assert inspect_trajectories(points) == {"summary": info}


def test_verify_finds_corrupt_shards_and_non_finite_values(points, tmp_path):
    code, text = inspect(points, "--verify")
    assert code == 0 and "all checksums match" in text

    corrupt = tmp_path / "corrupt"
    shutil.copytree(points, corrupt)
    chunk = next((corrupt / "shard-000001.zarr" / "states").rglob("c/*/*/*"))
    content = bytearray(chunk.read_bytes())
    content[-40] ^= 0x01
    chunk.write_bytes(bytes(content))
    code, text = inspect(corrupt, "--verify")
    assert code == 1 and "shard-000001.zarr is corrupt" in text and "1 faults" in text
    checked = inspect_trajectories(corrupt, verify=True)["verify"]
    assert not checked["ok"] and checked["shards"] == 3 and "shard-000001.zarr is corrupt" in checked["faults"][0]
    assert inspect_trajectories(points, verify=True)["verify"] == {"ok": True, "faults": [], "shards": 3}

    # NaN written with a matching checksum: only the scan can find it.
    poisoned = tmp_path / "poisoned"
    shutil.copytree(points, poisoned)
    dataset = TrajectoryDataset(poisoned)
    arrays = dataset.read_shard(dataset.shards[2])
    arrays["states"][5, 3, 0] = np.nan
    files = encode_shard(arrays, "zarr")
    fs, root = open_location(poisoned)
    write_atomic(fs, f"{root}/shard-000002.zarr", files)
    manifest = read_json(fs, f"{root}/manifest.json")
    manifest["shards"][2].update(sha256=checksum(files), bytes=sum(map(len, files.values())))
    write_json(fs, f"{root}/manifest.json", manifest)
    code, text = inspect(poisoned, "--verify", "--json")
    report = json.loads(text[text.index("{"):])
    assert code == 1
    assert report["verify"]["faults"] == [f"shard {root}/shard-000002.zarr: NaN/inf in states of trajectories 205"]


def test_stats_match_what_the_sigmas_predict_for_an_exact_teacher(points, tmp_path):
    # The exact probability-flow ODE keeps the marginals, std(x_sigma) = sqrt(std(x0)^2 + sigma^2):
    # 16 steps of DPM-Solver++ follow it closely, 6 steps visibly do not.
    fine = make(tmp_path / "fine", nfe=16)
    rows = inspect_trajectories(fine, stats=True)["stats"]
    code, text = inspect(fine, "--stats", "--json")
    assert code == 0 and json.loads(text)["stats"] == rows
    assert [row["state"] for row in rows] == list(range(17))
    for row in rows:
        assert row["std_ratio"] == pytest.approx(1, abs=0.05), row
    assert rows[-1]["mean"] == pytest.approx(rows[-1]["predicted_mean"])
    assert max(abs(row["std_ratio"] - 1) for row in inspect_trajectories(points, stats=True)["stats"]) > 0.1
    code, text = inspect(points, "--stats")
    assert code == 0 and "std/pred" in text


def test_preview_draws_images_and_scatter_plots(points, tmp_path):
    code, text = inspect(points, "--preview", tmp_path / "points.png")
    assert code == 0 and Image.open(tmp_path / "points.png").size[0] > 3 * Image.open(tmp_path / "points.png").size[1]
    assert f"preview   {tmp_path / 'points.png'}" in text
    images = make(tmp_path / "images", data_shape=(1, 4, 4), count=12, fmt="wds")
    report = inspect_trajectories(images, preview=tmp_path / "images.png", preview_count=5)
    assert report["preview"] == tmp_path / "images.png"
    # 7 states x 5 trajectories, 4 px enlarged 16x to the readable 64 px, under a strip of sigma labels
    assert Image.open(tmp_path / "images.png").size == (7 * (64 + 2) + 2, LABEL_HEIGHT + 5 * (64 + 2) + 2)


def test_unfinished_or_foreign_directories_are_refused(tmp_path, points):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(points, unfinished)
    (unfinished / "manifest.json").unlink()
    code, text = inspect(unfinished)
    assert code == 1 and "has not finished" in text
    code, text = inspect(tmp_path)
    assert code == 1 and "no manifest.json" in text
    with pytest.raises(ArgumentError, match="has not finished") as error:
        inspect_trajectories(unfinished)
    assert error.value.argument == "path"
    for options, argument in ((dict(vae="some-vae"), "preview"), (dict(preview="p.png", preview_count=0), "preview_count"),
                              (dict(preview=tmp_path / "p.png", vae="some-vae"), "vae")):
        with pytest.raises(ArgumentError) as error:
            inspect_trajectories(points, **options)
        assert error.value.argument == argument, options
