"""Post-hoc EMA on the project's own data: does reconstructing the EMA length after training beat the
recipe's fixed EMA, and by how much? Prints and writes the figures (no pass/fail).

For each data set (`toy:checkerboard`, `mnist`, each with its built-in teacher and the project's recipe):
1. `cmt.build_trajectories` (16-step DPM-Solver++(3M) trajectories), then `cmt.mid_train` with the
   recipe (endpoint target, its fixed EMA) keeping EDM2's two power-function EMAs (std 0.050, 0.100)
   in a snapshot every `max_steps / snapshots` steps (`--ema-std`, `--snapshot-every`);
2. `cmt.reconstruct_ema` of a sweep of EMA stds from those snapshots, each sampled with the student's
   2-step sampler and scored with the data's built-in metric (`cmt-ema --eval`);
3. the recipe's fixed-EMA model (`mid.safetensors`), sampled and scored from the same noise;
4. the fixed EMA and the best std again on `--check-seeds` other noises (seeds `seed + k * num_samples`),
   so the gain can be read against the metric's spread over evaluation noise.

    python benchmarks/bench_posthoc_ema.py --out runs/posthoc-ema --docs docs
    python benchmarks/bench_posthoc_ema.py --out /tmp/pe --quick

Outputs: OUT/posthoc_ema.json (per data set: the sweep's rows, the best std, the fixed EMA's metric and
the gain), OUT/posthoc_ema.png (metric against EMA std per data set, the fixed EMA as a line); with
--docs the two files are copied there (docs/posthoc_ema.json, docs/img/posthoc_ema.png). Resumable: a
rerun with the same --out reuses finished stages.
"""
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import click
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quick import quick_option  # noqa: E402

from cmt.builders.build import build_trajectories  # noqa: E402
from cmt.evaluation import evaluate  # noqa: E402
from cmt.manifest import MANIFEST  # noqa: E402
from cmt.posthoc_ema import reconstruct_ema  # noqa: E402
from cmt.sampling import sample  # noqa: E402
from cmt.stages import Call  # noqa: E402
from cmt.trainers.mid import mid_train  # noqa: E402
from cmt.trainers.recipes import RECIPES, builtin_recipe  # noqa: E402

TRACKED = (0.05, 0.1)
SWEEP = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.13, 0.17, 0.22)


def scored(ckpt, out, data, metric, *, steps, num_samples, seed):
    """The metric of `num_samples` samples of `ckpt` from seeds `seed`, `seed + 1`, ..."""
    samples = sample(ckpt=str(ckpt), out=out, sampler="flowmap", steps=steps, num_samples=num_samples, seed=seed,
                     progress=False)["samples"]
    return float(evaluate(samples=samples, data=data)["metrics"][metric])


