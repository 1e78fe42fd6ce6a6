"""A user's mistake is one clear line, never a traceback, never a lost run, never a silent wrong result.

The table runs the real commands (in this process, through click) on bad inputs of every class:
empty, foreign, truncated and refused checkpoint files; damaged or hand-edited trajectory sets;
nonsense values and options that do not apply; bad devices and out folders. Each row asserts the
exit code, that the message names the file or flag, that no traceback is printed, and that no file
that existed before changed. The tests after it cover the classes the table cannot: the final
checkpoint before the final evaluation, signals, divergence, a full disk, resume checks, the
sample range checks of cmt-eval.
"""
import errno
import hashlib
import importlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import FAST, TEACHER, make_shards

from cmt.checkpoint import load_network, save_network
from cmt.cli import build, convert, demo, evaluate, inspect, sample, train
from cmt.datasets import load_mnist
from cmt.errors import ArgumentError, EvaluationFailed, TrainingStopped
from cmt.metrics import mnist_fd
from cmt.networks import build_network
from cmt.trainers import loop, reports, run_files
from cmt.trainers.diffusion import train_diffusion
from cmt.trainers.mid import mid_train

COMMANDS = {"train": train.main, "sample": sample.main, "eval": evaluate.main, "inspect": inspect.main,
            "build": build.main, "convert": convert.main, "demo": demo.main}
TINY_DIFFUSION = dict(data="toy:moons", arch="mlp", channels=16, num_blocks=1, batch_size=16, progress=False)


class NotATensor:
    """An object whose pickle torch's weights-only loader refuses."""


class RunsCode:
    """A pickle that would call a function when loaded (it must be refused, never run)."""

    def __reduce__(self):
        return (os.getcwd, ())


def file_hashes(root):
    return {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in Path(root).rglob("*") if path.is_file()}


