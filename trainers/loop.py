"""The one training loop: Accelerate, optimizer, lr schedule, EMA, guard, checkpoints, logs, samples.

Every phase (diffusion pre-training, CMT mid-training, ECT / ECD / MeanFlow post-training) is an
objective `loss(net, batch, ctx) -> per-sample loss [B]` (or `(loss, {name: scalar})`) over a
stream of batches; this module does everything else. See docs/design.md, section "Trainer".

Randomness is derived, not carried: at every optimizer step the objective's generator and torch's
global generator (dropout) are re-seeded from (seed, rank, step), so a resumed run repeats an
uninterrupted one exactly as long as the data stream is restored too (its `state_dict`, or by
replaying the batches it had yielded).
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import inspect
import json
import math
import os
import platform
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object
from PIL import Image
from tqdm.auto import tqdm

from cmt.checkpoint import read_torch_file, save_network
from cmt.errors import ArgumentError, EvaluationFailed, TrainingStopped, local_path_only
from cmt.outputs import step_file_name

STATE_FILE = "training-state.pt"
LOG_FILE = "log.jsonl"
RUN_FILE = "run.json"
SNAPSHOT_DIR = "snapshots"
# The log's count of training images so far (log.jsonl files written before it was named so call it
# "images"; `read_log` renames it).
IMAGES_SEEN = "images_seen"
TRAINING_FIGURES = ("loss", "grad_norm", "lr", "skipped", IMAGES_SEEN, "sec_per_step")
LR_SCHEDULES = ("constant", "linear", "invsqrt")
OPTIMIZERS = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}
MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")
# The options a resumed run may change; every other option (the TrainConfig's and the phase's) must
# be the saved run's, or --resume is refused with the list of differences. max_steps may grow (the
# run is extended, as if it had been asked for from the start), except under the linear lr
# schedule, which max_steps defines; it may not fall below the saved step.
RESUMABLE_OPTIONS = ("out", "resume", "log_every", "ckpt_every", "sample_every", "snapshot_every", "tensorboard",
                     "progress", "max_nonfinite_steps")
# Exit codes of a run stopped by a signal (after saving its state): the shell's 128 + signal number.
SIGNAL_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


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
    mixed_precision: str = "auto"   # auto | no | bf16 | fp16
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 100
    ckpt_every: int = 1000
    sample_every: int = 0           # 0 = only at the end
    snapshot_every: int = 0         # EMA weights to snapshots/snapshot-NNNNNNN.safetensors; 0 = none
    resume: bool = False
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
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        self.betas = tuple(self.betas)


TRAIN_DEFAULTS = {field.name: field.default for field in dataclasses.fields(TrainConfig)
                  if field.default is not dataclasses.MISSING}


def check_choice(argument: str, value, choices) -> None:
    if value not in choices:
        raise ArgumentError(argument, f"{value!r} is not one of {', '.join(map(str, choices))}")


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


def final_metrics(out) -> dict:
    """The last record of a run's log: its step and every scalar logged then."""
    records = read_log(out)
    return records[-1] if records else {}


@dataclass
class Context:
    """What an objective sees besides the network and the batch."""
    step: int                       # the optimizer step being taken, 0-based
    max_steps: int
    generator: torch.Generator      # on `device`; re-seeded from (seed, rank, step) every step
    device: torch.device
    accelerator: Accelerator


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that depends on every key (seed, rank, step, stream, ...)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


def learning_rate(config: TrainConfig, step: int) -> float:
    lr = config.lr
    if config.lr_schedule == "linear":
        lr *= max(1.0 - step / max(config.max_steps, 1), 0.0)
    elif config.lr_schedule == "invsqrt":
        lr /= math.sqrt(max(step / max(config.lr_ref_steps, 1), 1.0))
    elif config.lr_schedule != "constant":
        check_choice("lr_schedule", config.lr_schedule, LR_SCHEDULES)
    if config.warmup_steps > 0:
        lr *= min((step + 1) / config.warmup_steps, 1.0)
    return lr


