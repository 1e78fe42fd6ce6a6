"""The whole pipeline on built-in data: `python -m cmt.demo --out runs/demo [--data mnist|toy:NAME]`.

A demo is a list of stages run in order over one `DemoRun`; each stage reads what earlier stages
left in it (paths, networks, metrics) and appends a section to the report. Today: the teacher
(built-in, or pre-trained here) and its 16-step DPM-Solver++(3M) samples; the trajectory build,
mid-training and post-training stages are added to `STAGES` by their modules' authors.
"""
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import torch

from cmt.checkpoint import load_network
from cmt.datasets import resolve_data
from cmt.metrics import embedded_metric
from cmt.sample import generate, pick_labels, save_samples
from cmt.teachers import BUILTIN_TEACHERS, builtin_teacher_path
from cmt.trainers.diffusion import TEACHER_RECIPES


@dataclass
class DemoRun:
    out: Path
    data: str
    reuse_teacher: bool = True
    eval_num: int = 2000
    seed: int = 0
    teacher_path: Path | None = None
    teacher: torch.nn.Module | None = None
    metrics: dict = field(default_factory=dict)     # {stage: {name: value}}
    sections: list = field(default_factory=list)   # markdown, one entry per stage
    timings: dict = field(default_factory=dict)    # {stage: seconds}

    def metric_table(self):
        names = sorted({name for values in self.metrics.values() for name in values})
        rows = ["| stage | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for stage, values in self.metrics.items():
            rows.append(f"| {stage} | " + " | ".join(_fmt(values.get(name)) for name in names) + " |")
        return "\n".join(rows)


def _fmt(value):
    return "" if value is None else f"{value:.4g}"


def teacher_stage(run):
    """The built-in teacher, or a fresh one trained with the same recipe (`--train-teacher`)."""
    if run.reuse_teacher:
        run.teacher_path = builtin_teacher_path(run.data)
        how = f"The built-in teacher `{run.teacher_path.name}`"
    else:
        from cmt.trainers.cli import main as train
        folder = run.out / "teacher"
        args = ["diffusion", *TEACHER_RECIPES[run.data], "--out", str(folder), "--eval-num", "0"]
        run.teacher_path = folder / "teacher.safetensors"
        if not run.teacher_path.is_file():   # a finished teacher of an earlier demo run is kept
            resume = ["--resume"] if (folder / "training-state.pt").is_file() else []
            train.main([*args, *resume], standalone_mode=False)
        how = f"A teacher trained here: `cmt-train {' '.join(args)}`"
    run.teacher = load_network(run.teacher_path)
    params = sum(p.numel() for p in run.teacher.parameters())
    run.sections.append(f"## Teacher\n\n{how} ({params / 1e6:.2f} M parameters, "
                        f"architecture `{run.teacher.config['architecture']}`).\n")


def teacher_samples_stage(run, steps=16, solver="dpm++3m"):
    """The teacher's DPM-Solver++(3M) samples: a grid (or scatter) and the embedded metric."""
    data = resolve_data(run.data)
    net, count = run.teacher, run.eval_num
    samples = generate(net, list(range(run.seed, run.seed + count)), pick_labels("random", count, net.label_dim, run.seed),
                       solver=solver, steps=steps)
    metrics = embedded_metric(data, samples)
    if data.kind == "toy":
        shown, reference, nrow = samples, data.reference(), None
    else:
        grid_labels = pick_labels("cycle", 100, net.label_dim)
        shown = generate(net, list(range(100)), grid_labels, solver=solver, steps=steps)
        reference, nrow = None, 10
    image = f"teacher_{solver}_{steps}.png"
    save_samples(shown, run.out / image, reference=reference, nrow=nrow)
    run.metrics[f"teacher {solver} {steps} steps"] = metrics
    # The same metric on real data of the same size: the best a generator can score.
    real = data.reference(count) if data.kind == "images" else data.sample(count, torch.Generator().manual_seed(1))[0]
    run.metrics[f"real data ({len(real)}, noise floor)"] = embedded_metric(data, real)
    run.sections.append(f"## Teacher samples ({solver}, {steps} steps, {count} samples)\n\n![]({image})\n")


def report_stage(run):
    text = [f"# cmt demo: {run.data}\n", *run.sections, "## Metrics\n", run.metric_table(), "",
            "Stage times (s): " + ", ".join(f"{name} {seconds:.0f}" for name, seconds in run.timings.items()), ""]
    (run.out / "report.md").write_text("\n".join(text))
    (run.out / "metrics.json").write_text(json.dumps(run.metrics, indent=2) + "\n")


STAGES = [teacher_stage, teacher_samples_stage]


def run_demo(run, stages=None):
    run.out.mkdir(parents=True, exist_ok=True)
    for stage in stages or STAGES:
        start = time.time()
        click.echo(f"[demo] {stage.__name__} ...")
        stage(run)
        run.timings[stage.__name__.removesuffix("_stage")] = time.time() - start
    report_stage(run)
    return run


@click.command(context_settings={"show_default": True})
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"))
@click.option("--data", type=click.Choice([name for name in BUILTIN_TEACHERS if name in TEACHER_RECIPES]),
              default="mnist", help="A built-in data set with a built-in teacher.")
@click.option("--reuse-teacher/--train-teacher", default=True,
              help="Use the shipped teacher, or pre-train one here with the same recipe (minutes on a CPU).")
@click.option("--eval-num", type=click.IntRange(min=100), default=2000, help="Samples per metric.")
@click.option("--seed", type=click.IntRange(min=0), default=0)
def main(out, data, reuse_teacher, eval_num, seed):
    """Run the pipeline on built-in data and write OUT/report.md."""
    run = run_demo(DemoRun(out=out, data=data, reuse_teacher=reuse_teacher, eval_num=eval_num, seed=seed))
    click.echo((run.out / "report.md").read_text())


if __name__ == "__main__":
    main()