def run_data(out, data, *, trajectories, mid_steps, snapshots, stds, num_samples, seed, check_seeds):
    """Build, mid-train with snapshots, reconstruct the sweep and score it and the fixed EMA."""
    root = out / data.replace(":", "-")
    log = lambda command: click.echo(f"[{data}] {command}", err=True)
    build = Call("cmt-build", build_trajectories, dict(teacher=data, out=str(root / "shards"), nfe=16, seed=seed,
                                                       num_trajectories=trajectories, progress=False),
                 root / "shards" / MANIFEST)
    build.run(log)
    recipe = builtin_recipe(data)
    steps = mid_steps or RECIPES[recipe]["mid"]["max_steps"]
    every = max(1, steps // snapshots)
    mid = Call("cmt-train mid", mid_train, dict(data=str(root / "shards"), out=str(root / "mid"), recipe=recipe,
                                                max_steps=steps, ema_std=TRACKED, snapshot_every=every,
                                                ckpt_every=every, workers=0, num_samples=min(num_samples, 256),
                                                seed=seed, progress=False),
               root / "mid" / "mid.safetensors", trains=True)
    _, mid_seconds = mid.run(log)
    swept = root / "posthoc" / "ema-eval.json"
    if not swept.is_file():
        started = time.perf_counter()
        reconstruct_ema(snapshots=root / "mid" / "snapshots", std=list(stds), out=root / "posthoc", eval_data=data,
                        num_samples=num_samples, seed=seed, progress=False)
        log(f"reconstructed and scored {len(stds)} EMA lengths in {time.perf_counter() - started:.0f} s")
    sweep = json.loads(swept.read_text())
    metric = sweep["metric"]
    fixed_model = root / "mid" / "mid.safetensors"
    fixed_value = scored(fixed_model, root / "fixed.png", data, metric, steps=sweep["steps"], num_samples=num_samples,
                         seed=seed)
    best = sweep["best"]
    checks = root / "checks.json"
    if not checks.is_file() or len(json.loads(checks.read_text())["seeds"]) != check_seeds:
        best_model = root / "posthoc" / next(row["model"] for row in sweep["rows"] if row["std"] == best["std"])
        seeds = [seed + k * num_samples for k in range(1, check_seeds + 1)]
        checks.write_text(json.dumps({"seeds": seeds, "fixed_ema": [
            scored(fixed_model, root / "check.png", data, metric, steps=sweep["steps"], num_samples=num_samples,
                   seed=other) for other in seeds], "best": [
            scored(best_model, root / "check.png", data, metric, steps=sweep["steps"], num_samples=num_samples,
                   seed=other) for other in seeds]}) + "\n")
    checked = json.loads(checks.read_text())
    run = json.loads((root / "mid" / "run.json").read_text())
    return {"data": data, "metric": metric, "steps": sweep["steps"], "num_samples": num_samples, "seed": seed,
            "mid_steps": steps, "snapshot_every": every, "tracked_stds": list(TRACKED),
            "fixed_ema": {"ema_beta": run["train"]["ema_beta"], "ema_halflife_images": run["train"]["ema_halflife_images"],
                          metric: fixed_value},
            "rows": [{"std": row["std"], metric: row[metric]} for row in sweep["rows"]],
            "best": {"std": best["std"], metric: best[metric]},
            "gain": fixed_value / best[metric] if best[metric] > 0 else math.inf,
            "power_ema_cost": run.get("power_ema"), "mid_seconds": mid_seconds,
            "other_noise": {"seeds": checked["seeds"], "fixed_ema": checked["fixed_ema"], "best": checked["best"],
                            "gains": [fixed / best_value if best_value > 0 else math.inf
                                      for fixed, best_value in zip(checked["fixed_ema"], checked["best"])]}}


def plot(results, path):
    figure = Figure(figsize=(5 * len(results), 4), dpi=100)
    axes = figure.subplots(1, len(results), squeeze=False)[0]
    for axis, result in zip(axes, results):
        metric = result["metric"]
        stds = [row["std"] for row in result["rows"]]
        axis.plot(stds, [row[metric] for row in result["rows"]], "o-", color="tab:blue",
                  label="post-hoc EMA (reconstructed)")
        axis.axhline(result["fixed_ema"][metric], color="tab:orange", linestyle="--",
                     label="the recipe's fixed EMA")
        for i, tracked in enumerate(result["tracked_stds"]):
            axis.axvline(tracked, color="0.7", linewidth=1, label="tracked stds" if i == 0 else None)
        axis.plot([result["best"]["std"]], [result["best"][metric]], "o", markersize=12, markerfacecolor="none",
                  color="tab:red", label=f"best: std {result['best']['std']:.2f} ({result['gain']:.2f}x better)")
        axis.set_xlabel("EMA std (sigma_rel)")
        axis.set_ylabel(f"{metric.replace('_', ' ')}, {result['steps']}-step samples (lower is better)")
        axis.set_title(f"{result['data']}: mid-training, {result['mid_steps']} steps", fontsize=10)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return path


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The run folder [default: a new temporary folder].")
@click.option("--data", "datasets", multiple=True, default=("toy:checkerboard", "mnist"), show_default=True)
@click.option("--trajectories", type=int, default=None, help="[default: toy 4000, mnist 2000, the demo's]")
@click.option("--mid-steps", type=int, default=None, help="[default: the recipe's]")
@click.option("--snapshots", type=int, default=20, show_default=True, help="Snapshots over the run.")
@click.option("--stds", default=",".join(map(str, SWEEP)), show_default=True)
@click.option("--num-samples", type=int, default=2000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--check-seeds", type=int, default=2, show_default=True,
              help="Other evaluation noises on which the fixed EMA and the best std are scored again.")
@click.option("--docs", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also copy the JSON and the plot into this docs folder.")
@quick_option({"datasets": ("toy:moons",), "trajectories": 64, "mid_steps": 8, "snapshots": 4, "stds": "0.05,0.1",
               "num_samples": 64, "check_seeds": 1})
def main(out, datasets, trajectories, mid_steps, snapshots, stds, num_samples, seed, check_seeds, docs):
    out = Path(tempfile.mkdtemp(prefix="cmt-posthoc-ema-")) if out is None else out
    out.mkdir(parents=True, exist_ok=True)
    stds = [float(value) for value in str(stds).split(",") if value.strip()]
    results = []
    for data in datasets:
        count = trajectories or (4000 if data.startswith("toy:") else 2000)
        result = run_data(out, data, trajectories=count, mid_steps=mid_steps, snapshots=snapshots, stds=stds,
                          num_samples=num_samples, seed=seed, check_seeds=check_seeds)
        results.append(result)
        metric = result["metric"]
        click.echo(f"{data}: fixed EMA {metric} {result['fixed_ema'][metric]:.4g}; best post-hoc std "
                   f"{result['best']['std']:.3g}: {result['best'][metric]:.4g} (gain {result['gain']:.3f}x; on other "
                   f"noise: {', '.join(f'{gain:.3f}x' for gain in result['other_noise']['gains'])})")
    (out / "posthoc_ema.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "posthoc_ema.png")
    if docs is not None:
        (docs / "img").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "posthoc_ema.json", docs / "posthoc_ema.json")
        shutil.copyfile(out / "posthoc_ema.png", docs / "img" / "posthoc_ema.png")
    click.echo(" ".join(f"gain_{result['data'].split(':')[-1]}={result['gain']:.3f}" for result in results))


if __name__ == "__main__":
    main()
