"""The options every training phase shares (`TrainConfig`), their one set of defaults
(`TRAIN_DEFAULTS`), and how a phase's entry point turns its keywords into a config (`train_config`)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from cmt.errors import ArgumentError, local_path_only
from cmt.phema import check_stds
from cmt.trainers.precision import TF32_SETTINGS

LR_SCHEDULES = ("constant", "linear", "invsqrt")
OPTIMIZERS = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}
MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")


# What each shared option means, written once: this is the documentation of `TrainConfig`'s fields
# (the phases' `**train_options`) and the `cmt-train` commands' help (cmt.cli.train).
TRAIN_HELP = {
    "out": "Run folder: log.jsonl, training-state.pt, samples/, the final model.",
    "max_steps": "Optimizer steps.",
    "batch_size": "Global batch per optimizer step (all processes and micro-batches).",
    "lr": "Peak learning rate.",
    "lr_schedule": "constant; linear: decay to 0 at --max-steps; invsqrt: EDM2's lr / sqrt(max(step / --lr-ref-steps, "
                   "1)).",
    "lr_ref_steps": "Steps before the invsqrt decay starts.",
    "warmup_steps": "Linear lr warm-up.",
    "optimizer": "adam or radam.",
    "betas": "Adam betas (EDM2's).",
    "weight_decay": "The optimizer's weight decay (torch Adam's: an L2 term in the gradient); 0: none.",
    "grad_clip": "Clip the global gradient norm to this value [default: no clipping].",
    "ema_halflife_images": "EMA half-life in training images (ramped up, see --ema-rampup-ratio); none: off.",
    "ema_rampup_ratio": "EDM's ramp-up: the half-life is at most this share of the images seen so far.",
    "ema_beta": "A fixed per-step EMA decay instead of the half-life.",
    "ema_std": "Also keep EDM2's power-function EMAs of these lengths (sigma_rel; EDM2's 0.050,0.100) in every "
               "snapshot (needs --snapshot-every), from which cmt-ema reconstructs any EMA length after training "
               "[default: none].",
    "mixed_precision": "auto: bf16 (or fp16) on GPU, no on CPU.",
    "tf32": "TF32 matmuls and convolutions on CUDA. auto: off where its rounding reaches the residual the loss "
            "resolves (ECT / ECD at fine gaps, measured at the start), off in pre- and mid-training as the official "
            "loops, on otherwise; the choice is printed and recorded in run.json (cmt.trainers.precision).",
    "grad_accum": "Micro-batches per optimizer step.",
    "seed": "Seeds the network init, the data stream and every step's noise.",
    "log_every": "Log a line (log.jsonl, the console) every this many steps.",
    "ckpt_every": "Write training-state.pt every this many steps (and at the end).",
    "sample_every": "Sample a grid (and the metric) every this many steps; 0: at the end only.",
    "snapshot_every": "Also keep the EMA weights every this many steps as --out/snapshots/snapshot-NNNNNNN.safetensors "
                      "(cmt-sample --ckpt reads them); 0: none.",
    "resume": "Continue exactly from --out/training-state.pt (same data order and RNG), or finish its final "
              "sampling; the other options must be the saved run's (paths compared resolved, the data set by "
              "content), but for --log-every, --ckpt-every, --sample-every, --tensorboard, --progress, "
              "--max-nonfinite-steps, and a larger --max-steps (not with --lr-schedule linear), which extends the "
              "run (cmt.trainers.identity).",
    "resume_new_data": "With --resume: go on training on a data set that is not the one the run was saved with "
                       "(rebuilt or extended; the run's record says what changed). Without it such a resume is "
                       "refused; a moved set is the same set.",
    "tensorboard": "Also log to --out/tensorboard.",
    "progress": "tqdm progress bar on rank 0.",
    "max_nonfinite_steps": "Stop (exit 1, no model written) after this many consecutive steps with a NaN/inf loss; "
                           "0: never.",
}


TRAIN_HEADING = "Shared trainer options (`**train_options`: `TrainConfig`'s fields, `TRAIN_HELP`):"


@dataclass
class TrainConfig:
    """The options every phase shares. Its field defaults are the one source of the trainer's
    defaults (`TRAIN_DEFAULTS`); a phase overrides a few (`MID_DEFAULTS` etc.), the commands read both.
    What each field means: `TRAIN_HELP`."""
    out: Path
    max_steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    lr_schedule: str = "constant"
    lr_ref_steps: int = 1000
    warmup_steps: int = 0
    optimizer: str = "adam"
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    grad_clip: float | None = None
    ema_halflife_images: float | None = 500_000.0
    ema_rampup_ratio: float | None = 0.05
    ema_beta: float | None = None
    ema_std: tuple | None = None
    mixed_precision: str = "auto"
    tf32: str = "auto"
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 100
    ckpt_every: int = 1000
    sample_every: int = 0
    snapshot_every: int = 0
    resume: bool = False
    resume_new_data: bool = False
    tensorboard: bool = False
    progress: bool = True
    max_nonfinite_steps: int = 100

    def __post_init__(self):
        local_path_only("out", self.out)
        self.out = Path(self.out)
        for name in ("max_steps", "batch_size", "lr_ref_steps", "grad_accum", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ArgumentError(name, f"must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "sample_every", "snapshot_every", "seed", "weight_decay", "max_nonfinite_steps"):
            if getattr(self, name) < 0:
                raise ArgumentError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.lr is None or not self.lr > 0:
            raise ArgumentError("lr", f"must be > 0, got {self.lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ArgumentError("grad_clip", f"must be > 0 (None: no clipping), got {self.grad_clip}")
        for name in ("ema_halflife_images", "ema_rampup_ratio"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ArgumentError(name, f"must be >= 0 (None: off), got {getattr(self, name)}")
        if self.ema_beta is not None and not 0 <= self.ema_beta < 1:
            raise ArgumentError("ema_beta", f"must be in [0, 1), got {self.ema_beta}")
        if self.ema_std is not None:
            self.ema_std = check_stds(self.ema_std, "ema_std")
            if not self.snapshot_every:
                raise ArgumentError("snapshot_every", "the power-function EMAs (ema_std) live in the snapshots, from "
                                                      "which cmt-ema reconstructs any EMA length: give snapshot_every")
        if self.resume_new_data and not self.resume:
            raise ArgumentError("resume_new_data", "applies to a resumed run only: add resume (--resume)")
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        check_choice("tf32", self.tf32, TF32_SETTINGS)
        self.betas = tuple(self.betas)


TRAIN_DEFAULTS = {field.name: field.default for field in dataclasses.fields(TrainConfig)
                  if field.default is not dataclasses.MISSING}


def check_choice(argument: str, value, choices) -> None:
    if value not in choices:
        raise ArgumentError(argument, f"{value!r} is not one of {', '.join(map(str, choices))}")


def micro_batch_size(config: TrainConfig) -> int:
    """The rows of one forward pass: batch_size over the launched processes (torchrun's WORLD_SIZE) and
    grad_accum; what the Trainer will use, known before it is made."""
    return config.batch_size // (max(1, int(os.environ.get("WORLD_SIZE", "1") or 1)) * config.grad_accum)


def train_config(out, phase_defaults: dict, options: dict, *, default_lr: float | None = None) -> TrainConfig:
    """The TrainConfig of a phase's entry point: its `**options` (TrainConfig's field names) over the
    phase's defaults over `TRAIN_DEFAULTS`; an lr of None (the phases' default) is `default_lr`, the
    phase's rate for the network at hand. An unknown name is a TypeError, as for any keyword."""
    unknown = sorted(set(options) - set(TRAIN_DEFAULTS))
    if unknown:
        raise TypeError(f"unexpected keyword argument{'s' * (len(unknown) > 1)}: {', '.join(unknown)}")
    values = {**TRAIN_DEFAULTS, **phase_defaults, **options}
    if values["lr"] is None:
        values["lr"] = default_lr
    return TrainConfig(out=out, **values)
