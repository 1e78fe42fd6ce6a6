"""python -m cmt.cli.demo: every stage runs, the report holds the grids, metrics and commands (which
the real commands accept), a re-run reuses finished stages (and resumes or redoes only what it
must), bad arguments fail cleanly."""
import json
import math
import shlex

import pytest
from click.testing import CliRunner

from cmt.cli.build import main as build_command
from cmt.cli.demo import main
from cmt.cli.evaluate import main as evaluate_command
from cmt.cli.sample import main as sample_command
from cmt.cli.train import main as train_command
from cmt.demo import DATA_CHOICES
from cmt.flags import command_words
from cmt.trainers.diffusion import TEACHER_RECIPES

TINY = ["--data", "toy:checkerboard", "--trajectories", "64", "--mid-steps", "4", "--batch-size", "32",
        "--eval-num", "1000", "--threads", "1", "--no-progress"]
STAGE_OUTPUTS = {"build": "shards/manifest.json", "mid": "mid/mid.pt", "post": "post/post.pt",
                 "sample": "samples/post_2step.npz"}


def demo(*args):
    result = CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def parsed_options(line):
    """The options (by parameter name) that the real command makes of a command line of the report;
    a misspelt flag or a bad value fails here as it would for a user."""
    program, *args = shlex.split(line)
    if program == "cmt-train":
        command, args = train_command.commands[args[0]], args[1:]
    else:
        command = {"cmt-build": build_command, "cmt-sample": sample_command, "cmt-eval": evaluate_command}[program]
    with command.make_context(program, args) as ctx:
        return {name: value for name, value in ctx.params.items()
                if ctx.get_parameter_source(name).name == "COMMANDLINE"}


def mtimes(out):
    return {stage: (out / path).stat().st_mtime_ns for stage, path in STAGE_OUTPUTS.items()}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    demo("--out", out, *TINY, "--post-steps", "4")
    return out


def test_every_stage_runs_and_the_report_shows_them(first_run):
    out = first_run
    records = json.loads((out / "stages.json").read_text())
    assert list(records) == ["teacher", "build", "mid", "post", "sample", "evaluate"]
    assert records["teacher"]["builtin"].endswith("toy-checkerboard.safetensors")
    for stage in ("build", "mid", "post", "sample"):
        assert not records[stage]["reused"] and records[stage]["wall_s"] > 0 and records[stage]["cpu_s"] > 0
    for path in STAGE_OUTPUTS.values():
        assert (out / path).is_file()
    assert json.loads((out / "mid" / "run.json").read_text())["train"]["max_steps"] == 4

    report = (out / "report.md").read_text()
    for grid in ("teacher_16step", "mid_1step", "mid_2step", "post_1step", "post_2step"):
        assert f"(demo_{grid}.png)" in report and (out / f"demo_{grid}.png").stat().st_size > 1000
    assert "| energy_distance | sliced_wasserstein | rmse_to_teacher |" in report
    assert "cmt-train mid --data" in report and "cmt-train post --init" in report and "--stage 11" in report
    assert "cmt-build --teacher toy:checkerboard" in report and "--solver dpm++3m --nfe 16" in report

    metrics = json.loads((out / "metrics.json").read_text())
    # The built-in teacher is at the metric's noise floor; its distance to itself is zero.
    assert metrics["teacher_16step"]["energy_distance"] < 0.005
    assert metrics["teacher_16step"]["rmse_to_teacher"] == 0
    for name in ("mid_1step", "post_1step", "post_2step"):
        assert math.isfinite(metrics[name]["energy_distance"]) and math.isfinite(metrics[name]["rmse_to_teacher"])
    # A student started from the teacher is nearer its samples from the same noise than other
    # teacher samples are.
    assert metrics["mid_1step"]["rmse_to_teacher"] < metrics["teacher_16step_other_noise"]["rmse_to_teacher"]


def test_the_recorded_commands_are_what_the_commands_accept(first_run):
    records = json.loads((first_run / "stages.json").read_text())
    lines = [line for stage in ("build", "mid", "post", "sample", "evaluate") for line in records[stage]["commands"]]
    assert len(lines) == 1 + 1 + 1 + 7 + 7
    for line in lines:
        assert parsed_options(line)
    mid = parsed_options(records["mid"]["commands"][0])
    assert mid["max_steps"] == 4 and mid["target"] == "endpoint" and mid["progress"] is False


@pytest.mark.parametrize("data", DATA_CHOICES)
def test_the_teacher_recipes_spell_as_cmt_train_diffusion(tmp_path, data):
    # --train-teacher reports `cmt-train diffusion` with the recipe's keywords as options.
    recipe = {**TEACHER_RECIPES[data], "out": str(tmp_path), "num_samples": 0, "seed": 0}
    options = parsed_options(shlex.join(command_words("cmt-train diffusion", recipe)))
    assert {name: options[name] for name in recipe} == {**recipe, "out": options["out"]}
    assert str(options["out"]) == str(tmp_path)


def test_a_rerun_reuses_finished_stages_and_redoes_only_changed_ones(first_run):
    out = first_run
    before = mtimes(out)
    result = demo("--out", out, *TINY, "--post-steps", "4")
    assert mtimes(out) == before
    assert "reusing" in result.output
    records = json.loads((out / "stages.json").read_text())
    assert all(records[stage]["reused"] for stage in ("build", "mid", "post", "sample"))

    # An interrupted post-training (state saved, no post.pt) resumes instead of starting over.
    (out / "post" / "post.pt").unlink()
    result = demo("--out", out, *TINY, "--post-steps", "4")
    assert "--resume" in result.output and (out / "post" / "post.pt").is_file()

    # Other post-training settings: build and mid are kept, post and everything after run again.
    before = mtimes(out)
    demo("--out", out, *TINY, "--post-steps", "6")
    after = mtimes(out)
    assert after["build"] == before["build"] and after["mid"] == before["mid"]
    assert after["post"] != before["post"] and after["sample"] != before["sample"]
    assert json.loads((out / "post" / "run.json").read_text())["train"]["max_steps"] == 6


def test_fresh_starts_over(first_run):
    before = mtimes(first_run)
    demo("--out", first_run, *TINY, "--post-steps", "6", "--fresh")
    after = mtimes(first_run)
    assert all(after[stage] != before[stage] for stage in STAGE_OUTPUTS)


@pytest.mark.parametrize("args, hint", [
    (["--data", "cifar10"], "--data"),
    (["--data", "toy:swissroll"], "--data"),
    (["--mid-steps", "0"], "--mid-steps"),
])
def test_bad_arguments_are_one_clean_error(tmp_path, args, hint):
    result = CliRunner().invoke(main, ["--out", str(tmp_path / "demo"), *args])
    assert result.exit_code == 2 and hint in result.output
    assert not (tmp_path / "demo").exists()
