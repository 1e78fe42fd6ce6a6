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
    np.savez(root / "one-point.npz", samples=np.zeros((1, 2), np.float32))
    pixels = np.random.default_rng(0).uniform(-1, 1, (8, 1, 8, 8)).astype(np.float32)
    pixels[5, 0, 2, 3] = np.nan
    np.savez(root / "nan-pixel.npz", x=pixels)
    np.savez(root / "square.npz", x=np.zeros((8, 1, 8, 8), np.uint8))
    np.savez(root / "not-square.npz", x=np.zeros((8, 1, 8, 12), np.uint8))
    nan_shards(root / "nan-shards", teacher)
    (root / "text.npz").write_text("not an npz\n")
    (root / "a-file").write_text("a file, not a folder\n")
    return root


def nan_shards(out, teacher):
    """A trajectory set whose every shard holds a NaN state, with checksums that match (written past
    cmt-build's own refusal of a NaN teacher, as other code could write it)."""
    from cmt.builders import build as builder

    real = builder.make_shard

    def poisoned(*args, **kwargs):
        arrays = real(*args, **kwargs)
        arrays["states"][1, 1] = np.nan
        return arrays
    builder.make_shard = poisoned
    try:
        builder.build_trajectories(teacher=str(teacher), out=out, nfe=4, num_trajectories=24, batch_size=8,
                                   shard_size=12, labels=None, progress=False, log=lambda message: None)
    finally:
        builder.make_shard = real


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
    ("convert-our-safetensors", ["convert", "{root}/toy.safetensors", "{root}/new.safetensors"], 2,
     ["toy.safetensors", "already a cmt network", "nothing to convert"]),
    ("convert-our-pt", ["convert", "{root}/midrun/mid.pt", "{root}/new.safetensors"], 2,
     ["mid.pt", "torch.save checkpoint", "nothing to convert"]),
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
    ("mid-nan-shard", MID[:3] + ["{root}/nan-shards"] + MID[4:] + ["--out", "{root}/new-mid"], 1,
     ["nan-shards/shard-00000", "NaN or inf", "trajectory"]),
    # users' data: non-finite, not square
    ("diffusion-nan-pixel", DIFFUSION[:3] + ["{root}/nan-pixel.npz"] + DIFFUSION[6:] + ["--out", "{root}/new-run"],
     2, ["--data", "nan-pixel.npz", "NaN or inf", "image 5"]),
    ("diffusion-not-square", DIFFUSION[:3] + ["{root}/not-square.npz"] + DIFFUSION[6:] + ["--out", "{root}/new-run"],
     2, ["--data", "not-square.npz", "8 x 12", "not square"]),
    # values that make no sense, options that do not apply
    ("diffusion-attn-res-absent", DIFFUSION[:3] + ["{root}/square.npz"] + DIFFUSION[6:] +
     ["--attn-res", "3", "--out", "{root}/new-run"], 2, ["--attn-res", "3", "8, 4, 2"]),
    ("diffusion-attn-res-mlp", DIFFUSION + ["--attn-res", "4", "--out", "{root}/new-run"], 2, ["--attn-res", "mlp"]),
    ("sample-labels-none-no-dropout", SAMPLE + ["--ckpt", "mnist", "--labels", "none"], 2,
     ["--labels", "without label dropout"]),
    ("sample-labels-unconditional", SAMPLE + ["--ckpt", "{root}/toy.safetensors", "--labels", "3"], 2,
     ["--labels", "unconditional"]),
    ("build-labels-none-no-dropout", ["build", "--teacher", "mnist", "--labels", "none", "--out", "{root}/new-shards"],
     2, ["--labels", "without label dropout"]),
    ("build-labels-unconditional", ["build", "--teacher", "{root}/toy.safetensors", "--labels", "random", "--out",
                                    "{root}/new-shards"], 2, ["--labels", "unconditional"]),
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
    ("eval-one-sample", ["eval", "--samples", "{root}/one-point.npz", "--data", "toy:moons"], 2,
     ["--samples", "one-point.npz", "1 sample", "at least 2"]),
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


class FullDisk:
    """A disk that fills up: writes to the files `which(path)` picks raise ENOSPC, as the OS does, once
    `room` bytes went in. `builtins.open` / `io.open` are patched (torch.save's handle, numpy's zip,
    PIL, matplotlib and pathlib open through them); safetensors writes from native code, so its
    `save_file` is made to fail the way it does on a full disk (a SafetensorError, the file begun)."""

    def __init__(self, monkeypatch, which, room=0):
        import builtins
        import io

        from safetensors import SafetensorError

        import cmt.outputs

        real_open, real_save_file = io.open, cmt.outputs.save_file
        disk = self

        class FillingFile:
            def __init__(self, handle):
                self.handle, self.written = handle, 0

            def write(self, data):
                self.written += len(data)
                if self.written > room:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return self.handle.write(data)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.handle.close()

            def __getattr__(self, name):
                return getattr(self.handle, name)

        def filling_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+") and which(Path(file)):
                disk.hits += 1
                return FillingFile(handle)
            return handle

        def filling_save_file(tensors, filename, metadata=None):
            if not which(Path(filename)):
                return real_save_file(tensors, filename, metadata=metadata)
            disk.hits += 1
            Path(filename).write_bytes(b"\0" * 64)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        self.hits = 0
        monkeypatch.setattr(io, "open", filling_open)
        monkeypatch.setattr(builtins, "open", filling_open)
        monkeypatch.setattr(cmt.outputs, "save_file", filling_save_file)


