"""The paper's claim as cost to reach quality: does post-training from CMT weights reach a good 2-step
model at a lower total cost (building and mid-training included) than the same post-training from
the teacher's weights or from scratch, when every start runs at its own best learning rate? Prints
and writes the figures (no pass/fail). (Over 400 lines: the stages, the tuning stage and the job
runner of one protocol; its arithmetic and report are in claim_report.py.)

For each data set (`mnist` with the built-in teacher, `toy:checkerboard`):
1. setup, for the tuning seed and each evaluation seed: the teacher's 16-step DPM-Solver++(3M)
   metric on that seed's noise (on the evaluation seeds, the thresholds Q1 = 1.5x, Q2 = 1.25x it),
   `cmt.build_trajectories` (16-step trajectories), `cmt.mid_train(target="endpoint")` (the CMT
   weights for ECT) and `target="flowmap"` (for MeanFlow);
2. six starts of `cmt.post_train`: ECT from random weights, from the teacher and from the CMT
   endpoint weights; MeanFlow from random weights, from the teacher (a flow-map network built from
   the diffusion weights) and from the CMT flow-map weights, each with the data's recipe (`recipe=
   "mnist"` / `"toy"`) except its learning rate. The CMT starts run `post_steps`, every other start
   `baseline_factor` (10) times as many;
3. tuning, the same for every start: an lr sweep (`lr_factors` x the recipe's lr, default 0.1, 0.3,
   1, 3, 10) at the start's own budget, on the tuning seed (its own build and mid-training, its own
   evaluation noise: never an evaluation seed's), each run scored once at its end; the lr is picked
   by `claim_report.LR_RULE` (lowest final 2-step metric; diverged runs last; a best at the grid's
   edge extends the grid, up to `max_extensions` each way);
4. every start on every evaluation seed at its chosen lr, its EMA weights every `eval_every` steps
   (snapshots) and at step 0 sampled with 1 and 2 steps from the same noise seeds and labels, scored
   with the data's built-in metric (FD-MNIST / energy distance).

Cost, counted two ways, both including the build and the mid-training for the CMT starts (the
teacher's own pre-training is shared by every start and not counted, nor is the tuning, which every
start gets in the same form):
- network passes: images through a student forward+backward (one per image per training step, for
  every method: ECT's no-grad target forward and MeanFlow's JVP are not counted, the same for every
  start of a method), plus the teacher's forward evaluations at 1/3 of a forward+backward each: in
  the build (trajectories x nfe / 3) and in flow-map mid-training's velocity rows (steps x batch x
  velocity share / 3);
- wall seconds: the build call's wall time plus the training loops' logged time up to the step
  (evaluations excluded: the runs evaluate after training, from snapshots).

Per start and seed: the cost at the first evaluated step whose 2-step metric is <= Q (or "not
reached"). cost_ratio = the CMT start's cost / the best baseline's cost, per seed "measured" or an
upper bound ("<="; the cheapest baseline did not reach Q and counts with its whole budget), median
over seeds, measured only when every seed's is (claim_report's docstring).

    python benchmarks/bench_claim.py --out runs/claim --workers 2            # the protocol (2-core CPU: hours)
    python benchmarks/bench_claim.py --out /tmp/claim --quick                # minutes: every stage, same JSON
    python benchmarks/bench_claim.py --out runs/claim-gpu --full --workers 6 --threads 2  # GPU budget
    python benchmarks/bench_claim.py --out runs/claim --docs docs            # (re)write docs/claim.json + plots

Resumable: every stage writes its result into its own folder under OUT/<data>/ (seed<k>/ for the
evaluation seeds, tuning-seed<k>/ for the sweep); a rerun with the same --out skips finished stages,
resumes interrupted training (`resume=True`) and evaluations. `--workers N` runs N jobs (a seed's
setup, one sweep run, one start's lr choice, one start on one seed) as separate processes, in
dependency order (one torch thread each by default), logs in OUT/logs/. Outputs: OUT/claim.json
(summary in the schema of docs/claim.md, per-seed raw curves, the tuning), OUT/claim.md (the
tables), OUT/claim_cost_<data>.png (2-step metric against cumulative cost: median, min-max band over
seeds), OUT/claim_cost_<data>_samples.png (the teacher's and every start's final 2-step samples).
"""
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click
import torch

