"""How many trajectories does CMT need? Mid-training on growing prefixes of one trajectory set.

On MNIST (built-in teacher): one build of `num_trajectories + held_out` trajectories (indices >=
num_trajectories are held out); then, for every size N (250 ... 4000) and seed, `cmt.mid_train`
(`target="endpoint"`, the project's recipe) with the same number of steps on the first N
trajectories only (`max_trajectories=N`), and ECT post-training from it (`cmt.post_train`, the
recipe). Per run:
- the 1- and 2-step metric (FD-MNIST) of the mid-trained student and of ECT from it, from the same
  fixed noise seeds and labels as `bench_claim.py`;
- over-fitting: the 1-step samples from the stored noise of training trajectories (indices 0..K-1,
  inside every subset) against those from held-out trajectories' noise (the same count K, with their
  labels): the metric of each, and the RMSE to the teacher's endpoint of the same trajectory;
  gap = held-out - training (> 0: the student is better on the noise it was trained on).

    python benchmarks/bench_trajectories.py --out runs/trajectories --workers 2    # default (< 60 min, 2 cores)
    python benchmarks/bench_trajectories.py --out /tmp/trajectories --quick        # < 5 minutes
    python benchmarks/bench_trajectories.py --out runs/trajectories --docs docs    # (re)write docs/trajectories.json

Resumable like bench_claim.py (every stage's result in its own folder under OUT). Outputs:
OUT/trajectories.json, OUT/trajectories.md (the table), OUT/trajectories.png.
"""
import statistics
import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_claim import (METRICS, call_logged, cached, data_kind, device, read_json, recipe_for,  # noqa: E402
                         run_processes, student_metrics, teacher_metric, train_stage, write_json)

from cmt.builders.build import build_trajectories  # noqa: E402
from cmt.checkpoint import load_network  # noqa: E402
from cmt.datasets import one_hot_labels, resolve_data  # noqa: E402
from cmt.manifest import MANIFEST, TrajectoryDataset  # noqa: E402
from cmt.metrics import embedded_metric  # noqa: E402
from cmt.sampling import flow_map_sample  # noqa: E402
from cmt.stages import Call  # noqa: E402
from cmt.trainers.mid import mid_train  # noqa: E402
from cmt.trainers.post import post_train  # noqa: E402

NFE = 16
BUDGETS = {
    "default": dict(data="mnist", num_trajectories=4000, held_out=500, sizes=[250, 500, 1000, 2000, 4000],
                    seeds=[0, 1], mid_steps=400, post_steps=100, num_samples=500, overfit_samples=250),
    "quick": dict(data="mnist", num_trajectories=256, held_out=64, sizes=[32, 64, 128, 256], seeds=[0],
                  mid_steps=6, post_steps=2, num_samples=100, overfit_samples=32, batch_size=32),
    "smoke": dict(data="toy:checkerboard", num_trajectories=64, held_out=16, sizes=[16, 64], seeds=[0],
                  mid_steps=3, post_steps=2, num_samples=64, overfit_samples=16, batch_size=32),
    "full": dict(data="mnist", num_trajectories=4000, held_out=1000, sizes=[250, 500, 1000, 2000, 4000],
                 seeds=[0, 1, 2], mid_steps=1200, post_steps=200, num_samples=2000, overfit_samples=250),
}


def load_trajectories(build, indices):
    """`(noise x_T / sigma_max, labels, endpoints)` of the trajectories with these indices."""
    dataset = TrajectoryDataset(build)
    wanted = set(int(i) for i in indices)
    parts = []
    for entry, first in zip(dataset.shards, np.cumsum([0] + [e["count"] for e in dataset.shards])):
        if wanted.isdisjoint(range(int(first), int(first) + entry["count"])):
            continue
        arrays = dataset.read_shard(entry)
        keep = np.isin(arrays["index"], list(wanted))
        parts.append({key: arrays[key][keep] for key in ("index", "states", "label", "endpoint")} |
                     {"sigma_max": float(arrays["sigmas"][0])})
    index = np.concatenate([p["index"] for p in parts])
    order = np.argsort(index)
    states = np.concatenate([p["states"] for p in parts])[order]
    noise = torch.from_numpy(states[:, 0].astype(np.float32)) / parts[0]["sigma_max"]
    labels = torch.from_numpy(np.concatenate([p["label"] for p in parts])[order].astype(np.int64))
    endpoints = torch.from_numpy(np.concatenate([p["endpoint"] for p in parts])[order].astype(np.float32))
    return noise, labels, endpoints, parts[0]["sigma_max"]


@torch.no_grad()
def noise_metrics(net, data, trajectories):
    """The metric of 1-step samples from trajectories' own noise, and their RMSE to the endpoints."""
    noise, labels, endpoints, sigma_max = trajectories
    net = net.to(device()).eval()
    samples = flow_map_sample(net, noise.to(device()), [sigma_max, 0.0],
                              None if not net.label_dim else one_hot_labels(labels, net.label_dim).to(device()),
                              renoise=True).float().cpu()
    metric = float(embedded_metric(resolve_data(data), samples)[METRICS[data_kind(data)]])
    rmse = float((samples - endpoints).flatten(1).pow(2).mean(1).sqrt().mean())
    return metric, rmse


