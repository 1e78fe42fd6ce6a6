"""cmt-train: one command per phase (`diffusion`, `mid`, `post`), each a thin layer over its library
function (`cmt.train_diffusion`, `cmt.mid_train`, `cmt.post_train`).

Every default comes from the library: a phase option's from its function's signature, a trainer
option's from `TRAIN_DEFAULTS` with the phase's overrides (`DIFFUSION_DEFAULTS`, ...), so
`--help` shows what the function does when the option is left out.
"""
import functools
import inspect
import json
import os
import time
from pathlib import Path

import click
from click.core import ParameterSource

from cmt.cli.common import (CONTEXT_SETTINGS, WithAliases, file_error_message, flag_for, run_summary, summary,
                            table_options, translate_errors)
from cmt.errors import ArgumentError, CmtError, PeerFailed
from cmt.manifest import VERIFY_MODES
from cmt.solvers import SOLVERS
from cmt.trainers import recipes
from cmt.trainers.config import LR_SCHEDULES, MIXED_PRECISIONS, OPTIMIZERS, TRAIN_DEFAULTS, TRAIN_HELP
from cmt.trainers.precision import TF32_SETTINGS
from cmt.networks import learning_rates
from cmt.trainers.data import PRETRAINING_ARCHITECTURES, STREAM_HELP, STUDENT_ARCHITECTURES
from cmt.trainers.diffusion import DIFFUSION_DEFAULTS, DIFFUSION_HELP, train_diffusion
from cmt.trainers.distances import DISTANCES
from cmt.trainers.mid import MID_DEFAULTS, MID_HELP, OBJECTIVES as MID_TARGETS, mid_train
from cmt.trainers.post import METHODS, POST_DEFAULTS, POST_HELP, post_train
from cmt.trainers.students import STUDENT_INITS

COMMAND_SETTINGS = CONTEXT_SETTINGS


class CountOrAuto(click.ParamType):
    """A count >= 0, or "auto"."""
    name = "auto|N"

    def convert(self, value, param, ctx):
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return value
        try:
            count = int(value)
        except (TypeError, ValueError):
            count = -1
        if count < 0:
            self.fail(f"{value!r} is neither 'auto' nor a count >= 0", param, ctx)
        return count


class NumberList(click.ParamType):
    """Comma-separated numbers of one kind (float or int), as a tuple."""

    def __init__(self, kind):
        self.kind = kind
        self.name = "X,X,..." if kind is float else "N,N,..."

    def convert(self, value, param, ctx):
        if isinstance(value, (tuple, list)):
            return tuple(value)
        try:
            return tuple(self.kind(part) for part in value.split(",") if part.strip())
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of "
                      f"{'numbers' if self.kind is float else 'integers'}", param, ctx)


