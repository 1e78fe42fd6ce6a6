"""The paper's claim, measured: does post-training from CMT weights reach a good 1-/2-step model in
fewer steps than post-training from the teacher or from scratch? Prints the figures (no pass/fail).

For each data set (built-in teachers only) and seed, with one fixed post-training budget:
1. the teacher's 16-step DPM-Solver++(3M) metric;
2. `cmt.build_trajectories` (16-step trajectories), `cmt.mid_train(target="endpoint")` (for ECT)
   and `target="flowmap"` (for MeanFlow);
3. `cmt.post_train`: ECT from random weights, from the teacher and from the CMT endpoint weights;
   MeanFlow from random weights and from the CMT flow-map weights; the 1- and 2-step metric every
   `--sample-every` steps (the loop's `sample_fn` scalars in log.jsonl) and at step 0 (here).
The table gives, per run, the post-training steps (and wall seconds, building and mid-training
included) needed to reach the final 2-step metric of the teacher-started ECT run. Targets: the CMT
start needs at most half the steps of the teacher start, and its final 2-step metric is within 1.25x
the teacher's 16-step metric.

    python benchmarks/bench_claim.py --out runs/claim                      # toy:checkerboard x 3 seeds, mnist x 1
    python benchmarks/bench_claim.py --out runs/claim --data toy:moons --seeds 0,1,2 --post-steps 1000
    python benchmarks/bench_claim.py --out /tmp/claim --quick             # a few minutes: the script works

Every stage calls the library in this process with `--threads` torch threads (1 by default: on a
small shared CPU two threads per process are many times slower than one), its output into a log
file; the results record the equivalent command of each. Results go to OUT/claim_<data>.json
after every stage (a rerun with the same --out skips the stages done); OUT/table_<data>.md holds the
table, OUT/claim_<data>.png the curves, OUT/claim_<data>_samples.png the teacher's and the CMT-started
student's samples. Two --data values can run as two processes with the same --out.
"""
import contextlib
import json
import os
import shlex
import statistics
import time
from pathlib import Path

import click
import torch

from cmt.builders.build import build_trajectories
from cmt.checkpoint import load_network
from cmt.cli.train import main as train_command
from cmt.datasets import resolve_data
from cmt.flags import command_words
from cmt.edm import SIGMA_MIN, TWO_STEP_SIGMA
from cmt.images import image_grid, save_scatter
from cmt.metrics import embedded_metric
from cmt.sampling import generate, pick_labels
from cmt.teachers import BUILTIN_TEACHERS, builtin_teacher_path, resolve_teacher
from cmt.trainers.loop import read_log
from cmt.trainers.mid import mid_train
from cmt.trainers.post import load_init, post_train
from cmt.trainers.students import build_student, sampling_report, student_config

# name: (post method, init, extra `post_train` keywords); "mid-endpoint" / "mid-flowmap" are the
# CMT weights. ECT from random or teacher weights runs ECT's curriculum (the gap shrinks 8 times over
# the run); from CMT weights the paper post-trains at one late stage (a small gap from the start),
# and "ect-cmt-schedule" shows what ECT's curriculum does to those weights instead.
RUNS = {
    "ect-random": ("ect", "random", {}),
    "ect-teacher": ("ect", "teacher", {}),
    "ect-cmt": ("ect", "mid-endpoint", {"stage": 11}),
    "ect-cmt-schedule": ("ect", "mid-endpoint", {}),
    "meanflow-random": ("meanflow", "random", {}),
    "meanflow-cmt": ("meanflow", "mid-flowmap", {}),
}
REFERENCE_RUN, CMT_RUN = "ect-teacher", "ect-cmt"
QUALITY_FACTOR = 1.25        # the target: a 2-step metric within 1.25x the teacher's 16-step metric
# Per data kind: the headline metric and a budget that fits a 2-core CPU.
PRESETS = {
    "toy": dict(metric="energy_distance", num_trajectories=2000, mid_steps=1000, mid_batch=256, post_steps=1000,
                post_batch=128, sample_every=100, log_every=25, num_samples=2000, runs=list(RUNS)),
    "mnist": dict(metric="fd_mnist", num_trajectories=1000, mid_steps=300, mid_batch=64, post_steps=300,
                  post_batch=64, sample_every=50, log_every=10, num_samples=500,
                  runs=[name for name in RUNS if name != "ect-cmt-schedule"]),
}
# --quick: a smoke run of every stage in a few minutes (the figures mean nothing at this size)
QUICK = {"datas": ["toy:checkerboard"], "seeds": "0", "run_names": "ect-teacher,ect-cmt,meanflow-cmt",
         "post_steps": 40, "mid_steps": 40, "num_trajectories": 200, "sample_every": 20, "num_samples": 256}
