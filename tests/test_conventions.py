"""What every command shares (issue 14): one vocabulary (old spellings still accepted), readable
pictures, EMA snapshots, growing trajectory sets, rank-split sampling and evaluation, file modes."""
import inspect
import json
import os
import re
import subprocess
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import cmt
import cmt.distributed
from cmt.builders.build import build_trajectories
from cmt.checkpoint import load_network, save_network
from cmt.cli.build import main as build_main
from cmt.cli.convert import main as convert_main
from cmt.cli.demo import main as demo_main
from cmt.cli.ema import main as ema_main
from cmt.cli.encode import main as encode_main
from cmt.cli.evaluate import main as eval_main
from cmt.cli.inspect import main as inspect_main
from cmt.cli.sample import main as sample_main
from cmt.cli.train import main as train_main
from cmt.edm import TWO_STEP_SIGMA
from cmt.evaluation import evaluate
from cmt.images import LABEL_HEIGHT, grid_with_layout, scatter_figure
from cmt.labels import pick_labels
from cmt.manifest import TrajectoryDataset, upgrade_manifest
from cmt.networks import build_network
from cmt.sampling import sample, save_samples, student_sampler
from cmt.builders.encode import ENCODE_HELP
from cmt.builders.build import BUILD_HELP
from cmt.builders.inspect import INSPECT_HELP, inspect_trajectories
from cmt.demo import DEMO_HELP
from cmt.evaluation import EVALUATE_HELP
from cmt.options import written_docstring
from cmt.posthoc_ema import EMA_HELP
from cmt.sampling import SAMPLE_HELP
from cmt.teachers import CONVERT_HELP, convert_checkpoint
from cmt.trainers.config import TRAIN_DEFAULTS, TRAIN_HELP
from cmt.trainers.diffusion import DIFFUSION_HELP
from cmt.trainers.mid import MID_HELP
from cmt.trainers.post import POST_HELP
from cmt.trainers.run_files import IMAGES_SEEN, read_log
from conftest import TEACHER, TWO_CPU_ENV, TWO_CPU_PROCESSES, gmm_teacher, invoke_command

COMMANDS = {"cmt-sample": sample_main, "cmt-eval": eval_main, "cmt-convert": convert_main, "cmt-build": build_main,
            "cmt-inspect": inspect_main, "demo": demo_main, "cmt-train": train_main, "cmt-ema": ema_main,
            "cmt-encode": encode_main}
TOY_TEACHER = dict(data="toy:checkerboard", arch="mlp", channels=32, num_blocks=1, max_steps=4, batch_size=16,
                   log_every=2, num_samples=64, progress=False)


def files_of(root):
    root = Path(root)
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def parsed(command, args):
    """The keyword arguments a click command makes of `args` (without running it)."""
    return command.make_context(command.name or "command", [str(arg) for arg in args]).params


# ---- one vocabulary -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_takes_h_and_shows_its_defaults(name):
    result = CliRunner().invoke(COMMANDS[name], ["-h"])
    assert result.exit_code == 0 and "Usage:" in result.output and "--help" in result.output
    if name in ("cmt-sample", "cmt-build", "demo", "cmt-ema", "cmt-encode"):
        assert "[default: " in result.output


def test_old_spellings_are_accepted_and_hidden():
    sample_args = ["--ckpt", "toy:moons", "--out", "x.png"]
    assert parsed(sample_main, [*sample_args, "--num", 7])["num_samples"] == 7
    assert parsed(sample_main, [*sample_args, "--num-samples", 7])["num_samples"] == 7
    diffusion = train_main.commands["diffusion"]
    assert parsed(diffusion, ["--data", "toy:moons", "--out", "r", "--eval-num", 5])["num_samples"] == 5
    demo = parsed(demo_main, ["--trajectories", 64, "--eval-num", 30])
    assert demo["num_trajectories"] == 64 and demo["num_samples"] == 30
    for command, old, new in ((sample_main, "--num ", "--num-samples"), (diffusion, "--eval-num", "--num-samples"),
                              (demo_main, "--trajectories", "--num-trajectories")):
        text = CliRunner().invoke(command, ["--help"]).output
        assert new in text and old not in text
    # The library's earlier keywords too, with a DeprecationWarning.
    with pytest.warns(DeprecationWarning, match="num_samples"):
        with pytest.raises(cmt.ArgumentError) as error:
            sample(ckpt="toy:moons", out="x.jpg", num=3)
    assert error.value.argument == "out"


