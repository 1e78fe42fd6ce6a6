"""A run resumes by meaning, finishes what its end left undone, stops on a signal within a step, and
refuses sizes and options it cannot honour, each with one line that names the flag or file.

- Identity: paths are compared resolved (a moved or copied run folder, `./shards` for `shards`, the
  same command from another directory), the data set by content (a moved set given anew resumes; an
  extended one is refused with what changed, unless --resume-new-data), and a flag given equal to the
  recipe's value resumes.
- The end: a kill in the final sampling or a full disk at the final model, then --resume, writes the
  model, the samples, the metric and the last log line; a post run from a mid checkpoint extends.
- Signals: SIGTERM inside a step that never ends stops within it (exit 143, the previous step saved,
  the resumed run equal to an uninterrupted one); a second SIGTERM stops at once (exit 143).
- Sizes: a batch above the data set, an allocation failure, a velocity share that trains no row.
- Recipes: a recipe's value that does not apply to a given flag is left out; a given flag that does
  not apply to the recipe's choice is refused naming both.
- Many processes: a rank stopping because another failed says nothing; the failing rank's line is
  the one line the user reads.
"""
import errno
import hashlib
import json
import os
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
from conftest import FAST, TEACHER, TWO_CPU_ENV, command_line, cpu_processes, make_shards
from safetensors.torch import load_file

from cmt.builders.build import build_trajectories
from cmt.cli.train import main
from cmt.errors import ArgumentError
from cmt.trainers import diffusion, reports, run_files
from cmt.trainers.diffusion import train_diffusion
from cmt.trainers.identity import resume_differences
from cmt.trainers.mid import mid_train
from cmt.trainers.post import post_train

QUICK = dict(FAST, num_samples=16)
TINY_DIFFUSION = dict(data="toy:moons", arch="mlp", channels=16, num_blocks=1, batch_size=16, progress=False,
                      num_samples=16, sample_steps=2)
DIFFUSION_FLAGS = ["diffusion", "--data", "toy:moons", "--arch", "mlp", "--channels", "16", "--num-blocks", "1",
                   "--batch-size", "16", "--num-samples", "16", "--sample-steps", "2", "--no-progress"]


def file_hashes(root):
    return {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in Path(root).rglob("*") if path.is_file()}


def train_command(*args):
    """cmt-train in this process: `(exit code, output)`; the output must hold no traceback."""
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


def one_error(output, *named):
    """The output says one `Error` line, naming each of `named`."""
    assert len([line for line in output.splitlines() if line.startswith("Error")]) == 1, output
    for word in named:
        assert word in output, (word, output)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A toy teacher, its 24 trajectories (4 states each besides the endpoint) and a 2-step mid run."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("resume")
    teacher, shards = make_shards(root, "toy", TEACHER)
    mid_train(data=shards, out=root / "midrun", max_steps=2, workers=0, **QUICK)
    return root


# ---- resume identity ----------------------------------------------------------------------------