SAMPLE_SEEDS_START = 10**6   # trainers.students.sampling_report's seeds: the same noise at every evaluation


def data_kind(data):
    return "mnist" if data == "mnist" else "toy"


def slug(data):
    return data.replace("toy:", "")


class Results:
    """claim_<data>.json, rewritten after every stage so an interrupted run leaves what it measured."""

    def __init__(self, path):
        self.path = path
        self.tree = json.loads(path.read_text()) if path.is_file() else {}

    def node(self, *keys):
        tree = self.tree
        for key in keys:
            tree = tree.setdefault(key, {})
        return tree

    def save(self):
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.tree, indent=1) + "\n")
        os.replace(tmp, self.path)


def run_call(program, function, kwargs, log_path):
    """Call one entry point, its printed output into `log_path`; returns (wall seconds, the
    equivalent command's words)."""
    command = command_words(program, kwargs)
    click.echo("  $ " + shlex.join(command))
    start = time.perf_counter()
    try:
        with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            function(**kwargs)
    except Exception as error:
        raise click.ClickException(f"{program} failed ({type(error).__name__}: {error}); see {log_path}") from error
    return time.perf_counter() - start, command


def post_options(options):
    """`cmt-train post` options (a --post-args value) as `post_train` keywords, read by the command itself."""
    command = train_command.commands["post"]
    with command.make_context("cmt-train post", list(options), resilient_parsing=True) as ctx:
        return {name: value for name, value in ctx.params.items()
                if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}


def train_seconds_per_step(records, log_every, sample_every):
    """Median seconds per optimizer step over log intervals without an evaluation in them."""
    clean = [r["sec_per_step"] for r in records if "sec_per_step" in r
             and (r["step"] - log_every) % sample_every != 0 and r["step"] % sample_every != 0]
    every = [r["sec_per_step"] for r in records if "sec_per_step" in r]
    return statistics.median(clean or every)


def metric_curve(records, metric):
    """[(step, 1-step metric, 2-step metric)] from a log.jsonl."""
    return [(r["step"], r[f"{metric}_1step"], r[f"{metric}_2step"]) for r in records if f"{metric}_2step" in r]


@torch.no_grad()
def teacher_metric(data, num_samples, steps=16):
    net, _ = resolve_teacher(data)
    seeds = list(range(SAMPLE_SEEDS_START, SAMPLE_SEEDS_START + num_samples))
    samples = generate(net, seeds, pick_labels("random", num_samples, net.label_dim, seed=0), solver="dpm++3m",
                       steps=steps)
    return {name: float(value) for name, value in embedded_metric(resolve_data(data), samples).items()}


@torch.no_grad()
def initial_metric(data, method, init, seed, num_samples, out):
    """The 1-/2-step metric of the student `post_train` starts from (its step 0)."""
    teacher = None if Path(init).is_file() else data
    config, state, _, _ = load_init(init, teacher, resolve_data(data), None)
    meanflow = method == "meanflow"
    student = build_student(student_config(config, flow_map=True if meanflow else None,
                                           sigma_min=None if meanflow else SIGMA_MIN), state, seed=seed)
    return sampling_report(student.eval(), out, 0, eval_data=data, num_samples=num_samples)


