"""The claim benchmark's arithmetic and report (`bench_claim.py` runs the stages; this reads what
they wrote): the cost of every evaluated point, the cost to reach a threshold, the cost ratio with
whether it is measured or only an upper bound (per seed and over seeds), the tuning stage's
learning-rate rule, and the tables, plots and sample figures.

Bounds. A baseline that does not reach a threshold counts with its whole budget, so its true cost
is larger than the one counted. On one seed the ratio CMT cost / best baseline cost is therefore
*measured* when the cheapest counted baseline reached the threshold, and an *upper bound* ("<=")
when the cheapest is one that did not. Over seeds the median is measured only when every seed's is
(the median of upper bounds bounds the median from above); a seed where the CMT start itself did not
reach the threshold counts as an infinite ratio and makes the median neither (said by name).
"""
import json
import math
import statistics
from pathlib import Path

import torch

from cmt.checkpoint import load_network
from cmt.datasets import resolve_data
from cmt.edm import SIGMA_MAX, TWO_STEP_SIGMA
from cmt.images import image_grid, save_scatter
from cmt.labels import pick_labels
from cmt.outputs import write_text
from cmt.sampling import generate
from cmt.teachers import resolve_teacher

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
TEACHER_FORWARD_SHARE = 1 / 3              # a forward pass ~ 1/3 of a forward+backward
METRICS = {"toy": "energy_distance", "mnist": "fd_mnist"}
# Evaluation noise: sample i uses seed START + i and the labels pick_labels("random", n, dim, seed=LABELS),
# the same every time. The tuning runs are scored on their own noise and labels, never the evaluation seeds'.
NOISE = {"evaluation": (10**6, 0), "tuning": (2 * 10**6, 1)}

# The learning rates a sweep may try, as multiples of the recipe's: half-decade steps (x3.16 rounded to 3).
LR_LADDER = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
LR_RULE = ("the lr factor whose run ends with the lowest 2-step metric on the tuning seed's noise; a run that "
           "diverged or scored a non-finite metric ranks last; equal scores: the factor nearer x1, then the "
           "smaller; when the best is the largest (smallest) factor tried, the next larger (smaller) one on "
           "the ladder is run too, at most max_extensions times each way (all diverged: extend downwards)")


def data_kind(data):
    return "mnist" if data == "mnist" else "toy"


def slug(data):
    return data.replace("toy:", "")


def factor_name(factor):
    return f"lr-x{factor:g}"


def write_json(path, value):
    """Atomically (`cmt.outputs.write_text`): an interrupted write leaves the old file or none."""
    write_text(path, json.dumps(value, indent=1) + "\n")


def read_json(path):
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def finite(value):
    return value is not None and math.isfinite(value)


# ---- the tuning rule ----------------------------------------------------------------------------

def choose_factor(scores, max_extensions, initial):
    """`(best factor, next factor to try or None)` from `{factor: final 2-step metric or None}` (None:
    diverged); `initial`: the sweep's first factors (extensions are counted beyond them), LR_RULE."""
    tried = sorted(scores)
    rank = lambda f: (scores[f] if finite(scores[f]) else math.inf, abs(math.log(f)), f)
    best = min(tried, key=rank)
    if not any(finite(scores[f]) for f in tried) or best == tried[0] and len(tried) > 1:
        candidates, used = [f for f in LR_LADDER if f < tried[0]][-1:], sum(f < min(initial) for f in tried)
    elif best == tried[-1] and len(tried) > 1:
        candidates, used = [f for f in LR_LADDER if f > tried[-1]][:1], sum(f > max(initial) for f in tried)
    else:
        return best, None
    return best, (candidates[0] if candidates and used < max_extensions else None)


