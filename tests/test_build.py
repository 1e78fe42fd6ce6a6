"""build_trajectories / cmt-build: exact contents in both formats, determinism across processes,
resume after a kill, refusal of a mismatched re-run, NaN detection, bad input, one guidance record."""
import functools
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset
import zarr

from cmt.builders.build import NonFiniteTrajectories, build_config, build_trajectories
from cmt.builders.plan import draw_inputs, trajectory_seed
from cmt.builders.teacher import load_teacher
from cmt.checkpoint import save_network
from cmt.cli.build import main
from cmt.edm import sigma_grid
from cmt.errors import ArgumentError
from cmt.guidance import apply_guidance
from cmt.manifest import TrajectoryDataset, config_hash
from cmt.metrics import embedded_metric
from cmt.networks.mlp import MLPDenoiser
from cmt.solvers import sample_trajectory
from cmt.teachers import resolve_teacher
from conftest import TWO_CPU_PROCESSES, gmm_teacher, invoke_command

# One thread everywhere: bitwise comparisons between runs need the same CPU kernels.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
CLI_OPTIONS = ["--num-trajectories", "37", "--batch-size", "5", "--shard-size", "8", "--no-progress"]
NFE = ["--nfe", "6"]
# The same build through the library.
OPTIONS = dict(num_trajectories=37, batch_size=5, shard_size=8, progress=False, nfe=6)
# A build that kills its own process the moment shard 1 is in place, before its sidecar is written
# (the worst moment for a resume): the library's on_shard_written hook, used from the test side.
KILLED_BUILD = """
import os, signal, sys
from cmt.builders.build import build_trajectories

def kill_at_shard_1(shard):
    if shard == 1:
        os.kill(os.getpid(), signal.SIGKILL)

build_trajectories(teacher=sys.argv[1], out=sys.argv[2], num_trajectories=37, batch_size=5, shard_size=8, nfe=6,
                   progress=False, on_shard_written=kill_at_shard_1)
"""


def make(out, teacher=None, eval_data=None, **options):
    """build_trajectories of an in-memory teacher (default: the GMM); returns what it reports."""
    teacher = teacher or gmm_teacher()
    settings = dict(num_trajectories=23, batch_size=4, shard_size=10, nfe=5)
    settings.update(options)
    return build_trajectories(teacher=teacher, out=out, eval_teacher=eval_data is not None, eval_data=eval_data,
                              progress=False, log=lambda message: None, **settings)


def all_files(root):
    """Every file under `root` (relative path -> bytes)."""
    root = Path(root)
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def run_cli(*args, env=None, launcher=None):
    """cmt-build in a subprocess (for several processes)."""
    command = [*(launcher or [sys.executable, "-m", "cmt.cli.build"]), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env or ENV, timeout=300)


invoke = functools.partial(invoke_command, main)   # cmt-build in this process: `(exit code, output)`



@pytest.fixture(scope="module")
def mlp_teacher(tmp_path_factory):
    torch.manual_seed(0)
    net = MLPDenoiser(data_shape=(2,), width=32, num_blocks=1, emb_width=16, fourier_freqs=8)
    return save_network(tmp_path_factory.mktemp("teacher") / "mlp.safetensors", net)


@pytest.fixture(scope="module")
def reference_build(tmp_path_factory, mlp_teacher):
    """One uninterrupted single-process CLI build, to compare other builds with."""
    out = tmp_path_factory.mktemp("reference") / "shards"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    code, output = invoke("--teacher", mlp_teacher, "--out", out, *CLI_OPTIONS, *NFE)
    torch.set_num_threads(threads)
    assert code == 0 and "37 trajectories in 5 shards" in output, output
    return out


@pytest.mark.parametrize("fmt, url", [("zarr", "memory://build-exact/zarr"), ("wds", "file://{tmp}/wds"),
                                      ("zarr", "file://{tmp}/zarr")])