def first_step_reaching(curve, threshold):
    for step, _, two_step in curve:
        if two_step <= threshold:
            return step
    return None


def run_seed(results, data, seed, settings, out, threads):
    """Every stage of one (data, seed); each stage is skipped when the results already have it."""
    metric = settings["metric"]
    folder = out / slug(data) / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    node = results.node("seeds", str(seed))

    if "teacher" not in node:
        start = time.perf_counter()
        node["teacher"] = {"metrics": teacher_metric(data, settings["num_samples"]),
                           "seconds": time.perf_counter() - start, "solver": "dpm++3m", "steps": 16}
        results.save()
    click.echo(f"[{data} seed {seed}] teacher 16-step {metric} = {node['teacher']['metrics'][metric]:.4g}")

    build = folder / "trajectories"
    if "build" not in node:
        kwargs = dict(teacher=data, out=str(build), num_trajectories=settings["num_trajectories"], nfe=16, seed=seed,
                      progress=False)
        seconds, command = run_call("cmt-build", build_trajectories, kwargs, folder / "build.log")
        node["build"] = {"seconds": seconds, "command": command}
        results.save()

    mids = {}
    for target in ("endpoint", "flowmap"):
        mid = folder / f"mid-{target}"
        mids[f"mid-{target}"] = mid / "mid.pt"
        if not any(RUNS[name][1] == f"mid-{target}" for name in settings["runs"]) or f"mid-{target}" in node:
            continue
        kwargs = dict(data=str(build), target=target, out=str(mid), max_steps=settings["mid_steps"],
                      batch_size=settings["mid_batch"], seed=seed, workers=0, num_samples=settings["num_samples"],
                      log_every=settings["log_every"], ckpt_every=settings["mid_steps"], progress=False)
        seconds, command = run_call("cmt-train mid", mid_train, kwargs, folder / f"mid-{target}.log")
        records = read_log(mid)
        node[f"mid-{target}"] = {"seconds": seconds, "command": command, "final": metric_curve(records, metric)[-1],
                                 "sec_per_step": train_seconds_per_step(records, settings["log_every"], 10**9)}
        results.save()

    for name in settings["runs"]:
        method, init, extra = RUNS[name]
        if name in node.get("runs", {}):
            continue
        post = folder / name
        init_arg = str(mids[init]) if init.startswith("mid-") else init
        kwargs = dict(init=init_arg, method=method, **({} if init.startswith("mid-") else {"teacher": data}), data=data,
                      max_steps=settings["post_steps"], batch_size=settings["post_batch"], seed=seed,
                      sample_every=settings["sample_every"], log_every=settings["log_every"],
                      num_samples=settings["num_samples"], ckpt_every=settings["post_steps"], out=str(post),
                      progress=False, **extra, **post_options(settings["post_args"].get(name, [])))
        seconds, command = run_call("cmt-train post", post_train, kwargs, folder / f"{name}.log")
        start = initial_metric(data, method, init_arg, seed, settings["num_samples"], post)
        records = read_log(post)
        curve = [(0, start[f"{metric}_1step"], start[f"{metric}_2step"]), *metric_curve(records, metric)]
        node.setdefault("runs", {})[name] = {
            "method": method, "init": init, "command": command, "seconds": seconds, "curve": curve,
            "sec_per_step": train_seconds_per_step(records, settings["log_every"], settings["sample_every"]),
            "final_metrics": {key: value for key, value in records[-1].items() if key.endswith("step") and key != "step"}}
        results.save()
        click.echo(f"[{data} seed {seed}] {name}: final 2-step {metric} = {curve[-1][2]:.4g} ({seconds:.0f} s)")


