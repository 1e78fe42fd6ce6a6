"""The paper's claim as cost to reach quality: does post-training from CMT weights reach a good 2-step
model at a lower total cost (building and mid-training included) than the same post-training from
the teacher's weights or from scratch? Prints and writes the figures (no pass/fail).

For each data set (`mnist` with the built-in teacher, `toy:checkerboard`) and seed:
1. the teacher's 16-step DPM-Solver++(3M) metric on the evaluation noise (the thresholds:
   Q1 = 1.5x, Q2 = 1.25x it);
2. `cmt.build_trajectories` (16-step trajectories), `cmt.mid_train(target="endpoint")` (the CMT
   weights for ECT) and `target="flowmap"` (for MeanFlow);
3. `cmt.post_train` from six starts: ECT from random weights, from the teacher and from the CMT
   endpoint weights; MeanFlow from random weights, from the teacher (a flow-map network built from
   the diffusion weights) and from the CMT flow-map weights. Each uses the project's recipe for the
   data (`recipe="mnist"` / `"toy"`, where it has settings for the method); the CMT starts run
   `post_steps`, every other start `baseline_factor` (4) times as many;
4. every run's EMA weights every `eval_every` steps (snapshots) and at step 0, sampled with 1 and 2
   steps from the same noise seeds and labels, scored with the data's built-in metric (FD-MNIST /
   energy distance).

Cost, counted two ways in the same run, both including the build and the mid-training for the CMT
starts (the teacher's own pre-training is shared by every start and not counted):
- network passes: images through a student forward+backward (one per image per training step, for
  every method: ECT's no-grad target forward and MeanFlow's JVP are not counted, the same for every
  start of a method), plus the teacher's forward evaluations at 1/3 of a forward+backward each: in
  the build (trajectories x nfe / 3) and in flow-map mid-training's velocity rows (steps x batch x
  velocity share / 3);
- wall seconds: the build call's wall time plus the training loops' logged time up to the step
  (evaluations excluded: the runs evaluate after training, from snapshots).

Per start and seed: the cost at the first evaluated step whose 2-step metric is <= Q (or "not
reached"). cost_ratio = the CMT start's cost / the best baseline's cost (a baseline that does not
reach Q counts with its whole budget: the ratio is then an upper bound), median over seeds (a seed
where the CMT start does not reach Q counts as infinite; null if that is the median).

    python benchmarks/bench_claim.py --out runs/claim --workers 2            # default budget (2-core CPU)
    python benchmarks/bench_claim.py --out /tmp/claim --quick                # < 5 minutes: every stage, same JSON
    python benchmarks/bench_claim.py --out runs/claim-gpu --full --workers 6 --threads 2  # GPU budget
    python benchmarks/bench_claim.py --out runs/claim --docs docs            # (re)write docs/claim.json + plots

Resumable: every stage writes its result into its own folder under OUT/<data>/seed<k>/; a rerun with
the same --out skips finished stages, resumes interrupted training (`resume=True`) and evaluations.
`--workers N` runs N (data, seed) units as separate processes (one torch thread each by default).
Outputs: OUT/claim.json (summary in the schema of docs/claim.md, per-seed raw curves), OUT/claim.md
(the tables), OUT/claim_cost_<data>.png (2-step metric against cumulative cost: median, min-max band over
seeds), OUT/claim_cost_<data>_samples.png (the teacher's and every start's final 2-step samples).
"""
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click
import torch

from cmt.builders.build import build_trajectories
from cmt.checkpoint import load_network
from cmt.cli.train import main as train_command
from cmt.datasets import resolve_data
from cmt.edm import SIGMA_MAX, TWO_STEP_SIGMA
from cmt.images import image_grid, save_scatter
from cmt.labels import pick_labels
from cmt.manifest import MANIFEST
from cmt.metrics import embedded_metric
from cmt.outputs import step_file_name
from cmt.sampling import generate
from cmt.stages import Call
from cmt.teachers import builtin_teacher_path, resolve_teacher
from cmt.trainers import recipes
from cmt.trainers.mid import mid_train
from cmt.trainers.post import METHODS as POST_METHODS, load_init, post_train
from cmt.trainers.run_files import SNAPSHOT_DIR, read_log
from cmt.trainers.students import build_student

# name: (post-training method, what it starts from); "mid-endpoint" / "mid-flowmap" are the CMT weights.
STARTS = {
    "ect-random": ("ect", "random"),
    "ect-teacher": ("ect", "teacher"),
    "ect-cmt": ("ect", "mid-endpoint"),
    "meanflow-random": ("meanflow", "random"),
    "meanflow-teacher": ("meanflow", "teacher"),
    "meanflow-cmt": ("meanflow", "mid-flowmap"),
}
METHODS = ("ect", "meanflow")
CMT_START = {"ect": "ect-cmt", "meanflow": "meanflow-cmt"}
THRESHOLDS = {"q1": 1.5, "q2": 1.25}      # x the teacher's 16-step metric, for the 2-step student
TEACHER_STEPS = 16
NFE = 16                                   # the build's teacher evaluations per trajectory (DPM-Solver++(3M))
TEACHER_FORWARD_SHARE = 1 / 3              # a forward pass ~ 1/3 of a forward+backward
SAMPLE_SEEDS_START = 10**6                 # the evaluation noise: sample i uses seed 10**6 + i, every time
LABEL_SEED = 0                             # and the same labels (pick_labels("random", ..., seed=0))
METRICS = {"toy": "energy_distance", "mnist": "fd_mnist"}

