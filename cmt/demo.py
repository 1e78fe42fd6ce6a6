"""The whole pipeline on built-in data: `python -m cmt.demo --out runs/demo [--data mnist|toy:NAME]`.

Stages, each one or more of the project's own commands run in this process (the report lists them,
so any stage can be re-run by hand):

1. teacher: the built-in one, or `cmt-train diffusion` with its recipe (`--train-teacher`);
2. build: `cmt-build`, DPM-Solver++(3M) trajectories of 16 steps into OUT/shards;
3. mid: `cmt-train mid --target endpoint` from the teacher's weights (CMT-CM) into OUT/mid;
4. post: `cmt-train post --method ect` from the mid-trained weights, at one fixed late curriculum
   stage as the paper does, into OUT/post;
5. sample: `cmt-sample` for the teacher (16 steps, and 1 and 2 steps for scale) and both students
   (1 and 2 steps), all from the same noise and labels, into OUT/samples/*.npz;
6. evaluate + report: the built-in metric (`cmt-eval`'s `evaluate_samples`), the per-sample distance
   of every sample to the teacher's 16-step sample from the same noise, OUT/report.md.

A re-run with the same OUT reuses every finished stage whose commands are unchanged (OUT/stages.json
records them), resumes an interrupted one, and runs a stage again from scratch when its commands or
an earlier stage changed; `--fresh` starts over.
"""
import json
import resource
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import torch

from cmt.datasets import resolve_data
from cmt.evaluation import evaluate_samples, load_samples
from cmt.images import save_image_grid, save_scatter
from cmt.metrics import embedded_metric
from cmt.teachers import BUILTIN_TEACHERS, builtin_teacher_path
from cmt.trainers.diffusion import TEACHER_RECIPES

DATA_CHOICES = [name for name in BUILTIN_TEACHERS if name in TEACHER_RECIPES]
STAGES_FILE = "stages.json"
MID_SIGMA = 0.821     # the 2-step samplers' intermediate sigma (the trainers' default)


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


SETTINGS = {
    "mnist": Settings(trajectories=2000, mid_steps=600, mid_batch=128, mid_lr=5e-3, post_steps=200, post_batch=128,
                      post_lr=2e-4, ect_stage=11, eval_num=2000),
    "toy": Settings(trajectories=4000, mid_steps=1000, mid_batch=256, mid_lr=2e-4, post_steps=500, post_batch=256,
                    post_lr=3e-5, ect_stage=11, eval_num=4096, log_every=100),
}
# (name in files, model, sampler steps): the teacher's 16-step samples are the reference of the
# distance column; its 1- and 2-step samples show what the students improve on.
SAMPLES = [("teacher_16step", "teacher", 16), ("teacher_1step", "teacher", 1), ("teacher_2step", "teacher", 2),
           ("mid_1step", "mid", 1), ("mid_2step", "mid", 2), ("post_1step", "post", 1), ("post_2step", "post", 2)]
GRIDS = ["teacher_16step", "mid_1step", "mid_2step", "post_1step", "post_2step"]
TITLES = {"teacher": "teacher (DPM-Solver++ 3M)", "mid": "mid-trained (CMT)", "post": "post-trained (ECT)"}


def _programs():
    """The click commands the stages call (imported late: each pulls in its own stack)."""
    from cmt.builders.cli import main as build
    from cmt.sampling import main as sample
    from cmt.trainers.cli import main as train
    return {"cmt-build": build, "cmt-train": train, "cmt-sample": sample}


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
    command: str = "python -m cmt.demo"               # how the demo was called, for the report
    teacher: str = ""                                 # what --teacher / --ckpt takes
    records: dict = field(default_factory=dict)       # {stage: {"commands", "wall_s", "cpu_s", "reused"}}
    changed: bool = False                             # an earlier stage ran: later ones must run again
    metrics: dict = field(default_factory=dict)       # {sample name: {metric: value}}

    def __post_init__(self):
        self.out = Path(self.out)
        if self.settings is None:
            self.settings = SETTINGS["toy" if self.data.startswith("toy:") else "mnist"]

    def path(self, *parts):
        return self.out.joinpath(*parts)


def run_stage(run, name, commands, folder, outputs):
    """Run `commands` ([program, *args] lists) unless `outputs` exist from the same commands.

    Commands that differ from the recorded ones, or an earlier stage that ran, clear `folder` first;
    otherwise an unfinished stage resumes (the builder by itself, trainers with --resume).
    """
    lines = [shlex.join(command) for command in commands]
    record = run.records.get(name, {})
    same = record.get("commands") == lines
    if same and not run.changed and all(Path(path).exists() for path in outputs):
        click.echo(f"[demo] {name}: reusing {', '.join(str(path) for path in outputs[:2])}"
                   + (" ..." if len(outputs) > 2 else ""))
        record["reused"] = True
        return
    resumed = same and not run.changed and folder is not None and folder.exists()
    if folder is not None and folder.exists() and not resumed:
        shutil.rmtree(folder)
    run.records[name] = record = {"commands": lines, "reused": False, "resumed": resumed}
    save_records(run)
    programs = _programs()
    wall, cpu = time.time(), _cpu_seconds()
    for command, output in zip(commands, outputs):
        if Path(output).exists():
            continue
        args = list(command[1:])
        if command[0] == "cmt-train" and (Path(args[args.index("--out") + 1]) / "training-state.pt").exists():
            args.append("--resume")
        click.echo(f"[demo] {name}: {shlex.join([command[0], *args])}")
        programs[command[0]].main(args, prog_name=command[0], standalone_mode=False)
    record.update(wall_s=time.time() - wall, cpu_s=_cpu_seconds() - cpu)
    run.changed = True
    save_records(run)


