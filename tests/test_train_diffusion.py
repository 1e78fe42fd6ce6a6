"""train_diffusion, the shared loop and the cmt-train command: learning, exact resume, 2 processes,
clean errors, one source of defaults."""
import inspect
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from conftest import TWO_CPU_ENV, TWO_CPU_PROCESSES, command_line

from cmt.checkpoint import load_network
from cmt.cli.train import main
from cmt.datasets import reference_sample, sample_toy
from cmt.errors import ArgumentError
from cmt.labels import pick_labels
from cmt.metrics import energy_distance
from cmt.networks import build_network
from cmt.sampling import generate
from cmt.trainers import loop, run_files, schedules
from cmt.trainers.config import TRAIN_DEFAULTS, TrainConfig
from cmt.trainers.batches import RandomBatches
from cmt.trainers.diffusion import DIFFUSION_DEFAULTS, diffusion_loss, train_diffusion
from cmt.trainers.mid import MID_DEFAULTS, mid_train
from cmt.trainers.post import METHODS, POST_DEFAULTS, post_train

TINY_EDM2 = dict(data="mnist", resolution=8, channels=8, channel_mult=(1, 2), num_blocks=1, attn_res=(), batch_size=8,
                 num_samples=0, progress=False)
TINY_MLP = dict(channels=64, num_blocks=2, progress=False)


def losses(out):
    return [record["loss"] for record in run_files.read_log(out)]


def fixed_batch_loss(net, data="8gaussians", n=4096):
    """The weighted denoising error on one fixed batch (same points, sigmas and noise every call)."""
    ctx = SimpleNamespace(generator=torch.Generator().manual_seed(1), device=torch.device("cpu"))
    batch = {"data": sample_toy(data, n, torch.Generator().manual_seed(0)), "label": torch.full((n,), -1)}
    with torch.no_grad():
        return float(diffusion_loss(net, batch, ctx, label_dim=0, uncertainty=False).mean())


def test_loss_decreases_and_samples_improve_on_8gaussians(tmp_path):
    out = tmp_path / "run"
    result = train_diffusion(data="toy:8gaussians", out=out, **TINY_MLP, max_steps=300, batch_size=256, lr=3e-3,
                             log_every=1, num_samples=2000)
    assert result["model"] == out / "teacher.safetensors" and result["log"] == out / run_files.LOG_FILE
    assert result["state"] == out / run_files.STATE_FILE and result["state"].is_file()
    assert result["metrics"] == run_files.read_log(out)[-1]
    history = torch.tensor(losses(out))
    assert len(history) == 300 and torch.isfinite(history).all()
    assert history[-100:].mean() < history[:25].mean() - 0.04, history

    teacher = load_network(out / "teacher.safetensors")
    fresh = build_network(teacher.config).eval()
    assert fixed_batch_loss(teacher) < 0.9 * fixed_batch_loss(fresh)
    seeds, labels = list(range(2000)), pick_labels("random", 2000, 0)
    reference = reference_sample("8gaussians")
    trained_ed = energy_distance(generate(teacher, seeds, labels, steps=16), reference)
    fresh_ed = energy_distance(generate(fresh, seeds, labels, steps=16), reference)
    assert trained_ed < 0.01 and trained_ed < fresh_ed / 5, (trained_ed, fresh_ed)
    logged = run_files.read_log(out)[-1]
    assert logged["step"] == 300 and logged["energy_distance"] < 0.01
    assert (out / "samples" / "step-0000300.png").is_file()
    assert json.loads((out / "teacher.json").read_text())["extra"]["data"] == "toy:8gaussians"


def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path):
    # Dropout and label dropout draw from the per-step generators, data from the stream's state.
    common = dict(TINY_EDM2, dropout=0.2, label_dropout=0.2, log_every=1, lr_schedule="invsqrt", lr_ref_steps=3)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train_diffusion(out=straight, max_steps=8, ckpt_every=4, **common)
    train_diffusion(out=interrupted, max_steps=4, **common)
    first_half = losses(interrupted)
    train_diffusion(out=interrupted, max_steps=8, resume=True, **common)
    assert losses(interrupted) == losses(straight)
    assert losses(interrupted)[:4] == first_half
    a = load_network(straight / "teacher.safetensors").state_dict()
    b = load_network(interrupted / "teacher.safetensors").state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)
    state = torch.load(straight / run_files.STATE_FILE, weights_only=True)
    assert state["step"] == 8 and len(state["data"]) == 1


def test_existing_run_is_not_overwritten_and_resume_needs_a_state(tmp_path):
    out = tmp_path / "run"
    train_diffusion(out=out, max_steps=2, **TINY_EDM2)
    before = (out / run_files.STATE_FILE).read_bytes()
    with pytest.raises(ArgumentError) as error:
        train_diffusion(out=out, max_steps=2, **TINY_EDM2)
    assert error.value.argument == "resume"
    args = command_line(dict(TINY_EDM2, max_steps=2))
    again = CliRunner().invoke(main, ["diffusion", "--out", str(out), *args])
    assert again.exit_code == 2 and "--resume" in again.output
    assert (out / run_files.STATE_FILE).read_bytes() == before
    missing = CliRunner().invoke(main, ["diffusion", "--out", str(tmp_path / "none"), "--resume", *args])
    assert missing.exit_code == 2 and "no training-state.pt" in missing.output


@pytest.mark.parametrize("data, message", [("toy:nosuch", "unknown toy distribution"),
                                           ("nosuch/folder", "no such file or folder")])
