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


@dataclass
class TrainConfig:
    """The options every phase shares. Its field defaults are the one source of the trainer's
    defaults (`TRAIN_DEFAULTS`); a phase overrides a few (`MID_DEFAULTS` etc.), the commands read both."""
    out: Path
    max_steps: int = 1000
    batch_size: int = 256           # global: images per optimizer step over all ranks and micro-batches
    lr: float = 1e-3
    lr_schedule: str = "constant"   # constant | linear | invsqrt
    lr_ref_steps: int = 1000        # invsqrt: lr / sqrt(max(step / lr_ref_steps, 1))
    warmup_steps: int = 0
    optimizer: str = "adam"         # adam | radam
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    grad_clip: float | None = None
    ema_halflife_images: float | None = 500_000.0
    ema_rampup_ratio: float | None = 0.05
    ema_beta: float | None = None   # a fixed per-step beta; overrides the half-life
    ema_std: tuple | None = None    # EDM2's power-function EMAs (sigma_rel, e.g. 0.050, 0.100) in the snapshots
    mixed_precision: str = "auto"   # auto | no | bf16 | fp16
    tf32: str = "auto"              # auto | on | off: TF32 matmuls and convolutions on CUDA (cmt.trainers.precision)
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 100
    ckpt_every: int = 1000
    sample_every: int = 0           # 0 = only at the end
    snapshot_every: int = 0         # EMA weights to snapshots/snapshot-NNNNNNN.safetensors; 0 = none
    resume: bool = False
    resume_new_data: bool = False   # resume: go on training on a data set that changed (cmt.trainers.identity)
    tensorboard: bool = False
    progress: bool = True
    max_nonfinite_steps: int = 100  # stop after this many consecutive steps with a NaN/inf loss; 0: never


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