def as_a_launched_process(command):
    """Inside `translate_errors`: a process that stops because another process of the run failed
    (`PeerFailed`) exits 1 printing nothing, since the failing process's own line is the one to read;
    a clean error of a launched process (accelerate launch, torchrun: `TORCHELASTIC_ERROR_FILE` is set)
    is also written to the launcher's error file, so the launcher's failure report quotes that line
    instead of pointing to a traceback."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except PeerFailed:
            raise SystemExit(1) from None
        except (ArgumentError, CmtError, OSError) as error:
            if isinstance(error, ArgumentError):
                line = f"{flag_for(error.argument)}: {error.message}"
            else:
                line = file_error_message(error) if isinstance(error, OSError) else str(error)
            where = os.environ.get("TORCHELASTIC_ERROR_FILE")
            if where and line:
                try:
                    Path(where).write_text(json.dumps({"message": f"Error: {line}", "timestamp": int(time.time())}))
                except OSError:
                    pass   # the report is a courtesy; the line itself is printed anyway
            raise
    return wrapper


def defaults_of(function):
    """The default of every keyword argument of `function` that has one."""
    return {name: parameter.default for name, parameter in inspect.signature(function).parameters.items()
            if parameter.default is not inspect.Parameter.empty}


def per_architecture(rates):
    return ", ".join(f"{arch} {rate:g}" for arch, rate in rates.items())


def trainer_options(phase_defaults, lr_by_arch):
    """The click options every `cmt-train` command shares, one per `TrainConfig` field, with the
    defaults of `TRAIN_DEFAULTS` overridden by the phase's and the help of `TRAIN_HELP`; an lr
    default of None means the phase's rate per architecture, `lr_by_arch`."""
    defaults = {**TRAIN_DEFAULTS, **phase_defaults}

    def option(name, kind=None, *aliases, help_suffix="", **settings):
        flag = "--" + name.replace("_", "-")
        if kind is not None:
            settings["type"] = kind
        if name != "out":
            settings.setdefault("default", defaults[name])
        return click.option(flag, *aliases, name, help=TRAIN_HELP[name] + help_suffix, **settings)

    lr_default = (f" [default: per architecture: {per_architecture(lr_by_arch)}]" if defaults["lr"] is None else "")
    options = [
        option("out", click.Path(file_okay=False, path_type=Path), required=True),
        option("max_steps", click.IntRange(min=1)),
        option("batch_size", click.IntRange(min=1)),
        option("lr", click.FloatRange(min=0, min_open=True), help_suffix=lr_default),
        option("lr_schedule", click.Choice(LR_SCHEDULES)),
        option("lr_ref_steps", click.IntRange(min=1)),
        option("warmup_steps", click.IntRange(min=0)),
        option("optimizer", click.Choice(list(OPTIMIZERS))),
        option("betas", (float, float)),
        option("weight_decay", click.FloatRange(min=0)),
        option("grad_clip", click.FloatRange(min=0, min_open=True)),
        option("ema_halflife_images", click.FloatRange(min=0), "--ema-halflife"),
        option("ema_rampup_ratio", click.FloatRange(min=0, min_open=True)),
        option("ema_std", NumberList(float)),
        option("ema_beta", click.FloatRange(0, 1, max_open=True)),
        option("mixed_precision", click.Choice(MIXED_PRECISIONS)),
        option("tf32", click.Choice(TF32_SETTINGS)),
        option("grad_accum", click.IntRange(min=1)),
        option("seed", click.IntRange(min=0)),
        option("log_every", click.IntRange(min=1)),
        option("ckpt_every", click.IntRange(min=1)),
        option("sample_every", click.IntRange(min=0)),
        option("snapshot_every", click.IntRange(min=0)),
        option("resume", is_flag=True),
        option("resume_new_data", is_flag=True),
        option("tensorboard", is_flag=True),
        click.option("--progress/--no-progress", default=defaults["progress"], help=TRAIN_HELP["progress"]),
        option("max_nonfinite_steps", click.IntRange(min=0)),
    ]

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command
    return decorate


def given_options(options):
    """The options given on the command line (or by environment): what overrides a recipe. Options
    left at their default are dropped, so the library fills them from the recipe, else its defaults."""
    ctx = click.get_current_context()
    return {name: value for name, value in options.items()
            if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)}


def recipe_option(phase):
    return click.option("--recipe", type=click.Choice(recipes.recipe_names(phase)), default=None,
                        help=recipes.recipe_help(phase))


@click.group(context_settings=CONTEXT_SETTINGS)
def main():
    """Train a diffusion teacher (diffusion), mid-train a student on teacher trajectories (mid),
    or post-train it with ECT / ECD / MeanFlow (post)."""


def data_options(defaults):
    """--xflip / --workers: how a streamed data set (image files, a latent set) is drawn."""
    def decorate(function):
        function = click.option("--workers", type=CountOrAuto(), default=defaults["workers"], show_default=True,
                                help=STREAM_HELP["workers"])(function)
        return click.option("--xflip/--no-xflip", default=None, help=STREAM_HELP["xflip"])(function)
    return decorate


DIFFUSION = defaults_of(train_diffusion)