def run(command, args):
    result = CliRunner().invoke(COMMANDS[command], [str(arg) for arg in args])
    return result


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder of good and bad inputs: a toy teacher and its trajectories, a 2-step mid run, and
    damaged copies of each."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("world")
    teacher, shards = make_shards(root, "toy", TEACHER)
    mid_train(data=shards, out=root / "midrun", max_steps=2, workers=0, **FAST)
    (root / "empty.pt").write_bytes(b"")
    (root / "empty.safetensors").write_bytes(b"")
    (root / "empty.pkl").write_bytes(b"")
    (root / "text.pt").write_text("not a checkpoint\n")
    (root / "text.safetensors").write_text("this is text, not safetensors\n")
    (root / "text.pkl").write_text("not a pickle\n")
    (root / "runs-code.pkl").write_bytes(pickle.dumps(RunsCode()))
    torch.save({"config": TEACHER, "net": NotATensor()}, root / "unsafe.pt")
    whole = (root / "midrun" / "mid.pt").read_bytes()
    (root / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    torch.save({"a": torch.zeros(2)}, root / "foreign.pt")
    nan_net = build_network(TEACHER)
    with torch.no_grad():
        for parameter in nan_net.parameters():
            parameter.fill_(float("nan"))
    save_network(root / "nan.safetensors", nan_net)

    def damaged(name, change):
        copy = root / name
        shutil.copytree(shards, copy)
        change(copy)
        return copy

    def edit_manifest(edit):
        def change(folder):
            manifest = json.loads((folder / "manifest.json").read_text())
            edit(manifest)
            (folder / "manifest.json").write_text(json.dumps(manifest))
        return change

    damaged("no-shape", edit_manifest(lambda m: m.pop("data_shape")))
    damaged("text-count", edit_manifest(lambda m: m.update(count="24")))
    damaged("bad-shard-entry", edit_manifest(lambda m: m["shards"][0].pop("sha256")))
    damaged("bad-json", lambda f: (f / "manifest.json").write_text('{"format": "cmt-trajectories", '))
    damaged("missing-shard", lambda f: shutil.rmtree(f / "shard-000001.zarr"))

    def truncate(folder):
        largest = max((p for p in (folder / "shard-000000.zarr").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        largest.write_bytes(largest.read_bytes()[:-7])
    damaged("short-shard", truncate)

    for name, content in (("text-state", "text"), ("foreign-state", "foreign")):
        (root / name).mkdir()
        source = root / ("text.pt" if content == "text" else "foreign.pt")
        shutil.copy(source, root / name / run_files.STATE_FILE)
    np.savez(root / "unit.npz", samples=(load_mnist(16)[0][:200] + 1) / 2)
    np.savez(root / "bytes255.npz", samples=((load_mnist(16)[0][:200] + 1) * 127.5).numpy())
    np.savez(root / "points.npz", samples=np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32))
    np.savez(root / "nan.npz", samples=np.full((50, 2), np.nan, dtype=np.float32))
    np.savez(root / "nokey.npz", other=np.zeros((4, 2)))
    (root / "text.npz").write_text("not an npz\n")
    (root / "a-file").write_text("a file, not a folder\n")
    return root


MID = ["train", "mid", "--data", "{root}/toy-shards", "--max-steps", "2", "--batch-size", "8", "--no-progress",
       "--workers", "0"]
POST = ["train", "post", "--init", "{root}/midrun/mid.pt", "--data", "toy:moons", "--max-steps", "2", "--batch-size",
        "8", "--no-progress"]
DIFFUSION = ["train", "diffusion", "--data", "toy:moons", "--arch", "mlp", "--channels", "16", "--max-steps", "2",
             "--batch-size", "8", "--no-progress"]
SAMPLE = ["sample", "--out", "{root}/new/out.png", "--num-samples", "4"]

# (id, command line, exit code, what the message names)
BAD = [
    # checkpoint files: empty, foreign, truncated, refused pickles
    ("sample-empty-pt", SAMPLE + ["--ckpt", "{root}/empty.pt"], 2, ["--ckpt", "empty.pt", "empty"]),
    ("sample-empty-safetensors", SAMPLE + ["--ckpt", "{root}/empty.safetensors"], 2, ["--ckpt", "empty.safetensors"]),
    ("sample-text-safetensors", SAMPLE + ["--ckpt", "{root}/text.safetensors"], 2, ["--ckpt", "text.safetensors"]),
    ("sample-text-pt", SAMPLE + ["--ckpt", "{root}/text.pt"], 2, ["--ckpt", "text.pt"]),
    ("sample-unsafe-pt", SAMPLE + ["--ckpt", "{root}/unsafe.pt"], 2, ["--ckpt", "unsafe.pt", "refused"]),
    ("sample-truncated-pt", SAMPLE + ["--ckpt", "{root}/truncated.pt"], 2, ["--ckpt", "truncated.pt", "truncated"]),
    ("sample-foreign-pt", SAMPLE + ["--ckpt", "{root}/foreign.pt"], 2, ["--ckpt", "foreign.pt", "config"]),
    ("sample-text-pkl", SAMPLE + ["--ckpt", "{root}/text.pkl"], 2, ["--ckpt", "text.pkl"]),
    ("sample-empty-pkl", SAMPLE + ["--ckpt", "{root}/empty.pkl"], 2, ["--ckpt", "empty.pkl"]),
    ("sample-bad-device", SAMPLE + ["--ckpt", "{root}/toy.safetensors", "--device", "gpu7"], 2, ["--device", "gpu7"]),
    ("sample-absent-cuda", SAMPLE + ["--ckpt", "{root}/toy.safetensors", "--device", "cuda:5"], 2, ["--device"]),
    ("sample-nan-model", SAMPLE + ["--ckpt", "{root}/nan.safetensors", "--steps", "2"], 1, ["nan.safetensors", "NaN"]),
    ("sample-mid-sigma-above-max", SAMPLE + ["--ckpt", "{root}/midrun/mid.safetensors", "--sampler", "flowmap",
                                             "--steps", "2", "--mid-sigma", "90"], 2, ["--mid-sigma", "sigma_max"]),
    ("build-empty-teacher", ["build", "--teacher", "{root}/empty.pt", "--out", "{root}/new-shards"], 2,
     ["--teacher", "empty.pt"]),
    ("build-unsafe-teacher", ["build", "--teacher", "{root}/unsafe.pt", "--out", "{root}/new-shards"], 2,
     ["--teacher", "refused"]),
    ("build-negative-guidance", ["build", "--teacher", "{root}/toy.safetensors", "--guidance", "-1", "--out",
                                 "{root}/new-shards"], 2, ["--guidance", ">= 0"]),
    ("convert-text-pkl", ["convert", "{root}/text.pkl", "{root}/new.safetensors"], 2, ["text.pkl"]),
    ("convert-code-pkl", ["convert", "{root}/runs-code.pkl", "{root}/new.safetensors"], 2, ["runs-code.pkl", "refused"]),
    ("sample-code-pkl", SAMPLE + ["--ckpt", "{root}/runs-code.pkl"], 2, ["--ckpt", "runs-code.pkl", "refused"]),
    ("mid-teacher-unsafe", MID + ["--out", "{root}/new-mid", "--teacher", "{root}/unsafe.pt"], 2,
     ["--teacher", "refused"]),
    ("post-ecd-teacher-unsafe", POST + ["--out", "{root}/new-post", "--method", "ecd", "--teacher", "{root}/unsafe.pt"],
     None, ["unsafe.pt", "refused"]),
    ("convert-empty-pkl", ["convert", "{root}/empty.pkl", "{root}/new.safetensors"], 2, ["empty.pkl"]),
    # manifests and shards
    ("inspect-no-shape", ["inspect", "{root}/no-shape"], 1, ["manifest.json", "data_shape"]),
    ("inspect-text-count", ["inspect", "{root}/text-count"], 1, ["manifest.json", "'count'"]),
    ("inspect-bad-shard-entry", ["inspect", "{root}/bad-shard-entry"], 1, ["manifest.json", "shards[0].sha256"]),
    ("inspect-bad-json", ["inspect", "{root}/bad-json"], 1, ["manifest.json", "JSON"]),
    ("inspect-not-a-dataset", ["inspect", "{root}/midrun"], 1, ["midrun", "manifest.json"]),
    ("mid-no-shape", MID[:3] + ["{root}/no-shape"] + MID[4:] + ["--out", "{root}/new-mid"], 2, ["--data", "data_shape"]),
    ("mid-bad-json", MID[:3] + ["{root}/bad-json"] + MID[4:] + ["--out", "{root}/new-mid"], 2, ["--data", "JSON"]),
    ("mid-missing-shard", MID[:3] + ["{root}/missing-shard"] + MID[4:] + ["--out", "{root}/new-mid"], 1,
     ["shard-000001.zarr", "missing"]),
    ("mid-short-shard", MID[:3] + ["{root}/short-shard"] + MID[4:] + ["--out", "{root}/new-mid"], 1,
     ["shard-000000.zarr", "bytes"]),
    # values that make no sense, options that do not apply
    ("mid-eval-data-shape", MID + ["--out", "{root}/new-mid", "--eval-data", "mnist"], 2, ["--eval-data", "shape"]),
    ("mid-mid-sigma-outside", MID + ["--out", "{root}/new-mid", "--mid-sigma", "500"], 2, ["--mid-sigma"]),
    ("mid-huber-c-with-l2", MID + ["--out", "{root}/new-mid", "--huber-c", "0.1"], 2, ["--huber-c", "huber"]),
    ("mid-velocity-share-endpoint", MID + ["--out", "{root}/new-mid", "--velocity-share", "0.3"], 2,
     ["--velocity-share", "flowmap"]),
    ("mid-velocity-share-one", MID + ["--out", "{root}/new-mid", "--target", "flowmap", "--velocity-share", "1"], 2,
     ["--velocity-share"]),
    ("mid-teacher-text", MID + ["--out", "{root}/new-mid", "--teacher", "{root}/text.safetensors"], 2,
     ["--teacher", "text.safetensors"]),
    ("post-stage-with-meanflow", POST + ["--out", "{root}/new-post", "--method", "meanflow", "--stage", "3"], 2,
     ["--stage", "meanflow"]),
    ("post-lpips-with-meanflow", POST + ["--out", "{root}/new-post", "--method", "meanflow", "--loss", "lpips"], 2,
     ["--loss", "meanflow"]),
    ("post-equal-share-with-ect", POST + ["--out", "{root}/new-post", "--method", "ect", "--equal-share", "0.5"], 2,
     ["--equal-share", "meanflow"]),
    ("post-init-empty", POST[:3] + ["{root}/empty.pt"] + POST[4:] + ["--method", "ect", "--out", "{root}/new-post"],
     None, ["empty.pt", "empty"]),
    ("post-init-unsafe", POST[:3] + ["{root}/unsafe.pt"] + POST[4:] + ["--method", "ect", "--out", "{root}/new-post"],
     None, ["unsafe.pt", "refused"]),
    ("post-mid-sigma-zero-ish", POST + ["--out", "{root}/new-post", "--method", "ect", "--mid-sigma", "0.0001"], 2,
     ["--mid-sigma"]),
    # run folders: resuming the wrong thing, out that is a file
    ("post-resumes-mid-run", POST + ["--method", "ect", "--out", "{root}/midrun", "--resume"], 2,
     ["--resume", "mid run"]),
    ("diffusion-resume-text-state", DIFFUSION + ["--out", "{root}/text-state", "--resume"], 1,
     ["training-state.pt"]),
    ("diffusion-resume-foreign-state", DIFFUSION + ["--out", "{root}/foreign-state", "--resume"], 2,
     ["--resume", "training-state.pt"]),
    ("diffusion-out-is-a-file", DIFFUSION + ["--out", "{root}/a-file"], 2, ["--out", "a-file"]),
    ("diffusion-existing-run", DIFFUSION + ["--out", "{root}/midrun"], 2, ["--resume", "exists"]),
    ("diffusion-out-is-a-url", DIFFUSION + ["--out", "s3://bucket/run"], 2, ["--out", "URL"]),
    ("sample-out-is-a-url", SAMPLE[:1] + ["--out", "s3://bucket/x.png", "--ckpt", "{root}/toy.safetensors"], 2,
     ["--out", "URL"]),
    ("mid-resume-other-loss", MID + ["--out", "{root}/midrun", "--resume", "--loss", "huber"], 2,
     ["--resume", "loss: saved 'l2', now 'huber'"]),
    # samples to score
    ("eval-unit-range", ["eval", "--samples", "{root}/unit.npz", "--data", "mnist"], 2, ["--samples", "[0, 1]"]),
    ("eval-255-floats", ["eval", "--samples", "{root}/bytes255.npz", "--data", "mnist"], 2, ["--samples", "[-1, 1]"]),
    ("eval-nan", ["eval", "--samples", "{root}/nan.npz", "--data", "toy:moons"], 2, ["--samples", "NaN"]),
    ("eval-no-key", ["eval", "--samples", "{root}/nokey.npz", "--data", "toy:moons"], 2, ["--samples", "'samples'"]),
    ("eval-text-npz", ["eval", "--samples", "{root}/text.npz", "--data", "toy:moons"], 2, ["--samples", "text.npz"]),
    ("eval-bad-device", ["eval", "--samples", "{root}/points.npz", "--data", "toy:moons", "--device", "tpu"], 2,
     ["--device"]),
    ("demo-out-is-a-file", ["demo", "--out", "{root}/a-file", "--data", "toy"], None, ["a-file"]),
]


@pytest.mark.parametrize("args, code, named", [row[1:] for row in BAD], ids=[row[0] for row in BAD])
def test_a_bad_invocation_is_one_clean_line(world, args, code, named):
    before = file_hashes(world)
    result = run(args[0], [arg.format(root=world) for arg in args[1:]])
    output = result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), output
    assert "Traceback" not in output and "weights_only" not in output, output
    assert result.exit_code == code if code is not None else result.exit_code in (1, 2), output
    for word in named:
        assert word in output, (word, output)
    assert len([line for line in output.splitlines() if line.startswith("Error")]) == 1, output
    after = file_hashes(world)
    assert {path: digest for path, digest in after.items() if path in before} == before


# ---- never lose a run ---------------------------------------------------------------------------

def test_a_failed_final_evaluation_leaves_the_trained_model(world, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the metric broke")
    monkeypatch.setattr(reports, "generate", broken)
    out = tmp_path / "mid"
    with pytest.raises(EvaluationFailed, match="model is saved"):
        mid_train(data=world / "toy-shards", out=out, max_steps=2, workers=0, **FAST)
    assert load_network(out / "mid.pt") is not None and load_network(out / "mid.safetensors") is not None
    assert torch.load(out / run_files.STATE_FILE, weights_only=True)["step"] == 2
    assert [record["step"] for record in run_files.read_log(out)] == [2]
    result = run("train", [arg.format(root=world) for arg in MID[1:]] + ["--out", tmp_path / "cli"])
    assert result.exit_code == 1 and "the metric broke" in result.output and "Traceback" not in result.output
    assert (tmp_path / "cli" / "mid.pt").is_file()


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_resumable_state(tmp_path, signum, code):
    out = tmp_path / "run"
    words = [sys.executable, "-m", "cmt.cli.train", "diffusion", "--data", "toy:moons", "--arch", "mlp", "--channels",
             "16", "--num-blocks", "1", "--batch-size", "8", "--max-steps", "1000000", "--log-every", "1",
             "--ckpt-every", "1000000", "--eval-num", "0", "--sample-steps", "2", "--no-progress", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(words, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    log = out / run_files.LOG_FILE
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr and "--resume" in stderr and signal.Signals(signum).name in stderr
    step = torch.load(out / run_files.STATE_FILE, weights_only=True)["step"]
    assert step >= 3 and not list(out.glob("*partial*"))
    with log.open("a") as file:
        file.write('{"step": 99, "loss"')   # what a kill in the middle of a write leaves
    words[words.index("1000000")] = str(step + 2)
    finished = subprocess.run(words + ["--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert torch.load(out / run_files.STATE_FILE, weights_only=True)["step"] == step + 2
    assert (out / "teacher.safetensors").is_file()
    assert [record["step"] for record in run_files.read_log(out)] == list(range(1, step + 3))


def test_a_full_disk_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch):
    def full(obj, file, *args, **kwargs):
        file.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(loop.torch, "save", full)
    out = tmp_path / "run"
    result = CliRunner().invoke(train.main, ["diffusion", "--data", "toy:moons", "--arch", "mlp", "--channels", "16",
                                             "--max-steps", "2", "--batch-size", "8", "--no-progress",
                                             "--out", str(out)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "no space left on device" in result.output and str(out / run_files.STATE_FILE) in result.output
    assert not list(out.rglob("*partial*")) and not (out / run_files.STATE_FILE).exists()


def test_a_diverging_run_stops_with_the_step_and_lr_and_writes_no_model(tmp_path, monkeypatch):
    from cmt.trainers import diffusion

    real = diffusion.diffusion_loss

    def exploding(net, batch, ctx, **kwargs):
        loss = real(net, batch, ctx, **kwargs)
        loss = loss[0] if isinstance(loss, tuple) else loss
        return loss * float("nan") if ctx.step >= 3 else loss
    monkeypatch.setattr(diffusion, "diffusion_loss", exploding)
    out = tmp_path / "run"
    with pytest.raises(TrainingStopped) as stopped:
        train_diffusion(out=out, max_steps=50, max_nonfinite_steps=4, ckpt_every=2, lr=2e-3, **TINY_DIFFUSION)
    message = str(stopped.value)
    assert "steps 4..7" in message and "lr 0.002" in message and stopped.value.exit_code == 1
    assert not (out / "teacher.safetensors").exists()
    assert torch.load(out / run_files.STATE_FILE, weights_only=True)["step"] == 6   # the last save, its net finite
    result = CliRunner().invoke(train.main, ["diffusion", "--data", "toy:moons", "--arch", "mlp", "--channels", "16",
                                             "--num-blocks", "1", "--max-steps", "50", "--batch-size", "16",
                                             "--max-nonfinite-steps", "2", "--no-progress", "--out", str(tmp_path / "cli")])
    assert result.exit_code == 1 and "diverged" in result.output and "Traceback" not in result.output


def test_cmt_debug_keeps_the_traceback(world, monkeypatch):
    monkeypatch.setenv("CMT_DEBUG", "1")
    result = run("sample", [arg.format(root=world) for arg in SAMPLE[1:]] + ["--ckpt", world / "empty.pt"])
    assert result.exception is not None and not isinstance(result.exception, SystemExit)


# ---- no silent wrong results --------------------------------------------------------------------

def test_resume_refuses_other_options_and_lists_them(tmp_path):
    out = tmp_path / "run"
    train_diffusion(out=out, max_steps=2, **TINY_DIFFUSION)
    before = file_hashes(out)
    result = CliRunner().invoke(train.main, ["diffusion", "--data", "toy:checkerboard", "--arch", "mlp", "--channels",
                                             "16", "--num-blocks", "1", "--batch-size", "32", "--max-steps", "4",
                                             "--lr", "0.01", "--no-progress", "--resume", "--out", str(out)])
    assert result.exit_code == 2 and "--resume" in result.output
    for difference in ("data: saved 'toy:moons', now 'toy:checkerboard'", "batch_size: saved 16, now 32",
                       "lr: saved 0.003, now 0.01"):
        assert difference in result.output, result.output
    assert file_hashes(out) == before
    # what may change: the intervals, the progress bar; and a longer run extends it
    train_diffusion(out=out, max_steps=4, resume=True, **dict(TINY_DIFFUSION, progress=True), log_every=1)
    assert torch.load(out / run_files.STATE_FILE, weights_only=True)["step"] == 4
    linear = dict(TINY_DIFFUSION, lr_schedule="linear")
    train_diffusion(out=tmp_path / "linear", max_steps=2, **linear)
    with pytest.raises(ArgumentError, match="linear") as refused:
        train_diffusion(out=tmp_path / "linear", max_steps=4, resume=True, **linear)
    assert refused.value.argument == "max_steps"


def test_cmt_eval_converts_uint8_and_scores_them_as_floats(tmp_path):
    images = load_mnist(16)[0]   # all 5000 real digits: the reference itself, FD about 0
    np.savez(tmp_path / "float.npz", samples=images.numpy())
    np.savez(tmp_path / "uint8.npz", samples=((images + 1) * 127.5).round().clamp(0, 255).numpy().astype(np.uint8))
    scores = {}
    for name in ("float", "uint8"):
        result = CliRunner().invoke(evaluate.main, ["--samples", str(tmp_path / f"{name}.npz"), "--data", "mnist",
                                                    "--json"])
        assert result.exit_code == 0, result.output
        scores[name] = json.loads(result.stdout.strip().splitlines()[-1])["fd_mnist"]
        assert ("uint8 images (0..255) converted" in result.output) == (name == "uint8")
    assert scores["float"] < 1 and scores["uint8"] < 1, scores   # read as [-1, 1] as is: in the thousands
    assert mnist_fd((images + 1) / 2) > 1000   # what [0, 1] images scored as [-1, 1] would report


def test_out_s3_without_s3fs_says_how_to_install(tmp_path, monkeypatch):
    registry = importlib.import_module("fsspec.registry")
    monkeypatch.setitem(sys.modules, "s3fs", None)
    for protocol in ("s3", "s3a"):
        monkeypatch.delitem(registry._registry, protocol, raising=False)
    result = CliRunner().invoke(build.main, ["--teacher", "toy:moons", "--out", "s3://bucket/shards",
                                             "--num-trajectories", "4", "--no-progress"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "s3://bucket/shards" in result.output and "cmt[s3]" in result.output


def test_post_resume_keeps_the_curriculum_and_the_method(world, tmp_path):
    from cmt.trainers.post import post_train

    common = dict(init=world / "midrun" / "mid.pt", data="toy:moons", batch_size=8, progress=False, num_samples=16)
    curriculum = dict(common, init="teacher", teacher=world / "toy.safetensors")   # ECT's curriculum, from a teacher
    post_train(method="ect", out=tmp_path / "curriculum", max_steps=2, **curriculum)
    with pytest.raises(ArgumentError, match="resolved_stage_every: saved 1, now 2"):   # max_steps / 8 moved
        post_train(method="ect", out=tmp_path / "curriculum", max_steps=16, resume=True, **curriculum)
    out = tmp_path / "post"
    post_train(method="ect", out=out, max_steps=2, **common)
    with pytest.raises(ArgumentError, match="method: saved 'ect', now 'ecd'"):
        post_train(method="ecd", out=out, max_steps=2, resume=True, teacher=world / "toy.safetensors", **common)
    post_train(method="ect", out=out, max_steps=4, resume=True, **common)   # from mid: CMT's fixed gap, extends
    assert torch.load(out / run_files.STATE_FILE, weights_only=True)["step"] == 4