def save_records(run):
    run.path(STAGES_FILE).write_text(json.dumps(run.records, indent=2) + "\n")


# ---- stages -----------------------------------------------------------------------------------

def teacher_stage(run):
    """The built-in teacher, or one pre-trained here with the same recipe (`--train-teacher`)."""
    if not run.train_teacher:
        run.teacher = run.data
        run.records["teacher"] = {"commands": [], "reused": True, "builtin": str(builtin_teacher_path(run.data))}
        return
    folder = run.path("teacher")
    command = ["cmt-train", "diffusion", *TEACHER_RECIPES[run.data], "--out", str(folder), "--eval-num", "0",
               "--seed", str(run.seed), *_progress(run)]
    run.teacher = str(folder / "teacher.safetensors")
    run_stage(run, "teacher", [command], folder, [run.teacher])


def build_stage(run):
    """Teacher trajectories: DPM-Solver++(3M), 16 steps on the log-SNR grid, every state kept."""
    folder = run.path("shards")
    command = ["cmt-build", "--teacher", run.teacher, "--out", str(folder), "--solver", "dpm++3m", "--nfe", "16",
               "--num-trajectories", str(run.settings.trajectories), "--shard-size", "1000", "--seed", str(run.seed),
               *_progress(run)]
    run_stage(run, "build", [command], folder, [folder / "manifest.json"])