@pytest.mark.parametrize("command, function", [(sample_main, cmt.sample), (build_main, cmt.build_trajectories),
                                               (eval_main, cmt.evaluate), (ema_main, cmt.reconstruct_ema),
                                               (encode_main, cmt.encode_dataset),
                                               (train_main.commands["diffusion"], cmt.train_diffusion),
                                               (demo_main, cmt.demo.run_demo)])
def test_command_options_are_the_library_keywords(command, function):
    keywords = inspect.signature(function).parameters
    for param in command.params:
        if param.name not in ("as_json", "help"):
            assert param.name in keywords or param.name in TRAIN_DEFAULTS, param.name


@pytest.mark.parametrize("phase", ["diffusion", "mid", "post"])
def test_the_shared_trainer_options_are_documented_once(phase):
    """TrainConfig's fields are described in TRAIN_HELP only, and every cmt-train command shows that text."""
    assert set(TRAIN_HELP) == set(TRAIN_DEFAULTS) | {"out"}
    shown = {param.name: param.help for param in train_main.commands[phase].params}
    for name, text in TRAIN_HELP.items():
        assert shown[name].startswith(text), name
    assert "per architecture" in shown["lr"] or phase == "diffusion"


# (command, its library function, the table that describes the function's keywords)
DOCUMENTED = [(sample_main, cmt.sample, SAMPLE_HELP), (build_main, cmt.build_trajectories, BUILD_HELP),
              (eval_main, cmt.evaluate, EVALUATE_HELP), (ema_main, cmt.reconstruct_ema, EMA_HELP),
              (encode_main, cmt.encode_dataset, ENCODE_HELP), (inspect_main, inspect_trajectories, INSPECT_HELP),
              (convert_main, convert_checkpoint, CONVERT_HELP), (demo_main, cmt.demo.run_demo, DEMO_HELP),
              (train_main.commands["diffusion"], cmt.train_diffusion, DIFFUSION_HELP),
              (train_main.commands["mid"], cmt.mid_train, MID_HELP),
              (train_main.commands["post"], cmt.post_train, POST_HELP)]


@pytest.mark.parametrize("command, function, table", DOCUMENTED,
                         ids=[function.__name__ for _, function, _ in DOCUMENTED])
def test_each_keyword_is_described_once_for_the_library_and_the_command(command, function, table):
    """Every keyword of an entry point is described in its table only: the docstring lists the table
    (and its hand-written part does not describe a keyword again), the command's help is the table's text."""
    keywords = [name for name, parameter in inspect.signature(function).parameters.items()
                if parameter.kind is not inspect.Parameter.VAR_KEYWORD]
    assert set(table) == set(keywords)
    written = written_docstring(function)
    assert written != function.__doc__
    for name, text in table.items():
        assert not re.search(rf"(^\s*|\.\s+)`?{name}`?(, `?[a-z_]+`?)*: ", written, re.M), name
        assert " ".join(text.split())[:60] in " ".join(function.__doc__.split()), name
    options = [param for param in command.params if isinstance(param, click.Option) and param.name in table]
    assert options
    for param in options:
        assert param.help == table[param.name], param.name
    for param in command.params:
        if isinstance(param, click.Argument):
            assert table[param.name] in " ".join(command.help.split()) or param.name == "path", param.name


def test_mid_sigma_defaults_to_the_two_step_sigma_everywhere():
    for function in (cmt.mid_train, cmt.post_train, student_sampler):
        assert inspect.signature(function).parameters["mid_sigma"].default == TWO_STEP_SIGMA
    # cmt-sample takes the student's recorded one (what it was trained and reported with), and a
    # student records student_sampler's
    assert inspect.signature(cmt.sample).parameters["mid_sigma"].default is None