@main.command("diffusion", context_settings=COMMAND_SETTINGS)
@click.option("--data", required=True, help=DIFFUSION_HELP["data"])
@click.option("--resolution", type=click.IntRange(min=4), default=DIFFUSION["resolution"],
              help=DIFFUSION_HELP["resolution"])
@data_options(DIFFUSION)
@click.option("--arch", type=click.Choice(PRETRAINING_ARCHITECTURES), default=DIFFUSION["arch"],
              help=DIFFUSION_HELP["arch"])
@click.option("--channels", type=click.IntRange(min=1), default=DIFFUSION["channels"], help=DIFFUSION_HELP["channels"])
@click.option("--channel-mult", type=NumberList(int), default=DIFFUSION["channel_mult"],
              help=DIFFUSION_HELP["channel_mult"])
@click.option("--num-blocks", type=click.IntRange(min=1), default=DIFFUSION["num_blocks"],
              help=DIFFUSION_HELP["num_blocks"])
@click.option("--attn-res", type=NumberList(int), default=DIFFUSION["attn_res"], help=DIFFUSION_HELP["attn_res"])
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=DIFFUSION["dropout"],
              help=DIFFUSION_HELP["dropout"])
@click.option("--cond/--uncond", default=DIFFUSION["cond"], help=DIFFUSION_HELP["cond"])
@click.option("--label-dropout", type=click.FloatRange(0, 1), default=DIFFUSION["label_dropout"],
              help=DIFFUSION_HELP["label_dropout"])
@click.option("--p-mean", type=float, default=DIFFUSION["p_mean"], help=DIFFUSION_HELP["p_mean"])
@click.option("--p-std", type=click.FloatRange(min=0, min_open=True), default=DIFFUSION["p_std"],
              help=DIFFUSION_HELP["p_std"])
@click.option("--uncertainty/--no-uncertainty", default=DIFFUSION["uncertainty"], help=DIFFUSION_HELP["uncertainty"])
@click.option("--sample-solver", type=click.Choice(sorted(SOLVERS)), default=DIFFUSION["sample_solver"],
              help=DIFFUSION_HELP["sample_solver"])
@click.option("--sample-steps", type=click.IntRange(min=1), default=DIFFUSION["sample_steps"],
              help=DIFFUSION_HELP["sample_steps"])
@click.option("--num-samples", "--eval-num", "num_samples", cls=WithAliases, type=click.IntRange(min=0),
              default=DIFFUSION["num_samples"], help=DIFFUSION_HELP["num_samples"])
@recipe_option("diffusion")
@trainer_options(DIFFUSION_DEFAULTS, learning_rates("diffusion"))
@translate_errors
@as_a_launched_process
def diffusion(**options):
    """Pre-train a diffusion teacher (EDM2 objective); writes OUT/teacher.safetensors (EMA weights)."""
    summary(run_summary("cmt-train diffusion", train_diffusion(**given_options(options))))


MID = defaults_of(mid_train)


@main.command("mid", context_settings=COMMAND_SETTINGS)
@click.option("--data", required=True, help=MID_HELP["data"])
@click.option("--target", type=click.Choice(list(MID_TARGETS)), default=MID["target"], help=MID_HELP["target"])
@click.option("--loss", type=click.Choice(DISTANCES), default=MID["loss"], help=MID_HELP["loss"])
@click.option("--huber-c", type=click.FloatRange(min=0), default=MID["huber_c"], help=MID_HELP["huber_c"])
@click.option("--lpips-resize", type=click.IntRange(min=16), default=MID["lpips_resize"], help=MID_HELP["lpips_resize"])
@click.option("--elatentlpips-augment", default=MID["elatentlpips_augment"], help=MID_HELP["elatentlpips_augment"])
@click.option("--teacher", default=MID["teacher"], help=MID_HELP["teacher"])
@click.option("--student-init", type=click.Choice(STUDENT_INITS), default=MID["student_init"],
              help=MID_HELP["student_init"])