def mid_stage(run):
    """CMT mid-training: the student (the teacher's weights) jumps from any state to its endpoint."""
    s, folder = run.settings, run.path("mid")
    command = ["cmt-train", "mid", "--data", str(run.path("shards")), "--target", "endpoint", "--out", str(folder),
               "--max-steps", str(s.mid_steps), "--batch-size", str(s.mid_batch), "--lr", str(s.mid_lr),
               "--workers", "0", "--num-samples", "100", "--log-every", str(s.log_every),
               "--ckpt-every", str(max(s.mid_steps // 4, 1)), "--seed", str(run.seed), *_progress(run)]
    run_stage(run, "mid", [command], folder, [folder / "mid.pt"])


def post_stage(run):
    """ECT from the mid-trained weights at one fixed late stage (a small gap t - r from the start)."""
    s, folder = run.settings, run.path("post")
    command = ["cmt-train", "post", "--init", str(run.path("mid", "mid.pt")), "--method", "ect", "--data", run.data,
               "--stage", str(s.ect_stage), "--out", str(folder), "--max-steps", str(s.post_steps),
               "--batch-size", str(s.post_batch), "--lr", str(s.post_lr), "--num-samples", "100",
               "--log-every", str(s.log_every), "--ckpt-every", str(max(s.post_steps // 4, 1)),
               "--seed", str(run.seed), *_progress(run)]
    run_stage(run, "post", [command], folder, [folder / "post.pt"])


def sample_commands(run):
    """One cmt-sample per row of SAMPLES: the same seeds and (cycling) labels for every model."""
    checkpoints = {"teacher": run.teacher, "mid": str(run.path("mid", "mid.safetensors")),
                   "post": str(run.path("post", "post.safetensors"))}
    commands, outputs = [], []
    for name, model, steps in SAMPLES:
        sampler = ["--steps", str(steps)]
        if model != "teacher":
            sampler = ["--sampler", "flowmap", *sampler] + (["--mid-sigma", str(MID_SIGMA)] if steps == 2 else [])
        npz = run.path("samples", f"{name}.npz")
        commands.append(["cmt-sample", "--ckpt", checkpoints[model], *sampler, "--num", str(run.settings.eval_num),
                         "--seed", str(run.seed), "--labels", "cycle", "--out", str(npz.with_suffix(".png")),
                         "--npz", str(npz)])
        outputs.append(npz)
    return commands, outputs


def sample_stage(run):
    commands, outputs = sample_commands(run)
    run_stage(run, "sample", commands, run.path("samples"), outputs)


def evaluate_stage(run):
    """Metrics of every sample set, distances to the teacher's 16-step samples, the report's pictures."""
    wall, cpu = time.time(), _cpu_seconds()
    data = resolve_data(run.data)
    loaded = {name: load_samples(run.path("samples", f"{name}.npz")) for name, _, _ in SAMPLES}
    samples = {name: values for name, (values, _) in loaded.items()}
    reference, labels = loaded["teacher_16step"]
    for name, _, _ in SAMPLES:
        run.metrics[name] = {**evaluate_samples(samples[name], data),
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
        if data.kind == "toy":
            save_scatter(samples[name], run.path(f"demo_{name}.png"), reference=data.reference())
        else:
            save_image_grid(samples[name][:100].clamp(-1, 1), run.path(f"demo_{name}.png"), nrow=10)
    commands = [shlex.join(["cmt-eval", "--samples", str(run.path("samples", f"{name}.npz")), "--data", run.data,
                            "--json"]) for name, _, _ in SAMPLES]
    run.records["evaluate"] = {"commands": commands, "wall_s": time.time() - wall, "cpu_s": _cpu_seconds() - cpu,
                               "reused": False}
    save_records(run)
    run.path("metrics.json").write_text(json.dumps(run.metrics, indent=2) + "\n")


def per_sample_rmse(samples, reference):
    """Mean over samples of each sample's root-mean-square distance to its reference sample."""
    return float((samples - reference).flatten(1).pow(2).mean(1).sqrt().mean())


def _progress(run):
    return [] if run.progress else ["--no-progress"]


STAGES = [teacher_stage, build_stage, mid_stage, post_stage, sample_stage, evaluate_stage]


# ---- report -----------------------------------------------------------------------------------

def _fmt(value):
    return "" if value is None else f"{value:.4g}"


def report(run):
    """OUT/report.md: the grids side by side, the metrics, the time and the command of every stage."""
    s, kind = run.settings, "toy" if run.data.startswith("toy:") else "mnist"
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
             f"{MID_SIGMA} with fresh noise (multistep consistency sampling), so it leaves the teacher's ODE path "
             "on purpose; the 1-step distance is the one that measures how well a student copies the teacher.", "",
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
    run.path("report.md").write_text("\n".join(lines))


METRIC_NOTES = {
    "mnist": "`fd_mnist`: Fréchet distance of a small MNIST classifier's features to the 5k digits "
             "(lower is better; not Inception FID).",
    "toy": "`energy_distance`, `sliced_wasserstein`: to the data's fixed 4096-point reference sample "
           "(lower is better).",
}


def run_demo(run, stages=None):
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


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"),
              help="Demo folder: shards/, mid/, post/, samples/, report.md.")
@click.option("--data", type=click.Choice(DATA_CHOICES), default="mnist",
              help="A built-in data set with a built-in teacher.")
@click.option("--train-teacher", is_flag=True,
              help="Pre-train the teacher here with the built-in one's recipe instead of reusing it "
                   "(MNIST: ~12 CPU minutes).")
@click.option("--trajectories", type=click.IntRange(min=1), default=None,
              help="Teacher trajectories [default: per data].")
@click.option("--mid-steps", type=click.IntRange(min=1), default=None, help="Mid-training steps [default: per data].")
@click.option("--post-steps", type=click.IntRange(min=1), default=None, help="Post-training steps [default: per data].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Mid- and post-training batch [default: per data].")
@click.option("--eval-num", type=click.IntRange(min=20), default=None,
              help="Samples per model for the metrics [default: per data].")
@click.option("--seed", type=click.IntRange(min=0), default=0)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch threads [default: torch's, one per core].")
@click.option("--fresh", is_flag=True, help="Start over: remove the stages of an earlier run in --out.")
@click.option("--progress/--no-progress", default=True)
def main(out, data, train_teacher, trajectories, mid_steps, post_steps, batch_size, eval_num, seed, threads, fresh,
         progress):
    """Run the whole pipeline on built-in data (teacher, trajectories, mid-training, ECT post-training,
    1- and 2-step samples, metrics) and write OUT/report.md."""
    defaults = SETTINGS["toy" if data.startswith("toy:") else "mnist"]
    overrides = {"trajectories": trajectories, "mid_steps": mid_steps, "post_steps": post_steps,
                 "mid_batch": batch_size, "post_batch": batch_size, "eval_num": eval_num}
    settings = Settings(**{**defaults.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
    started, cpu = time.time(), _cpu_seconds()
    run = run_demo(DemoRun(out=out, data=data, settings=settings, train_teacher=train_teacher, seed=seed,
                           threads=threads, fresh=fresh, progress=progress, command=_command_line()))
    click.echo(run.path("report.md").read_text())
    click.echo(f"[demo] done in {time.time() - started:.0f} s ({_cpu_seconds() - cpu:.0f} CPU s): "
               f"{run.path('report.md')}")


def _command_line():
    """`python -m cmt.demo` with the options given (not their defaults), for the report."""
    ctx = click.get_current_context()
    words = ["python", "-m", "cmt.demo"]
    for param in ctx.command.params:
        if ctx.get_parameter_source(param.name) != click.core.ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[param.name]
        if param.is_flag:
            words.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            words += [param.opts[0], str(value)]
    return shlex.join(words)


if __name__ == "__main__":
    main()