# ---- cost ---------------------------------------------------------------------------------------

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
    """One start on one seed: its curve with the cumulative cost of every point, or None if unfinished.
    A point without a metric (after a divergence) has metric None."""
    method, init = STARTS[name]
    run, curve = read_json(root / f"{name}.json"), read_json(root / name / "curve.json")
    if run is None or curve is None or curve[-1][0] != run["max_steps"]:
        return None
    passes0, wall0 = setup_cost(root, init)
    points = [{"step": step, "passes": passes0 + step * run["batch_size"], "wall_s": wall0 + wall_at(run["wall"], step),
               "metric_1step": one, "metric_2step": two} for step, one, two in curve]
    return {"method": method, "init": init, "steps": run["max_steps"], "batch_size": run["batch_size"],
            "lr": run["lr"], "lr_factor": run.get("lr_factor"), "recipe": run["recipe"], "command": run["command"],
            "diverged_at": run.get("diverged_at"), "setup_passes": passes0, "setup_wall_s": wall0, "curve": points}


def first_reach(points, threshold):
    """The first point whose 2-step metric is <= threshold, or None."""
    return next((point for point in points if finite(point["metric_2step"]) and point["metric_2step"] <= threshold),
                None)


def seed_ratio(cmt, baselines, threshold, unit):
    """CMT cost / best baseline cost at one threshold on one seed, as `{"ratio", "kind",
    "best_baseline", "best_baseline_cost"}`. `baselines`: {name: record}; one that does not reach the
    threshold counts with its whole budget. kind: "measured" (the cheapest counted baseline reached
    it), "upper bound" (the cheapest did not: its true cost is higher), "CMT start not reached"
    (ratio None), or "no baseline"."""
    if not baselines:
        return {"ratio": None, "kind": "no baseline", "best_baseline": None, "best_baseline_cost": None}
    counted = {}
    for name, record in baselines.items():
        point = first_reach(record["curve"], threshold)
        counted[name] = ((point or record["curve"][-1])[unit], point is not None)
    best_cost = min(cost for cost, _ in counted.values())
    reached_at_best = [name for name, (cost, reached) in counted.items() if cost == best_cost and reached]
    best = reached_at_best[0] if reached_at_best else min(counted, key=lambda name: counted[name][0])
    result = {"best_baseline": best, "best_baseline_cost": best_cost,
              "kind": "measured" if reached_at_best else "upper bound"}
    point = first_reach(cmt["curve"], threshold)
    if point is None:
        return {**result, "ratio": None, "kind": "CMT start not reached"}
    return {**result, "ratio": point[unit] / best_cost if best_cost > 0 else math.inf}


def median_ratio(ratios):
    """Median over seeds, a seed without a ratio counting as infinite; None if that is the median."""
    if not ratios:
        return None
    value = statistics.median(math.inf if r is None else r for r in ratios)
    return None if math.isinf(value) else value


def combined_kind(kinds):
    """What the median over seeds is: "measured" only if every seed's ratio is."""
    missed = sum(kind in ("CMT start not reached", "no baseline") for kind in kinds)
    if missed:
        return f"CMT start not reached on {missed} of {len(kinds)} seeds"
    return "measured" if all(kind == "measured" for kind in kinds) else "upper bound"


def ratio_text(value, kind, digits=3):
    """A ratio as printed: "<= r" for an upper bound, "r" when measured."""
    if value is None:
        return "not reached" if kind and "not reached" in kind else "-"
    text = _fmt(value, digits)
    if kind == "upper bound":
        return "<= " + text
    return text if kind == "measured" else f"{text} ({kind})"


# ---- summary ------------------------------------------------------------------------------------

def tuning_summary(out, data, budget, names):
    """Per start: the sweep's factors and final metrics and the chosen lr (its choice.json)."""
    root = out / slug(data) / f"tuning-seed{budget['tuning_seed']}"
    teacher = read_json(root / "teacher.json")
    result = {}
    for name in names:
        choice = read_json(root / f"{name}.choice.json")
        if choice is not None:
            result[name] = {**choice, "teacher_16step": teacher and teacher["value"]}
    return result