def named(word):
    return lambda path: word in path.name


# (what fills the disk, the command line with OUT for the output folder, the file named)
FULL_DISK = [
    ("training-state", DIFFUSION[1:] + ["--out", "{out}"], named("training-state"), "training-state.pt"),
    ("teacher-safetensors", DIFFUSION[1:] + ["--out", "{out}"], named("teacher"), "teacher.safetensors"),
    ("log-jsonl", DIFFUSION[1:] + ["--out", "{out}"], named("log.jsonl"), "log.jsonl"),
    ("mid-pt", [arg for arg in MID[1:]] + ["--out", "{out}"], named("mid"), "mid.pt"),
    ("sample-npz", SAMPLE[1:2] + ["{out}/x.png", "--npz", "{out}/x.npz", "--ckpt", "{root}/toy.safetensors",
                                  "--steps", "2"], named(".npz"), "x.npz"),
    ("sample-png", SAMPLE[1:2] + ["{out}/x.png", "--ckpt", "{root}/toy.safetensors", "--steps", "2"], named(".png"),
     "x.png"),
    ("build-shard", ["--teacher", "{root}/toy.safetensors", "--out", "{out}", "--nfe", "4", "--num-trajectories", "8",
                     "--batch-size", "8", "--no-progress"], lambda path: "shard-000000.zarr" in str(path),
     "shard-000000.zarr"),
    ("build-manifest", ["--teacher", "{root}/toy.safetensors", "--out", "{out}", "--nfe", "4", "--num-trajectories",
                        "8", "--batch-size", "8", "--no-progress"], named("manifest"), "manifest.json"),
]


@pytest.mark.parametrize("args, which, file", [row[1:] for row in FULL_DISK], ids=[row[0] for row in FULL_DISK])
def test_a_full_disk_names_the_file_and_leaves_no_temporary(world, tmp_path, monkeypatch, args, which, file):
    out = tmp_path / "out"
    command = "build" if "--teacher" in args else "sample" if "--ckpt" in args else "train"
    disk = FullDisk(monkeypatch, lambda path: str(out) in str(path) and which(path))
    result = run(command, [arg.format(root=world, out=out) for arg in args])
    monkeypatch.undo()
    assert disk.hits and result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"Error: no space left on device: {out}" in result.output and file in result.output, result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1
    assert not [path for path in out.rglob("*") if "partial" in path.name or ".tmp-" in path.name]


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