def summarize(results, settings):
    """Per run, over seeds: steps and seconds to reach the teacher-started ECT run's final 2-step
    metric, and the final metrics; plus the two targets."""
    metric = settings["metric"]
    seeds = {seed: node for seed, node in results.tree["seeds"].items() if "runs" in node}
    rows = {}
    for name in RUNS:
        per_seed = []
        for seed, node in seeds.items():
            run = node["runs"].get(name)
            reference = node["runs"].get(REFERENCE_RUN)
            if run is None or reference is None:
                continue
            threshold = reference["curve"][-1][2]
            steps = first_step_reaching(run["curve"], threshold)
            quality = QUALITY_FACTOR * node["teacher"]["metrics"][metric]
            setup = node["build"]["seconds"] + node[run["init"]]["seconds"] if run["init"].startswith("mid-") else 0.0
            per_seed.append({
                "seed": seed, "threshold": threshold, "steps_to_reach": steps,
                "steps_to_quality": first_step_reaching(run["curve"], quality),
                "seconds_to_reach": None if steps is None else setup + steps * run["sec_per_step"],
                "setup_seconds": setup, "post_seconds": run["seconds"], "sec_per_step": run["sec_per_step"],
                "final_1step": run["curve"][-1][1], "final_2step": run["curve"][-1][2],
                "start_2step": run["curve"][0][2]})
        if per_seed:
            rows[name] = per_seed
    teacher = [node["teacher"]["metrics"][metric] for node in seeds.values()]
    summary = {"metric": metric, "teacher_16step": teacher, "rows": rows}
    if REFERENCE_RUN in rows and CMT_RUN in rows:
        pairs = list(zip(rows[REFERENCE_RUN], rows[CMT_RUN]))
        summary["targets"] = {
            "cmt_steps_at_most_half_of_teacher_start": [
                c["steps_to_reach"] is not None and c["steps_to_reach"] <= 0.5 * t["steps_to_reach"] for t, c in pairs],
            "cmt_final_2step_over_teacher_16step": [
                c["final_2step"] / seeds[c["seed"]]["teacher"]["metrics"][metric] for _, c in pairs]}
    results.tree["summary"] = summary
    results.save()
    return summary


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def _fmt(value, digits=4):
    return "-" if value is None else f"{value:.{digits}g}"