def run_unit(out, budget, seed, size):
    """Mid-training on the first `size` trajectories, ECT from it, and their metrics."""
    data, build = budget["data"], out / "trajectories"
    folder = out / f"seed{seed}" / f"n{size}"
    folder.mkdir(parents=True, exist_ok=True)
    batch = {"batch_size": budget["batch_size"]} if "batch_size" in budget else {}
    steps = budget["mid_steps"]
    mid = train_stage(folder / "mid", "cmt-train mid", mid_train, dict(
        data=str(build), out=str(folder / "mid"), target="endpoint", max_trajectories=size, recipe=recipe_for("mid", data), max_steps=steps,
        seed=seed, workers=0, num_samples=min(budget["num_samples"], 256), log_every=max(1, steps // 10),
        ckpt_every=max(1, steps // 4), progress=False, **batch), "mid")
    ect = train_stage(folder / "ect", "cmt-train post", post_train, dict(
        init=str(folder / "mid" / "mid.pt"), method="ect", data=data, recipe=recipe_for("post", data, "ect"),
        max_steps=budget["post_steps"], seed=seed, log_every=max(1, budget["post_steps"] // 10),
        ckpt_every=budget["post_steps"], num_samples=min(budget["num_samples"], 256), out=str(folder / "ect"),
        progress=False, **batch), "post")

    def measure():
        k, n = budget["overfit_samples"], budget["num_trajectories"]
        train_noise = load_trajectories(build, range(k))
        held_noise = load_trajectories(build, range(n, n + k))
        result = {"size": size, "seed": seed, "mid_steps": steps, "mid_batch": mid["batch_size"],
                  "epochs": steps * mid["batch_size"] / (size * NFE), "mid_wall_s": mid["wall"][-1][1],
                  "post_steps": budget["post_steps"]}
        for name, model in (("mid", folder / "mid" / "mid.safetensors"), ("ect", folder / "ect" / "post.safetensors")):
            net = load_network(model)
            scores = student_metrics(net, data, budget["num_samples"], consistency=True)
            train_metric, train_rmse = noise_metrics(net, data, train_noise)
            held_metric, held_rmse = noise_metrics(net, data, held_noise)
            result[name] = {"metric_1step": scores["1step"], "metric_2step": scores["2step"],
                            "metric_1step_train_noise": train_metric, "metric_1step_heldout_noise": held_metric,
                            "metric_gap": held_metric - train_metric, "rmse_train_noise": train_rmse,
                            "rmse_heldout_noise": held_rmse, "rmse_gap": held_rmse - train_rmse}
        return result

    result = cached(folder / "metrics.json", measure)
    click.echo(f"[n={size} seed {seed}] mid 2-step {result['mid']['metric_2step']:.4g}, ECT 2-step "
               f"{result['ect']['metric_2step']:.4g}, mid gap {result['mid']['metric_gap']:.3g} "
               f"(rmse {result['mid']['rmse_gap']:.3g})", err=True)
    return result


def summarize(out, budget):
    runs = [read_json(out / f"seed{seed}" / f"n{size}" / "metrics.json") for size in budget["sizes"]
            for seed in budget["seeds"]]
    runs = [run for run in runs if run is not None]
    teacher = read_json(out / "teacher.json")
    rows = []
    for size in budget["sizes"]:
        group = [run for run in runs if run["size"] == size]
        if not group:
            continue
        row = {"size": size, "seeds": [run["seed"] for run in group], "epochs": group[0]["epochs"]}
        for name in ("mid", "ect"):
            for key in group[0][name]:
                row[f"{name}_{key}"] = statistics.mean(run[name][key] for run in group)
        rows.append(row)
    return {"data": budget["data"], "metric": METRICS[data_kind(budget["data"])],
            "teacher_16step": teacher and teacher["value"], "budget": budget, "rows": rows, "runs": runs,
            "convention": "metric_gap / rmse_gap = held-out noise - training noise, 1-step samples of K trajectories "
                          "each (K = overfit_samples); values are means over seeds"}


def markdown_table(summary):
    metric = summary["metric"]
    lines = [f"Teacher, 16 steps: {summary['teacher_16step']:.4g} ({metric}, {summary['budget']['num_samples']} samples)",
             "", f"| trajectories | epochs | mid 1-step | mid 2-step | ECT 1-step | ECT 2-step | mid gap {metric} "
             "(held-out - train) | mid gap RMSE | ECT gap {metric} | ECT gap RMSE |".replace("{metric}", metric),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        cells = [row["size"], f"{row['epochs']:.1f}"] + [f"{row[key]:.4g}" for key in (
            "mid_metric_1step", "mid_metric_2step", "ect_metric_1step", "ect_metric_2step", "mid_metric_gap",
            "mid_rmse_gap", "ect_metric_gap", "ect_rmse_gap")]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def plot(summary, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.3))
    for name, color in (("mid", "tab:red"), ("ect", "tab:blue")):
        for steps, style in (("1step", ":"), ("2step", "-")):
            for run_seed in summary["budget"]["seeds"]:
                runs = sorted((r for r in summary["runs"] if r["seed"] == run_seed), key=lambda r: r["size"])
                axes[0].plot([r["size"] for r in runs], [r[name][f"metric_{steps}"] for r in runs], style, color=color,
                             marker=".", alpha=0.8,
                             label=f"{name}, {steps[0]} step" if run_seed == summary["budget"]["seeds"][0] else None)
        sizes = [r["size"] for r in summary["rows"]]
        axes[1].plot(sizes, [r[f"{name}_metric_gap"] for r in summary["rows"]], color=color, marker=".", label=name)
        axes[2].plot(sizes, [r[f"{name}_rmse_gap"] for r in summary["rows"]], color=color, marker=".", label=name)
    for axis in axes[1:]:
        axis.axhline(0, color="black", linewidth=0.6)
    if summary["teacher_16step"]:
        axes[0].axhline(summary["teacher_16step"], color="black", linestyle="--", label="teacher, 16 steps")
    for axis in axes:
        axis.set_xscale("log", base=2)
        axis.set_xlabel("training trajectories (first N of one build)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    axes[0].set_yscale("log")
    axes[0].set_ylabel(summary["metric"])
    axes[0].set_title("quality (one line per seed)")
    axes[1].set_ylabel(f"{summary['metric']}: held-out noise - training noise")
    axes[1].set_title("over-fitting gap, 1-step metric (mean over seeds)")
    axes[2].set_ylabel("RMSE to the endpoint: held-out - training")
    axes[2].set_title("over-fitting gap, RMSE to the teacher's endpoint")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@click.command(context_settings={"show_default": True})
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--quick", "budget_name", flag_value="quick", help="Every stage in under 5 minutes.")
@click.option("--full", "budget_name", flag_value="full", help="The larger budget, for a GPU machine.")
@click.option("--smoke", "budget_name", flag_value="smoke", help="Seconds, on toy:checkerboard: the test's size.")
@click.option("--budget", "budget_name", type=click.Choice(list(BUDGETS)), default="default")
@click.option("--workers", type=click.IntRange(min=1), default=1, help="(seed, size) runs side by side.")
@click.option("--threads", type=click.IntRange(min=1), default=1, help="torch threads per process.")
@click.option("--docs", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write DOCS/trajectories.json and DOCS/img/trajectories.png.")
@click.option("--unit", default=None, hidden=True, help="Run one SEED@SIZE only (the --workers processes).")
def main(out, budget_name, workers, threads, docs, unit):
    """How many trajectories CMT needs: mid-training on 250 ... 4000 trajectories of one build."""
    torch.set_num_threads(threads)
    budget = BUDGETS[budget_name]
    out.mkdir(parents=True, exist_ok=True)
    stored = read_json(out / "settings.json")
    if stored is not None and stored["budget"] != budget:
        raise click.UsageError(f"{out} holds runs of another budget ({stored['name']}); choose another --out")
    if unit is not None:
        seed, _, size = unit.partition("@")
        run_unit(out, budget, int(seed), int(size))
        return
    write_json(out / "settings.json", {"name": budget_name, "budget": budget})
    started = time.perf_counter()
    data = budget["data"]
    cached(out / "teacher.json", lambda: teacher_metric(data, budget["num_samples"]))

    def build():
        count = budget["num_trajectories"] + budget["held_out"]
        kwargs = dict(teacher=data, out=str(out / "trajectories"), num_trajectories=count, nfe=NFE, seed=0,
                      progress=False)
        seconds, command, _ = call_logged(Call("cmt-build", build_trajectories, kwargs, out / "trajectories" / MANIFEST),
                                          out / "build.log")
        return {"seconds": seconds, "command": command, "num_trajectories": count}

    cached(out / "build.json", build)
    units = [(seed, size) for size in sorted(budget["sizes"], reverse=True) for seed in budget["seeds"]]
    if workers > 1:
        run_processes([(f"[n={size} seed {seed}]", [sys.executable, str(Path(__file__).resolve()), "--out", str(out),
                                                    "--budget", budget_name, "--threads", str(threads), "--unit",
                                                    f"{seed}@{size}"], out / f"unit-seed{seed}-n{size}.log")
                       for seed, size in units], workers)
    else:
        for seed, size in units:
            run_unit(out, budget, seed, size)
    summary = summarize(out, budget)
    write_json(out / "trajectories.json", summary)
    table = markdown_table(summary)
    (out / "trajectories.md").write_text(table + "\n")
    plot(summary, out / "trajectories.png")
    click.echo(table)
    if docs is not None:
        (docs / "img").mkdir(parents=True, exist_ok=True)
        write_json(docs / "trajectories.json", summary)
        (docs / "img" / "trajectories.png").write_bytes((out / "trajectories.png").read_bytes())
    click.echo(f"{time.perf_counter() - started:.0f} s in this call (finished stages are not re-run); "
               f"results in {out / 'trajectories.json'}")


if __name__ == "__main__":
    main()