def summarize(out, data, budget, starts=tuple(STARTS)):
    """One data set's summary: per method, the cost ratios at Q1 and Q2 (median over seeds, with
    what kind of figure it is), every seed's ratios and kinds, the CMT start's final 2-step metric
    over the teacher's, the tuning stage's choices, and every start's per-seed raw curves. A seed
    counts once every start of the method in `starts` has finished on it, so a run stopped early
    never compares the CMT start with only some of its baselines; a method with no such seed is
    left out."""
    seeds = {}
    for seed in budget["seeds"]:
        root = out / slug(data) / f"seed{seed}"
        teacher = read_json(root / "teacher.json")
        if teacher is None:
            continue
        seeds[seed] = {"teacher": teacher["value"],
                       "starts": {name: record for name in STARTS if (record := start_record(root, name))}}
    summary = {}
    for method in METHODS:
        cmt_name = CMT_START[method]
        names = [name for name in STARTS if STARTS[name][0] == method and name in starts]
        if cmt_name not in names:
            continue
        entry = {"cost_ratio_q1": None, "cost_ratio_q2": None, "final_2step_over_teacher": None}
        per_seed, finals = {}, []
        for seed, node in seeds.items():
            cmt = node["starts"].get(cmt_name)
            if cmt is None or any(name not in node["starts"] for name in names):
                continue
            baselines = {name: r for name, r in node["starts"].items() if r["method"] == method and name != cmt_name}
            row = {"teacher_16step": node["teacher"],
                   "final_2step_over_teacher": cmt["curve"][-1]["metric_2step"] / node["teacher"]
                   if finite(cmt["curve"][-1]["metric_2step"]) else None}
            finals.append(row["final_2step_over_teacher"])
            for key, factor in THRESHOLDS.items():
                threshold = factor * node["teacher"]
                row[f"{key}_threshold"] = threshold
                for unit, suffix in (("passes", ""), ("wall_s", "_wall")):
                    ratio = seed_ratio(cmt, baselines, threshold, unit)
                    row[f"cost_ratio_{key}{suffix}"] = ratio["ratio"]
                    row[f"cost_ratio_{key}{suffix}_kind"] = ratio["kind"]
                    row[f"best_baseline_{key}{suffix}"] = ratio["best_baseline"]
                    row[f"best_baseline_cost_{key}{suffix}"] = ratio["best_baseline_cost"]
                for name, record in node["starts"].items():
                    if record["method"] == method:
                        point = first_reach(record["curve"], threshold)
                        row.setdefault("cost_to_reach", {}).setdefault(name, {})[key] = (
                            "not reached" if point is None else
                            {"step": point["step"], "passes": point["passes"], "wall_s": point["wall_s"]})
            per_seed[str(seed)] = row
        tuning = tuning_summary(out, data, budget, names)
        if not per_seed:
            continue   # no seed finished for this method: report() keeps what OUT/claim.json holds for it
        for key in THRESHOLDS:
            for suffix in ("", "_wall"):
                field = f"cost_ratio_{key}{suffix}"
                entry[field] = median_ratio([row[field] for row in per_seed.values()])
                entry[f"{field}_kind"] = combined_kind([row[f"{field}_kind"] for row in per_seed.values()])
        entry["final_2step_over_teacher"] = (statistics.mean(finals) if all(finite(f) for f in finals) else None)
        counted = {seed: node for seed, node in seeds.items() if str(seed) in per_seed}   # what the ratios rest on
        best_finals = [min(finals_of) / node["teacher"] for node in counted.values()
                       if (finals_of := [r["curve"][-1]["metric_2step"] for name, r in node["starts"].items()
                                         if r["method"] == method and name != cmt_name
                                         and finite(r["curve"][-1]["metric_2step"])])]
        entry["best_baseline_final_2step_over_teacher"] = statistics.mean(best_finals) if best_finals else None
        entry.update({
            "cost_unit": "network passes: images through a student forward+backward, plus the teacher's forward "
                         "evaluations (the build's, flow-map mid-training's velocity rows) at 1/3 each; "
                         "cost_ratio_*_wall: the same in wall seconds",
            "not_reached": "a baseline that does not reach the threshold counts with its whole budget; a seed's "
                           "ratio is 'measured' when its cheapest counted baseline reached the threshold, else an "
                           "'upper bound'; the value is the median over seeds (a seed where the CMT start does not "
                           "reach it counts as infinite; null: not reached on most seeds), 'measured' only when "
                           "every seed's is (*_kind)",
            "thresholds": {key: f"{factor} x the teacher's {TEACHER_STEPS}-step metric, 2-step student sampling"
                           for key, factor in THRESHOLDS.items()},
            "metric": METRICS[data_kind(data)], "cmt_start": cmt_name,
            "baselines": [name for name in names if name != cmt_name],
            "lr_rule": LR_RULE, "tuning_seed": budget.get("tuning_seed"), "tuning": tuning,
            "seeds": per_seed,
            "teacher_16step": {str(seed): node["teacher"] for seed, node in counted.items()},
            "curves": {name: {str(seed): node["starts"][name] for seed, node in counted.items()} for name in names},
        })
        summary[method] = entry
    return summary