def test_shards_hold_exactly_the_teachers_trajectories(tmp_path, fmt, url):
    url = url.format(tmp=tmp_path)
    teacher = gmm_teacher()
    manifest = make(url, teacher, format=fmt, dtype="float32", states="0,2,5")
    dataset = TrajectoryDataset(url)
    assert manifest["count"] == len(dataset) == 23 and [entry["count"] for entry in dataset.shards] == [10, 10, 3]
    sigmas = sigma_grid("logsnr", 5)
    for entry in dataset.shards:
        arrays = dataset.read_shard(entry)
        first, count = entry["first_index"], entry["count"]
        indices = range(first, first + count)
        noise, _, seeds = draw_inputs(indices, 0, (2,), 0, None)
        np.testing.assert_array_equal(arrays["index"], list(indices))
        np.testing.assert_array_equal(arrays["seed"], seeds)
        np.testing.assert_array_equal(arrays["label"], -1)
        np.testing.assert_array_equal(arrays["noise"], noise.numpy())
        for start in range(0, count, 4):  # the builder's batches: 4 consecutive trajectories
            rows = slice(start, min(start + 4, count))
            trajectory = sample_trajectory(teacher.denoiser, noise[rows].double(), sigmas, solver="dpm++3m")
            expected = trajectory.states.transpose(0, 1).float().numpy()
            np.testing.assert_array_equal(arrays["states"][rows], expected[:, [0, 2, 5]])
            np.testing.assert_array_equal(arrays["endpoint"][rows], expected[:, -1])
        np.testing.assert_array_equal(arrays["sigmas"], sigmas[[0, 2, 5]].numpy())


def test_plain_zarr_and_webdataset_read_the_documented_schema(tmp_path):
    make(tmp_path / "z", format="zarr")
    make(tmp_path / "w", format="wds")
    ours = TrajectoryDataset(tmp_path / "z").read_shard(TrajectoryDataset(tmp_path / "z").shards[1])

    group = zarr.open_group(tmp_path / "z" / "shard-000001.zarr", mode="r")
    assert group["states"].shape == (10, 6, 2) and group["states"].dtype == np.float16
    assert group["states"].metadata.to_dict()["codecs"][0]["name"] == "sharding_indexed"
    for name in ("index", "seed", "label", "noise", "states", "sigmas", "endpoint"):
        np.testing.assert_array_equal(group[name][...], ours[name])

    samples = list(webdataset.WebDataset(str(tmp_path / "w" / "shard-000001.tar.gz"), shardshuffle=False).decode())
    assert [sample["__key__"] for sample in samples] == [f"{index:09d}" for index in range(10, 20)]
    for row, sample in enumerate(samples):
        np.testing.assert_array_equal(sample["states.npy"], ours["states"][row])
        np.testing.assert_array_equal(sample["noise.npy"], ours["noise"][row])
        np.testing.assert_array_equal(sample["endpoint.npy"], ours["endpoint"][row])
        np.testing.assert_array_equal(sample["sigmas.npy"], ours["sigmas"])
        assert sample["label.cls"] == -1 and sample["json"]["index"] == 10 + row
        assert sample["json"]["seed"] == trajectory_seed(0, 10 + row)


def test_noise_and_labels_depend_only_on_seed_and_index(tmp_path):
    teacher = gmm_teacher(label_dim=5)
    make(tmp_path / "a", teacher, labels="random", shard_size=10, batch_size=4)
    make(tmp_path / "b", teacher, labels="random", shard_size=7, batch_size=3)
    columns = {}
    for name in ("a", "b"):
        dataset = TrajectoryDataset(tmp_path / name)
        shards = [dataset.read_shard(entry) for entry in dataset.shards]
        columns[name] = {key: np.concatenate([shard[key] for shard in shards]) for key in ("noise", "label", "seed")}
    for key in ("noise", "label", "seed"):
        np.testing.assert_array_equal(columns["a"][key], columns["b"][key])
    assert len(set(columns["a"]["label"].tolist())) > 1 and columns["a"]["label"].min() >= 0
    make(tmp_path / "c", teacher, labels=3)
    assert set(TrajectoryDataset(tmp_path / "c").read_shard(TrajectoryDataset(tmp_path / "c").shards[0])["label"]) == {3}
    with pytest.raises(ValueError, match="class out of range"):
        make(tmp_path / "d", teacher, labels=5)