@click.option("--velocity-share", type=click.FloatRange(0, 1, max_open=True), default=MID["velocity_share"],
              help=MID_HELP["velocity_share"])
@click.option("--states-per-trajectory", default=MID["states_per_trajectory"], help=MID_HELP["states_per_trajectory"])
@click.option("--max-trajectories", type=click.IntRange(min=1), default=MID["max_trajectories"],
              help=MID_HELP["max_trajectories"])
@click.option("--dropout", type=click.FloatRange(0, 1), default=MID["dropout"], help=MID_HELP["dropout"])
@click.option("--workers", type=CountOrAuto(), default=MID["workers"], help=MID_HELP["workers"])
@click.option("--cache-gb", type=click.FloatRange(min=0), default=MID["cache_gb"], help=MID_HELP["cache_gb"])
@click.option("--verify", type=click.Choice(VERIFY_MODES), default=MID["verify"], show_default=True,
              help=MID_HELP["verify"])
@click.option("--eval-data", default=MID["eval_data"], help=MID_HELP["eval_data"])
@click.option("--num-samples", type=click.IntRange(min=1), default=MID["num_samples"], help=MID_HELP["num_samples"])
@click.option("--mid-sigma", type=click.FloatRange(min=0, min_open=True), default=MID["mid_sigma"],
              help=MID_HELP["mid_sigma"])
@recipe_option("mid")
@trainer_options(MID_DEFAULTS, learning_rates("mid"))
@translate_errors
@as_a_launched_process
def mid(**options):
    """CMT mid-training: regress a student onto the stored teacher trajectories -> OUT/mid.pt."""
    summary(run_summary("cmt-train mid", mid_train(**given_options(options))))


POST = defaults_of(post_train)
# Every post-training method's own options, each with the methods that take it.
METHOD_OPTIONS = {}
for _method in METHODS.values():
    for _name, _option in _method.options.items():
        METHOD_OPTIONS.setdefault(_name, {})[_method.name] = _option


@main.command("post", context_settings=COMMAND_SETTINGS)
@click.option("--init", default=POST["init"], help=POST_HELP["init"])
@click.option("--method", type=click.Choice(list(METHODS)), default=None, help=POST_HELP["method"])
@click.option("--data", required=True, help=POST_HELP["data"])
@click.option("--teacher", default=POST["teacher"], help=POST_HELP["teacher"])
@click.option("--arch", type=click.Choice(STUDENT_ARCHITECTURES), default=POST["arch"], help=POST_HELP["arch"])
@click.option("--guidance", default=POST["guidance"], help=POST_HELP["guidance"])
@click.option("--guide-ckpt", default=POST["guide_ckpt"], help=POST_HELP["guide_ckpt"])
@click.option("--dropout", type=click.FloatRange(0, 1), default=POST["dropout"], help=POST_HELP["dropout"])
@click.option("--dropout-res", type=click.IntRange(min=1), default=POST["dropout_res"], help=POST_HELP["dropout_res"])
@click.option("--resolution", type=click.IntRange(min=4), default=POST["resolution"],
              help=POST_HELP["resolution"])
@data_options(POST)
@click.option("--eval-data", default=POST["eval_data"], help=POST_HELP["eval_data"])
@click.option("--num-samples", type=click.IntRange(min=1), default=POST["num_samples"], help=POST_HELP["num_samples"])
@click.option("--mid-sigma", type=click.FloatRange(min=0, min_open=True), default=POST["mid_sigma"],
              help=POST_HELP["mid_sigma"])
@table_options(METHOD_OPTIONS)
@recipe_option("post")
@trainer_options(POST_DEFAULTS, learning_rates("post"))
@translate_errors
@as_a_launched_process
def post(**options):
    """Post-train a student with a post-training method (ECT, ECD, MeanFlow) -> OUT/post.pt (1- and 2-step sampling)."""
    summary(run_summary("cmt-train post", post_train(**given_options(options))))


if __name__ == "__main__":
    main()