def test_labels_take_random_cycle_class_none():
    assert pick_labels("none", 3, 10).tolist() == [-1] * 3
    assert pick_labels("cycle", 4, 3).tolist() == [0, 1, 2, 0]
    assert pick_labels("7", 2, 10).tolist() == [7, 7]
    with pytest.raises(cmt.ArgumentError, match="none"):
        pick_labels("sometimes", 2, 10)


def test_the_builder_cycles_labels(tmp_path):
    build_trajectories(teacher=gmm_teacher(label_dim=3), out=tmp_path / "s", nfe=2, num_trajectories=5,
                       labels="cycle", progress=False, log=lambda line: None)
    dataset = TrajectoryDataset(tmp_path / "s")
    assert dataset.read_shard(dataset.shards[0])["label"].tolist() == [0, 1, 2, 0, 1]
    assert dataset.manifest["format"] == "zarr" and dataset.manifest["dataset"] == "cmt-trajectories"


def test_version_1_sets_still_read_resume_and_grow(tmp_path):
    old = {"format": "cmt-trajectories", "format_version": 1, "layout": "wds", "count": 3}
    assert upgrade_manifest(old) == {"dataset": "cmt-trajectories", "dataset_version": 2, "format": "wds", "count": 3}
    new = upgrade_manifest(old)
    assert upgrade_manifest(new) == new
    # A set as version 1 wrote it: its JSON files in the old names (and the old hash, of everything).
    options = dict(teacher=gmm_teacher(), nfe=2, shard_size=4, format="wds", progress=False, log=lambda line: None)
    build_trajectories(out=tmp_path / "s", num_trajectories=6, **options)
    for name in ("manifest.json", "build-config.json"):
        record = json.loads((tmp_path / "s" / name).read_text())
        inner = record.get("config", record)
        inner.update({"format": "cmt-trajectories", "format_version": 1, "layout": inner.pop("format")})
        inner.pop("dataset"), inner.pop("dataset_version")
        (tmp_path / "s" / name).write_text(json.dumps(record))
    assert TrajectoryDataset(tmp_path / "s").format == "wds"
    build_trajectories(out=tmp_path / "s", num_trajectories=6, **options)     # resumes: nothing to do
    build_trajectories(out=tmp_path / "s", num_trajectories=9, **options)     # grows
    assert len(TrajectoryDataset(tmp_path / "s")) == 9


# ---- growing a trajectory set ---------------------------------------------------------------------

def test_a_larger_count_extends_a_set_to_what_a_fresh_build_makes(tmp_path):
    options = dict(nfe=3, batch_size=3, shard_size=4, progress=False, log=lambda line: None)
    teacher = gmm_teacher()
    build_trajectories(teacher=teacher, out=tmp_path / "grown", num_trajectories=10, **options)  # last shard: 2
    first = files_of(tmp_path / "grown")
    grown = build_trajectories(teacher=teacher, out=tmp_path / "grown", num_trajectories=17, **options)
    build_trajectories(teacher=teacher, out=tmp_path / "fresh", num_trajectories=17, **options)
    after = files_of(tmp_path / "grown")
    assert after == files_of(tmp_path / "fresh")             # shards, sidecars, build-config and manifest
    assert grown["count"] == 17 and len(TrajectoryDataset(tmp_path / "grown").shards) == 5
    assert after["shard-000000.json"] == first["shard-000000.json"]   # full shards are kept as they were
    assert after["shard-000002.json"] != first["shard-000002.json"]   # the partial one is rebuilt full
    # Anything else that differs is still refused, and so is a smaller set.
    with pytest.raises(cmt.ArgumentError, match="seed") as error:
        build_trajectories(teacher=teacher, out=tmp_path / "grown", num_trajectories=20, seed=1, **options)
    assert error.value.argument == "out"
    with pytest.raises(cmt.ArgumentError, match="only grows") as error:
        build_trajectories(teacher=teacher, out=tmp_path / "grown", num_trajectories=12, **options)
    assert error.value.argument == "num_trajectories"
    assert files_of(tmp_path / "grown") == after


# ---- snapshots, run.json, log names, file modes -----------------------------------------------------