# ---- tables -------------------------------------------------------------------------------------

def _fmt(value, digits=3):
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def tuning_table(summary):
    """Per start: the final 2-step metric / the teacher's (tuning noise) at every factor tried."""
    rows = [(name, choice) for entry in summary.values() for name, choice in entry.get("tuning", {}).items()]
    if not rows:
        return ""
    factors = sorted({float(f) for _, choice in rows for f in choice["factors"]})
    lines = ["| start | recipe lr | " + " | ".join(f"x{f:g}" for f in factors) + " | chosen lr |",
             "|---|---|" + "---|" * len(factors) + "---|"]
    for name, choice in rows:
        teacher = choice.get("teacher_16step") or 1.0
        cells = []
        for factor in factors:
            result = choice["factors"].get(f"{factor:g}")
            if result is None:
                cells.append("")
            elif not finite(result["final_2step"]):
                cells.append("diverged" if result.get("diverged") else "nan")
            else:
                text = _fmt(result["final_2step"] / teacher)
                cells.append(f"**{text}**" if factor == choice["chosen_factor"] else text)
        edge = " (edge)" if choice.get("at_edge") else ""
        lines.append(f"| {name} | {choice['base_lr']:g} | " + " | ".join(cells)
                     + f" | {choice['chosen_lr']:.3g} (x{choice['chosen_factor']:g}){edge} |")
    return "\n".join(lines)