# Budgets per data kind. batch sizes and learning rates come from the recipe (unless set here).
# default: fits 90 minutes on a 2-core CPU with --workers 2 (docs/claim.md, "Runtime"); quick: every
# stage in minutes; smoke: the test's (toy only, seconds); full: a GPU machine.
BUDGETS = {
    "default": {
        "toy": dict(seeds=[0, 1, 2], num_trajectories=2000, mid_steps=1000, post_steps=250, baseline_factor=4,
                    eval_every=50, num_samples=2000),
        "mnist": dict(seeds=[0, 1, 2], num_trajectories=1000, mid_steps=300, post_steps=80, baseline_factor=4,
                      eval_every=40, num_samples=500),
    },
    "quick": {
        "toy": dict(seeds=[0], num_trajectories=256, mid_steps=100, post_steps=20, baseline_factor=4, eval_every=20,
                    num_samples=1000),
        "mnist": dict(seeds=[0], num_trajectories=64, mid_steps=6, post_steps=2, baseline_factor=4, eval_every=2,
                      num_samples=100, batch_size=32),
    },
    "smoke": {
        "toy": dict(seeds=[0], num_trajectories=64, mid_steps=4, post_steps=2, baseline_factor=4, eval_every=2,
                    num_samples=64, batch_size=32),
    },
    "full": {
        "toy": dict(seeds=[0, 1, 2], num_trajectories=4000, mid_steps=1000, post_steps=500, baseline_factor=4,
                    eval_every=100, num_samples=4096),
        "mnist": dict(seeds=[0, 1, 2], num_trajectories=4000, mid_steps=600, post_steps=200, baseline_factor=4,
                      eval_every=25, num_samples=2000),
    },
}
# default with a quarter of the mid-training (the CMT start's setup cost); the baselines are the
# default's, so their stages can be copied from a default run's OUT (docs/claim.md, "Shorter mid-training").
BUDGETS["short-mid"] = {"toy": {**BUDGETS["default"]["toy"], "mid_steps": 250},
                        "mnist": {**BUDGETS["default"]["mnist"], "mid_steps": 100}}
# default with the baselines run 10x the CMT start's post-training steps: more than twice the CMT
# start's build and mid-training cost, so that a baseline that gets there gives a measured ratio and
# one that does not a bound below 0.5 (docs/claim.md, "Longer baselines"); the CMT stages are the
# default's, and can be copied from a default run's OUT.
BUDGETS["long-baselines"] = {kind: {**budget, "baseline_factor": 10} for kind, budget in BUDGETS["default"].items()}
DEFAULT_DATA = ("mnist", "toy:checkerboard")


def data_kind(data):
    return "mnist" if data == "mnist" else "toy"


def slug(data):
    return data.replace("toy:", "")


# ---- small file helpers -------------------------------------------------------------------------