def markdown_table(summary):
    metric = summary["metric"]
    lines = [f"| run | start 2-step {metric} | final 1-step | final 2-step | steps to reach teacher-start final "
             "(per seed) | cost to reach, s (build + mid + post) | steps to reach 1.25x teacher 16-step (per seed) "
             "| post wall s (full run, with evals) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, per_seed in summary["rows"].items():
        steps, quality = (", ".join("never" if r[key] is None else str(r[key]) for r in per_seed)
                          for key in ("steps_to_reach", "steps_to_quality"))
        cost = _mean(r["seconds_to_reach"] for r in per_seed)
        setup = _mean(r["setup_seconds"] for r in per_seed)
        cost_text = "-" if cost is None else f"{cost:.0f}" + (f" (incl. {setup:.0f} setup)" if setup else "")
        lines.append(f"| {name} | {_fmt(_mean(r['start_2step'] for r in per_seed))} | "
                     f"{_fmt(_mean(r['final_1step'] for r in per_seed))} | {_fmt(_mean(r['final_2step'] for r in per_seed))} | "
                     f"{steps} | {cost_text} | {quality} | {_mean(r['post_seconds'] for r in per_seed):.0f} |")
    lines.append(f"| teacher, DPM-Solver++(3M) 16 steps | | | {_fmt(_mean(summary['teacher_16step']))} | | | | |")
    return "\n".join(lines)


def plot(results, data, settings, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metric = settings["metric"]
    seeds = [node for node in results.tree["seeds"].values() if "runs" in node]
    colors = {"ect-random": "tab:gray", "ect-teacher": "tab:blue", "ect-cmt": "tab:red", "ect-cmt-schedule": "tab:orange",
              "meanflow-random": "tab:olive", "meanflow-cmt": "tab:purple"}
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), sharey=True)
    for axis, column, title in ((axes[0], 1, "1-step"), (axes[1], 2, "2-step")):
        for name in RUNS:
            curves = [np.array(node["runs"][name]["curve"]) for node in seeds if name in node["runs"]]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            steps = curves[0][:length, 0]
            values = np.stack([c[:length, column] for c in curves])
            label = name if len(curves) == len(seeds) else f"{name} ({len(curves)} of {len(seeds)} seeds)"
            axis.plot(steps, values.mean(0), color=colors[name], label=label, marker=".")
            if len(curves) > 1:
                axis.fill_between(steps, values.min(0), values.max(0), color=colors[name], alpha=0.15)
        teacher = statistics.mean(node["teacher"]["metrics"][metric] for node in seeds)
        axis.axhline(teacher, color="black", linestyle="--", label="teacher, 16 steps")
        axis.axhline(1.25 * teacher, color="black", linestyle=":", label="1.25 x teacher")
        axis.set_yscale("log")
        axis.set_xlabel("post-training steps")
        axis.set_title(f"{title} sampling")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(f"{data}: {metric} against post-training steps ({len(seeds)} seed{'s' if len(seeds) > 1 else ''}: "
                 "mean, band = min to max)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def sample_figure(data, student_path, path, count=100):
    """Teacher 16 steps next to the CMT-started ECT student's 1 and 2 steps, same noise."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher, _ = resolve_teacher(data)
    student = load_network(student_path)
    points = data_kind(data) == "toy"
    count = 2000 if points else count
    labels = pick_labels("random" if points else "cycle", count, teacher.label_dim)
    seeds = list(range(count))
    panels = [("teacher, DPM-Solver++(3M) 16 steps", generate(teacher, seeds, labels, steps=16))]
    for steps in (1, 2):
        panels.append((f"CMT + ECT student, {steps} step{'s' if steps > 1 else ''}",
                       generate(student, seeds, labels, sampler="flowmap", steps=steps, mid_sigma=TWO_STEP_SIGMA)))
    if points:
        save_scatter([(samples, title) for title, samples in panels], path, reference=resolve_data(data).reference())
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.3))
    for axis, (title, samples) in zip(axes, panels):
        axis.imshow(image_grid(samples.clamp(-1, 1), nrow=10), cmap="gray", vmin=0, vmax=255)
        axis.set_title(title, fontsize=9)
        axis.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_ints(ctx, param, value):
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"comma-separated integers, got {value!r}") from None


def quick_sizes(ctx, param, value):
    if value:
        ctx.default_map = {**QUICK, **(ctx.default_map or {})}


@click.command(context_settings={"show_default": True})
@click.option("--quick", is_flag=True, is_eager=True, expose_value=False, callback=quick_sizes,
              help="Small sizes (" + ", ".join(f"{key}={value}" for key, value in QUICK.items()) + ") unless given.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--data", "datas", multiple=True, default=["toy:checkerboard", "mnist"],
              help="Built-in data with a built-in teacher (toy:NAME, mnist); repeat for several.")
@click.option("--seeds", default="0,1,2", callback=parse_ints, help="Seeds of the toy runs.")
@click.option("--mnist-seeds", default="0", callback=parse_ints, help="Seeds of the mnist runs.")
@click.option("--runs", "run_names", default=None,
              help="Comma-separated subset of " + ", ".join(RUNS) + " [toy: all; mnist: all but ect-cmt-schedule].")
@click.option("--post-steps", type=click.IntRange(min=1), default=None, help="[toy 1000, mnist 300]")
@click.option("--mid-steps", type=click.IntRange(min=1), default=None, help="[toy 1000, mnist 300]")
@click.option("--num-trajectories", type=click.IntRange(min=1), default=None, help="[toy 2000, mnist 1000]")
@click.option("--sample-every", type=click.IntRange(min=1), default=None, help="[toy 100, mnist 50]")
@click.option("--num-samples", type=click.IntRange(min=2), default=None, help="Samples per metric [toy 2000, mnist 500].")
@click.option("--post-args", multiple=True, metavar="RUN=OPTIONS",
              help="Extra `cmt-train post` options for one run, e.g. 'meanflow-cmt=--norm-p 0 --lr 3e-5'; repeatable.")
@click.option("--threads", type=click.IntRange(min=1), default=1, help="OMP_NUM_THREADS of every command.")
@click.option("--figures", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also copy the plots and sample figures here (e.g. docs/img).")
def main(out, datas, seeds, mnist_seeds, run_names, post_steps, mid_steps, num_trajectories, sample_every, num_samples,
         post_args, threads, figures):
    """Measure the paper's claim on built-in data and print the table."""
    if run_names is not None:
        run_names = [name.strip() for name in run_names.split(",") if name.strip()]
        unknown = sorted(set(run_names) - set(RUNS))
        if unknown:
            raise click.BadParameter(f"unknown runs {unknown}; valid: {', '.join(RUNS)}", param_hint="--runs")
    extra_args = {}
    for item in post_args:
        name, _, options = item.partition("=")
        if name not in RUNS or not options.strip():
            raise click.BadParameter(f"{item!r}: expected RUN=OPTIONS with RUN one of {', '.join(RUNS)}",
                                     param_hint="--post-args")
        extra_args[name] = options.split()
        try:
            post_options(extra_args[name])
        except click.ClickException as error:
            raise click.BadParameter(f"{item!r}: {error.format_message()}", param_hint="--post-args") from None
    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    overrides = dict(post_steps=post_steps, mid_steps=mid_steps, num_trajectories=num_trajectories,
                     sample_every=sample_every, num_samples=num_samples)
    for data in datas:
        wall = time.perf_counter()
        if data not in BUILTIN_TEACHERS or not builtin_teacher_path(data).is_file():
            click.echo(f"[{data}] skipped: no built-in teacher {builtin_teacher_path(data)}")
            continue
        settings = {**PRESETS[data_kind(data)], **{k: v for k, v in overrides.items() if v is not None},
                    "post_args": extra_args}
        if run_names is not None:
            settings["runs"] = run_names
        results = Results(out / f"claim_{slug(data)}.json")
        stored = results.tree.get("settings")
        budget = [key for key in settings if key != "runs"]
        if stored is not None and any(stored.get(key) != settings[key] for key in budget):
            changed = {key: (stored.get(key), settings[key]) for key in budget if stored.get(key) != settings[key]}
            raise click.UsageError(f"{results.path} holds runs made with other settings (stored, asked): {changed}; "
                                   "pass the same options or choose another --out")
        results.tree["settings"] = settings
        results.tree.setdefault("machine", {"cpu_threads_per_command": threads, "torch": torch.__version__,
                                   "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()})
        for seed in (mnist_seeds if data == "mnist" else seeds):
            run_seed(results, data, seed, settings, out, threads)
        summary = summarize(results, settings)
        table = markdown_table(summary)
        (out / f"table_{slug(data)}.md").write_text(table + "\n")
        plot(results, data, settings, out / f"claim_{slug(data)}.png")
        cmt_student = out / slug(data) / f"seed{(mnist_seeds if data == 'mnist' else seeds)[0]}" / CMT_RUN / "post.safetensors"
        if cmt_student.is_file():
            sample_figure(data, cmt_student, out / f"claim_{slug(data)}_samples.png")
        if figures is not None:
            figures.mkdir(parents=True, exist_ok=True)
            for name in (f"claim_{slug(data)}.png", f"claim_{slug(data)}_samples.png"):
                if (out / name).is_file():
                    (figures / name).write_bytes((out / name).read_bytes())
        click.echo(f"\n## {data} ({summary['metric']}; threshold = the {REFERENCE_RUN} run's final 2-step metric)\n")
        click.echo(table)
        if "targets" in summary:
            click.echo(f"\ntargets: {json.dumps(summary['targets'])}")
        results.save()
        click.echo(f"\n[{data}] {time.perf_counter() - wall:.0f} s in this call (stages already in the results "
                   f"are not re-run); results in {results.path}")


if __name__ == "__main__":
    main()
