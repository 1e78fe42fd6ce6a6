"""The whole pipeline on built-in data: `run_demo(out=..., data="mnist" | "toy:NAME")`, the library of
`python -m cmt.cli.demo`.

Stages, each one or more calls of the project's entry points (the report lists the equivalent
commands, so any stage can be re-run by hand):

1. teacher: the built-in one, or `cmt.train_diffusion` with its recipe (`train_teacher=True`);
2. build: `cmt.build_trajectories`, DPM-Solver++(3M) trajectories of 16 steps into OUT/shards;
3. mid: `cmt.mid_train(target="endpoint")` from the teacher's weights (CMT-CM) into OUT/mid;
4. post: `cmt.post_train(method="ect")` from the mid-trained weights, at one fixed late curriculum
   stage as the paper does, into OUT/post;
5. sample: `cmt.sample` for the teacher (16 steps, and 1 and 2 steps for scale) and both students
   (1 and 2 steps), all from the same noise and labels, into OUT/samples/*.npz;
6. evaluate + report: `cmt.evaluate` (the built-in metric), the per-sample distance of every sample
   to the teacher's 16-step sample from the same noise, OUT/report.md.

A re-run with the same OUT reuses every finished stage whose calls are unchanged (OUT/stages.json
records them as commands), resumes an interrupted one, and runs a stage again from scratch when its
calls or an earlier stage changed; `fresh=True` starts over.

One module of ~420 lines: the six stages, the report that reads them and the keyword table of the
entry point are one demo, read top to bottom.
"""
import inspect
import json
import resource
import shlex
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from cmt.builders.build import build_trajectories
from cmt.datasets import resolve_data
from cmt.edm import TWO_STEP_SIGMA
from cmt.errors import ArgumentError
from cmt.evaluation import evaluate, load_samples
from cmt.flags import command_words, renamed_keywords
from cmt.metrics import embedded_metric
from cmt.options import document_keywords
from cmt.outputs import write_text
from cmt.sampling import metric_title, sample, save_samples
from cmt.stages import Call
from cmt.teachers import BUILTIN_TEACHERS, builtin_teacher_path
from cmt.trainers.diffusion import TEACHER_RECIPES, train_diffusion
from cmt.trainers.mid import mid_train
from cmt.trainers.post import post_train
from cmt.trainers.recipes import RECIPES

DATA_CHOICES = [name for name in BUILTIN_TEACHERS if name in TEACHER_RECIPES]
STAGES_FILE = "stages.json"
DEMO_COMMAND = "python -m cmt.cli.demo"


@dataclass
class Settings:
    """Sizes of every stage; the defaults per data kind are measured to fit a 2-core CPU."""
    trajectories: int
    mid_steps: int
    mid_batch: int
    mid_lr: float
    post_steps: int
    post_batch: int
    post_lr: float
    ect_stage: int          # fixed ECT curriculum stage of post-training
    eval_num: int           # samples per model for the metrics
    log_every: int = 50


def _recipe_settings(recipe, **sizes):
    """The demo's sizes of a data kind, its training settings those of the project's recipe."""
    mid, post = RECIPES[recipe]["mid"], RECIPES[recipe]["post"]["ect"]
    return Settings(mid_steps=mid["max_steps"], mid_batch=mid["batch_size"], mid_lr=mid["lr"],
                    post_steps=post["max_steps"], post_batch=post["batch_size"], post_lr=post["lr"],
                    ect_stage=post["stage"], **sizes)


# The training settings are the recipes `mnist` and `toy` (cmt.trainers.recipes), which the stages
# also name, so the commands of the report repeat them.
SETTINGS = {
    "mnist": _recipe_settings("mnist", trajectories=2000, eval_num=2000),
    "toy": _recipe_settings("toy", trajectories=4000, eval_num=4096, log_every=100),
}
MIN_EVAL_NUM = 20
# (name in files, model, sampler steps): the teacher's 16-step samples are the reference of the
# distance column; its 1- and 2-step samples show what the students improve on.
SAMPLES = [("teacher_16step", "teacher", 16), ("teacher_1step", "teacher", 1), ("teacher_2step", "teacher", 2),
           ("mid_1step", "mid", 1), ("mid_2step", "mid", 2), ("post_1step", "post", 1), ("post_2step", "post", 2)]
GRIDS = ["teacher_16step", "mid_1step", "mid_2step", "post_1step", "post_2step"]
TITLES = {"teacher": "teacher (DPM-Solver++ 3M)", "mid": "mid-trained (CMT)", "post": "post-trained (ECT)"}