def markdown_tables(summary, data):
    """One data set: per start, seeds reaching Q1 / Q2 and the median cost to reach them; per method,
    the ratios (median, and every seed's, "<=" where a bound); then the tuning table."""
    lines = [f"### {data}", "",
             "| start | lr | steps | final 2-step / teacher (mean) | Q1 reached | cost to Q1, passes (median) | "
             "wall s | Q2 reached | cost to Q2, passes (median) | wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for method, entry in summary.items():
        for name, per_seed in entry["curves"].items():
            if not per_seed:
                continue
            teacher = entry.get("teacher_16step", {})
            finals = [r["curve"][-1]["metric_2step"] / teacher[s] if finite(r["curve"][-1]["metric_2step"]) else math.inf
                      for s, r in per_seed.items()]
            first = next(iter(per_seed.values()))
            cells = [name, f"{first['lr']:.3g}", str(first["steps"]), _fmt(statistics.mean(finals))]
            for key in THRESHOLDS:   # reaching is summarised where the CMT start ran (a baseline-only run: "0 of 0")
                reached = [entry["seeds"][s]["cost_to_reach"][name][key] for s in per_seed if s in entry["seeds"]]
                hits = [r for r in reached if r != "not reached"]
                cells += [f"{len(hits)} of {len(reached)}" + (f" (steps {', '.join(str(r['step']) for r in hits)})"
                                                              if hits else ""),
                          _fmt(statistics.median(r["passes"] for r in hits)) if hits else "not reached",
                          _fmt(statistics.median(r["wall_s"] for r in hits), 4) if hits else "-"]
            lines.append("| " + " | ".join(cells) + " |")
        def ratio(key, suffix=""):
            field = f"cost_ratio_{key}{suffix}"
            return ratio_text(entry.get(field), entry.get(f"{field}_kind"))
        lines.append(f"| **{method}: cost ratio CMT / best baseline (median)** | | | "
                     f"**{_fmt(entry['final_2step_over_teacher'])}** | | **{ratio('q1')}** | **{ratio('q1', '_wall')}** | "
                     f"| **{ratio('q2')}** | **{ratio('q2', '_wall')}** |")
        per_seed_cells = []
        for key in THRESHOLDS:
            for suffix in ("", "_wall"):
                field = f"cost_ratio_{key}{suffix}"
                per_seed_cells.append(", ".join(ratio_text(row[field], row[f"{field}_kind"])
                                                for row in entry["seeds"].values()) or "-")
        lines.append(f"| {method}: per seed ({', '.join(entry['seeds'])}) | | | | | {per_seed_cells[0]} | "
                     f"{per_seed_cells[1]} | | {per_seed_cells[2]} | {per_seed_cells[3]} |")
    table = tuning_table(summary)
    if table:
        lines += ["", f"Tuning (seed {next(iter(summary.values())).get('tuning_seed')}, its own noise): final "
                  "2-step metric / the teacher's 16-step metric on that noise, per lr factor (x the recipe's "
                  "lr); bold: chosen.", "", table]
    return "\n".join(lines)


# ---- figures ------------------------------------------------------------------------------------

COLORS = {"ect-random": "tab:gray", "ect-teacher": "tab:blue", "ect-cmt": "tab:red",
          "meanflow-random": "tab:olive", "meanflow-teacher": "tab:cyan", "meanflow-cmt": "tab:purple"}


def plot(summary, data, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    summary = {method: entry for method, entry in summary.items() if any(entry["curves"].values())}   # methods that ran
    if not summary:
        return
    fig, axes = plt.subplots(len(summary), 2, figsize=(13, 4.2 * len(summary)), squeeze=False)
    for row, (method, entry) in enumerate(summary.items()):
        teachers = list(entry["teacher_16step"].values())
        for column, (unit, label) in enumerate((("passes", "network passes (build + mid + post)"),
                                                ("wall_s", "wall seconds (build + mid + post)"))):
            axis = axes[row][column]
            for name, per_seed in entry["curves"].items():
                curves = [r["curve"] for r in per_seed.values()]
                if not curves:
                    continue
                length = min(len(c) for c in curves)
                cost = np.median([[p[unit] for p in c[:length]] for c in curves], axis=0)
                values = np.array([[np.nan if p["metric_2step"] is None else p["metric_2step"] for p in c[:length]]
                                   for c in curves])
                lr = next(iter(per_seed.values()))["lr"]
                axis.plot(cost, np.median(values, axis=0), color=COLORS[name], marker=".",
                          label=f"{name}, lr {lr:.2g} ({len(curves)})")
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
    fig.suptitle(f"{data}: 2-step metric against cumulative cost, each start at its tuned lr "
                 "(median over seeds, band = min to max)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


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
    first = NOISE["evaluation"][0]
    seeds = list(range(first, first + count))
    labels = pick_labels("random" if points else "cycle", count, teacher.label_dim)
    panels = [(f"teacher, {TEACHER_STEPS} steps", generate(teacher.to(device()), seeds, labels, solver="dpm++3m",
                                                            steps=TEACHER_STEPS))]
    for name, (method, _) in STARTS.items():
        model = root / name / "post.safetensors"
        if model.is_file():
            panels.append((f"{name}, 2 steps", generate(load_network(model).to(device()), seeds, labels,
                                                        sampler="flowmap", steps=2, mid_sigma=TWO_STEP_SIGMA,
                                                        sigma_max=SIGMA_MAX, renoise=method != "meanflow")))
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