def write_json(path, value):
    """Through a temporary name and a rename: an interrupted write leaves the old file or none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def read_json(path):
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def cached(path, compute):
    """The JSON at `path`, or `compute()` written there first (a finished stage is never redone)."""
    value = read_json(path)
    if value is None:
        value = compute()
        write_json(path, value)
    return value


def call_logged(call, log_path):
    """Run one stage (`cmt.stages.Call`), its printed output into `log_path`; returns (wall seconds or
    None when its output was there, the equivalent command's words, the function's result)."""
    log = lambda command: click.echo("  $ " + command, err=True)
    try:
        with open(log_path, "a") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
            result, seconds = call.run(log)
    except Exception as error:
        raise click.ClickException(f"{call.program} failed ({type(error).__name__}: {error}); see {log_path}") \
            from error
    return seconds, call.words(), result


def post_options(options):
    """`cmt-train post` options (a --post-args value) as `post_train` keywords, read by the command itself."""
    command = train_command.commands["post"]
    with command.make_context("cmt-train post", list(options), resilient_parsing=True) as ctx:
        return {name: value for name, value in ctx.params.items()
                if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}


def recipe_for(phase, data, method=None):
    """The project's recipe name for `data` if it has settings for `phase` (post: for `method`),
    else None (then the entry point's defaults apply; the results record which)."""
    name = recipes.builtin_recipe(data)
    settings = (recipes.RECIPES.get(name) or {}).get(phase)
    if not settings or (phase == "post" and method not in settings):
        return None
    return name


# ---- evaluation ---------------------------------------------------------------------------------

def evaluation_inputs(label_dim, num_samples):
    seeds = list(range(SAMPLE_SEEDS_START, SAMPLE_SEEDS_START + num_samples))
    return seeds, pick_labels("random", num_samples, label_dim, seed=LABEL_SEED)


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@torch.no_grad()
def student_metrics(net, data, num_samples, consistency, mid_sigma=TWO_STEP_SIGMA):
    """`{"1step": m, "2step": m}`: the headline metric of 1- and 2-step samples (fixed seeds and labels)."""
    net = net.to(device()).eval()
    seeds, labels = evaluation_inputs(net.label_dim, num_samples)
    metric = METRICS[data_kind(data)]
    scores = {}
    for steps in (1, 2):
        samples = generate(net, seeds, labels, sampler="flowmap", steps=steps, mid_sigma=mid_sigma,
                           sigma_max=SIGMA_MAX, renoise=consistency)
        scores[f"{steps}step"] = float(embedded_metric(resolve_data(data), samples)[metric])
    return scores


@torch.no_grad()
def teacher_metric(data, num_samples):
    net, _ = resolve_teacher(data)
    net = net.to(device()).eval()
    seeds, labels = evaluation_inputs(net.label_dim, num_samples)
    start = time.perf_counter()
    samples = generate(net, seeds, labels, solver="dpm++3m", steps=TEACHER_STEPS)
    return {"metric": METRICS[data_kind(data)], "value": float(embedded_metric(resolve_data(data), samples)[
        METRICS[data_kind(data)]]), "solver": "dpm++3m", "steps": TEACHER_STEPS, "num_samples": num_samples,
            "seconds": time.perf_counter() - start}


def initial_student(data, method, init, seed):
    """The network `post_train` starts from (its step 0), built the way it builds it."""
    teacher = None if Path(init).is_file() else data
    config, state, _, _, _ = load_init(init, teacher, resolve_data(data), None)
    return build_student(POST_METHODS[method].student(config), state, seed=seed)


# ---- training stages ----------------------------------------------------------------------------

def cumulative_wall(records):
    """`[[step, seconds of training up to it]]` from a log.jsonl (each record: the mean seconds per
    step over the steps since the previous one; evaluations run after training)."""
    timed = {record["step"]: record["sec_per_step"] for record in records if "sec_per_step" in record}
    points, total, previous = [[0, 0.0]], 0.0, 0
    for step in sorted(timed):   # a resumed run may log a step twice: its last record counts
        total += timed[step] * (step - previous)
        previous = step
        points.append([step, total])
    return points


def wall_at(points, step):
    """Training seconds up to `step` (linear between logged steps)."""
    for (s0, w0), (s1, w1) in zip(points, points[1:]):
        if s0 <= step <= s1:
            return w0 + (w1 - w0) * (step - s0) / max(s1 - s0, 1)
    return points[-1][1]


def train_stage(folder, program, function, kwargs, model_name):
    """One training run into `folder`, resumable (`cmt.stages.Call`): a finished one (its model
    written) is kept, an interrupted one continues from its training state, a folder without one
    starts over."""
    folder = Path(folder)
    result = read_json(folder.with_name(folder.name + ".json"))
    if result is not None:
        return result
    call = Call(program, function, {**kwargs, "out": str(folder)}, folder / f"{model_name}.safetensors", trains=True)
    seconds, command, _ = call_logged(call, folder.with_name(folder.name + ".log"))
    run = json.loads((folder / "run.json").read_text())
    records = read_log(folder)
    result = {"command": command, "call_seconds": seconds, "batch_size": run["train"]["batch_size"],
              "max_steps": run["train"]["max_steps"], "lr": run["train"]["lr"], "recipe": run.get("recipe"),
              "wall": cumulative_wall(records), "options": run.get("options"),
              "velocity_share": run.get("velocity_share") or 0.0}
    write_json(folder.with_name(folder.name + ".json"), result)
    return result


def evaluate_curve(folder, data, method, init, seed, grid, num_samples, mid_sigma):
    """`[[step, 1-step, 2-step]]` at every grid step, from the snapshots (step 0: the initial
    network); each point is kept in folder/curve.json as it is done."""
    path = Path(folder) / "curve.json"
    done = {point[0]: point for point in (read_json(path) or [])}
    consistency = method != "meanflow"
    for step in grid:
        if step in done:
            continue
        if step == 0:
            net = initial_student(data, method, init, seed)
        else:
            snapshot = Path(folder) / SNAPSHOT_DIR / step_file_name("snapshot", step, ".safetensors")
            net = load_network(snapshot if snapshot.is_file() else Path(folder) / "post.safetensors")
        scores = student_metrics(net, data, num_samples, consistency, mid_sigma)
        done[step] = [step, scores["1step"], scores["2step"]]
        write_json(path, [done[s] for s in sorted(done)])
    return [done[s] for s in grid]


def run_unit(out, data, seed, budget, starts, post_args):
    """Every stage of one (data, seed); stages already done are skipped."""
    root = out / slug(data) / f"seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    tag = f"[{data} seed {seed}]"
    teacher = cached(root / "teacher.json", lambda: teacher_metric(data, budget["num_samples"]))
    click.echo(f"{tag} teacher {TEACHER_STEPS}-step {teacher['metric']} = {teacher['value']:.4g}", err=True)
    batch = {"batch_size": budget["batch_size"]} if "batch_size" in budget else {}

    def build():
        kwargs = dict(teacher=data, out=str(root / "trajectories"), num_trajectories=budget["num_trajectories"],
                      nfe=NFE, seed=seed, progress=False)
        seconds, command, _ = call_logged(Call("cmt-build", build_trajectories, kwargs, root / "trajectories" / MANIFEST),
                                          root / "build.log")
        return {"seconds": seconds, "command": command, "num_trajectories": budget["num_trajectories"], "nfe": NFE}

    built = cached(root / "build.json", build)
    mids = {}
    for target in ("endpoint", "flowmap"):
        if not any(STARTS[name][1] == f"mid-{target}" for name in starts):
            continue
        steps = budget["mid_steps"]
        kwargs = dict(data=str(root / "trajectories"), target=target, out=str(root / f"mid-{target}"),
                      recipe=recipe_for("mid", data), max_steps=steps, seed=seed, workers=0,
                      num_samples=min(budget["num_samples"], 256), log_every=max(1, steps // 10),
                      ckpt_every=max(1, steps // 4), progress=False, **batch)
        mids[f"mid-{target}"] = train_stage(root / f"mid-{target}", "cmt-train mid", mid_train, kwargs, "mid")
        click.echo(f"{tag} mid {target}: {steps} steps", err=True)

    for name in starts:
        method, init = STARTS[name]
        cmt_start = init.startswith("mid-")
        steps = budget["post_steps"] * (1 if cmt_start else budget["baseline_factor"])
        init_arg = str(root / init / "mid.pt") if cmt_start else init
        extra = post_options(post_args.get(name, []))
        if method == "ect" and not cmt_start:
            # ECT's own curriculum from non-CMT weights (the gap shrinks every max_steps / 8), not the
            # recipe's fixed CMT gap (stage 11), which is the paper's setting for mid-trained weights.
            extra.setdefault("stage", None)
        kwargs = dict(init=init_arg, method=method, data=data, **({} if cmt_start else {"teacher": data}),
                      recipe=recipe_for("post", data, method), max_steps=steps, seed=seed,
                      log_every=budget["eval_every"], snapshot_every=budget["eval_every"],
                      ckpt_every=budget["eval_every"],   # an interrupted run resumes from its last grid step
                      num_samples=min(budget["num_samples"], 256), out=str(root / name), progress=False,
                      **batch, **extra)
        run = train_stage(root / name, "cmt-train post", post_train, kwargs, "post")
        grid = list(range(0, steps + 1, budget["eval_every"]))
        if grid[-1] != steps:
            grid.append(steps)
        mid_sigma = (run.get("options") or {}).get("mid_sigma") or TWO_STEP_SIGMA
        curve = evaluate_curve(root / name, data, method, init_arg, seed, grid, budget["num_samples"], mid_sigma)
        click.echo(f"{tag} {name}: 2-step {teacher['metric']} {curve[0][2]:.4g} -> {curve[-1][2]:.4g} "
                   f"({steps} steps)", err=True)
    return root


# ---- summary ------------------------------------------------------------------------------------

def setup_cost(root, init):
    """(passes, wall seconds) before post-training: build + mid-training for a CMT start, else 0."""
    if not init.startswith("mid-"):
        return 0.0, 0.0
    built, mid = read_json(root / "build.json"), read_json(root / f"{init}.json")
    # flow-map mid-training's velocity rows add one teacher forward each
    teacher_forwards = built["num_trajectories"] * built["nfe"] + mid["max_steps"] * mid["batch_size"] * mid.get(
        "velocity_share", 0.0)
    passes = teacher_forwards * TEACHER_FORWARD_SHARE + mid["max_steps"] * mid["batch_size"]
    return passes, built["seconds"] + mid["wall"][-1][1]


def start_record(root, name):
    """One start on one seed: its curve with the cumulative cost of every point, or None if unfinished."""
    method, init = STARTS[name]
    run, curve = read_json(root / f"{name}.json"), read_json(root / name / "curve.json")
    if run is None or curve is None or curve[-1][0] != run["max_steps"]:
        return None
    passes0, wall0 = setup_cost(root, init)
    points = [{"step": step, "passes": passes0 + step * run["batch_size"], "wall_s": wall0 + wall_at(run["wall"], step),
               "metric_1step": one, "metric_2step": two} for step, one, two in curve]
    return {"method": method, "init": init, "steps": run["max_steps"], "batch_size": run["batch_size"],
            "lr": run["lr"], "recipe": run["recipe"], "command": run["command"], "setup_passes": passes0,
            "setup_wall_s": wall0, "curve": points}


def first_reach(points, threshold):
    """The first point whose 2-step metric is <= threshold, or None."""
    return next((point for point in points if point["metric_2step"] <= threshold), None)


def seed_ratio(cmt, baselines, threshold, unit):
    """CMT cost / best baseline cost at one threshold on one seed (None: the CMT start did not
    reach it); a baseline that does not reach it counts with its whole budget."""
    reached = first_reach(cmt["curve"], threshold)
    costs = []
    for record in baselines:
        point = first_reach(record["curve"], threshold)
        costs.append((point or record["curve"][-1])[unit])
    if reached is None or not costs:
        return None, None
    best = min(costs)
    return reached[unit] / best if best > 0 else math.inf, best


def median_ratio(ratios):
    """Median over seeds, a seed without a ratio counting as infinite; None if that is the median."""
    if not ratios:
        return None
    value = statistics.median(math.inf if r is None else r for r in ratios)
    return None if math.isinf(value) else value


def summarize(out, data, budget):
    """The issue's summary for one data set: per method, cost ratios at Q1 and Q2 and the CMT start's
    final 2-step metric over the teacher's, with every start's per-seed raw curves."""
    seeds = {}
    for seed in budget["seeds"]:
        root = out / slug(data) / f"seed{seed}"
        teacher = read_json(root / "teacher.json")
        if teacher is None:
            continue
        seeds[seed] = {"root": root, "teacher": teacher["value"],
                       "starts": {name: record for name in STARTS if (record := start_record(root, name))}}
    summary = {}
    for method in METHODS:
        cmt_name = CMT_START[method]
        entry = {"cost_ratio_q1": None, "cost_ratio_q2": None, "final_2step_over_teacher": None}
        per_seed, finals = {}, []
        for seed, node in seeds.items():
            cmt = node["starts"].get(cmt_name)
            baselines = [r for name, r in node["starts"].items() if r["method"] == method and name != cmt_name]
            if cmt is None:
                continue
            row = {"teacher_16step": node["teacher"],
                   "final_2step_over_teacher": cmt["curve"][-1]["metric_2step"] / node["teacher"]}
            finals.append(row["final_2step_over_teacher"])
            for key, factor in THRESHOLDS.items():
                threshold = factor * node["teacher"]
                row[f"{key}_threshold"] = threshold
                for unit, suffix in (("passes", ""), ("wall_s", "_wall")):
                    ratio, best = seed_ratio(cmt, baselines, threshold, unit)
                    row[f"cost_ratio_{key}{suffix}"] = ratio
                    row[f"best_baseline_cost_{key}{suffix}"] = best
                for name, record in node["starts"].items():
                    if record["method"] == method:
                        point = first_reach(record["curve"], threshold)
                        row.setdefault("cost_to_reach", {}).setdefault(name, {})[key] = (
                            "not reached" if point is None else
                            {"step": point["step"], "passes": point["passes"], "wall_s": point["wall_s"]})
            per_seed[str(seed)] = row
        if not per_seed and not any(r["method"] == method for node in seeds.values() for r in node["starts"].values()):
            continue   # no run of this method under OUT: report() keeps what OUT/claim.json holds for it
        if per_seed:
            for key in THRESHOLDS:
                entry[f"cost_ratio_{key}"] = median_ratio([row[f"cost_ratio_{key}"] for row in per_seed.values()])
                entry[f"cost_ratio_{key}_wall"] = median_ratio([row[f"cost_ratio_{key}_wall"]
                                                                for row in per_seed.values()])
            entry["final_2step_over_teacher"] = statistics.mean(finals)
            # Whether a ratio is only an upper bound (no baseline reached the threshold on any seed),
            # and how far the baselines got: the figures a bounded ratio needs beside it.
            for key in THRESHOLDS:
                entry[f"cost_ratio_{key}_is_upper_bound"] = all(
                    all(reach[key] == "not reached" for name, reach in row["cost_to_reach"].items() if name != cmt_name)
                    for row in per_seed.values())
            best_finals = [min(finals_of) / node["teacher"] for node in seeds.values()
                           if (finals_of := [r["curve"][-1]["metric_2step"] for name, r in node["starts"].items()
                                             if r["method"] == method and name != cmt_name])]
            entry["best_baseline_final_2step_over_teacher"] = statistics.mean(best_finals) if best_finals else None
        entry.update({
            "cost_unit": "network passes: images through a student forward+backward, plus the teacher's forward "
                         "evaluations (the build's, flow-map mid-training's velocity rows) at 1/3 each; "
                         "cost_ratio_*_wall: the same in wall seconds",
            "not_reached": "a baseline that does not reach the threshold counts with its whole budget (the ratio "
                           "is then an upper bound); a seed where the CMT start does not reach it counts as an "
                           "infinite ratio; the value is the median over seeds (null: not reached on most seeds)",
            "thresholds": {key: f"{factor} x the teacher's {TEACHER_STEPS}-step metric, 2-step student sampling"
                           for key, factor in THRESHOLDS.items()},
            "metric": METRICS[data_kind(data)], "cmt_start": cmt_name,
            "baselines": [name for name in STARTS if STARTS[name][0] == method and name != cmt_name],
            "seeds": per_seed,
            "teacher_16step": {str(seed): node["teacher"] for seed, node in seeds.items()},
            "curves": {name: {str(seed): node["starts"][name] for seed, node in seeds.items() if name in node["starts"]}
                       for name in STARTS if STARTS[name][0] == method},
        })
        summary[method] = entry
    return summary


def _fmt(value, digits=3):
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def markdown_tables(summary, data):
    """The table of one data set: per start, seeds reaching Q1 / Q2 and the median cost to reach them."""
    lines = [f"### {data}", "",
             "| start | steps | final 2-step / teacher (mean) | Q1 reached | cost to Q1, passes (median) | "
             "wall s | Q2 reached | cost to Q2, passes (median) | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for method, entry in summary.items():
        for name, per_seed in entry["curves"].items():
            if not per_seed:
                continue
            teacher = entry.get("teacher_16step", {})
            cells = [name, str(next(iter(per_seed.values()))["steps"]),
                     _fmt(statistics.mean(r["curve"][-1]["metric_2step"] / teacher[s] for s, r in per_seed.items()))]
            for key in THRESHOLDS:   # reaching is summarised where the CMT start ran (a baseline-only run: "0 of 0")
                reached = [entry["seeds"][s]["cost_to_reach"][name][key] for s in per_seed if s in entry["seeds"]]
                hits = [r for r in reached if r != "not reached"]
                cells += [f"{len(hits)} of {len(reached)}",
                          _fmt(statistics.median(r["passes"] for r in hits)) if hits else "not reached",
                          _fmt(statistics.median(r["wall_s"] for r in hits), 4) if hits else "-"]
            lines.append("| " + " | ".join(cells) + " |")
        def ratio(key, suffix=""):   # "<= r": no baseline reached the threshold, r counts their whole budget
            bound = "<= " if entry.get(f"cost_ratio_{key}_is_upper_bound") and entry[f"cost_ratio_{key}"] is not None else ""
            return bound + _fmt(entry.get(f"cost_ratio_{key}{suffix}"))
        lines.append(f"| **{method}: cost ratio CMT / best baseline** | | **{_fmt(entry['final_2step_over_teacher'])}** "
                     f"| | **{ratio('q1')}** | **{ratio('q1', '_wall')}** | "
                     f"| **{ratio('q2')}** | **{ratio('q2', '_wall')}** |")
    return "\n".join(lines)


COLORS = {"ect-random": "tab:gray", "ect-teacher": "tab:blue", "ect-cmt": "tab:red",
          "meanflow-random": "tab:olive", "meanflow-teacher": "tab:cyan", "meanflow-cmt": "tab:purple"}


def plot(summary, data, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    summary = {method: entry for method, entry in summary.items() if any(entry["curves"].values())}   # methods that ran
    fig, axes = plt.subplots(len(summary), 2, figsize=(13, 4.2 * len(summary)), squeeze=False)
    for row, (method, entry) in enumerate(summary.items()):
        teachers = [node["teacher_16step"] for node in entry["seeds"].values()]
        for column, (unit, label) in enumerate((("passes", "network passes (build + mid + post)"),
                                                ("wall_s", "wall seconds (build + mid + post)"))):
            axis = axes[row][column]
            for name, per_seed in entry["curves"].items():
                curves = [r["curve"] for r in per_seed.values()]
                if not curves:
                    continue
                length = min(len(c) for c in curves)
                cost = np.median([[p[unit] for p in c[:length]] for c in curves], axis=0)
                values = np.array([[p["metric_2step"] for p in c[:length]] for c in curves])
                axis.plot(cost, np.median(values, axis=0), color=COLORS[name], marker=".", label=f"{name} ({len(curves)})")
                if len(curves) > 1:
                    axis.fill_between(cost, values.min(0), values.max(0), color=COLORS[name], alpha=0.15)
            if teachers:
                teacher = statistics.median(teachers)
                axis.axhline(teacher, color="black", linestyle="--", label="teacher, 16 steps")
                for key, factor in THRESHOLDS.items():
                    axis.axhline(factor * teacher, color="black", linestyle=":", alpha=0.6)
                    axis.annotate(f"{key.upper()} = {factor}x", (1.0, factor * teacher), xycoords=("axes fraction", "data"),
                                  fontsize=7, ha="right", va="bottom")
            axis.set_xlim(left=0)
            axis.set_yscale("log")
            axis.set_xlabel(label)
            axis.set_ylabel(f"2-step {entry['metric']}")
            axis.set_title(f"{data}: {method}")
            axis.grid(alpha=0.3)
        axes[row][1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(f"{data}: 2-step metric against cumulative cost (median over seeds, band = min to max)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def sample_figure(out, data, seed, path, count=100):
    """The teacher (16 steps) next to every start's final student (2 steps), the same noise and labels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = out / slug(data) / f"seed{seed}"
    teacher, _ = resolve_teacher(data)
    points = data_kind(data) == "toy"
    count = 2000 if points else count
    seeds = list(range(SAMPLE_SEEDS_START, SAMPLE_SEEDS_START + count))
    labels = pick_labels("random" if points else "cycle", count, teacher.label_dim)
    panels = [(f"teacher, {TEACHER_STEPS} steps", generate(teacher.to(device()), seeds, labels, solver="dpm++3m",
                                                            steps=TEACHER_STEPS))]
    for name, (method, _) in STARTS.items():
        model = root / name / "post.safetensors"
        if model.is_file():
            panels.append((f"{name}, 2 steps", generate(load_network(model).to(device()), seeds, labels,
                                                        sampler="flowmap", steps=2, mid_sigma=TWO_STEP_SIGMA,
                                                        renoise=method != "meanflow")))
    if points:
        save_scatter([(samples, title) for title, samples in panels], path, reference=resolve_data(data).reference())
        return
    columns = 4
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 4.3 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, (title, samples) in zip(axes.flat, panels):
        axis.imshow(image_grid(samples.clamp(-1, 1), nrow=10), cmap="gray")
        axis.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- driver -------------------------------------------------------------------------------------

def parse_ints(ctx, param, value):
    if value is None:
        return None
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"comma-separated integers, got {value!r}") from None


def run_processes(jobs, workers):
    """Run `(name, command, log path)` jobs, `workers` processes at a time, in the order given
    (longest first); raises naming the failed ones once all have ended."""
    pending, running, failed = list(jobs), [], []
    while pending or running:
        while pending and len(running) < workers:
            name, command, log = pending.pop(0)
            running.append((name, subprocess.Popen(command, stdout=open(log, "a"), stderr=subprocess.STDOUT),
                            time.perf_counter()))
            click.echo(f"{name} started (log {log})")
        time.sleep(2)
        for item in list(running):
            name, process, started = item
            if process.poll() is not None:
                running.remove(item)
                status = "done" if process.returncode == 0 else f"FAILED (exit {process.returncode})"
                click.echo(f"{name} {status} in {time.perf_counter() - started:.0f} s")
                if process.returncode:
                    failed.append(name)
    if failed:
        raise click.ClickException(f"failed: {', '.join(failed)}; see their logs (a rerun resumes them)")


def run_units(units, workers, argv, out):
    """Run `(data, seed)` units as processes of this script (--unit), `workers` at a time."""
    run_processes([(f"[{data} seed {seed}]", [sys.executable, str(Path(__file__).resolve()), *argv, "--unit",
                                              f"{data}@{seed}"], out / f"unit-{slug(data)}-seed{seed}.log")
                   for data, seed in units], workers)


def budget_of(name, data, seeds):
    budget = dict(BUDGETS[name][data_kind(data)])
    if seeds is not None:
        budget["seeds"] = seeds
    return budget


@click.command(context_settings={"show_default": True})
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--quick", "budget_name", flag_value="quick", help="Every stage in under 5 minutes (figures mean nothing).")
@click.option("--full", "budget_name", flag_value="full", help="The larger budget, for a GPU machine.")
@click.option("--smoke", "budget_name", flag_value="smoke", help="Seconds, toy only: the test's size.")
@click.option("--budget", "budget_name", type=click.Choice(list(BUDGETS)), default="default",
              help="The budget by name (--quick / --full / --smoke are short for it).")
@click.option("--data", "datas", multiple=True, help=f"Data sets [default: {', '.join(DEFAULT_DATA)}; smoke: toy].")
@click.option("--seeds", default=None, callback=parse_ints, help="Seeds [default: the budget's, 0,1,2 or 0].")
@click.option("--starts", "start_names", default=",".join(STARTS), help="Comma-separated subset of the starts.")
@click.option("--post-args", multiple=True, metavar="START=OPTIONS",
              help="Extra `cmt-train post` options for one start, e.g. 'meanflow-cmt=--norm-p 0'; repeatable "
                   "(the results record them).")
@click.option("--workers", type=click.IntRange(min=1), default=1, help="(data, seed) units run side by side.")
@click.option("--threads", type=click.IntRange(min=1), default=1, help="torch threads per process.")
@click.option("--docs", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write DOCS/claim.json and DOCS/img/claim_*.png (e.g. docs).")
@click.option("--unit", default=None, hidden=True, help="Run one DATA@SEED only (the --workers processes).")
def main(out, budget_name, datas, seeds, start_names, post_args, workers, threads, docs, unit):
    """Measure the paper's claim as cost to reach quality, on several seeds."""
    torch.set_num_threads(threads)
    starts = [name.strip() for name in start_names.split(",") if name.strip()]
    unknown = sorted(set(starts) - set(STARTS))
    if unknown:
        raise click.BadParameter(f"unknown starts {unknown}; valid: {', '.join(STARTS)}", param_hint="--starts")
    extra_args = {}
    for item in post_args:
        name, _, options = item.partition("=")
        if name not in STARTS or not options.strip():
            raise click.BadParameter(f"{item!r}: expected START=OPTIONS with START one of {', '.join(STARTS)}",
                                     param_hint="--post-args")
        extra_args[name] = options.split()
    datas = list(datas) or [d for d in DEFAULT_DATA if data_kind(d) in BUDGETS[budget_name]]
    for data in datas:
        if data_kind(data) not in BUDGETS[budget_name]:
            raise click.BadParameter(f"the {budget_name} budget has no {data_kind(data)} settings", param_hint="--data")
        if not builtin_teacher_path(data).is_file():
            raise click.BadParameter(f"{data}: no built-in teacher at {builtin_teacher_path(data)}", param_hint="--data")
    out.mkdir(parents=True, exist_ok=True)
    settings = {"budget": budget_name, "starts": starts, "post_args": extra_args,
                "budgets": {data: budget_of(budget_name, data, seeds) for data in datas}}
    stored = read_json(out / "settings.json")
    if stored is not None:
        changed = [data for data in datas if data in stored["budgets"]
                   and {k: v for k, v in stored["budgets"][data].items() if k != "seeds"}
                   != {k: v for k, v in settings["budgets"][data].items() if k != "seeds"}]
        if changed or stored.get("post_args", {}) != extra_args:
            raise click.UsageError(f"{out} holds runs made with another budget or --post-args ({stored['budget']}, "
                                   f"{stored.get('post_args')}): pass the same options or choose another --out")
        settings["budgets"] = {**stored["budgets"], **settings["budgets"]}
        settings["starts"] = [name for name in STARTS if name in set(stored["starts"]) | set(starts)]
    if unit is None:
        write_json(out / "settings.json", {**settings, "machine": {
            "cpus": os.cpu_count(), "torch": torch.__version__, "threads_per_process": threads, "workers": workers,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}})
    units = [(data, seed) for data in datas for seed in settings["budgets"][data]["seeds"]]
    if unit is not None:
        data, _, seed = unit.rpartition("@")
        run_unit(out, data, int(seed), settings["budgets"][data], starts, extra_args)
        return
    started = time.perf_counter()
    if workers > 1 and len(units) > 1:
        argv = ["--out", str(out), "--budget", budget_name, "--starts", ",".join(starts), "--threads", str(threads),
                *[f"--post-args={item}" for item in post_args],
                *(["--seeds", ",".join(map(str, seeds))] if seeds is not None else []),
                *[f"--data={data}" for data in datas]]
        run_units(units, workers, argv, out)
    else:
        for data, seed in units:
            run_unit(out, data, seed, settings["budgets"][data], starts, extra_args)
    report(out, settings, docs)
    click.echo(f"{time.perf_counter() - started:.0f} s in this call (finished stages are not re-run); "
               f"results in {out / 'claim.json'}")


def report(out, settings, docs=None):
    """claim.json, claim.md and the figures, from whatever the stages under `out` have finished."""
    claim = read_json(out / "claim.json") or {}
    tables = []
    for data, budget in settings["budgets"].items():
        kind = data_kind(data)
        claim[kind] = {**claim.get(kind, {}), **summarize(out, data, budget)}   # methods run here replace theirs
        tables.append(markdown_tables(claim[kind], data))
        plot(claim[kind], data, out / f"claim_cost_{slug(data)}.png")
        sample_figure(out, data, budget["seeds"][0], out / f"claim_cost_{slug(data)}_samples.png")
    write_json(out / "claim.json", claim)
    (out / "claim.md").write_text("\n\n".join(tables) + "\n")
    click.echo("\n\n".join(tables))
    for kind in claim:
        for method, entry in claim[kind].items():
            bounds = [key for key in THRESHOLDS if entry.get(f"cost_ratio_{key}_is_upper_bound")]
            click.echo(f"{kind} {method}: cost_ratio_q1 {_fmt(entry['cost_ratio_q1'])}, cost_ratio_q2 "
                       f"{_fmt(entry['cost_ratio_q2'])}, final_2step_over_teacher {_fmt(entry['final_2step_over_teacher'])}"
                       + (f" (upper bounds at {', '.join(bounds)}: no baseline reached them)" if bounds else ""))
    if docs is not None:
        (docs / "img").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "claim.json", docs / "claim.json")
        for data in settings["budgets"]:
            for name in (f"claim_cost_{slug(data)}.png", f"claim_cost_{slug(data)}_samples.png"):
                if (out / name).is_file():
                    shutil.copyfile(out / name, docs / "img" / name)


if __name__ == "__main__":
    main()
