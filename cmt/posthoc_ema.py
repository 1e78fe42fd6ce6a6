"""Post-hoc EMA: combine a run's power-function EMA snapshots into the EMA of any length, after
training (EDM2's reconstruct_phema.py); `reconstruct_ema` is `cmt-ema`.

The snapshots are the files `cmt.phema.PowerFunctionEMA.snapshot` writes (`phema-NNNNNNN-STD.safetensors`,
with `"phema": {"std", "step", "nimg"}` in their metadata). For each requested std the least-squares
coefficients of `cmt.phema.solve_posthoc_coefficients` combine every snapshot up to the target step
into `ema-NNNNNNN-STD.safetensors`, a network file that `cmt-sample`, `load_network` and the trainers
read. With `eval_data` (a built-in data name) each reconstruction is sampled and scored, and the
sweep is written as a table (`ema-eval.json`) and a plot of the metric against the EMA std
(`ema-eval.png`), so the best length can be picked.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from cmt.checkpoint import read_safetensors, save_weights
from cmt.datasets import TOY_NAMES, resolve_data
from cmt.edm import TWO_STEP_SIGMA
from cmt.errors import ArgumentError, FileFormatError, local_path_only
from cmt.evaluation import evaluate
from cmt.networks import build_network
from cmt.options import checked_keywords, document_keywords
from cmt.outputs import STEP_DIGITS, atomic_path, write_text
from cmt.phema import SNAPSHOT_PREFIX, check_stds, p_dot_p, solve_posthoc_coefficients, std_to_exp
from cmt.sampling import DEFAULT_STEPS, sample

OUTPUT_PREFIX = "ema"
EVAL_TABLE = "ema-eval.json"
EVAL_PLOT = "ema-eval.png"


def output_name(step, std):
    """`ema-0001000-0.130.safetensors`: a reconstruction (snapshots are `phema-...`, so a folder holding
    both never feeds a reconstruction back in)."""
    return f"{OUTPUT_PREFIX}-{int(step):0{STEP_DIGITS}d}-{std:.3f}.safetensors"


def read_snapshot(path):
    """`{"path", "std", "step", "nimg", "config", "extra"}` of one snapshot (its metadata only)."""
    _, config, extra = read_safetensors(path, tensors=False)
    info = extra.get("phema")
    if not isinstance(info, dict) or not all(key in info for key in ("std", "step", "nimg")):
        raise FileFormatError(f"{path}: not a power-function EMA snapshot (no 'phema' record with std, step and "
                              "nimg in its metadata); cmt.phema.PowerFunctionEMA.snapshot writes them")
    return {"path": Path(path), "std": float(info["std"]), "step": int(info["step"]), "nimg": int(info["nimg"]),
            "config": config, "extra": extra}


def find_snapshots(snapshots):
    """The snapshots of a folder (its `phema-*.safetensors`) or a list of files, sorted by (step, std)."""
    if isinstance(snapshots, (str, Path)):
        folder = Path(snapshots)
        if not folder.exists():
            raise ArgumentError("snapshots", f"{folder} does not exist")
        paths = sorted(folder.glob(f"{SNAPSHOT_PREFIX}-*.safetensors")) if folder.is_dir() else [folder]
    else:
        paths = [Path(path) for path in snapshots]
    if not paths:
        raise ArgumentError("snapshots", f"no power-function EMA snapshots ({SNAPSHOT_PREFIX}-NNNNNNN-STD.safetensors) "
                                         f"in {snapshots}")
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise ArgumentError("snapshots", f"no such file: {', '.join(missing[:3])}")
    found = [read_snapshot(path) for path in paths]
    configs = {json.dumps(item["config"], sort_keys=True) for item in found}
    if len(configs) > 1:
        raise ArgumentError("snapshots", "the snapshots hold different networks (their configs differ); give the "
                                         "snapshots of one run")
    return sorted(found, key=lambda item: (item["step"], item["std"]))


def fit_error(coefficients, in_times, in_stds, out_time, out_stds):
    """How far each reconstructed profile is from its target: `|p_out - sum_i x_i p_i|^2 / |p_out|^2`
    (0: exact; a target far shorter or longer than the snapshots' profiles is fitted loosely)."""
    gram = p_dot_p(in_times[:, None], in_stds[:, None], in_times[None], in_stds[None])
    cross = p_dot_p(in_times[:, None], in_stds[:, None], out_time, out_stds[None])
    norms = p_dot_p(out_time, out_stds, out_time, out_stds)
    residual = norms - 2 * np.sum(coefficients * cross, axis=0) + np.einsum("ik,ij,jk->k", coefficients, gram,
                                                                              coefficients)
    return np.maximum(residual, 0.0) / norms


# What each keyword of `reconstruct_ema` means: its docstring and cmt-ema's help (`cmt.options.document_keywords`).
EMA_HELP = {
    "snapshots": "A run's snapshot folder (phema-NNNNNNN-STD.safetensors files) or one snapshot file; in Python also "
                 "a list of such files.",
    "std": "Target EMA std(s), EDM2's sigma_rel, comma-separated (in Python a number or a list), each in (0, 0.289).",
    "out": "Folder for the reconstructed networks ema-NNNNNNN-STD.safetensors.",
    "step": "Reconstruct at this snapshot step; later snapshots are not used [default: the last].",
    "eval_data": f"Sample and score each reconstruction on this built-in data set (mnist, toy:NAME: "
                 f"{', '.join(TOY_NAMES)}).",
    "eval_steps": f"Sampler steps for --eval [default: 2 flow-map steps for a student, {DEFAULT_STEPS} ODE steps "
                  "otherwise].",
    "mid_sigma": "A student's 2-step intermediate sigma.",
    "num_samples": "Samples per reconstruction for --eval.",
    "seed": "Sample i uses seed + i.",
    "device": "torch device [default: cuda if available, else cpu].",
    "progress": "tqdm progress bars while sampling.",
}


@document_keywords(EMA_HELP)
@checked_keywords
def reconstruct_ema(*, snapshots, std, out, step=None, eval_data=None, eval_steps=None, mid_sigma=TWO_STEP_SIGMA,
                    num_samples=2000, seed=0, device=None, progress=True):
    """Reconstruct the power-function EMA of each `std` from a run's snapshots; `cmt-ema`.

    Each reconstruction keeps the network config and the snapshot's run record; `"posthoc_ema"` in
    its metadata holds the std, the step, the coefficients and the fit error. With `eval_data`, each
    is sampled (seeds `seed + i`) and scored with the data's metric (lower is better): flow-map /
    consistency students by flow-map steps, diffusion networks by the default ODE sampler; the
    sweep goes to `out/ema-eval.json` and `out/ema-eval.png` (metric against std), the pictures to
    `out/eval/`.

    Returns `{"out", "models": [Path per std], "stds", "step", "nimg", "snapshots": [Path],
    "coefficients": [[per snapshot] per std], "fit_error": [per std], "eval": None or {"data",
    "metric", "sampler", "steps", "rows": [{"std", "model", metrics...}], "best": row, "table", "plot"}}`.
    """
    stds = sorted(set(check_stds(std, "std")))
    local_path_only("out", out)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArgumentError("out", f"{out} is a file; give a folder for the reconstructed networks")
    found = find_snapshots(snapshots)
    steps = sorted({item["step"] for item in found})
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ArgumentError("step", f"{step} is not a snapshot step; the snapshots are at steps "
                                    f"{', '.join(map(str, steps[:10]))}{' ...' if len(steps) > 10 else ''}")
    inputs = [item for item in found if 0 < item["step"] <= step]
    if not inputs:
        raise ArgumentError("snapshots", f"no snapshot after step 0 and at or before step {step}")
    data = _check_eval(eval_data, eval_steps, num_samples, inputs[-1]["config"])

    in_times = np.array([item["nimg"] for item in inputs], dtype=np.float64)
    in_stds = np.array([item["std"] for item in inputs], dtype=np.float64)
    out_time = float(max(item["nimg"] for item in inputs if item["step"] == step))
    coefficients = solve_posthoc_coefficients(in_times, in_stds, out_time, np.array(stds))
    errors = fit_error(coefficients, in_times, in_stds, out_time, np.array(stds))

    # One pass over the snapshots: each is read once and added to every output (float32 sums, as EDM2).
    sums, buffers, dtypes = None, None, None
    for i, item in enumerate(inputs):
        state, _, _ = read_safetensors(item["path"])
        if sums is None:
            skip = _buffer_names(item["config"], state)
            parameters = [name for name in state if name not in skip]
            sums = [{name: torch.zeros(state[name].shape, dtype=torch.float32) for name in parameters} for _ in stds]
            dtypes = {name: value.dtype for name, value in state.items()}
        for k in range(len(stds)):
            for name, total in sums[k].items():
                total.add_(state[name].float(), alpha=float(coefficients[i, k]))
        buffers = {name: value for name, value in state.items() if name not in sums[0]}   # the latest input's
    last = next(item for item in reversed(inputs) if item["step"] == step)
    record = {key: value for key, value in last["extra"].items() if key != "phema"}
    models = []
    for k, target in enumerate(stds):
        state = {**{name: value.to(dtypes[name]) for name, value in sums[k].items()}, **buffers}
        info = {**record, "step": step, "posthoc_ema": {
            "std": target, "exp": float(std_to_exp(target)), "step": step, "nimg": int(out_time),
            "fit_error": float(errors[k]), "snapshots": [item["path"].name for item in inputs],
            "coefficients": [float(value) for value in coefficients[:, k]]}}
        models.append(save_weights(out / output_name(step, target), state, last["config"], info))
    result = {"out": out, "models": models, "stds": stds, "step": step, "nimg": int(out_time),
              "snapshots": [item["path"] for item in inputs], "coefficients": coefficients.T.tolist(),
              "fit_error": errors.tolist(), "eval": None}
    if data is not None:
        result["eval"] = _evaluate_sweep(models, stds, sorted({item["std"] for item in inputs}), last, data, out,
                                         eval_steps=eval_steps, mid_sigma=mid_sigma, num_samples=num_samples,
                                         seed=seed, device=device, progress=progress)
    return result


def _buffer_names(config, state):
    """The names in `state` that are the network's buffers, not its parameters (not averaged)."""
    with torch.device("meta"):
        net = build_network(config)
    return {name for name, _ in net.named_buffers() if name in state}


def is_student(config, extra):
    """A flow-map or consistency student (sampled by 1-2 jumps), not a diffusion network (ODE solver)."""
    return bool(config.get("flow_map")) or float(config.get("sigma_min") or 0) > 0 \
        or extra.get("phase") in ("mid", "post")


def _check_eval(eval_data, eval_steps, num_samples, config):
    """The resolved built-in data set of `eval_data` (None without it), checked before any work."""
    if eval_data is None:
        for argument, value in (("eval_steps", eval_steps),):
            if value is not None:
                raise ArgumentError(argument, "only used with --eval (eval_data=)")
        return None
    if not (eval_data == "mnist" or (str(eval_data).startswith("toy:") and eval_data[4:] in TOY_NAMES)):
        raise ArgumentError("eval_data", f"{eval_data!r}: --eval takes a data set with a built-in metric: mnist or "
                                         f"toy:NAME ({', '.join(TOY_NAMES)})")
    if int(num_samples) != num_samples or num_samples < 2:
        raise ArgumentError("num_samples", f"must be an integer >= 2, got {num_samples!r}")
    if eval_steps is not None and (int(eval_steps) != eval_steps or eval_steps < 1):
        raise ArgumentError("eval_steps", f"must be an integer >= 1, got {eval_steps!r}")
    data = resolve_data(eval_data)
    with torch.device("meta"):
        shape = tuple(build_network(config).data_shape)
    if shape != tuple(data.data_shape):
        raise ArgumentError("eval_data", f"{data.name} holds data of shape {tuple(data.data_shape)}; the network "
                                         f"makes samples of shape {shape}")
    return data


def _evaluate_sweep(models, stds, tracked, last, data, out, *, eval_steps, mid_sigma, num_samples, seed, device,
                    progress):
    student = is_student(last["config"], last["extra"])
    sampler = "flowmap" if student else "ode"
    steps = eval_steps or (2 if student else DEFAULT_STEPS)
    if student and steps not in (1, 2):
        raise ArgumentError("eval_steps", f"a student is sampled with 1 or 2 flow-map steps, got {steps}")
    rows = []
    for target, model in zip(stds, models):
        drawn = sample(ckpt=model, out=out / "eval" / model.with_suffix(".png").name, sampler=sampler, steps=steps,
                       mid_sigma=mid_sigma, num_samples=num_samples, seed=seed, device=device, progress=progress)
        metrics = evaluate(samples=drawn["samples"], data=data.name)["metrics"]
        rows.append({"std": target, "model": str(model), **metrics})
    metric = next(name for name in rows[0] if name not in ("std", "model"))   # the data's headline metric
    best = min(rows, key=lambda row: row[metric] if math.isfinite(row[metric]) else math.inf)
    summary = {"data": data.name, "metric": metric, "sampler": sampler, "steps": steps, "num_samples": num_samples,
               "seed": seed, "step": last["step"], "tracked_stds": tracked, "rows": rows, "best": best,
               "table": out / EVAL_TABLE, "plot": out / EVAL_PLOT}
    write_text(out / EVAL_TABLE, json.dumps({**summary, "table": str(summary["table"]), "plot": str(summary["plot"])},
                                            indent=2) + "\n")
    plot_sweep(summary, out / EVAL_PLOT)
    return summary


def plot_sweep(summary, path):
    """The metric of each reconstruction against its EMA std, the tracked stds marked, the best circled."""
    rows, metric = summary["rows"], summary["metric"]
    figure = Figure(figsize=(6, 4), dpi=100)
    axis = figure.subplots()
    axis.plot([row["std"] for row in rows], [row[metric] for row in rows], "o-", color="tab:blue",
              label="post-hoc EMA reconstructions")
    for i, tracked in enumerate(summary["tracked_stds"]):
        axis.axvline(tracked, color="0.6", linestyle="--", linewidth=1, label="tracked stds" if i == 0 else None)
    best = summary["best"]
    axis.plot([best["std"]], [best[metric]], "o", markersize=12, markerfacecolor="none", color="tab:red",
              label=f"best: std {best['std']:.3f}, {metric.replace('_', ' ')} {best[metric]:.4g}")
    axis.set_xlabel("EMA std (sigma_rel)")
    axis.set_ylabel(f"{metric.replace('_', ' ')} (lower is better)")
    how = f"{summary['sampler']} {summary['steps']} step{'s' * (summary['steps'] > 1)}"
    axis.set_title(f"{summary['data']}: post-hoc EMA at step {summary['step']} ({how}, {summary['num_samples']} "
                   "samples)", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary)
    return path