def test_paths_are_compared_resolved_and_the_data_by_content(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(world / "toy-shards", tmp_path / "shards")
    common = dict(workers=0, **QUICK)
    mid_train(data="shards", out="run", max_steps=2, **common)
    # the run folder moved, the data named otherwise (./, absolute), from another directory
    shutil.move(tmp_path / "run", tmp_path / "moved")
    mid_train(data="./shards", out="moved", max_steps=3, resume=True, **common)
    shutil.copytree(tmp_path / "moved", tmp_path / "copied")   # and a copy of it resumes too
    mid_train(data=tmp_path / "shards", out="copied", max_steps=4, resume=True, **common)
    assert torch.load(tmp_path / "copied" / run_files.STATE_FILE, weights_only=True)["step"] == 4
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    mid_train(data=tmp_path / "shards", out=tmp_path / "moved", max_steps=4, resume=True, **common)
    # the data set moved: given anew, checked by content
    shutil.move(tmp_path / "shards", tmp_path / "relocated")
    mid_train(data="../relocated", out="../moved", max_steps=5, resume=True, **common)
    assert torch.load(tmp_path / "moved" / run_files.STATE_FILE, weights_only=True)["step"] == 5
    # an extended set is refused with what changed; nothing is written
    shutil.copytree(tmp_path / "relocated", tmp_path / "grown")
    build_trajectories(teacher=str(world / "toy.safetensors"), out=tmp_path / "grown", nfe=4, num_trajectories=36,
                       batch_size=8, shard_size=12, labels=None, progress=False, log=lambda message: None)
    before = file_hashes(tmp_path / "moved")
    code, output = train_command("mid", "--data", tmp_path / "grown", "--out", tmp_path / "moved", "--max-steps", 6,
                                 "--resume", *command_line(common))
    assert code == 2, output
    one_error(output, "--data", "count 24 -> 36", "--resume-new-data")
    assert file_hashes(tmp_path / "moved") == before
    # unless the caller says so; then the record is the new set's
    mid_train(data=tmp_path / "grown", out=tmp_path / "moved", max_steps=6, resume=True, resume_new_data=True, **common)
    state = torch.load(tmp_path / "moved" / run_files.STATE_FILE, weights_only=True)
    assert state["step"] == 6 and state["run"]["inputs"]["data"]["count"] == 36
    recorded = json.loads((tmp_path / "moved" / run_files.RUN_FILE).read_text())
    assert recorded["inputs"]["data"]["count"] == 36 and recorded["new_data"][0]["step"] == 5
    with pytest.raises(ArgumentError, match="resume") as error:   # a flag that needs --resume
        mid_train(data=tmp_path / "grown", out=tmp_path / "fresh", resume_new_data=True, **common)
    assert error.value.argument == "resume_new_data" and not (tmp_path / "fresh").exists()


def test_a_flag_given_equal_to_the_recipes_value_resumes(world, tmp_path):
    common = dict(init=world / "midrun" / "mid.pt", method="ect", recipe="toy", data="toy:moons", batch_size=8,
                  progress=False, num_samples=16)
    post_train(out=tmp_path / "run", max_steps=2, **common)
    post_train(out=tmp_path / "run", max_steps=2, resume=True, lr=3e-5, stage=11, **common)   # the recipe's own
    with pytest.raises(ArgumentError, match=r"lr: saved 3e-05, now 0\.001"):
        post_train(out=tmp_path / "run", max_steps=2, resume=True, lr=1e-3, **common)


def test_a_state_saved_before_identities_compares_resolved_paths(tmp_path, monkeypatch):
    """Records of earlier versions hold `out`, paths as given and no inputs: `out` and the recipe's
    filled-in values are ignored, paths compared resolved; a real difference still lists the recipe."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shards").mkdir()
    saved = {"phase": "mid", "max_steps": 2, "train": {"lr": 0.001},
             "options": {"recipe": {"name": "toy", "values": {"lr": 0.001}},
                         "options": {"data": "shards", "out": "run", "loss": "l2", "resolved_stage_every": 1}}}
    current = {"phase": "mid", "max_steps": 2, "train": {"lr": 0.001},
               "options": {"recipe": None, "options": {"data": str(tmp_path / "shards"), "loss": "l2"}},
               "inputs": {"data": {"kind": "trajectories", "count": 24}}}
    assert resume_differences(saved, current) == ([], [])
    current["options"]["options"]["loss"] = "huber"
    changed, _ = resume_differences(saved, current)
    assert changed == ["options.options.loss: saved 'l2', now 'huber'", "options.recipe: saved {'name': 'toy', "
                       "'values': {'lr': 0.001}}, now None"]


# ---- the end of a run ---------------------------------------------------------------------------

class Killed(BaseException):
    """What a kill -9 leaves: the process gone at that point."""


def test_a_kill_or_a_full_disk_in_the_final_phase_is_finished_by_resume(tmp_path, monkeypatch):
    real_generate, real_save = reports.generate, diffusion.save_network

    def killed(*args, **kwargs):
        raise Killed()
    monkeypatch.setattr(reports, "generate", killed)
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        train_diffusion(out=out, max_steps=3, log_every=2, **TINY_DIFFUSION)
    state = torch.load(out / run_files.STATE_FILE, weights_only=True)
    assert state["step"] == 3 and state["evaluation"] == "pending"
    assert [record["step"] for record in run_files.read_log(out)] == [2] and not (out / "samples").exists()
    monkeypatch.setattr(reports, "generate", real_generate)
    code, output = train_command(*DIFFUSION_FLAGS, "--max-steps", 3, "--log-every", 2, "--out", out, "--resume")
    assert code == 0 and "done at step 3" in output, output
    last = run_files.read_log(out)[-1]
    assert last["step"] == 3 and "energy_distance" in last and "loss" in last
    assert list((out / "samples").glob("*.png")) and (out / "teacher.safetensors").is_file()

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(diffusion, "save_network", full)
    out = tmp_path / "full"
    code, output = train_command(*DIFFUSION_FLAGS, "--max-steps", 2, "--log-every", 100, "--out", out)
    assert code == 1, output
    one_error(output, "no space left on device", "teacher.safetensors")
    assert run_files.read_log(out) == [] and not (out / "teacher.safetensors").exists()
    monkeypatch.setattr(diffusion, "save_network", real_save)
    code, output = train_command(*DIFFUSION_FLAGS, "--max-steps", 2, "--log-every", 100, "--out", out, "--resume")
    assert code == 0, output
    assert [record["step"] for record in run_files.read_log(out)] == [2] and (out / "teacher.safetensors").is_file()
    assert "energy_distance" in run_files.read_log(out)[-1]
    # done: a resume writes nothing new to the log
    code, output = train_command(*DIFFUSION_FLAGS, "--max-steps", 2, "--log-every", 100, "--out", out, "--resume")
    assert code == 0 and [record["step"] for record in run_files.read_log(out)] == [2], output


def test_a_failed_final_sampling_is_tried_again_on_resume(tmp_path, monkeypatch):
    real_generate = reports.generate

    def broken(*args, **kwargs):
        raise RuntimeError("the metric broke")
    monkeypatch.setattr(reports, "generate", broken)
    out = tmp_path / "run"
    code, output = train_command(*DIFFUSION_FLAGS, "--max-steps", 2, "--out", out)
    assert code == 1, output
    one_error(output, "the metric broke", "model is saved")
    assert run_files.read_log(out)[-1]["evaluation"] == "failed"
    monkeypatch.setattr(reports, "generate", real_generate)
    code, output = train_command(*DIFFUSION_FLAGS, "--max-steps", 2, "--out", out, "--resume")
    assert code == 0, output
    records = run_files.read_log(out)
    assert [record["step"] for record in records] == [2] and "energy_distance" in records[0]
    assert "evaluation" not in records[0]


def test_a_post_run_from_a_mid_checkpoint_extends(world, tmp_path):
    common = dict(init=world / "midrun" / "mid.pt", method="ect", data="toy:moons", batch_size=8, progress=False,
                  num_samples=16, log_every=2)
    post_train(out=tmp_path / "run", max_steps=2, **common)
    post_train(out=tmp_path / "run", max_steps=4, resume=True, **common)
    assert torch.load(tmp_path / "run" / run_files.STATE_FILE, weights_only=True)["step"] == 4
    assert [record["step"] for record in run_files.read_log(tmp_path / "run")] == [2, 4]


# ---- signals ------------------------------------------------------------------------------------

DRIVER = """
import os, sys, time
from pathlib import Path
from cmt.trainers import diffusion, loop

mode, marker = sys.argv[1], Path(sys.argv[2])
real_loss, real_write = diffusion.diffusion_loss, loop.write_state


def stalling(net, batch, ctx, **settings):   # step 3 never ends (a stalled read, a huge batch)
    if ctx.step == 2 and mode != "whole":
        marker.write_text("in step 3")
        time.sleep(3600)
    return real_loss(net, batch, ctx, **settings)


def slow_write(out, state):   # the save the first signal asks for never ends either
    if mode == "stall-save" and marker.exists():
        marker.write_text("saving")
        time.sleep(3600)
    return real_write(out, state)


diffusion.diffusion_loss, loop.write_state = stalling, slow_write
from cmt.cli.train import main
main(sys.argv[3:], prog_name="cmt-train")
"""


def run_until(command, marker, text, timeout=120):
    """Popen `command`, wait until `marker` says `text`, send SIGTERM; the process (stdout and stderr joined)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    for _ in range(timeout * 10):
        if marker.exists() and marker.read_text() == text:
            break
        if process.poll() is not None:
            raise AssertionError(process.stdout.read())
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    return process


def test_sigterm_inside_a_step_that_never_ends_saves_the_previous_step(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out, marker = tmp_path / "run", tmp_path / "marker"
    flags = [*DIFFUSION_FLAGS, "--max-steps", 5, "--log-every", 1, "--ckpt-every", 1000, "--out", out]
    command = [sys.executable, str(driver), "stall-step", str(marker), *map(str, flags)]
    process = run_until(command, marker, "in step 3")
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 143, output
    assert "SIGTERM" in output and "--resume" in output and "Traceback" not in output
    assert torch.load(out / run_files.STATE_FILE, weights_only=True)["step"] == 2
    train_diffusion(out=out, max_steps=5, log_every=1, ckpt_every=1000, resume=True, **TINY_DIFFUSION)
    whole = train_diffusion(out=tmp_path / "whole", max_steps=5, log_every=1, **TINY_DIFFUSION)
    assert [record["loss"] for record in run_files.read_log(out)] == \
        [record["loss"] for record in run_files.read_log(tmp_path / "whole")]
    for name, tensor in load_file(whole["model"]).items():
        assert torch.equal(tensor, load_file(out / "teacher.safetensors")[name]), name


def test_a_second_sigterm_stops_at_once_with_143(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out, marker = tmp_path / "run", tmp_path / "marker"
    flags = [*DIFFUSION_FLAGS, "--max-steps", 5, "--ckpt-every", 1, "--out", out]
    process = run_until([sys.executable, str(driver), "stall-save", str(marker), *map(str, flags)], marker, "in step 3")
    for _ in range(600):
        if marker.read_text() == "saving":
            break
        time.sleep(0.1)
    before = file_hashes(out)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 143, output
    assert "Aborted" not in output and "Traceback" not in output
    one_error(output, "second SIGTERM", "holds step 2")
    assert file_hashes(out) == before and not list(out.rglob("*.tmp"))


# ---- sizes --------------------------------------------------------------------------------------

def test_a_batch_above_the_data_is_refused_before_anything_is_made(world, tmp_path):
    code, output = train_command("mid", "--data", world / "toy-shards", "--out", tmp_path / "mid", "--batch-size",
                                 100000, "--workers", 0, "--no-progress")
    assert code == 2, output
    one_error(output, "--batch-size", "24 trajectories", "96 samples")
    images = np.random.default_rng(0).integers(0, 256, (20, 3, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", images=images)
    code, output = train_command("diffusion", "--data", tmp_path / "images.npz", "--out", tmp_path / "diffusion",
                                 "--batch-size", 64, "--no-progress")
    assert code == 2, output
    one_error(output, "--batch-size", "20 items")
    assert not (tmp_path / "mid").exists() and not (tmp_path / "diffusion").exists()


@pytest.mark.parametrize("failure", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 80000000000 bytes. Error code 12 (Cannot allocate memory)"),
], ids=["cuda", "cpu"])
def test_an_allocation_failure_names_the_batch_size_and_loses_nothing(tmp_path, monkeypatch, failure):
    real = diffusion.diffusion_loss

    def hungry(net, batch, ctx, **settings):
        if ctx.step == 2:
            raise failure
        return real(net, batch, ctx, **settings)
    monkeypatch.setattr(diffusion, "diffusion_loss", hungry)
    out = tmp_path / "run"
    code, output = train_command(*DIFFUSION_FLAGS, "--max-steps", 4, "--ckpt-every", 2, "--grad-accum", 2,
                                 "--out", out)
    assert code == 2, output
    one_error(output, "--batch-size", "--grad-accum", "micro-batches of 8 rows", "holds step 2")
    assert torch.load(out / run_files.STATE_FILE, weights_only=True)["step"] == 2


def test_a_velocity_share_that_trains_no_row_is_refused(world, tmp_path):
    code, output = train_command("mid", "--data", world / "toy-shards", "--out", tmp_path / "mid", "--target",
                                 "flowmap", "--velocity-share", 0.05, "--batch-size", 16, "--workers", 0,
                                 "--no-progress")
    assert code == 2, output
    one_error(output, "--velocity-share", "16 rows", "0.0625")
    assert not (tmp_path / "mid").exists()


# ---- recipes ------------------------------------------------------------------------------------

def test_recipe_conflicts_name_the_given_flag_and_the_recipe(world, tmp_path, offline_hub):
    post = ["post", "--init", world / "midrun" / "mid.pt", "--method", "ect", "--data", "toy:moons", "--max-steps",
            1, "--batch-size", 8, "--num-samples", 16, "--no-progress", "--recipe", "cifar10"]
    # the recipe's huber_c (for its huber loss) does not apply to the loss given: left out, said
    code, output = train_command(*post, "--loss", "l2", "--out", tmp_path / "l2")
    assert code == 0 and "recipe cifar10's huber_c=0.0 does not apply to the given loss l2: left out" in output, output
    # (lpips offline: the error is about --loss, the flag given, never --huber-c)
    code, output = train_command(*post, "--loss", "lpips", "--out", tmp_path / "lpips")
    assert code == 2 and "--huber-c" not in output, output
    one_error(output, "--loss")
    # a flag given that does not apply to the recipe's choice: refused naming both
    code, output = train_command("mid", "--data", world / "toy-shards", "--out", tmp_path / "mid", "--recipe",
                                 "cifar10", "--huber-c", 0.1, "--workers", 0, "--no-progress")
    assert code == 2, output
    one_error(output, "--huber-c", "recipe cifar10 sets loss lpips")
    assert not (tmp_path / "mid").exists()


# ---- many processes -----------------------------------------------------------------------------

FAILING_RANK = """
import os, sys
from cmt.errors import FileFormatError
from cmt.trainers import diffusion

real = diffusion.diffusion_loss


def failing(net, batch, ctx, **settings):
    if ctx.step == 1 and os.environ.get("RANK") == "1":
        raise FileFormatError("bad-file.bin: damaged (the test's fault on rank 1)")
    return real(net, batch, ctx, **settings)


diffusion.diffusion_loss = failing
from cmt.cli.train import main
main(sys.argv[1:], prog_name="cmt-train")
"""


def test_a_rank_stopped_by_a_failed_peer_exits_quietly(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(FAILING_RANK)
    launcher = cpu_processes(2)
    launcher.insert(launcher.index("accelerate.commands.launch") + 1, "--quiet")   # the launcher's report, no traceback
    flags = [*DIFFUSION_FLAGS, "--max-steps", 4, "--out", tmp_path / "run"]
    run = subprocess.run([*launcher, str(driver), *map(str, flags)], env=TWO_CPU_ENV, capture_output=True, text=True,
                         timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 1, output
    assert "Traceback" not in output and "Connection closed" not in output and "gloo" not in output.lower(), output
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert errors == ["Error: bad-file.bin: damaged (the test's fault on rank 1)"], output
    # the launcher's report quotes that line as the failure's cause (its error file)
    assert "traceback : Error: bad-file.bin" in output, output