from claim_report import (LR_RULE, METRICS, NOISE, STARTS, TEACHER_STEPS, THRESHOLDS, choose_factor,
                          cumulative_wall, data_kind, device, factor_name, finite, markdown_tables, plot, read_json,
                          sample_figure, slug, summarize, write_json, _fmt, ratio_text)
from cmt.builders.build import build_trajectories
from cmt.checkpoint import load_network
from cmt.cli.train import main as train_command
from cmt.datasets import resolve_data
from cmt.edm import SIGMA_MAX, TWO_STEP_SIGMA
from cmt.errors import TrainingStopped
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

NFE = 16                                   # the build's teacher evaluations per trajectory (DPM-Solver++(3M))
CKPT_GRID = 5                              # post-training runs save their training state every 5 grid steps

# Budgets per data kind; batch sizes and every setting but the lr come from the recipe (unless set here).
# default: the protocol, hours on a 2-core CPU with --workers 2 (docs/claim.md, "Runtime"): baselines
# run 10x the CMT start's steps, more than twice its build and mid-training cost, so a baseline that
# gets to a threshold gives a measured ratio and one that does not a bound below 0.5; quick: every
# stage in minutes; smoke: the test's (toy only, seconds); full: a GPU machine.
TUNING = dict(tuning_seed=100, lr_factors=[0.1, 0.3, 1.0, 3.0, 10.0], max_extensions=3)
BUDGETS = {
    "default": {
        "toy": dict(seeds=[0, 1, 2], **TUNING, num_trajectories=2000, mid_steps=1000, post_steps=250,
                    baseline_factor=10, eval_every=50, num_samples=2000),
        # MNIST sweeps 4 values over the same 2 decades: its baselines' 800-step runs at 1 to 2 s a step
        # made the 5-value sweep alone about 6 hours on the shared 2 cores; on the toy, x0.1 was the
        # worst or next-worst factor for both ECT baselines (docs/claim.md, "Runtime"), and a best at
        # x0.1 extends the grid downwards.
        "mnist": dict(seeds=[0, 1, 2], **{**TUNING, "lr_factors": [0.1, 1.0, 3.0, 10.0]}, num_trajectories=1000,
                      mid_steps=300, post_steps=80, baseline_factor=10, eval_every=40, num_samples=500),
    },
    "quick": {
        "toy": dict(seeds=[0], tuning_seed=100, lr_factors=[0.3, 3.0], max_extensions=0, num_trajectories=256,
                    mid_steps=100, post_steps=10, baseline_factor=4, eval_every=10, num_samples=500),
        "mnist": dict(seeds=[0], tuning_seed=100, lr_factors=[0.3, 3.0], max_extensions=0, num_trajectories=64,
                      mid_steps=6, post_steps=2, baseline_factor=4, eval_every=2, num_samples=100, batch_size=32),
    },
    "smoke": {
        "toy": dict(seeds=[0], tuning_seed=100, lr_factors=[0.1, 10.0], max_extensions=1, num_trajectories=64,
                    mid_steps=4, post_steps=2, baseline_factor=4, eval_every=2, num_samples=64, batch_size=32),
    },
    "full": {
        "toy": dict(seeds=[0, 1, 2], **TUNING, num_trajectories=4000, mid_steps=1000, post_steps=500,
                    baseline_factor=10, eval_every=100, num_samples=4096),
        "mnist": dict(seeds=[0, 1, 2], **TUNING, num_trajectories=4000, mid_steps=600, post_steps=200,
                      baseline_factor=10, eval_every=25, num_samples=2000),
    },
}
DEFAULT_DATA = ("mnist", "toy:checkerboard")


# ---- stages -------------------------------------------------------------------------------------

def call_logged(call, log_path):
    """Run one stage (`cmt.stages.Call`), its printed output into `log_path`; returns (wall seconds or
    None when its output was there, the equivalent command's words, the function's result). A
    training run that diverged raises its `TrainingStopped` (exit code 1) as it is."""
    log = lambda command: click.echo("  $ " + command, err=True)
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(log_path, "a") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
            result, seconds = call.run(log)
    except TrainingStopped as error:
        if error.exit_code == 1:
            raise
        raise click.ClickException(f"{call.program} stopped ({error}); see {log_path}") from error
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