def ema_beta(config: TrainConfig, step: int) -> float:
    """EMA decay per optimizer step: fixed, or from a half-life in images (EDM's ramp-up)."""
    if config.ema_beta is not None:
        return config.ema_beta
    if config.ema_halflife_images is None:
        return 0.0
    halflife = config.ema_halflife_images
    if config.ema_rampup_ratio is not None:
        halflife = min(halflife, (step + 1) * config.batch_size * config.ema_rampup_ratio)
    return 0.5 ** (config.batch_size / max(halflife, 1e-8))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    ema_params, net_params = list(ema.parameters()), [p.detach() for p in net.parameters()]
    if all(a.dtype == b.dtype and a.device == b.device for a, b in zip(ema_params, net_params)):
        # One foreach call instead of a Python loop of kernels: the same lerp per tensor.
        torch._foreach_lerp_(ema_params, net_params, 1.0 - beta)
    else:
        for p_ema, p_net in zip(ema_params, net_params):
            p_ema.lerp_(p_net.to(p_ema.dtype), 1.0 - beta)
    ema_buffers, net_buffers = list(ema.buffers()), list(net.buffers())
    if ema_buffers:
        torch._foreach_copy_(ema_buffers, net_buffers)


class RandomBatches:
    """An endless stream of batches drawn by `draw(n, generator) -> dict` (fresh samples of a toy
    distribution, random indices into a data set); resumable through its generator's state."""

    def __init__(self, draw: Callable[[int, torch.Generator], dict], batch_size: int, seed: int):
        self.draw, self.batch_size = draw, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self.draw(self.batch_size, self.generator)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class _Counted:
    """Wraps a plain iterator without state: resumes by replaying (skipping) the batches it yielded."""

    def __init__(self, iterator: Iterator[dict]):
        self.iterator, self.count = iterator, 0

    def __next__(self) -> dict:
        self.count += 1
        return next(self.iterator)

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        for _ in range(int(state["count"])):
            next(self)