@pytest.fixture
def default_umask():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_snapshots_of_the_ema_model_load_in_cmt_sample(tmp_path, default_umask):
    result = cmt.train_diffusion(out=tmp_path / "run", snapshot_every=2, tensorboard=True, **TOY_TEACHER)
    snapshots = sorted((tmp_path / "run" / "snapshots").iterdir())
    assert [path.name for path in snapshots] == ["snapshot-0000002.json", "snapshot-0000002.safetensors",
                                                 "snapshot-0000004.json", "snapshot-0000004.safetensors"]
    last = load_network(snapshots[-1])
    final = load_network(result["model"])
    assert all(torch.equal(a, b) for a, b in zip(last.state_dict().values(), final.state_dict().values()))
    earlier = load_network(snapshots[1])
    assert any(not torch.equal(a, b) for a, b in zip(earlier.state_dict().values(), final.state_dict().values()))
    drawn = sample(ckpt=snapshots[1], out=tmp_path / "snap.png", steps=2, num_samples=8, progress=False)
    assert drawn["samples"].shape == (8, 2) and (tmp_path / "snap.png").is_file()
    # Every output follows the umask like a file made by open() (save_file alone makes it 0600).
    for path in (result["model"], snapshots[1], result["state"], tmp_path / "run" / "run.json"):
        assert path.stat().st_mode & 0o777 == 0o644, path
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["num_processes"] == 1 and run["versions"]["torch"] == torch.__version__
    assert run["versions"]["cmt"] == cmt.__version__
    records = read_log(tmp_path / "run")
    assert records[-1][IMAGES_SEEN] == 4 * 16 and "images" not in records[-1]
    # TensorBoard: the sample picture and the metric curve, not only the training scalars.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert "samples/samples" in events.Tags()["images"]
    assert {"metrics/energy_distance", "train/loss", f"train/{IMAGES_SEEN}"} <= set(events.Tags()["scalars"])


def test_an_old_log_reads_with_the_new_name(tmp_path):
    (tmp_path / "log.jsonl").write_text(json.dumps({"step": 2, "loss": 1.0, "images": 32}) + "\n")
    assert read_log(tmp_path) == [{"step": 2, "loss": 1.0, IMAGES_SEEN: 32}]


def test_cmt_sample_writes_a_readable_mode_and_a_summary(tmp_path, default_umask):
    code, output = invoke_command(sample_main, "--ckpt", "toy:moons", "--steps", 2, "--num-samples", 30,
                                  "--out", tmp_path / "p.png", "--npz", tmp_path / "p.npz", "--no-progress")
    assert code == 0, output
    assert f"wrote {tmp_path / 'p.npz'}" in output and f"wrote {tmp_path / 'p.png'}" in output
    assert "energy_distance" in output
    assert (tmp_path / "p.npz").stat().st_mode & 0o777 == 0o644


# ---- pictures ---------------------------------------------------------------------------------------