def recipe_lr(data, method):
    """The lr the sweep multiplies: the data's recipe's for the method."""
    name = recipe_for("post", data, method)
    if name is None or "lr" not in recipes.RECIPES[name]["post"][method]:
        raise click.ClickException(f"{data}: no recipe lr for {method} to tune around")
    return recipes.RECIPES[name]["post"][method]["lr"]


def evaluation_inputs(label_dim, num_samples, noise="evaluation"):
    first, label_seed = NOISE[noise]
    return list(range(first, first + num_samples)), pick_labels("random", num_samples, label_dim, seed=label_seed)


def scored(data, samples):
    """The data's headline metric of `samples`; None when a sample is not finite (a diverged network)."""
    if not torch.isfinite(samples).all():
        return None
    value = float(embedded_metric(resolve_data(data), samples)[METRICS[data_kind(data)]])
    return value if finite(value) else None


@torch.no_grad()
def student_metrics(net, data, num_samples, consistency, mid_sigma=TWO_STEP_SIGMA, noise="evaluation"):
    """`{"1step": m, "2step": m}`: the headline metric of 1- and 2-step samples (fixed seeds and labels)."""
    net = net.to(device()).eval()
    seeds, labels = evaluation_inputs(net.label_dim, num_samples, noise)
    return {f"{steps}step": scored(data, generate(net, seeds, labels, sampler="flowmap", steps=steps,
                                                  mid_sigma=mid_sigma, sigma_max=SIGMA_MAX, renoise=consistency))
            for steps in (1, 2)}


@torch.no_grad()
def teacher_metric(data, num_samples, noise="evaluation"):
    net, _ = resolve_teacher(data)
    net = net.to(device()).eval()
    seeds, labels = evaluation_inputs(net.label_dim, num_samples, noise)
    start = time.perf_counter()
    samples = generate(net, seeds, labels, solver="dpm++3m", steps=TEACHER_STEPS)
    return {"metric": METRICS[data_kind(data)], "value": scored(data, samples), "solver": "dpm++3m",
            "steps": TEACHER_STEPS, "num_samples": num_samples, "noise": noise, "seconds": time.perf_counter() - start}


def initial_student(data, method, init, seed):
    """The network `post_train` starts from (its step 0), built the way it builds it."""
    teacher = None if Path(init).is_file() else data
    config, state, _, _, _ = load_init(init, teacher, resolve_data(data), None)
    return build_student(POST_METHODS[method].student(config), state, seed=seed)


def cached(path, compute):
    """The JSON at `path`, or `compute()` written there first (a finished stage is never redone)."""
    value = read_json(path)
    if value is None:
        value = compute()
        write_json(path, value)
    return value


def train_stage(folder, program, function, kwargs, model_name, extra_record=None):
    """One training run into `folder`, resumable (`cmt.stages.Call`): a finished one (its model
    written) is kept, an interrupted one continues from its training state, a folder without one
    starts over. A run that diverged is recorded as such ("diverged_at": its last logged step)."""
    folder = Path(folder)
    result = read_json(folder.with_name(folder.name + ".json"))
    if result is not None:
        return result
    call = Call(program, function, {**kwargs, "out": str(folder)}, folder / f"{model_name}.safetensors", trains=True)
    try:
        seconds, command, _ = call_logged(call, folder.with_name(folder.name + ".log"))
        diverged_at = None
    except TrainingStopped:
        seconds, command = None, call.words()
        diverged_at = max([r["step"] for r in read_log(folder)] or [0])
    run = json.loads((folder / "run.json").read_text())
    result = {"command": command, "call_seconds": seconds, "batch_size": run["train"]["batch_size"],
              "max_steps": run["train"]["max_steps"], "lr": run["train"]["lr"], "recipe": run.get("recipe"),
              "wall": cumulative_wall(read_log(folder)), "options": run.get("options"),
              "velocity_share": run.get("velocity_share") or 0.0, "diverged_at": diverged_at, **(extra_record or {})}
    write_json(folder.with_name(folder.name + ".json"), result)
    return result


def evaluate_curve(folder, data, method, init, seed, grid, num_samples, mid_sigma, noise="evaluation"):
    """`[[step, 1-step, 2-step]]` at every grid step, from the snapshots (step 0: the initial
    network; a step with no weights, after a divergence: None); each point is kept in
    folder/curve.json as it is done."""
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
            final = Path(folder) / "post.safetensors"
            net = load_network(snapshot) if snapshot.is_file() else load_network(final) if final.is_file() else None
        scores = (student_metrics(net, data, num_samples, consistency, mid_sigma, noise) if net is not None
                  else {"1step": None, "2step": None})
        done[step] = [step, scores["1step"], scores["2step"]]
        write_json(path, [done[s] for s in sorted(done)])
    return [done[s] for s in grid]