def save_atomic(obj: Any, path: Path) -> None:
    """`torch.save` through a temporary name and a rename: `path` is the old file or the new one, and
    a failed write (a full disk) leaves no temporary behind and raises an OSError naming `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:
            raise OSError(error.errno, error.strerror or str(error), str(path)) from error
        raise


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


def run_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """`name: saved X, now Y` for every option whose value differs (nested dicts by dotted name)."""
    differences = []
    for name in sorted(set(saved) | set(current)):
        old, new = saved.get(name, "(not set)"), current.get(name, "(not set)")
        if isinstance(old, dict) and isinstance(new, dict):
            differences += run_differences(old, new, f"{prefix}{name}.")
        elif old != new:
            differences.append(f"{prefix}{name}: saved {old!r}, now {new!r}")
    return differences


class _StopSignals:
    """SIGINT / SIGTERM during training: remember the first (the loop saves its state and stops at
    the end of the step); a second one of the same kind stops at once. Only in the main thread."""

    def __init__(self):
        self.signum, self.previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNAL_EXIT_CODES:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum == signum:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        return False


def _to_device(batch: Any, device: torch.device) -> Any:
    """The batch on `device`; half-precision tensors (a shard reader's stored float16) cross in
    their own dtype and are upcast there, so objectives see float32 data; uint8 tensors are images
    (0..255, streamed from disk) and become [-1, 1] there (EDM2's StandardRGBEncoder: x / 127.5 - 1)."""
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        if batch.dtype == torch.uint8:
            return batch.float() / 127.5 - 1
        return batch.float() if batch.dtype in (torch.float16, torch.bfloat16) else batch
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _resolve_precision(mixed_precision: str) -> str:
    if mixed_precision != "auto":
        return mixed_precision
    if torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


class Trainer:
    """Create it first (it owns the Accelerator, so callers learn `device`, `rank`, `seed_for`; it
    seeds torch for the network's initialisation), then `fit(net, objective, batches, ...)`."""

    def __init__(self, config: TrainConfig, find_unused_parameters: bool = True):
        self.config = config
        self.out = Path(config.out)
        self.accelerator = Accelerator(
            mixed_precision=_resolve_precision(config.mixed_precision),
            gradient_accumulation_steps=config.grad_accum,
            # DDP: an objective that leaves some head without gradient (logvar unused) needs True.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
        )
        per_step = self.num_processes * config.grad_accum
        if config.batch_size % per_step:
            raise ArgumentError("batch_size", f"{config.batch_size} is not divisible by processes x grad_accum = "
                                              f"{self.num_processes} x {config.grad_accum}")
        self.micro_batch_size = config.batch_size // per_step
        # Networks built after this line get the same initial weights on every rank and every run.
        torch.manual_seed(derive_seed(config.seed, 2**32))
        state_path = self.out / STATE_FILE
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ArgumentError("out", f"cannot create the run folder {self.out}: {error.strerror}") from None
        if not os.access(self.out, os.W_OK | os.X_OK):
            raise ArgumentError("out", f"the run folder {self.out} is not writable")
        if config.resume and not state_path.is_file():
            raise ArgumentError("resume", f"no {STATE_FILE} in {self.out} to resume from")
        if not config.resume and state_path.exists():
            raise ArgumentError("resume", f"{state_path} exists: resume that run, or choose another out folder")
        if config.tensorboard:
            _summary_writer()   # fail before training, not at the first log

    device = property(lambda self: self.accelerator.device)
    rank = property(lambda self: self.accelerator.process_index)
    num_processes = property(lambda self: self.accelerator.num_processes)
    is_main = property(lambda self: self.accelerator.is_main_process)

    def seed_for(self, stream: int) -> int:
        """Seed of a per-rank stream (0 = data); streams of different ranks differ."""
        return derive_seed(self.config.seed, self.rank, 1000 + stream)

    def shared_seed_for(self, stream: int) -> int:
        """Seed of a stream that every rank must draw alike (0 = data): a deal of shards to ranks is a
        partition only when every rank permutes them with the same seed."""
        return derive_seed(self.config.seed, 1000 + stream)

    def fit(
        self,
        net: torch.nn.Module,
        objective: Callable[[torch.nn.Module, Any, Context], Any],
        batches: Iterator[dict],
        *,
        sample_fn: Callable[[torch.nn.Module, int, Path], dict] | None = None,
        save_final: Callable[[torch.nn.Module, torch.nn.Module, Path], None] | None = None,
        run_info: dict | None = None,
        run_options: dict | None = None,
    ) -> torch.nn.Module:
        """Train; returns the EMA network. `sample_fn(ema, step, out)` runs on rank 0 every
        `sample_every` steps and at the end and returns scalars to log; `save_final(ema, net, out)`
        writes the phase's deliverable on rank 0. `run_options` (`phase_options`) and the config
        (but `RESUMABLE_OPTIONS`) are saved with the state; `resume` refuses a run that differs.

        Nothing trained is lost: the final training state and `save_final` are written before the
        final sampling; a failed sampling is raised as `EvaluationFailed` once everything is saved.
        SIGINT / SIGTERM save the state and raise `TrainingStopped` (exit code 130 / 143);
        `max_nonfinite_steps` consecutive steps with a non-finite loss raise `TrainingStopped`
        without writing a model."""
        config, acc = self.config, self.accelerator
        fixed = lambda values: {k: v for k, v in values.items() if k not in RESUMABLE_OPTIONS + ("max_steps",)}
        self.run_record = json.loads(json.dumps({
            "phase": (run_info or {}).get("phase"), "max_steps": config.max_steps,
            "train": fixed(dataclasses.asdict(config)), "options": fixed(run_options or {})}, default=str))
        if not hasattr(batches, "state_dict"):
            batches = _Counted(iter(batches))
        ema = copy.deepcopy(net).float().eval().requires_grad_(False).to(self.device)
        opt_class = OPTIMIZERS[config.optimizer]
        optimizer = opt_class(net.parameters(), lr=config.lr, betas=tuple(config.betas),
                              weight_decay=config.weight_decay)
        net, optimizer = acc.prepare(net, optimizer)
        plain_net = acc.unwrap_model(net)

        start_step, skipped = 0, 0
        if config.resume:
            state = self._read_state()
            if state["config"] != getattr(plain_net, "config", None):
                raise ArgumentError("resume", f"the network in {self.out / STATE_FILE} has another config")
            plain_net.load_state_dict(state["net"])
            ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
            if acc.scaler is not None and state.get("scaler"):
                acc.scaler.load_state_dict(state["scaler"])
            data_states = state["data"]
            if len(data_states) != self.num_processes:
                raise ArgumentError("resume", f"the run used {len(data_states)} processes, not "
                                              f"{self.num_processes}")
            batches.load_state_dict(data_states[self.rank])
            start_step, skipped = int(state["step"]), int(state["skipped"])

        self.out.mkdir(parents=True, exist_ok=True)
        logger = _Logger(self.out, start_step, config.tensorboard) if self.is_main else None
        # A snapshot carries what the final model carries (phase, data, ...), so cmt-sample reads it alike.
        self.snapshot_info = json.loads(json.dumps(run_info or {}, default=str))
        if self.is_main and run_info is not None and not config.resume:
            info = {"train": {k: (str(v) if isinstance(v, Path) else v)
                              for k, v in dataclasses.asdict(config).items()}, **run_info,
                    "num_processes": self.num_processes, "versions": software_versions()}
            write_text_atomic(self.out / RUN_FILE, json.dumps(info, indent=2, default=str) + "\n")

        generator = torch.Generator(self.device)
        ctx = Context(step=start_step, max_steps=config.max_steps, generator=generator,
                      device=self.device, accelerator=acc)
        bar = tqdm(range(start_step, config.max_steps), initial=start_step, total=config.max_steps,
                   disable=not (self.is_main and config.progress), dynamic_ncols=True)
        self.saved_step = start_step if config.resume else None
        with _StopSignals() as signals:
            try:
                failure = self._steps(bar, net, plain_net, ema, optimizer, objective, batches, ctx, skipped,
                                      sample_fn, save_final, logger, signals)
                if start_step >= config.max_steps and self.is_main and save_final is not None:
                    save_final(ema, plain_net, self.out)   # a finished run resumed: write its deliverable again
            finally:
                if logger is not None:
                    logger.close()
        acc.wait_for_everyone()
        if failure is not None:
            raise EvaluationFailed(f"training finished and its model is saved in {self.out}, but sampling it "
                                   f"failed: {type(failure).__name__}: {failure}") from failure
        return ema

    def _steps(self, bar, net, plain_net, ema, optimizer, objective, batches, ctx, skipped, sample_fn, save_final,
               logger, signals):
        """The optimizer steps of `fit`; returns the first sampling failure (or None)."""
        config, acc, generator = self.config, self.accelerator, ctx.generator
        # The logged figures add up on the device and are read at the log steps only; each step
        # reads one pair of flags (gradient and loss finite), which its skip decision needs.
        sums: dict[str, torch.Tensor] = {}
        count, tick = 0, time.time()
        nonfinite, failure = 0, None
        parameters = [parameter for parameter in net.parameters() if parameter.requires_grad]
        for step in bar:
            ctx.step = step
            generator.manual_seed(derive_seed(config.seed, self.rank, step, 0))
            torch.manual_seed(derive_seed(config.seed, self.rank, step, 1))
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step)
            net.train()
            losses_finite = torch.ones((), dtype=torch.bool, device=self.device)
            for _ in range(config.grad_accum):
                batch = _to_device(next(batches), self.device)
                with acc.accumulate(net):
                    with acc.autocast():
                        result = objective(net, batch, ctx)
                    per_sample, logs = result if isinstance(result, tuple) else (result, {})
                    loss = per_sample.float().mean()
                    acc.backward(loss)
                    losses_finite = losses_finite & torch.isfinite(loss.detach())
                    if acc.sync_gradients:
                        grad_norm = self._grad_norm(parameters)
                        finite, loss_finite = torch.stack([torch.isfinite(grad_norm), losses_finite]).tolist()
                        if finite or acc.scaler is not None:   # fp16: the scaler skips the step itself
                            optimizer.step()
                        skipped += int(not finite or acc.optimizer_step_was_skipped)
                        optimizer.zero_grad(set_to_none=True)
                for name, value in {"loss": loss, **logs}.items():
                    value = torch.as_tensor(value).detach().to(self.device, torch.float32) / config.grad_accum
                    sums[name] = sums[name] + value if name in sums else value
            update_ema(ema, plain_net, ema_beta(config, step))
            norm = grad_norm.detach().to(torch.float32)
            sums["grad_norm"] = sums["grad_norm"] + norm if "grad_norm" in sums else norm
            count += 1
            done = step + 1
            nonfinite = 0 if loss_finite else nonfinite + 1
            diverged = bool(config.max_nonfinite_steps) and nonfinite >= config.max_nonfinite_steps
            signum = signals.signum
            if self.num_processes > 1:   # every rank stops at the same step
                flags = acc.reduce(torch.tensor([float(signum or 0), float(diverged)], device=self.device), "max")
                signum, diverged = int(flags[0]) or None, bool(flags[1])

            if done % config.log_every == 0 or done == config.max_steps:
                names = sorted(sums)
                means = acc.reduce(torch.stack([sums[n] / count for n in names]), "mean").tolist()
                if logger is not None:
                    logger.training_names.update(names)
                record = {"step": done, **{n: float(v) for n, v in zip(names, means)},
                          "lr": learning_rate(config, step), "skipped": skipped,
                          IMAGES_SEEN: done * config.batch_size,
                          "sec_per_step": (time.time() - tick) / count}
                sums, count, tick = {}, 0, time.time()
                if self.is_main:
                    bar.set_postfix(loss=f"{record['loss']:.4g}")
            else:
                record = None
            if diverged:
                if self.is_main and record is not None:
                    logger.write(record)
                kept = (f"{STATE_FILE} holds step {self.saved_step}" if self.saved_step
                        else f"no {STATE_FILE} was written")
                raise TrainingStopped(
                    f"training diverged: the loss was not finite for {nonfinite} consecutive steps (steps "
                    f"{done - nonfinite + 1}..{done}, lr {learning_rate(config, step):.4g}); no model was written "
                    f"and {kept}; lower --lr (or --grad-clip), or raise --max-nonfinite-steps")
            if done % config.ckpt_every == 0 or done == config.max_steps or signum:
                self._save_state(done, skipped, plain_net, ema, optimizer, batches)
            if config.snapshot_every and done % config.snapshot_every == 0 and self.is_main:
                self._save_snapshot(done, ema)
            if done == config.max_steps and save_final is not None and self.is_main:
                save_final(ema, plain_net, self.out)   # the deliverable first, the final sampling after
            if signum:
                if self.is_main and record is not None:
                    logger.write(record)
                raise TrainingStopped(
                    f"stopped by {signal.Signals(signum).name} at step {done} of {config.max_steps}; "
                    f"{self.out / STATE_FILE} is saved: add --resume to the same command to continue",
                    exit_code=SIGNAL_EXIT_CODES.get(signum, 128 + signum))
            if sample_fn is not None and failure is None and (
                    done == config.max_steps or (config.sample_every and done % config.sample_every == 0)):
                if self.is_main:
                    try:
                        with torch.no_grad():
                            record = {**(record or {"step": done}), **sample_fn(ema, done, self.out)}
                    except Exception as error:   # training goes on; fit raises it once all is saved
                        failure = error
                acc.wait_for_everyone()
            if self.is_main and record is not None:
                logger.write(record)
        return failure

    def _grad_norm(self, parameters) -> torch.Tensor:
        """The gradients' total norm, clipped to `grad_clip` when one is set. Without clipping only
        the norm is computed: accelerate's clip_grad_norm_ to infinity would also rescale every
        gradient by 1 (same values, one more pass over them)."""
        if self.config.grad_clip:
            return self.accelerator.clip_grad_norm_(parameters, self.config.grad_clip)
        self.accelerator.unscale_gradients()   # fp16: the norm of the true gradients, as clipping takes it
        return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])

    def _save_snapshot(self, step, ema) -> Path:
        """The EMA weights at `step` as `snapshots/snapshot-NNNNNNN.safetensors` (EDM2's periodic
        snapshots; loadable wherever a checkpoint is, e.g. `cmt-sample --ckpt`)."""
        path = self.out / SNAPSHOT_DIR / step_file_name("snapshot", step, ".safetensors")
        return save_network(path, ema, extra_config={**self.snapshot_info, "step": step})

    def _read_state(self) -> dict:
        """The saved training state, checked to be one (a truncated or foreign file: FileFormatError)."""
        path = self.out / STATE_FILE
        state = read_torch_file(path, "training state")
        required = ("step", "skipped", "config", "net", "ema", "optimizer", "data")
        if not isinstance(state, dict) or any(key not in state for key in required):
            raise ArgumentError("resume", f"{path} is not a cmt training state (expected the keys "
                                          f"{', '.join(required)})")
        saved = state.get("run")
        if saved is not None:
            if saved.get("phase") != self.run_record["phase"]:
                raise ArgumentError("resume", f"{path} is the state of a {saved.get('phase')} run, not of "
                                              f"{self.run_record['phase']}: resume it with cmt-train "
                                              f"{saved.get('phase')}, or choose another --out")
            saved_steps, steps = saved.get("max_steps"), self.run_record["max_steps"]
            if steps < int(state["step"]):
                raise ArgumentError("max_steps", f"{path} is at step {state['step']}; max_steps {steps} is behind it")
            if steps != saved_steps and self.config.lr_schedule == "linear":
                raise ArgumentError("max_steps", f"{path} was saved by a run of {saved_steps} steps under the "
                                                 f"linear lr schedule, which max_steps sets: keep {saved_steps}")
            differences = run_differences({**saved, "max_steps": steps}, self.run_record)
            if differences:
                raise ArgumentError("resume", f"{path} was saved by a run with other options; only "
                                              f"{', '.join(RESUMABLE_OPTIONS[2:])} (and a larger max_steps) "
                                              "may change on resume: " + "; ".join(differences))
        return state

    def _save_state(self, step, skipped, net, ema, optimizer, batches) -> None:
        data_states = gather_object([batches.state_dict()])
        if self.is_main:
            state = {
                "step": step, "skipped": skipped, "config": getattr(net, "config", None),
                "net": net.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler else None,
                "data": data_states, "run": self.run_record,
            }
            save_atomic(state, self.out / STATE_FILE)
        self.saved_step = step
        self.accelerator.wait_for_everyone()


def _summary_writer():
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


class _Logger:
    """log.jsonl (cut back to the resumed step, so a resumed run's log reads as one run) + tensorboard."""

    def __init__(self, out: Path, start_step: int, tensorboard: bool):
        path = out / LOG_FILE
        kept = []
        if start_step > 0 and path.exists():
            kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= start_step]
        path.write_text("".join(line + "\n" for line in kept))
        self.file = path.open("a")
        self.training_names: set[str] = set()   # the objective's own figures (set by the loop)
        self.writer = None
        if tensorboard:
            self.writer = _summary_writer()(str(out / "tensorboard"))

    def write(self, record: dict) -> None:
        """One record: its numbers to log.jsonl; for TensorBoard also its pictures (values that are
        paths of PNGs a `sample_fn` wrote) as images, training figures under train/, the sampling
        metrics under metrics/."""
        pictures = {name: value for name, value in record.items() if isinstance(value, Path)}
        scalars = {name: value for name, value in record.items() if name not in pictures}
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


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