def _cpu_seconds():
    """CPU time of this process and its finished children (data-loader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class DemoRun:
    out: Path
    data: str = "mnist"
    settings: Settings | None = None
    train_teacher: bool = False
    seed: int = 0
    threads: int | None = None
    fresh: bool = False
    progress: bool = True
    command: str = DEMO_COMMAND                       # how the demo was called, for the report
    log: Callable = print
    teacher: str = ""                                 # what the build's `teacher` / sampling's `ckpt` take
    records: dict = field(default_factory=dict)       # {stage: {"commands", "wall_s", "cpu_s", "reused"}}
    changed: bool = False                             # an earlier stage ran: later ones must run again
    metrics: dict = field(default_factory=dict)       # {sample name: {metric: value}}

    def __post_init__(self):
        self.out = Path(self.out)
        if self.settings is None:
            self.settings = SETTINGS[data_kind(self.data)]

    def path(self, *parts):
        return self.out.joinpath(*parts)


def data_kind(data):
    return "toy" if data.startswith("toy:") else "mnist"


def run_stage(run, name, calls, folder):
    """Make each call unless the outputs of all of them exist from the same calls.

    Calls that differ from the recorded ones, or an earlier stage that ran, clear `folder` first;
    otherwise an unfinished stage resumes (the builder by itself, trainers with `resume=True`).
    """
    lines = [call.command() for call in calls]
    record = run.records.get(name, {})
    same = record.get("commands") == lines
    outputs = [call.output for call in calls]
    if same and not run.changed and all(path.exists() for path in outputs):
        run.log(f"[demo] {name}: reusing {', '.join(str(path) for path in outputs[:2])}"
                + (" ..." if len(outputs) > 2 else ""))
        record["reused"] = True
        return
    resumed = same and not run.changed and folder is not None and folder.exists()
    if folder is not None and folder.exists() and not resumed:
        shutil.rmtree(folder)
    run.records[name] = record = {"commands": lines, "reused": False, "resumed": resumed}
    save_records(run)
    wall, cpu = time.time(), _cpu_seconds()
    for call in calls:
        call.run(lambda command: run.log(f"[demo] {name}: {command}"))
    record.update(wall_s=time.time() - wall, cpu_s=_cpu_seconds() - cpu)
    run.changed = True
    save_records(run)


def save_records(run):
    write_text(run.path(STAGES_FILE), json.dumps(run.records, indent=2) + "\n")


# ---- stages -----------------------------------------------------------------------------------

def teacher_stage(run):
    """The built-in teacher, or one pre-trained here with the same recipe (`train_teacher`)."""
    if not run.train_teacher:
        run.teacher = run.data
        run.records["teacher"] = {"commands": [], "reused": True, "builtin": str(builtin_teacher_path(run.data))}
        return
    folder = run.path("teacher")
    kwargs = {**TEACHER_RECIPES[run.data], "out": str(folder), "num_samples": 0, "seed": run.seed, **_progress(run)}
    run.teacher = str(folder / "teacher.safetensors")
    call = Call("cmt-train diffusion", train_diffusion, kwargs, Path(run.teacher), trains=True)
    run_stage(run, "teacher", [call], folder)


def build_stage(run):
    """Teacher trajectories: DPM-Solver++(3M), 16 steps on the log-SNR grid, every state kept."""
    folder = run.path("shards")
    kwargs = dict(teacher=run.teacher, out=str(folder), solver="dpm++3m", nfe=16,
                  num_trajectories=run.settings.trajectories, shard_size=1000, seed=run.seed, **_progress(run))
    run_stage(run, "build", [Call("cmt-build", build_trajectories, kwargs, folder / "manifest.json")], folder)


def mid_stage(run):
    """CMT mid-training: the student (the teacher's weights) jumps from any state to its endpoint."""
    s, folder = run.settings, run.path("mid")
    kwargs = dict(data=str(run.path("shards")), recipe=data_kind(run.data), target="endpoint", out=str(folder),
                  max_steps=s.mid_steps,
                  batch_size=s.mid_batch, lr=s.mid_lr, workers=0, num_samples=100, log_every=s.log_every,
                  ckpt_every=max(s.mid_steps // 4, 1), seed=run.seed, **_progress(run))
    run_stage(run, "mid", [Call("cmt-train mid", mid_train, kwargs, folder / "mid.pt", trains=True)], folder)


def post_stage(run):
    """ECT from the mid-trained weights at one fixed late stage (a small gap t - r from the start)."""
    s, folder = run.settings, run.path("post")
    kwargs = dict(init=str(run.path("mid", "mid.pt")), recipe=data_kind(run.data), method="ect", data=run.data,
                  stage=s.ect_stage,
                  out=str(folder), max_steps=s.post_steps, batch_size=s.post_batch, lr=s.post_lr, num_samples=100,
                  log_every=s.log_every, ckpt_every=max(s.post_steps // 4, 1), seed=run.seed, **_progress(run))
    run_stage(run, "post", [Call("cmt-train post", post_train, kwargs, folder / "post.pt", trains=True)], folder)


def sample_calls(run):
    """One `sample` per row of SAMPLES: the same seeds and (cycling) labels for every model."""
    checkpoints = {"teacher": run.teacher, "mid": str(run.path("mid", "mid.safetensors")),
                   "post": str(run.path("post", "post.safetensors"))}
    calls = []
    for name, model, steps in SAMPLES:
        sampler = {"steps": steps}
        if model != "teacher":
            sampler = {"sampler": "flowmap", **sampler, "mid_sigma": TWO_STEP_SIGMA if steps == 2 else None}
        npz = run.path("samples", f"{name}.npz")
        labels = {"labels": "cycle"} if data_kind(run.data) == "mnist" else {}   # the toys take no labels
        kwargs = dict(ckpt=checkpoints[model], **sampler, num_samples=run.settings.eval_num, seed=run.seed, **labels,
                      out=str(npz.with_suffix(".png")), npz=str(npz), **_progress(run))
        calls.append(Call("cmt-sample", sample, kwargs, npz))
    return calls


def sample_stage(run):
    run_stage(run, "sample", sample_calls(run), run.path("samples"))


def evaluate_stage(run):
    """Metrics of every sample set, distances to the teacher's 16-step samples, the report's pictures."""
    wall, cpu = time.time(), _cpu_seconds()
    data = resolve_data(run.data)
    loaded = {name: load_samples(run.path("samples", f"{name}.npz")) for name, _, _ in SAMPLES}
    samples = {name: values for name, (values, _) in loaded.items()}
    reference, labels = loaded["teacher_16step"]
    commands = []
    for name, _, _ in SAMPLES:
        kwargs = dict(samples=str(run.path("samples", f"{name}.npz")), data=run.data)
        commands.append(shlex.join([*command_words("cmt-eval", kwargs), "--json"]))   # --json: the command's output
        run.metrics[name] = {**evaluate(**kwargs)["metrics"],
                             "rmse_to_teacher": per_sample_rmse(samples[name], reference)}
    # Scale of the distance: the teacher's own samples from other noise (same label when conditional).
    shift = int(labels.max()) + 1 if labels is not None and bool((labels >= 0).any()) else 1
    other_noise = per_sample_rmse(reference.roll(shift, 0), reference)
    run.metrics["teacher_16step_other_noise"] = {"rmse_to_teacher": other_noise}
    # The same metric on real data of the same size: the best any generator can score.
    if data.kind == "images":
        real = data.reference(len(reference))
    else:
        real = data.sample(len(reference), torch.Generator().manual_seed(1))[0]
    run.metrics["real_data"] = embedded_metric(data, real)
    for name in GRIDS:
        metrics = {key: value for key, value in run.metrics[name].items() if key != "rmse_to_teacher"}
        shown = samples[name] if data.kind == "toy" else samples[name][:60]   # 6 rows of the 10 digits
        save_samples(shown, run.path(f"demo_{name}.png"), nrow=10,
                     reference=data.reference() if data.kind == "toy" else None,
                     title=metric_title(name.replace("_", ", "), metrics))
    run.records["evaluate"] = {"commands": commands, "wall_s": time.time() - wall,
                               "cpu_s": _cpu_seconds() - cpu, "reused": False}
    save_records(run)
    write_text(run.path("metrics.json"), json.dumps(run.metrics, indent=2) + "\n")


def per_sample_rmse(samples, reference):
    """Mean over samples of each sample's root-mean-square distance to its reference sample."""
    return float((samples - reference).flatten(1).pow(2).mean(1).sqrt().mean())


def _progress(run):
    return {} if run.progress else {"progress": False}


STAGES = [teacher_stage, build_stage, mid_stage, post_stage, sample_stage, evaluate_stage]


# ---- report -----------------------------------------------------------------------------------

def _fmt(value):
    return "" if value is None else f"{value:.4g}"


def report(run):
    """OUT/report.md: the grids side by side, the metrics, the time and the command of every stage."""
    s, kind = run.settings, data_kind(run.data)
    metric_names = [name for name in run.metrics["teacher_16step"] if name != "rmse_to_teacher"]
    heading = {name: f"{TITLES[model]}, {steps} step{'s' * (steps > 1)}" for name, model, steps in SAMPLES}
    timed = [record for record in run.records.values() if "wall_s" in record]
    teacher = run.records["teacher"].get("builtin") or run.teacher
    lines = [f"# cmt demo: {run.data}", "",
             f"`{run.command}` (torch threads: {run.threads or torch.get_num_threads()}); stages took "
             f"{sum(r['wall_s'] for r in timed):.0f} s wall, {sum(r['cpu_s'] for r in timed):.0f} s CPU.", "",
             f"Teacher `{Path(teacher).name}`; {s.trajectories} DPM-Solver++(3M) trajectories of 16 steps; "
             f"mid-training (CMT, endpoint target) {s.mid_steps} steps x {s.mid_batch}, lr {s.mid_lr:g}; "
             f"post-training (ECT at the fixed stage {s.ect_stage}) {s.post_steps} steps x {s.post_batch}, "
             f"lr {s.post_lr:g}.", "",
             "## Samples", "",
             f"Every panel starts from the same noise (seeds {run.seed}..{run.seed + s.eval_num - 1}) and the same "
             "labels (cycling through the classes).", "",
             "| " + " | ".join(heading[name] for name in GRIDS) + " |", "|" + "---|" * len(GRIDS),
             "| " + " | ".join(f"![{name}](demo_{name}.png)" for name in GRIDS) + " |", "",
             "## Metrics", "",
             f"{s.eval_num} samples per row. {METRIC_NOTES[kind]} `rmse_to_teacher`: the mean over samples of the "
             "root-mean-square distance between a sample and the teacher's 16-step sample from the same noise and "
             "label. The students' 2-step sampler re-noises the first jump's output to sigma "
             f"{TWO_STEP_SIGMA} with fresh noise (multistep consistency sampling), so it leaves the teacher's ODE "
             "path on purpose; the 1-step distance is the one that measures how well a student copies the teacher.",
             "",
             "| model | steps | " + " | ".join(metric_names) + " | rmse_to_teacher |",
             "|---|---|" + "---|" * (len(metric_names) + 1)]
    for name, model, steps in SAMPLES:
        values = run.metrics[name]
        lines.append(f"| {TITLES[model]} | {steps} | " + " | ".join(_fmt(values.get(key)) for key in metric_names)
                     + f" | {_fmt(values['rmse_to_teacher'])} |")
    other = "teacher, other noise" + (" (same label)" if kind == "mnist" else "")
    lines += [f"| {other} | 16 | " + " | ".join("" for _ in metric_names)
              + f" | {_fmt(run.metrics['teacher_16step_other_noise']['rmse_to_teacher'])} |",
              f"| real data, {s.eval_num} samples (noise floor) | | "
              + " | ".join(_fmt(run.metrics["real_data"].get(key)) for key in metric_names) + " | |", "",
              "## Stages", "",
              "Wall and CPU seconds (this process and its workers) of each stage as last run; a reused stage "
              "keeps the figures of the run that made it.", "",
              "| stage | wall s | CPU s | |", "|---|---|---|---|"]
    for name, record in run.records.items():
        note = ("built-in teacher" if "builtin" in record else "reused" if record.get("reused")
                else "resumed (time of the last part)" if record.get("resumed") else "")
        lines.append(f"| {name} | {_fmt(record.get('wall_s'))} | {_fmt(record.get('cpu_s'))} | {note} |")
    lines += ["", "Commands (run from the same directory to repeat a stage by hand):", "", "```"]
    for name, record in run.records.items():
        if record["commands"]:
            lines += [f"# {name}", *record["commands"]]
    lines += ["```", ""]
    write_text(run.path("report.md"), "\n".join(lines))


METRIC_NOTES = {
    "mnist": "`fd_mnist`: Fréchet distance of a small MNIST classifier's features to the 5k digits "
             "(lower is better; not Inception FID).",
    "toy": "`energy_distance`, `sliced_wasserstein`: to the data's fixed 4096-point reference sample "
           "(lower is better).",
}


def run_stages(run, stages=None):
    """Run `stages` (default: all) over `run` and write its report."""
    run.out.mkdir(parents=True, exist_ok=True)
    if run.fresh:
        for name in ("teacher", "shards", "mid", "post", "samples", STAGES_FILE):
            path = run.path(name)
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    records_path = run.path(STAGES_FILE)
    run.records = json.loads(records_path.read_text()) if records_path.is_file() else {}
    threads = torch.get_num_threads()
    torch.set_num_threads(run.threads or threads)
    try:
        for stage in stages or STAGES:
            stage(run)
    finally:
        torch.set_num_threads(threads)
    report(run)
    return run


def _per_data(field):
    values = ", ".join(f"{kind} {getattr(settings, field)}" for kind, settings in SETTINGS.items())
    return f"[default: per data: {values}]"


# What each keyword of `run_demo` means: its docstring and the demo command's help
# (`cmt.options.document_keywords`).
DEMO_HELP = {
    "out": "Demo folder: shards/, mid/, post/, samples/, report.md.",
    "data": f"A built-in data set with a built-in teacher ({', '.join(DATA_CHOICES)}).",
    "train_teacher": "Pre-train the teacher here with the built-in one's recipe instead of reusing it (MNIST: ~12 CPU "
                     "minutes).",
    "num_trajectories": f"Teacher trajectories {_per_data('trajectories')}.",
    "mid_steps": f"Mid-training steps {_per_data('mid_steps')}.",
    "post_steps": f"Post-training steps {_per_data('post_steps')}.",
    "batch_size": f"Mid- and post-training batch {_per_data('mid_batch')}.",
    "num_samples": f"Samples per model for the metrics (at least {MIN_EVAL_NUM}) {_per_data('eval_num')}.",
    "seed": "Seeds every stage (the build's trajectories, the trainers, the samples).",
    "threads": "torch threads [default: torch's, one per core].",
    "fresh": "Start over: remove the stages of an earlier run in --out.",
    "progress": "tqdm progress bars.",
    "log": "(Python) Where progress lines go.",
}


@document_keywords(DEMO_HELP)
@renamed_keywords(trajectories="num_trajectories", eval_num="num_samples")
def run_demo(*, out="runs/demo", data="mnist", train_teacher=False, num_trajectories=None, mid_steps=None,
             post_steps=None, batch_size=None, num_samples=None, seed=0, threads=None, fresh=False, progress=True,
             log=print):
    """Run the whole pipeline on built-in data and write OUT/report.md; `python -m cmt.cli.demo`.

    Returns `{"out", "report", "stages", "metrics" (file), "figures": [Path, ...], "values":
    {sample set: {metric: value}}, "wall_s", "cpu_s"}`.
    """
    if data not in DATA_CHOICES:
        raise ArgumentError("data", f"{data!r} has no built-in teacher; choose one of {', '.join(DATA_CHOICES)}")
    for name, value, least in (("num_trajectories", num_trajectories, 1), ("mid_steps", mid_steps, 1),
                               ("post_steps", post_steps, 1), ("batch_size", batch_size, 1),
                               ("num_samples", num_samples, MIN_EVAL_NUM), ("threads", threads, 1), ("seed", seed, 0)):
        if value is not None and (not isinstance(value, int) or value < least):
            raise ArgumentError(name, f"must be an integer >= {least}, got {value!r}")
    overrides = {"trajectories": num_trajectories, "mid_steps": mid_steps, "post_steps": post_steps,
                 "mid_batch": batch_size, "post_batch": batch_size, "eval_num": num_samples}
    started, cpu = time.time(), _cpu_seconds()
    settings = replace(SETTINGS[data_kind(data)], **{k: v for k, v in overrides.items() if v is not None})
    arguments = dict(out=out, data=data, train_teacher=train_teacher, num_trajectories=num_trajectories,
                     mid_steps=mid_steps, post_steps=post_steps, batch_size=batch_size, num_samples=num_samples,
                     seed=seed, threads=threads, fresh=fresh, progress=progress)
    run = run_stages(DemoRun(out=out, data=data, settings=settings, train_teacher=train_teacher, seed=seed,
                             threads=threads, fresh=fresh, progress=progress, command=demo_command(arguments),
                             log=log))
    return {"out": run.out, "report": run.path("report.md"), "stages": run.path(STAGES_FILE),
            "metrics": run.path("metrics.json"), "figures": [run.path(f"demo_{name}.png") for name in GRIDS],
            "values": run.metrics, "wall_s": time.time() - started, "cpu_s": _cpu_seconds() - cpu}


DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(run_demo).parameters.items()
            if name != "log"}


def demo_command(arguments):
    """`python -m cmt.cli.demo` with the arguments that differ from the defaults, for the report."""
    given = {name: value for name, value in arguments.items() if str(value) != str(DEFAULTS[name])}
    return shlex.join(command_words(DEMO_COMMAND, given))
