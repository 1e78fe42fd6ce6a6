"""The files of a training run beside the loop that writes them: the resumable state
(`training-state.pt`), the log (`log.jsonl`, and TensorBoard), the run record (`run.json`), the EMA
snapshots, and the checks that a `--resume` continues the same run.

A run folder holds `run.json` (every option, the software versions; written once, at the start),
`log.jsonl` (one record per logged step; cut back to the resumed step on resume), `training-state.pt`
(`torch.load(weights_only=True)`: step, networks, optimizer, each rank's data-stream state, and the
run record that a resume must match), and `snapshots/`.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import json
import math
import platform
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from cmt.checkpoint import read_torch_file
from cmt.errors import ArgumentError
from cmt.trainers.identity import normalised_options, resume_differences
from cmt.outputs import naming, write_text, write_torch

STATE_FILE = "training-state.pt"
LOG_FILE = "log.jsonl"
RUN_FILE = "run.json"
SNAPSHOT_DIR = "snapshots"
# The log's count of training images so far (log.jsonl files written before it was named so call it
# "images"; `read_log` renames it).
IMAGES_SEEN = "images_seen"
TRAINING_FIGURES = ("loss", "grad_norm", "lr", "skipped", IMAGES_SEEN, "sec_per_step")
# The options a resumed run may change; every other option (the TrainConfig's and the phase's) must
# be the saved run's, or --resume is refused with the list of differences. max_steps may grow (the
# run is extended, as if it had been asked for from the start), except under the linear lr
# schedule, which max_steps defines; it may not fall below the saved step.
RESUMABLE_OPTIONS = ("out", "resume", "resume_new_data", "log_every", "ckpt_every", "sample_every", "snapshot_every",
                     "tensorboard", "progress", "max_nonfinite_steps")
# Exit codes of a run stopped by a signal (after saving its state): the shell's 128 + signal number.

STATE_KEYS = ("step", "skipped", "config", "net", "ema", "optimizer", "data")


def final_metrics(out) -> dict:
    """The last record of a run's log: its step and every scalar logged then."""
    records = read_log(out)
    return records[-1] if records else {}


def phase_options(function: Callable, values: dict) -> dict:
    """The run-defining options of a phase: the keyword arguments of its entry point `function`
    (as resolved in `values`, its locals) except `out` and the trainer options; a value that is not
    plain data (a resolved data set) by its name. What `--resume` compares with the saved run."""
    def plain(value):
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        if isinstance(value, dict):
            return {str(key): plain(item) for key, item in value.items()}
        if isinstance(value, Path):
            return str(value)
        return str(getattr(value, "name", type(value).__name__))
    names = [name for name, parameter in inspect.signature(function).parameters.items()
             if parameter.kind == parameter.KEYWORD_ONLY and name != "out"]
    return {name: plain(values[name]) for name in names if name in values}


def run_record(config, phase: str | None, run_options: dict | None, inputs: dict | None = None) -> dict:
    """What defines a run and what a resume must repeat: the phase, max_steps, the trainer options and
    the phase's options, but `RESUMABLE_OPTIONS`, its paths resolved (plain JSON values); and the
    identities of its inputs (`cmt.trainers.identity.input_identities`), compared by content."""
    fixed = lambda values: {k: v for k, v in values.items() if k not in RESUMABLE_OPTIONS + ("max_steps",)}
    return json.loads(json.dumps({"phase": phase, "max_steps": config.max_steps,
                                  "train": fixed(dataclasses.asdict(config)),
                                  "options": normalised_options(fixed(run_options or {})), "inputs": inputs or {}},
                                 default=str))


def write_run_file(out: Path, config, run_info: dict, num_processes: int) -> Path:
    """`run.json`: every option, the run's own information, the process count and the versions."""
    info = {"train": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()},
            **run_info, "num_processes": num_processes, "versions": software_versions()}
    return write_text(Path(out) / RUN_FILE, json.dumps(info, indent=2, default=str) + "\n")


def note_new_data(out: Path, inputs: dict, step: int, changes: list[str]) -> None:
    """run.json after a resume on a changed data set (`resume_new_data`): the new inputs, and under
    "new_data" the step and what changed (run.json is otherwise written once, at the start)."""
    path = Path(out) / RUN_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return   # no readable run.json to amend; the state records the new inputs anyway
    info["inputs"] = inputs
    info.setdefault("new_data", []).append({"step": step, "changes": changes})
    write_text(path, json.dumps(info, indent=2, default=str) + "\n")