def test_two_processes_make_the_same_shards_as_one(tmp_path, mlp_teacher, reference_build):
    out = tmp_path / "shards"
    launcher = [*TWO_CPU_PROCESSES, "-m", "cmt.cli.build"]
    result = run_cli("--teacher", mlp_teacher, "--out", out, *CLI_OPTIONS, *NFE, launcher=launcher,
                     env={**ENV, "ACCELERATE_USE_CPU": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 shards built by this rank" in result.stdout  # rank 0 made shards 0, 2, 4 of 5
    assert all_files(out) == all_files(reference_build)


def test_killed_build_resumes_to_the_same_dataset(tmp_path, mlp_teacher, reference_build):
    out = tmp_path / "shards"
    killed = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(mlp_teacher), str(out)], capture_output=True,
                            text=True, env=ENV, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # Shard 1 was renamed into place but has no sidecar; shards 2-4 were never started.
    assert (out / "shard-000000.json").is_file() and not (out / "shard-000001.json").exists()
    assert (out / "shard-000001.zarr").is_dir() and not (out / "manifest.json").exists()
    # What other crashes leave: a half-written temporary, a truncated shard with a stale sidecar.
    (out / "shard-000003.zarr.tmp-deadbeef").mkdir()
    (out / "shard-000003.zarr.tmp-deadbeef" / "zarr.json").write_text("{")
    output = []
    build_trajectories(teacher=mlp_teacher, out=out, log=output.append, **OPTIONS)
    assert "4 shards built by this rank, 1 kept" in output[-1], output
    assert all_files(out) == all_files(reference_build)

    states = next((out / "shard-000002.zarr" / "states").rglob("c/*/*/*"))
    states.write_bytes(states.read_bytes()[:-10])  # truncate a finished shard
    output = []
    build_trajectories(teacher=mlp_teacher, out=out, log=output.append, **OPTIONS)
    assert "1 shards built by this rank, 4 kept" in output[-1], output
    assert all_files(out) == all_files(reference_build)


def test_rerun_with_another_configuration_is_refused_and_changes_nothing(tmp_path, mlp_teacher, reference_build):
    before = all_files(reference_build)
    stamps = {path: path.stat().st_mtime_ns for path in reference_build.rglob("*")}
    code, output = invoke("--teacher", mlp_teacher, "--out", reference_build, *CLI_OPTIONS, "--nfe", "4")
    assert code != 0 and "another configuration" in output and "nfe: 6 -> 4" in output, output
    assert all_files(reference_build) == before
    assert {path: path.stat().st_mtime_ns for path in reference_build.rglob("*")} == stamps

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, output = invoke("--teacher", mlp_teacher, "--out", tmp_path / "other", *CLI_OPTIONS, *NFE)
    assert code != 0 and "not a cmt-build output" in output
    assert sorted(os.listdir(tmp_path / "other")) == ["notes.txt"]


def test_non_finite_teacher_stops_naming_the_trajectories(tmp_path):
    exact = gmm_teacher().denoiser
    noise, _, _ = draw_inputs(range(23), 0, (2,), 0, None)
    starts = 80 * noise[[12, 17]].double()

    def broken(x, sigma, labels=None):
        """NaN all along the solve of trajectories 12 and 17 (recognised by their start)."""
        denoised = exact(x, sigma, labels)
        if float(sigma.max()) == 80:
            broken.rows = (x[:, None] == starts[None]).all(-1).any(-1)
        return torch.where(broken.rows[:, None], torch.nan, denoised)

    teacher = gmm_teacher()
    teacher.denoiser = broken
    with pytest.raises(NonFiniteTrajectories, match="NaN or inf") as error:
        make(tmp_path / "shards", teacher)
    assert "2 trajectories: 12, 17" in str(error.value)
    left = sorted(os.listdir(tmp_path / "shards"))
    assert left == ["build-config.json", "shard-000000.json", "shard-000000.zarr"]  # nothing half-written


def test_bad_input_gives_one_clear_error(tmp_path, mlp_teacher):
    out = tmp_path / "a"
    code, output = invoke("--teacher", "no-such-teacher", "--out", out)
    assert code == 2 and "--teacher" in output and "accepted" in output
    code, output = invoke("--teacher", tmp_path / "missing.safetensors", "--out", out)
    assert code == 2 and "not found" in output
    code, output = invoke("--teacher", mlp_teacher, "--out", out, "--states", "0,99")
    assert code == 2 and "--states" in output
    code, output = invoke("--teacher", mlp_teacher, "--out", out, "--labels", "random")
    assert code == 2 and "unconditional" in output
    code, output = invoke("--teacher", mlp_teacher, "--out", out, "--solver", "heun", "--nfe", "6", "--grid", "karras")
    assert code == 2 and "--nfe: heun on the karras grid" in output and "6 is not possible" in output
    code, output = invoke("--teacher", mlp_teacher, "--out", out, "--eval-teacher")
    assert code == 2 and "--eval-data" in output
    assert not out.exists()


def test_library_errors_name_the_keyword(tmp_path, mlp_teacher):
    out = tmp_path / "a"
    cases = [(dict(teacher="no-such-teacher"), "teacher", "accepted"),
             (dict(teacher="edm2"), "teacher_ckpt", "needs a checkpoint"),
             (dict(num_trajectories=0), "num_trajectories", ">= 1"),
             (dict(format="hdf5"), "format", "zarr, wds"),
             (dict(states="0,99"), "states", r"bad: \[99\]"),
             (dict(labels="random"), "labels", "unconditional"),
             (dict(solver="heun", nfe=6, grid="karras"), "nfe", "6 is not possible"),
             (dict(guidance=2.0), "guidance", "class-conditional"),
             (dict(guide_ckpt=mlp_teacher), "guidance", "needs a guidance weight"),
             (dict(eval_teacher=True), "eval_data", "toy:moons"),
             (dict(teacher=gmm_teacher(), teacher_ckpt="x.pkl"), "teacher_ckpt", "in-memory Teacher")]
    for options, argument, message in cases:
        options = {"teacher": mlp_teacher, "out": out, **options}
        with pytest.raises(ArgumentError, match=message) as error:
            build_trajectories(**options)
        assert error.value.argument == argument, (options, error.value)
    assert not out.exists()


def test_build_trajectories_returns_what_it_wrote(tmp_path):
    result = make(tmp_path / "shards", eval_data="toy:moons")
    assert result["out"] == tmp_path / "shards" and result["count"] == 23
    assert result["manifest"] == tmp_path / "shards" / "manifest.json" and result["manifest"].is_file()
    assert result["build_config"] == tmp_path / "shards" / "build-config.json" and result["build_config"].is_file()
    assert result["shards"] == [tmp_path / "shards" / f"shard-00000{k}.zarr" for k in range(3)]
    assert all(path.is_dir() for path in result["shards"])
    assert result["teacher_eval"] == TrajectoryDataset(tmp_path / "shards").manifest["teacher_eval"]
    remote = make("memory://build-result/shards", format="wds")
    assert remote["out"] == "memory://build-result/shards" and remote["teacher_eval"] is None
    assert remote["shards"][0] == "memory://build-result/shards/shard-000000.tar.gz"


def test_heun_on_the_karras_grid_stores_its_states():
    url = "memory://build-heun/shards"
    make(url, solver="heun", grid="karras", nfe=7)
    manifest = TrajectoryDataset(url).manifest
    assert manifest["steps"] == 4 and manifest["kept_states"] == [0, 1, 2, 3, 4]
    assert manifest["kept_sigmas"][0] == 80 and manifest["kept_sigmas"][-1] == 0.0
    dataset = TrajectoryDataset(url)
    arrays = dataset.read_shard(dataset.shards[0])
    np.testing.assert_array_equal(arrays["states"][:, -1], arrays["endpoint"])
    np.testing.assert_allclose(arrays["states"][:, 0].astype(np.float32), 80 * arrays["noise"].astype(np.float32), rtol=2e-3)


def test_eval_teacher_scores_the_endpoints_into_the_manifest(tmp_path):
    manifest = make(tmp_path / "shards", eval_data="toy:moons", num_trajectories=200, batch_size=100, shard_size=100)
    dataset = TrajectoryDataset(tmp_path / "shards")
    endpoints = np.concatenate([dataset.read_shard(entry)["endpoint"] for entry in dataset.shards])
    expected = embedded_metric("toy:moons", torch.from_numpy(endpoints.astype(np.float32)))
    assert dataset.manifest["teacher_eval"] == manifest["teacher_eval"]
    assert manifest["teacher_eval"]["count"] == 200 and manifest["teacher_eval"]["data"] == "toy:moons"
    assert manifest["teacher_eval"]["metrics"] == pytest.approx({key: float(value) for key, value in expected.items()})
    # a re-run that does not evaluate keeps the stored baseline
    again = make(tmp_path / "shards", num_trajectories=200, batch_size=100, shard_size=100)
    assert again["teacher_eval"] == manifest["teacher_eval"]


def guided_pair(tmp_path):
    """Two class-conditional MLP networks saved as checkpoints (teacher, guide) and the networks."""
    torch.manual_seed(0)
    nets = [MLPDenoiser(data_shape=(2,), label_dim=3, width=16, num_blocks=1, emb_width=8, fourier_freqs=4)
            for _ in range(2)]
    return [save_network(tmp_path / f"net{k}.safetensors", net) for k, net in enumerate(nets)], nets


def test_guidance_is_applied_and_recorded(tmp_path):
    paths, nets = guided_pair(tmp_path)
    options = dict(num_trajectories=6, batch_size=6, nfe=3, labels="random", progress=False, log=lambda message: None)
    build_trajectories(teacher=paths[0], guidance=2, guide_ckpt=paths[1], out=tmp_path / "auto", **options)
    dataset = TrajectoryDataset(tmp_path / "auto")
    guidance = dataset.manifest["guidance"]
    assert guidance["kind"] == "autoguidance" and guidance["weight"] == 2
    assert guidance["guide"]["sha256"] != dataset.manifest["teacher"]["sha256"]
    arrays = dataset.read_shard(dataset.shards[0])
    labels = torch.nn.functional.one_hot(torch.from_numpy(arrays["label"]), 3).float()

    def guided(x, sigma, labels):  # D = D_guide + 2 (D - D_guide)
        return 2 * nets[0](x, sigma, labels) - nets[1](x, sigma, labels)

    with torch.no_grad():
        expected = sample_trajectory(guided, torch.from_numpy(arrays["noise"].astype(np.float32)),
                                     sigma_grid("logsnr", 3), labels=labels).endpoint
    np.testing.assert_allclose(arrays["endpoint"].astype(np.float32), expected.numpy(), rtol=2e-3, atol=2e-3)

    build_trajectories(teacher=paths[0], guidance=2, out=tmp_path / "cfg", **options)
    assert TrajectoryDataset(tmp_path / "cfg").manifest["guidance"]["kind"] == "classifier_free"
    cli_options = ["--num-trajectories", "6", "--batch-size", "6", "--nfe", "3", "--labels", "random", "--no-progress"]
    code, output = invoke("--teacher", paths[0], "--guide-ckpt", paths[1], "--out", tmp_path / "x", *cli_options)
    assert code == 2 and "--guidance" in output


def test_guidance_1_is_recorded_as_no_guidance_by_every_path(tmp_path):
    """The builder and the teacher loader share `apply_guidance`: weight 1 (with or without a guide) is
    the teacher itself, recorded as no guidance, so it is the same build configuration as no guidance."""
    paths, nets = guided_pair(tmp_path)
    assert apply_guidance(nets[0], 1) == (nets[0], None) and apply_guidance(nets[0], 1.0, nets[1]) == (nets[0], None)
    hashes = set()
    for options in ({}, {"guidance": 1}, {"guidance": 1.0, "guide_ckpt": str(paths[1])}):
        net, identity = resolve_teacher(str(paths[0]), **options)
        teacher = load_teacher(paths[0], **options)
        assert "guidance" not in identity and teacher.guidance is None and teacher.denoiser is not None
        assert net.config == nets[0].config and type(net) is MLPDenoiser
        hashes.add(config_hash(build_config(teacher, num_trajectories=4, batch_size=4)))
    assert len(hashes) == 1
    for options in ({"guidance": 2.0}, {"guidance": 1.5, "guide_ckpt": str(paths[1])}):
        _, identity = resolve_teacher(str(paths[0]), **options)
        assert identity["guidance"] == load_teacher(paths[0], **options).guidance
        assert identity["guidance"]["weight"] == options["guidance"]
    log = lambda message: None  # noqa: E731
    build_trajectories(teacher=paths[0], guidance=1, out=tmp_path / "w1", num_trajectories=4, nfe=3, log=log,
                       progress=False)
    build_trajectories(teacher=paths[0], out=tmp_path / "w1", num_trajectories=4, nfe=3, log=log, progress=False)
    assert TrajectoryDataset(tmp_path / "w1").manifest["guidance"] is None