def seed_root(out, data, seed, tuning=False):
    return out / slug(data) / (f"tuning-seed{seed}" if tuning else f"seed{seed}")


def setup(out, data, seed, budget, starts, tuning=False):
    """The teacher's metric on the seed's noise, the build and the mid-training the starts need."""
    root = seed_root(out, data, seed, tuning)
    root.mkdir(parents=True, exist_ok=True)
    noise = "tuning" if tuning else "evaluation"
    tag = f"[{data} {'tuning ' if tuning else ''}seed {seed}]"
    teacher = cached(root / "teacher.json", lambda: teacher_metric(data, budget["num_samples"], noise))
    click.echo(f"{tag} teacher {TEACHER_STEPS}-step {teacher['metric']} = {_fmt(teacher['value'], 4)}", err=True)
    batch = {"batch_size": budget["batch_size"]} if "batch_size" in budget else {}

    def build():
        kwargs = dict(teacher=data, out=str(root / "trajectories"), num_trajectories=budget["num_trajectories"],
                      nfe=NFE, seed=seed, progress=False)
        seconds, command, _ = call_logged(Call("cmt-build", build_trajectories, kwargs, root / "trajectories" / MANIFEST),
                                          root / "build.log")
        return {"seconds": seconds, "command": command, "num_trajectories": budget["num_trajectories"], "nfe": NFE}

    if not any(STARTS[name][1].startswith("mid-") for name in starts):
        return
    cached(root / "build.json", build)
    for target in ("endpoint", "flowmap"):
        if not any(STARTS[name][1] == f"mid-{target}" for name in starts):
            continue
        steps = budget["mid_steps"]
        kwargs = dict(data=str(root / "trajectories"), target=target, out=str(root / f"mid-{target}"),
                      recipe=recipe_for("mid", data), max_steps=steps, seed=seed, workers=0,
                      num_samples=min(budget["num_samples"], 256), log_every=max(1, steps // 10),
                      ckpt_every=max(1, steps // 4), progress=False, **batch)
        train_stage(root / f"mid-{target}", "cmt-train mid", mid_train, kwargs, "mid")
        click.echo(f"{tag} mid {target}: {steps} steps", err=True)


def post_run(root, folder, data, name, seed, budget, factor, post_args, snapshots):
    """One post-training run of start `name` at `factor` x the recipe's lr into `folder`."""
    method, init = STARTS[name]
    cmt_start = init.startswith("mid-")
    steps = budget["post_steps"] * (1 if cmt_start else budget["baseline_factor"])
    init_arg = str(root / init / "mid.pt") if cmt_start else init
    extra = post_options(post_args.get(name, []))
    if method == "ect" and not cmt_start:
        # ECT's own curriculum from non-CMT weights (the gap shrinks every max_steps / 8), not the
        # recipe's fixed CMT gap (stage 11), which is the paper's setting for mid-trained weights.
        extra.setdefault("stage", None)
    batch = {"batch_size": budget["batch_size"]} if "batch_size" in budget else {}
    kwargs = dict(init=init_arg, method=method, data=data, **({} if cmt_start else {"teacher": data}),
                  recipe=recipe_for("post", data, method), max_steps=steps, seed=seed,
                  lr=recipe_lr(data, method) * factor, log_every=budget["eval_every"],
                  snapshot_every=budget["eval_every"] if snapshots else 0,
                  # a training state every CKPT_GRID grid steps: an interrupted run resumes from there (saving
                  # one, fsync'd, took seconds on the loaded 2-core machine: every grid step doubled a toy run)
                  ckpt_every=budget["eval_every"] * CKPT_GRID,
                  num_samples=min(budget["num_samples"], 256), out=str(folder), progress=False, **batch, **extra)
    run = train_stage(folder, "cmt-train post", post_train, kwargs, "post", {"lr_factor": factor})
    return run, init_arg, steps


def sweep(out, data, name, factor, budget, post_args):
    """One tuning run: start `name` at `factor` x the recipe's lr on the tuning seed, scored at its
    end on the tuning noise -> `{"lr", "final_1step", "final_2step", "diverged"}`."""
    seed = budget["tuning_seed"]
    root = seed_root(out, data, seed, tuning=True)
    folder = root / name / factor_name(factor)
    path = folder.with_name(folder.name + ".final.json")
    result = read_json(path)
    if result is not None:
        return result
    run, init_arg, steps = post_run(root, folder, data, name, seed, budget, factor, post_args, snapshots=False)
    mid_sigma = (run.get("options") or {}).get("mid_sigma") or TWO_STEP_SIGMA
    _, one, two = evaluate_curve(folder, data, STARTS[name][0], init_arg, seed, [steps], budget["num_samples"],
                                 mid_sigma, noise="tuning")[0]
    result = {"factor": factor, "lr": run["lr"], "steps": steps, "final_1step": one, "final_2step": two,
              "diverged": run["diverged_at"] is not None, "command": run["command"]}
    write_json(path, result)
    click.echo(f"[{data} tuning] {name} lr {run['lr']:.3g} (x{factor:g}): final 2-step {_fmt(two, 4)}", err=True)
    return result


def choose(out, data, name, budget, post_args):
    """The start's lr by LR_RULE from its sweep, running the grid's extensions (here, one after the
    other) -> `tuning-seed<k>/<name>.choice.json`."""
    root = seed_root(out, data, budget["tuning_seed"], tuning=True)
    path = root / f"{name}.choice.json"
    if (choice := read_json(path)) is not None:
        return choice
    results = {factor: sweep(out, data, name, factor, budget, post_args) for factor in budget["lr_factors"]}
    while True:
        best, extension = choose_factor({f: r["final_2step"] for f, r in results.items()}, budget["max_extensions"],
                                        budget["lr_factors"])
        if extension is None:
            break
        results[extension] = sweep(out, data, name, extension, budget, post_args)
    tried = sorted(results)
    choice = {"start": name, "base_lr": recipe_lr(data, STARTS[name][0]), "rule": LR_RULE,
              "chosen_factor": best, "chosen_lr": results[best]["lr"],
              "at_edge": len(tried) > 1 and best in (tried[0], tried[-1]),
              "factors": {f"{f:g}": results[f] for f in tried}}
    write_json(path, choice)
    click.echo(f"[{data} tuning] {name}: lr {choice['chosen_lr']:.3g} (x{best:g})"
               + (" at the edge of the grid" if choice["at_edge"] else ""), err=True)
    return choice


def evaluation_run(out, data, name, seed, budget, post_args):
    """Start `name` on evaluation seed `seed` at its chosen lr, with its curve on the evaluation noise."""
    choice = read_json(seed_root(out, data, budget["tuning_seed"], tuning=True) / f"{name}.choice.json")
    if choice is None:
        raise click.ClickException(f"{data} {name}: no lr chosen yet (its choose job comes first)")
    root = seed_root(out, data, seed)
    run, init_arg, steps = post_run(root, root / name, data, name, seed, budget, choice["chosen_factor"], post_args,
                                    snapshots=True)
    grid = list(range(0, steps + 1, budget["eval_every"]))
    if grid[-1] != steps:
        grid.append(steps)
    mid_sigma = (run.get("options") or {}).get("mid_sigma") or TWO_STEP_SIGMA
    curve = evaluate_curve(root / name, data, STARTS[name][0], init_arg, seed, grid, budget["num_samples"], mid_sigma)
    click.echo(f"[{data} seed {seed}] {name} at lr {run['lr']:.3g}: 2-step {_fmt(curve[0][2], 4)} -> "
               f"{_fmt(curve[-1][2], 4)} ({steps} steps)", err=True)


# ---- jobs ---------------------------------------------------------------------------------------

def job_list(datas, budgets, starts):
    """`[(name, spec, needs)]` in the order they are started when ready: every data set's setups, then
    method by method (so a run stopped early leaves whole comparisons, not every method's half), per
    data set the sweeps and choices of its teacher and CMT starts, then of its random start (in every
    earlier run the furthest from the teacher), then their evaluation runs seed by seed."""
    jobs = []
    for data in datas:
        budget = budgets[data]
        jobs.append((f"setup {data} tuning-seed{budget['tuning_seed']}",
                     dict(kind="setup", data=data, seed=budget["tuning_seed"], tuning=True), []))
        for seed in budget["seeds"]:
            jobs.append((f"setup {data} seed{seed}", dict(kind="setup", data=data, seed=seed), []))
    for method in dict.fromkeys(STARTS[name][0] for name in starts):
        group = sorted((name for name in starts if STARTS[name][0] == method), key=lambda name: STARTS[name][1] == "random")
        for data in datas:
            budget = budgets[data]
            for name in group:
                needs = [f"setup {data} tuning-seed{budget['tuning_seed']}"] if STARTS[name][1].startswith("mid-") else []
                sweeps = [(f"sweep {data} {name} {factor_name(f)}", dict(kind="sweep", data=data, start=name, factor=f),
                           needs) for f in budget["lr_factors"]]
                jobs += sweeps + [(f"choose {data} {name}", dict(kind="choose", data=data, start=name),
                                   [job[0] for job in sweeps])]
            for seed in budget["seeds"]:   # seed by seed: a run stopped early leaves whole seeds
                for name in group:
                    needs = [f"choose {data} {name}"] + ([f"setup {data} seed{seed}"]
                                                         if STARTS[name][1].startswith("mid-") else [])
                    jobs.append((f"run {data} {name} seed{seed}", dict(kind="run", data=data, start=name, seed=seed),
                                 needs))
    return jobs


def run_job(out, spec, budgets, starts, post_args):
    data, budget = spec["data"], budgets[spec["data"]]
    if spec["kind"] == "setup":
        setup(out, data, spec["seed"], budget, starts, spec.get("tuning", False))
    elif spec["kind"] == "sweep":
        sweep(out, data, spec["start"], spec["factor"], budget, post_args)
    elif spec["kind"] == "choose":
        choose(out, data, spec["start"], budget, post_args)
    else:
        evaluation_run(out, data, spec["start"], spec["seed"], budget, post_args)


def job_log(out, name):
    return out / "logs" / (name.replace(" ", "_").replace(":", "-") + ".log")


def run_processes(jobs, workers, command_of, out):
    """Run `(name, spec, needs)` jobs as processes (`command_of(spec)`), `workers` at a time, each
    when the jobs it needs have ended well, in the order given; raises naming the failed ones once
    nothing more can run."""
    pending, running, done, failed = list(jobs), [], set(), []
    (out / "logs").mkdir(parents=True, exist_ok=True)
    while pending or running:
        while len(running) < workers:
            ready = next((job for job in pending if all(need in done for need in job[2])), None)
            if ready is None:
                break
            pending.remove(ready)
            name, spec, _ = ready
            log = job_log(out, name)
            running.append((name, subprocess.Popen(command_of(spec), stdout=open(log, "a"), stderr=subprocess.STDOUT),
                            time.perf_counter()))
            click.echo(f"{time.strftime('%H:%M:%S')} {name} started (log {log})")
        if not running:
            break   # the rest waits on failed jobs
        time.sleep(2)
        for item in list(running):
            name, process, started = item
            if process.poll() is not None:
                running.remove(item)
                status = "done" if process.returncode == 0 else f"FAILED (exit {process.returncode})"
                click.echo(f"{time.strftime('%H:%M:%S')} {name} {status} in {time.perf_counter() - started:.0f} s")
                (done.add if process.returncode == 0 else failed.append)(name)
    if failed or pending:
        raise click.ClickException(f"failed: {', '.join(failed)}; not run: {len(pending)} jobs that need them; "
                                   "see OUT/logs (a rerun resumes them)")


def budget_of(name, data, seeds):
    budget = dict(BUDGETS[name][data_kind(data)])
    if seeds is not None:
        budget["seeds"] = seeds
    return budget


@click.command(context_settings={"show_default": True})
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--quick", "budget_name", flag_value="quick", help="Every stage in minutes (figures mean nothing).")
@click.option("--full", "budget_name", flag_value="full", help="The larger budget, for a GPU machine.")
@click.option("--smoke", "budget_name", flag_value="smoke", help="Seconds, toy only: the test's size.")
@click.option("--budget", "budget_name", type=click.Choice(list(BUDGETS)), default="default",
              help="The budget by name (--quick / --full / --smoke are short for it).")
@click.option("--data", "datas", multiple=True, help=f"Data sets [default: {', '.join(DEFAULT_DATA)}; smoke: toy].")
@click.option("--seeds", default=None, callback=lambda ctx, param, value: None if value is None else parse_ints(value),
              help="Evaluation seeds [default: the budget's, 0,1,2 or 0; the tuning seed is the budget's].")
@click.option("--starts", "start_names", default=",".join(STARTS), help="Comma-separated subset of the starts.")
@click.option("--post-args", multiple=True, metavar="START=OPTIONS",
              help="Extra `cmt-train post` options for one start, e.g. 'meanflow-cmt=--norm-p 0' (not --lr: it is "
                   "tuned); repeatable (the results record them).")
@click.option("--workers", type=click.IntRange(min=1), default=1, help="Jobs run side by side, as processes.")
@click.option("--threads", type=click.IntRange(min=1), default=1, help="torch threads per process.")
@click.option("--docs", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write DOCS/claim.json and DOCS/img/claim_*.png (e.g. docs).")
@click.option("--job", default=None, hidden=True, help="Run one job (JSON), for the --workers processes.")
def main(out, budget_name, datas, seeds, start_names, post_args, workers, threads, docs, job):
    """Measure the paper's claim as cost to reach quality, each start at its tuned lr, on several seeds."""
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
        if "lr" in post_options(options.split()):
            raise click.BadParameter(f"{item!r}: the lr is tuned (the budget's lr_factors), not given",
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
    if job is not None:
        run_job(out, json.loads(job), settings["budgets"], starts, extra_args)
        return
    write_json(out / "settings.json", {**settings, "machine": {
        "cpus": os.cpu_count(), "torch": torch.__version__, "threads_per_process": threads, "workers": workers,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}})
    started = time.perf_counter()
    jobs = job_list(datas, settings["budgets"], starts)
    if workers > 1:
        argv = ["--out", str(out), "--budget", budget_name, "--starts", ",".join(starts), "--threads", str(threads),
                *[f"--post-args={item}" for item in post_args],
                *(["--seeds", ",".join(map(str, seeds))] if seeds is not None else []),
                *[f"--data={data}" for data in datas]]
        run_processes(jobs, workers, lambda spec: [sys.executable, str(Path(__file__).resolve()), *argv,
                                                   "--job", json.dumps(spec)], out)
    else:
        for name, spec, _ in jobs:
            run_job(out, spec, settings["budgets"], starts, extra_args)
    report(out, settings, docs)
    click.echo(f"{time.perf_counter() - started:.0f} s in this call (finished stages are not re-run); "
               f"results in {out / 'claim.json'}")


def parse_ints(value):
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"comma-separated integers, got {value!r}") from None


def report(out, settings, docs=None):
    """claim.json, claim.md and the figures, from whatever the stages under `out` have finished."""
    claim = {kind: methods for kind, methods in (read_json(out / "claim.json") or {}).items() if methods}
    tables = []
    for data, budget in settings["budgets"].items():
        kind = data_kind(data)
        summary = summarize(out, data, budget, settings["starts"])
        if not summary and not claim.get(kind):   # a data set with no finished run yet: nothing to report
            continue
        claim[kind] = {**claim.get(kind, {}), **summary}   # methods run here replace theirs
        tables.append(markdown_tables(claim[kind], data))
        plot(claim[kind], data, out / f"claim_cost_{slug(data)}.png")
        sample_figure(out, data, budget["seeds"][0], out / f"claim_cost_{slug(data)}_samples.png")
    write_json(out / "claim.json", claim)
    (out / "claim.md").write_text("\n\n".join(tables) + "\n")
    click.echo("\n\n".join(tables))
    for kind in claim:
        for method, entry in claim[kind].items():
            ratios = ", ".join(f"cost_ratio_{key} {ratio_text(entry.get(f'cost_ratio_{key}'), entry.get(f'cost_ratio_{key}_kind'))}"
                               for key in THRESHOLDS)
            click.echo(f"{kind} {method}: {ratios}, final_2step_over_teacher {_fmt(entry['final_2step_over_teacher'])}")
    if docs is not None:
        (docs / "img").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "claim.json", docs / "claim.json")
        for data in settings["budgets"]:
            for name in (f"claim_cost_{slug(data)}.png", f"claim_cost_{slug(data)}_samples.png"):
                if (out / name).is_file():
                    shutil.copyfile(out / name, docs / "img" / name)


if __name__ == "__main__":
    main()