def test_bad_data_is_a_clean_usage_error(tmp_path, data, message):
    result = CliRunner().invoke(main, ["diffusion", "--data", data, "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "--data" in result.output and message in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "x").exists()


def test_bad_batch_split_is_a_clean_error(tmp_path):
    result = CliRunner().invoke(main, ["diffusion", "--data", "toy:moons", "--out", str(tmp_path / "x"),
                                       "--batch-size", "9", "--grad-accum", "2"])
    assert result.exit_code == 2 and "--batch-size" in result.output


def test_bad_trainer_options_name_their_keyword(tmp_path):
    for options, argument in ((dict(max_steps=0), "max_steps"), (dict(lr_schedule="cosine"), "lr_schedule"),
                              (dict(batch_size=9, grad_accum=2), "batch_size"), (dict(arch="vit"), "arch")):
        with pytest.raises(ArgumentError) as error:
            train_diffusion(data="toy:moons", out=tmp_path / "x", **options)
        assert error.value.argument == argument
    with pytest.raises(TypeError, match="max_step"):
        train_diffusion(data="toy:moons", out=tmp_path / "x", max_step=3)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("command, function, phase_defaults", [("diffusion", train_diffusion, DIFFUSION_DEFAULTS),
                                                                ("mid", mid_train, MID_DEFAULTS),
                                                                ("post", post_train, POST_DEFAULTS)])
def test_command_options_are_the_entry_point_keywords_with_its_defaults(command, function, phase_defaults):
    """One source of defaults: every cmt-train flag is a keyword of the library function (or a
    TrainConfig field) and defaults to what the function does without it."""
    params = {param.name: param for param in main.commands[command].params if param.name != "help"}
    keywords = {name: parameter for name, parameter in inspect.signature(function).parameters.items()
                if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name != "resolved_options"}
    # post: each method's own options come from its table; left out, they are the chosen method's default
    methods = {name for method in METHODS.values() for name in method.options} if command == "post" else set()
    assert set(params) == set(keywords) | set(TRAIN_DEFAULTS) | {"out"} | methods
    train_defaults = {**TRAIN_DEFAULTS, **phase_defaults}
    for name, param in params.items():
        if name in methods:
            assert param.default is None and not param.required, name
        elif name in keywords and keywords[name].default is inspect.Parameter.empty:
            assert param.required, name
        else:
            default = keywords[name].default if name in keywords else train_defaults[name]
            assert param.default == default, name
            assert not param.required, name


def test_schedules_and_ema():
    config = TrainConfig(out=Path("."), lr=1.0, max_steps=100, lr_schedule="invsqrt", lr_ref_steps=10,
                              warmup_steps=4, batch_size=10, ema_halflife_images=100, ema_rampup_ratio=None)
    assert [schedules.learning_rate(config, step) for step in (0, 3, 10, 40)] == [0.25, 1.0, 1.0, 0.5]
    config.lr_schedule, config.warmup_steps = "linear", 0
    assert schedules.learning_rate(config, 75) == pytest.approx(0.25)
    assert schedules.ema_beta(config, 0) ** 10 == pytest.approx(0.5)   # half-life of 100 images = 10 steps


def test_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    env = TWO_CPU_ENV
    command = [*TWO_CPU_PROCESSES, "-m", "cmt.cli.train", "diffusion", "--data", "toy:moons", "--out", str(out),
               "--max-steps", "6", "--batch-size", "32", "--log-every", "2", "--eval-num", "64", *command_line(TINY_MLP)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    records = run_files.read_log(out)
    assert [record["step"] for record in records] == [2, 4, 6]
    assert "energy_distance" in records[-1]
    state = torch.load(out / run_files.STATE_FILE, weights_only=True)
    # Each rank drew its own data: two different stream states were gathered onto rank 0.
    assert len(state["data"]) == 2
    assert not torch.equal(state["data"][0]["generator"], state["data"][1]["generator"])
    assert load_network(out / "teacher.safetensors").config["architecture"] == "mlp"


def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    """A custom objective over a custom stream: the loop's plug-in interface, and its guard."""
    config = TrainConfig(out=tmp_path / "guard", max_steps=6, batch_size=16, lr=1e-2, log_every=1,
                              ema_beta=0.0, progress=False)
    trainer = loop.Trainer(config)
    net = build_network(dict(architecture="mlp", data_shape=[2], width=16, num_blocks=1))
    snapshots = {}

    def objective(net, batch, ctx):
        snapshots[ctx.step] = [p.detach().clone() for p in net.parameters()]
        loss = (net(batch["data"], 1.0) - batch["data"]).square().mean(dim=1)
        return loss * (float("nan") if ctx.step in (2, 3) else 1.0), {"step_seen": torch.tensor(float(ctx.step))}

    batches = RandomBatches(lambda n, g: {"data": sample_toy("moons", n, g)}, trainer.micro_batch_size,
                                 trainer.seed_for(0))
    ema = trainer.fit(net, objective, batches)
    records = run_files.read_log(tmp_path / "guard")
    assert [record["skipped"] for record in records] == [0, 0, 1, 2, 2, 2]
    assert [record["step_seen"] for record in records] == [0, 1, 2, 3, 4, 5]
    # The skipped steps left the weights alone; the others changed them.
    assert all(torch.equal(a, b) for a, b in zip(snapshots[3], snapshots[4]))
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2]))
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), net.parameters()))   # ema_beta 0