def read_state(out: Path, record: dict, lr_schedule: str, resume_new_data: bool = False) -> tuple[dict, list[str]]:
    """`(state, data changes)`: the saved training state of the run in `out`, checked to be one (a
    truncated or foreign file: FileFormatError) and to continue the run `record` describes
    (`run_record`, compared as `cmt.trainers.identity.resume_differences` says): the same phase and
    options, a max_steps not behind the saved step (and unchanged under the linear schedule), the same
    data set unless `resume_new_data` (then its changes are returned, to be said)."""
    path = Path(out) / STATE_FILE
    state = read_torch_file(path, "training state")
    if not isinstance(state, dict) or any(key not in state for key in STATE_KEYS):
        raise ArgumentError("resume", f"{path} is not a cmt training state (expected the keys "
                                      f"{', '.join(STATE_KEYS)})")
    saved = state.get("run")
    if saved is not None:
        if saved.get("phase") != record["phase"]:
            raise ArgumentError("resume", f"{path} is the state of a {saved.get('phase')} run, not of "
                                          f"{record['phase']}: resume it with cmt-train {saved.get('phase')}, or "
                                          "choose another --out")
        saved_steps, steps = saved.get("max_steps"), record["max_steps"]
        if steps < int(state["step"]):
            raise ArgumentError("max_steps", f"{path} is at step {state['step']}; max_steps {steps} is behind it")
        if steps != saved_steps and lr_schedule == "linear":
            raise ArgumentError("max_steps", f"{path} was saved by a run of {saved_steps} steps under the "
                                             f"linear lr schedule, which max_steps sets: keep {saved_steps}")
        changed, data = resume_differences({**saved, "max_steps": steps}, record)
        if changed:
            raise ArgumentError("resume", f"{path} was saved by a run with other options; only "
                                          f"{', '.join(RESUMABLE_OPTIONS[2:])} (and a larger max_steps) "
                                          "may change on resume: " + "; ".join(changed))
        if data and not resume_new_data:
            raise ArgumentError("data", f"not the data set {path} was trained on ({'; '.join(data)}): give that "
                                        "set (if moved, by its new path), or add --resume-new-data to go on "
                                        "training on this one")
        return state, data
    return state, []


def write_state(out: Path, state: dict) -> Path:
    """`training-state.pt`, atomically (the old state or the new one, never half of either)."""
    return write_torch(Path(out) / STATE_FILE, state)


def summary_writer():
    """tensorboard's SummaryWriter class (an optional dependency, imported only when asked for)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ArgumentError("tensorboard", "needs the tensorboard package (pip install tensorboard)") from error
    return SummaryWriter


def _logged_step(line: str) -> float:
    """The step of a log line; infinity for a line a killed run left half-written (dropped on resume)."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


class RunLog:
    """log.jsonl (cut back to the resumed step, so a resumed run's log reads as one run) + tensorboard."""

    def __init__(self, out: Path, start_step: int, tensorboard: bool):
        path = out / LOG_FILE
        kept = []
        if start_step > 0 and path.exists():
            kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= start_step]
        self.path = path
        with naming(path):
            path.write_text("".join(line + "\n" for line in kept))
            self.file = path.open("a")
        self.training_names: set[str] = set()   # the objective's own figures (set by the loop)
        self.writer = None
        if tensorboard:
            self.writer = summary_writer()(str(out / "tensorboard"))

    def write(self, record: dict) -> None:
        """One record: its numbers to log.jsonl; for TensorBoard also its pictures (values that are
        paths of PNGs a `sample_fn` wrote) as images, training figures under train/, the sampling
        metrics under metrics/."""
        pictures = {name: value for name, value in record.items() if isinstance(value, Path)}
        scalars = {name: value for name, value in record.items() if name not in pictures}
        with naming(self.path):   # a full disk: "no space left on device: .../log.jsonl"
            self.file.write(json.dumps(scalars) + "\n")
            self.file.flush()
        if self.writer is not None:
            step = record["step"]
            for name, value in scalars.items():
                if name != "step" and isinstance(value, (int, float)):
                    group = "train" if name in TRAINING_FIGURES or name in self.training_names else "metrics"
                    self.writer.add_scalar(f"{group}/{name}", value, step)
            for name, path in pictures.items():
                self.writer.add_image(f"samples/{name}", np.asarray(Image.open(path).convert("RGB")), step,
                                      dataformats="HWC")
            self.writer.flush()

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def evaluation_pending(out: Path, step: int) -> bool:
    """Whether the final sampling of a run that reached its last step `step` is still to do: its log
    has no record of that step (a kill or a full disk after the final state), or one of a sampling
    that failed (`"evaluation": "failed"`)."""
    path = Path(out) / LOG_FILE
    records = []
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            record = json.loads(line)
        except ValueError:   # a line a kill left half-written
            continue
        if isinstance(record, dict) and record.get("step") == step:
            records.append(record)
    return not records or records[-1].get("evaluation") == "failed"


def read_log(out: Path) -> list[dict]:
    """The records of a run's log.jsonl (an older log's "images" read as `IMAGES_SEEN`)."""
    path = Path(out) / LOG_FILE
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for record in records:
        if "images" in record and IMAGES_SEEN not in record:
            record[IMAGES_SEEN] = record.pop("images")
    return records


def software_versions() -> dict:
    """What run.json records of the software a run used."""
    return {"cmt": importlib.metadata.version("cmt"), "torch": torch.__version__,
            "accelerate": importlib.metadata.version("accelerate"), "python": platform.python_version()}