def test_a_nan_shard_read_by_reader_workers_is_one_line_naming_it(world, tmp_path):
    result = run("train", ["mid", "--data", world / "nan-shards", "--max-steps", "2", "--batch-size", "8",
                           "--no-progress", "--workers", "2", "--out", tmp_path / "mid"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "nan-shards/shard-00000" in result.output and "NaN or inf" in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1


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


def test_cmt_sample_reports_no_metric_of_one_sample_and_skips_it_when_asked(world, tmp_path):
    common = ["--ckpt", "toy:moons", "--steps", "2", "--no-progress"]
    one = run("sample", common + ["--num-samples", "1", "--out", tmp_path / "one.png"])
    assert one.exit_code == 0 and "metric skipped: 1 sample" in one.output and "energy_distance" not in one.output
    assert (tmp_path / "one.png").is_file()
    asked = run("sample", common + ["--num-samples", "64", "--no-metric", "--out", tmp_path / "skip.png"])
    assert asked.exit_code == 0 and "metric skipped: --no-metric" in asked.output
    assert "energy_distance" not in asked.output
    scored = run("sample", common + ["--num-samples", "64", "--out", tmp_path / "scored.png"])
    assert scored.exit_code == 0 and "energy_distance" in scored.output and "skipped" not in scored.output


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


# ---- the Python API: every keyword's type and range checked before anything is written -------------

def _diffusion(world, tmp, **bad):
    return train_diffusion(**{**TINY_DIFFUSION, "out": tmp / "run", "max_steps": 2, **bad})


def _mid(world, tmp, **bad):
    return mid_train(**{"data": world / "toy-shards", "out": tmp / "mid", "max_steps": 2, "workers": 0,
                        "progress": False, **bad})


def _post(world, tmp, **bad):
    from cmt.trainers.post import post_train
    return post_train(**{"init": world / "midrun" / "mid.pt", "method": "ect", "data": "toy:moons",
                         "out": tmp / "post", "max_steps": 2, "progress": False, **bad})


def _build(world, tmp, **bad):
    from cmt.builders.build import build_trajectories
    return build_trajectories(**{"teacher": str(world / "toy.safetensors"), "out": tmp / "shards", "nfe": 4,
                                 "num_trajectories": 8, "batch_size": 8, "progress": False, **bad})


def _sample(world, tmp, **bad):
    from cmt.sampling import sample
    return sample(**{"ckpt": world / "toy.safetensors", "out": tmp / "x.png", "num_samples": 4, "steps": 2,
                     "progress": False, **bad})


def _evaluate(world, tmp, **bad):
    from cmt.evaluation import evaluate
    return evaluate(**{"samples": world / "points.npz", "data": "toy:moons", **bad})


def _reconstruct(world, tmp, **bad):
    from cmt.posthoc_ema import reconstruct_ema
    return reconstruct_ema(**{"snapshots": tmp, "std": 0.1, "out": tmp / "ema", **bad})


# (entry point, the bad keyword and its value)
BAD_KEYWORDS = [
    (_diffusion, "max_steps", "10"), (_diffusion, "max_steps", 2.7), (_diffusion, "out", 123),
    (_diffusion, "lr", "fast"), (_diffusion, "seed", "0"), (_diffusion, "progress", "no"),
    (_mid, "max_steps", "10"), (_mid, "mid_sigma", "0.8"), (_mid, "cache_gb", float("inf")),
    (_mid, "lr", float("nan")), (_post, "mid_sigma", "0.8"), (_post, "max_steps", 2.7),
    (_build, "nfe", "16"), (_build, "num_trajectories", 16.5), (_build, "seed", "0"), (_build, "out", 123),
    (_sample, "steps", "16"), (_sample, "seed", "0"), (_sample, "out", 123), (_sample, "mid_sigma", "0.8"),
    (_evaluate, "fid", "yes"), (_reconstruct, "num_samples", -1),
    (_post, "guidance", "fast"), (_build, "guidance", "manifest"),   # post_train's words are not a build's
]


@pytest.mark.parametrize("entry, argument, value", BAD_KEYWORDS,
                         ids=[f"{entry.__name__[1:]}-{argument}-{value!r}" for entry, argument, value in BAD_KEYWORDS])
def test_a_bad_keyword_is_an_argument_error_naming_it_and_writes_nothing(world, tmp_path, monkeypatch, entry, argument,
                                                                        value):
    monkeypatch.chdir(tmp_path)   # where a stray `out=123` would go
    work = tmp_path / "work"
    work.mkdir()
    before = file_hashes(world)
    with pytest.raises(ArgumentError) as refused:
        entry(world, work, **{argument: value})
    assert refused.value.argument == argument, refused.value
    assert [path.name for path in tmp_path.rglob("*")] == ["work"]
    assert file_hashes(world) == before


def test_a_refused_build_leaves_the_folder_free_for_a_valid_one(world, tmp_path):
    with pytest.raises(ArgumentError, match="num_trajectories"):
        _build(world, tmp_path, num_trajectories=16.5)
    assert not (tmp_path / "shards").exists()
    assert _build(world, tmp_path, num_trajectories=16.0, log=lambda message: None)["count"] == 16   # a whole float


# ---- object storage: the client's errors are the setup's, said as such ----------------------------

@pytest.fixture
def bare_s3(tmp_path, monkeypatch):
    """s3fs with no credentials anywhere (no environment, no files, no instance metadata) and one try
    per request (s3fs retries 5 times with back-off)."""
    s3fs = pytest.importorskip("s3fs", minversion="2024.1")   # older s3fs swallowed these errors
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.setenv(name, str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    s3fs.S3FileSystem.clear_instance_cache()
    yield monkeypatch
    s3fs.S3FileSystem.clear_instance_cache()


def closed_port():
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("setup, said", [("no-credentials", "NoCredentialsError"),
                                         ("no-endpoint", "Could not connect to the endpoint")])
def test_object_storage_client_errors_are_one_line_naming_object_storage(world, tmp_path, bare_s3, setup, said):
    if setup == "no-endpoint":
        for name, value in (("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}"), ("AWS_ACCESS_KEY_ID", "key"),
                            ("AWS_SECRET_ACCESS_KEY", "secret"), ("AWS_DEFAULT_REGION", "us-east-1")):
            bare_s3.setenv(name, value)
    for command, args in (("inspect", ["s3://cmt-bucket/shards"]),
                          ("train", ["mid", "--data", "s3://cmt-bucket/shards", "--out", tmp_path / "mid"]),
                          ("build", ["--teacher", world / "toy.safetensors", "--out", "s3://cmt-bucket/shards",
                                     "--num-trajectories", "4", "--no-progress"])):
        result = run(command, args)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert "Error: object storage: " in result.output and said in result.output, result.output
        assert "not a finished" not in result.output   # what s3fs 0.4 made of them: "no manifest.json; ..."
    assert not (tmp_path / "mid").exists()