def test_a_grid_of_mnist_digits_is_readable_and_capped(tmp_path):
    digits = torch.rand(100, 1, 16, 16) * 2 - 1
    path = save_samples(digits, tmp_path / "grid.png")
    # 64 of the 100 digits, 8 x 8, each 16 px enlarged 4x to 64 px, 2 px apart (146 x 146 before).
    assert Image.open(path).size == (8 * 66 + 2, 8 * 66 + 2)
    pixels = np.asarray(Image.open(path))
    cell = pixels[2:66, 2:66]
    expected = ((digits[0, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    np.testing.assert_array_equal(cell[::4, ::4], expected)      # nearest neighbour: 4 x 4 blocks
    np.testing.assert_array_equal(cell[1::4, 3::4], expected)


def test_trajectory_columns_are_labelled_with_their_sigma(tmp_path):
    sigmas = [80.0, 2.5, 0.002]
    states = torch.zeros(2 * 3, 1, 8, 8)
    image, layout = grid_with_layout(states, nrow=3, scale=8, column_labels=[f"s={s:.3g}" for s in sigmas])
    assert layout["column_labels"] == ["s=80", "s=2.5", "s=0.002"] and layout["header"] == LABEL_HEIGHT
    strip = np.asarray(image)[:LABEL_HEIGHT]
    for column in range(3):   # ink in every column's label, none in the white gap between them
        left = 2 + column * 66
        assert (strip[:, left:left + 64] < 128).any(), column
    unlabelled, plain = grid_with_layout(states, nrow=3, scale=8)
    assert plain["header"] == 0 and image.size[1] == unlabelled.size[1] + LABEL_HEIGHT
    # cmt-inspect's image previews use it.
    out = tmp_path / "s"
    build_trajectories(teacher=gmm_teacher(data_shape=(1, 4, 4)), out=out, nfe=2, num_trajectories=3,
                       progress=False, log=lambda line: None)
    preview = cmt.inspect_trajectories(out, preview=tmp_path / "p.png", preview_count=3)["preview"]
    assert Image.open(preview).size == (3 * 66 + 2, LABEL_HEIGHT + 3 * 66 + 2)
    assert (np.asarray(Image.open(preview).convert("L"))[:LABEL_HEIGHT] < 128).any()


def test_toy_scatter_plots_have_a_title_a_legend_and_the_metric():
    points = torch.randn(200, 2)
    figure = scatter_figure(points, reference=torch.randn(300, 2), title="teacher: energy distance 0.0004")
    assert figure._suptitle.get_text() == "teacher: energy distance 0.0004"
    legend = figure.axes[0].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == ["reference (300)", "samples (200)"]


# ---- several processes --------------------------------------------------------------------------------

# Both commands in one launch (one start-up of the two processes): cmt-sample, then cmt-eval.
TWO_COMMANDS = """
import sys
from cmt.cli.evaluate import main as evaluate
from cmt.cli.sample import main as sample
sample(sys.argv[1].split("|"), standalone_mode=False)
evaluate(sys.argv[2].split("|"), standalone_mode=False)
"""


def test_two_processes_share_sampling_and_evaluation_and_match_one(tmp_path):
    torch.manual_seed(0)
    # A consistency network: its 2 steps re-noise, from noise of each sample's own seed.
    student = save_network(tmp_path / "student.safetensors", build_network(TEACHER))
    sample_args = ["--ckpt", student, "--sampler", "flowmap", "--steps", 2, "--num-samples", 37, "--batch-size", 8,
                   "--no-progress", "--out", tmp_path / "two.png", "--npz", tmp_path / "two.npz"]
    # FD-MNIST of 1500 digit-shaped samples: two feature batches, one per rank.
    generator = torch.Generator().manual_seed(1)
    np.savez(tmp_path / "digits.npz", samples=(torch.rand(1500, 1, 16, 16, generator=generator) * 2 - 1).numpy())
    eval_args = ["--samples", tmp_path / "digits.npz", "--data", "mnist", "--json"]
    script = tmp_path / "two_commands.py"
    script.write_text(TWO_COMMANDS)
    result = subprocess.run([*TWO_CPU_PROCESSES, str(script), "|".join(map(str, sample_args)),
                             "|".join(map(str, eval_args))], capture_output=True, text=True, env=TWO_CPU_ENV,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("cmt-sample:") == 1       # rank 0 speaks (and writes) for both
    one = sample(ckpt=student, sampler="flowmap", steps=2, num_samples=37, batch_size=8, progress=False,
                 out=tmp_path / "one.png", npz=tmp_path / "one.npz")
    saved = np.load(tmp_path / "two.npz")
    np.testing.assert_array_equal(saved["samples"], one["samples"].numpy())
    np.testing.assert_array_equal(saved["seeds"], np.arange(37))
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    alone = evaluate(samples=tmp_path / "digits.npz", data="mnist")["metrics"]["fd_mnist"]
    assert json.loads(lines[0])["fd_mnist"] == alone


def test_each_rank_computes_only_its_batches(monkeypatch):
    class Rank1Of2:
        process_index, num_processes = 1, 2

    calls = []
    # gather_object of the other rank's batches 0 and 2 (what rank 0 would send).
    monkeypatch.setattr(cmt.distributed, "gather_object",
                        lambda mine: [(0, "b0"), (2, "b2"), *mine])
    results = cmt.distributed.map_batches(lambda start, stop: calls.append((start, stop)) or f"b{start // 4}", 14, 4,
                                          state=Rank1Of2())
    assert calls == [(4, 8), (12, 14)]
    assert results == ["b0", "b1", "b2", "b3"]
