"""The one training loop: Accelerate, optimizer, lr schedule, EMA, guard, checkpoints, logs, samples.

Every phase (diffusion pre-training, CMT mid-training, ECT / ECD / MeanFlow post-training) is an
objective `loss(net, batch, ctx) -> per-sample loss [B]` (or `(loss, {name: scalar})`) over a
stream of batches; this module does everything else. See docs/design.md, section "Trainer".

Randomness is derived, not carried: at every optimizer step the objective's generator and torch's
global generator (dropout) are re-seeded from (seed, rank, step), so a resumed run repeats an
uninterrupted one exactly as long as the data stream is restored too (its `state_dict`, or by
replaying the batches it had yielded).

(About 450 lines: the order of a step's saves, samplings, stops and log lines is the loop's whole
contract, kept in one place; how a run stops is `cmt.trainers.stops`, its files `cmt.trainers.run_files`,
its batch streams `cmt.trainers.batches`.)
"""
from __future__ import annotations

import copy
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object
from tqdm.auto import tqdm

from cmt.checkpoint import save_network
from cmt.errors import ArgumentError, EvaluationFailed, PeerFailed, TrainingStopped
from cmt.outputs import step_file_name
from cmt.phema import PowerFunctionEMA
from cmt.seeds import derive_seed
# The trainer options live in cmt.trainers.config; the phases reach them through the loop they configure.
from cmt.trainers.batches import Counted, to_device
from cmt.trainers.config import OPTIMIZERS, TrainConfig
from cmt.trainers.run_files import (IMAGES_SEEN, SNAPSHOT_DIR, STATE_FILE, RunLog, evaluation_pending, note_new_data,
                                    read_state, run_record, summary_writer, write_run_file, write_state)
from cmt.trainers.precision import TF32Choice, apply_tf32, fixed_choice
from cmt.trainers.schedules import ema_beta, learning_rate, update_ema
from cmt.trainers.stops import (SIGNAL_EXIT_CODES, Interrupted, StopNow, StopSignals, allocation_failure, first_line,
                                peer_failure)


@dataclass
class Context:
    """What an objective sees besides the network and the batch."""
    step: int                       # the optimizer step being taken, 0-based
    max_steps: int
    generator: torch.Generator      # on `device`; re-seeded from (seed, rank, step) every step
    device: torch.device
    accelerator: Accelerator


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
            summary_writer()   # fail before training, not at the first log

    device = property(lambda self: self.accelerator.device)
    rank = property(lambda self: self.accelerator.process_index)
    num_processes = property(lambda self: self.accelerator.num_processes)
    is_main = property(lambda self: self.accelerator.is_main_process)

    def set_tf32(self, choice: TF32Choice) -> TF32Choice:
        """Set the run's TF32 choice (`cmt.trainers.precision`): applied on CUDA, said on rank 0, and
        recorded in run.json by `fit`."""
        self.tf32 = choice
        apply_tf32(choice, self.device)
        if self.is_main:
            print(choice.line(), flush=True)
        return choice

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
        inputs: dict | None = None,
    ) -> torch.nn.Module:
        """Train; returns the EMA network. `sample_fn(ema, step, out)` runs on rank 0 every
        `sample_every` steps and at the end and returns scalars to log; `save_final(ema, net, out)`
        writes the phase's deliverable on rank 0. `run_options` (`phase_options`) and the config
        (but `RESUMABLE_OPTIONS`) are saved with the state, and `inputs` (`identity.input_identities`:
        the data set's and the loaded networks' identities); `resume` refuses a run that differs.

        Nothing trained is lost: the final training state (which says the final sampling is pending)
        and `save_final` are written before the final sampling; a failed sampling is raised as
        `EvaluationFailed` once everything is saved; a resume of a run whose final sampling or last
        log line is missing (a kill, a full disk) writes them. SIGINT / SIGTERM save the state and
        raise `TrainingStopped` (exit code 130 / 143; `cmt.trainers.stops`); `max_nonfinite_steps`
        consecutive steps with a non-finite loss raise `TrainingStopped` without writing a model; an
        allocation failure is an ArgumentError of batch_size; a collective that fails because another
        process died raises `PeerFailed`."""
        config, acc = self.config, self.accelerator
        if getattr(self, "tf32", None) is None:   # a phase that chose nothing: the option as given, auto off
            self.set_tf32(fixed_choice(config.tf32, "the official training loops run without it"))
        run_info = {**(run_info or {}), "tf32": self.tf32.record()} if run_info is not None else None
        self.run_record = run_record(config, (run_info or {}).get("phase"), run_options, inputs)
        if not hasattr(batches, "state_dict"):
            batches = Counted(iter(batches))
        ema = copy.deepcopy(net).float().eval().requires_grad_(False).to(self.device)
        opt_class = OPTIMIZERS[config.optimizer]
        optimizer = opt_class(net.parameters(), lr=config.lr, betas=tuple(config.betas),
                              weight_decay=config.weight_decay)
        net, optimizer = acc.prepare(net, optimizer)
        plain_net = acc.unwrap_model(net)
        # EDM2's power-function EMAs (rank 0 keeps and writes them), averaged after every step
        self.power_ema = PowerFunctionEMA(plain_net, config.ema_std) if config.ema_std and self.is_main else None

        start_step, skipped, final_record = 0, 0, None
        if config.resume:
            state, data_changes = read_state(self.out, self.run_record, config.lr_schedule, config.resume_new_data)
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
            final_record = state.get("final_record")
            if self.power_ema is not None:
                self.power_ema.load_state_dict(state["phema"])
            if data_changes and self.is_main:
                print(f"[cmt] resume: training on a changed data set (resume_new_data): {'; '.join(data_changes)}",
                      flush=True)
                note_new_data(self.out, self.run_record["inputs"], start_step, data_changes)

        self.out.mkdir(parents=True, exist_ok=True)
        # A finished run resumed: its final sampling and last log line are pending when the log has no
        # record of that step, or one of a failed sampling (which is then dropped and written anew).
        pending = start_step >= config.max_steps and evaluation_pending(self.out, start_step)
        logger = RunLog(self.out, start_step - int(pending), config.tensorboard) if self.is_main else None
        # A snapshot carries what the final model carries (phase, data, ...), so cmt-sample reads it alike.
        self.snapshot_info = json.loads(json.dumps(run_info or {}, default=str))
        if self.power_ema is not None:
            run_info = {**(run_info or {}), "power_ema": self._announce_power_ema(plain_net)}
        if self.is_main and run_info is not None and not config.resume:
            write_run_file(self.out, config, {**run_info, "inputs": self.run_record["inputs"]}, self.num_processes)

        generator = torch.Generator(self.device)
        ctx = Context(step=start_step, max_steps=config.max_steps, generator=generator,
                      device=self.device, accelerator=acc)
        bar = tqdm(range(start_step, config.max_steps), initial=start_step, total=config.max_steps,
                   disable=not (self.is_main and config.progress), dynamic_ncols=True)
        self.saved_step = start_step if config.resume else None
        # Steps and samplings may be cut short by a signal in a single process only: ranks stop together.
        with StopSignals(interruptible_steps=self.num_processes == 1) as signals:
            try:
                if start_step < config.max_steps:
                    failure = self._steps(bar, net, plain_net, ema, optimizer, objective, batches, ctx, skipped,
                                          sample_fn, save_final, logger, signals)
                else:   # a finished run resumed: its deliverable again, and what of its end is pending
                    if self.is_main and save_final is not None:
                        save_final(ema, plain_net, self.out)
                    failure = None
                    if pending:
                        failure = self._final_report(ema, start_step, final_record or {"step": start_step},
                                                     sample_fn, logger, signals)
            except StopNow as stop:
                kept = (f"{self.out / STATE_FILE} holds step {self.saved_step}" if self.saved_step is not None
                        else f"no {STATE_FILE} was written")
                raise TrainingStopped(f"stopped at once by a second {signal.Signals(stop.signum).name}; {kept}",
                                      exit_code=SIGNAL_EXIT_CODES.get(stop.signum, 128 + stop.signum)) from None
            except RuntimeError as error:
                if self.num_processes > 1 and peer_failure(error):
                    raise PeerFailed(f"rank {self.rank} stopped: another process of the run failed "
                                     f"({first_line(error)})") from None
                raise
            finally:
                if logger is not None:
                    logger.close()
        acc.wait_for_everyone()
        if failure is not None:
            raise EvaluationFailed(f"training finished and its model is saved in {self.out}, but sampling it "
                                   f"failed: {type(failure).__name__}: {failure}") from failure
        return ema

    def _stopped(self, signum, message):
        """`TrainingStopped` for a signal, its exit code the shell's."""
        return TrainingStopped(f"stopped by {signal.Signals(signum).name} {message}: add --resume to the same "
                               "command to continue", exit_code=SIGNAL_EXIT_CODES.get(signum, 128 + signum))

    def _final_report(self, ema, done, record, sample_fn, logger, signals):
        """The final sampling (rank 0; a signal may cut it short: the state and the model are saved and
        a resume does it) merged into the last log record, which is then written; a failed sampling
        marks the record `"evaluation": "failed"` (a resume tries again) and is returned."""
        failure = None
        if sample_fn is not None:
            if self.is_main:
                try:
                    with signals.interruptible(), torch.no_grad():
                        record = {**record, **sample_fn(ema, done, self.out)}
                except Interrupted as stop:
                    raise self._stopped(stop.signum, f"in the final sampling at step {done}; {self.out / STATE_FILE} "
                                                     "and the model are saved, the sampling is not") from None
                except Exception as error:   # raised by fit once all is saved
                    failure, record = error, {**record, "evaluation": "failed"}
            self.accelerator.wait_for_everyone()
        if self.is_main:
            logger.write(record)
        return failure

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
            # What a signal inside the step saves: the weights are the last step's until the optimizer
            # step, and the data stream as it was before this step's batches.
            data_before, skipped_before = (batches.state_dict() if signals.allowed else None), skipped
            try:
                with signals.interruptible():
                    for _ in range(config.grad_accum):
                        batch = to_device(next(batches), self.device)
                        with acc.accumulate(net):
                            with acc.autocast():
                                result = objective(net, batch, ctx)
                            per_sample, logs = result if isinstance(result, tuple) else (result, {})
                            loss = per_sample.float().mean()
                            acc.backward(loss)
                            losses_finite = losses_finite & torch.isfinite(loss.detach())
                            if acc.sync_gradients:
                                signals.hold()
                                grad_norm = self._grad_norm(parameters)
                                finite, loss_finite = torch.stack([torch.isfinite(grad_norm), losses_finite]).tolist()
                                if finite or acc.scaler is not None:   # fp16: the scaler skips the step itself
                                    optimizer.step()
                                skipped += int(not finite or acc.optimizer_step_was_skipped)
                                optimizer.zero_grad(set_to_none=True)
                        for name, value in {"loss": loss, **logs}.items():
                            value = torch.as_tensor(value).detach().to(self.device, torch.float32) / config.grad_accum
                            sums[name] = sums[name] + value if name in sums else value
            except Interrupted as stop:
                self._save_state(step, skipped_before, plain_net, ema, optimizer, data_before)
                raise self._stopped(stop.signum, f"in step {step + 1} of {config.max_steps}; {self.out / STATE_FILE} "
                                                 f"is saved at step {step}, which the resume takes again") from None
            except Exception as error:
                if not allocation_failure(error):
                    raise
                raise ArgumentError("batch_size", self._allocation_message(step, error)) from None
            update_ema(ema, plain_net, ema_beta(config, step))
            if self.power_ema is not None:
                self.power_ema.update(plain_net, step + 1, config.batch_size)
            norm = grad_norm.detach().to(torch.float32)
            sums["grad_norm"] = sums["grad_norm"] + norm if "grad_norm" in sums else norm
            count += 1
            done = step + 1
            final = done == config.max_steps
            nonfinite = 0 if loss_finite else nonfinite + 1
            diverged = bool(config.max_nonfinite_steps) and nonfinite >= config.max_nonfinite_steps
            signum = signals.signum
            if self.num_processes > 1:   # every rank stops at the same step
                flags = acc.reduce(torch.tensor([float(signum or 0), float(diverged)], device=self.device), "max")
                signum, diverged = int(flags[0]) or None, bool(flags[1])

            if done % config.log_every == 0 or final:
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
            if done % config.ckpt_every == 0 or final or signum:
                self._save_state(done, skipped, plain_net, ema, optimizer, batches.state_dict(),
                                 final_record=record if final else None)
            if config.snapshot_every and done % config.snapshot_every == 0 and self.is_main:
                self._save_snapshot(done, ema)
            if final and save_final is not None and self.is_main:
                save_final(ema, plain_net, self.out)   # the deliverable first, the final sampling after
            if signum:
                if final:   # the last log line comes with the final sampling, which the resume does
                    raise self._stopped(signum, f"at step {done} of {config.max_steps}; {self.out / STATE_FILE} and "
                                                "the model are saved, the final sampling is not")
                if self.is_main and record is not None:
                    logger.write(record)
                raise self._stopped(signum, f"at step {done} of {config.max_steps}; {self.out / STATE_FILE} is saved")
            if final:
                if failure is not None:   # an earlier sampling failed: none now, a resume tries again
                    sample_fn, record = None, {**record, "evaluation": "failed"}
                failure = self._final_report(ema, done, record, sample_fn, logger, signals) or failure
            elif sample_fn is not None and failure is None and config.sample_every and done % config.sample_every == 0:
                if self.is_main:
                    try:
                        with signals.interruptible(), torch.no_grad():
                            record = {**(record or {"step": done}), **sample_fn(ema, done, self.out)}
                    except Interrupted as stop:
                        if self.saved_step != done:
                            self._save_state(done, skipped, plain_net, ema, optimizer, batches.state_dict())
                        raise self._stopped(stop.signum, f"in the sampling at step {done}; {self.out / STATE_FILE} "
                                                         f"is saved at step {done}") from None
                    except Exception as error:   # training goes on; fit raises it once all is saved
                        failure = error
                acc.wait_for_everyone()
                if self.is_main and record is not None:
                    logger.write(record)
            elif self.is_main and record is not None:
                logger.write(record)
        return failure

    def _allocation_message(self, step, error):
        """The one line of an allocation failure in step `step`: the sizes to lower."""
        micro = self.micro_batch_size
        per_step = f"micro-batches of {micro} rows" if self.config.grad_accum > 1 else f"a batch of {micro} rows"
        per_step += f" per process ({self.num_processes} processes)" if self.num_processes > 1 else ""
        kept = (f"{self.out / STATE_FILE} holds step {self.saved_step}" if self.saved_step is not None
                else "nothing was trained yet")
        return (f"{self.config.batch_size} does not fit in memory: step {step + 1} ran out with {per_step} "
                f"({first_line(error, 120)}); lower --batch-size, or split each step into more micro-batches "
                f"with --grad-accum (now {self.config.grad_accum}); {kept}")

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
        snapshots; loadable wherever a checkpoint is, e.g. `cmt-sample --ckpt`), and each power-function
        EMA's as `snapshots/phema-NNNNNNN-STD.safetensors` (`cmt-ema` reconstructs any length from them)."""
        if self.power_ema is not None:
            self.power_ema.snapshot(self.out / SNAPSHOT_DIR, step, extra=self.snapshot_info)
        path = self.out / SNAPSHOT_DIR / step_file_name("snapshot", step, ".safetensors")
        return save_network(path, ema, extra_config={**self.snapshot_info, "step": step})

    def _announce_power_ema(self, net) -> dict:
        """What the power-function EMAs cost on disk, printed once and recorded in run.json."""
        config = self.config
        per_profile = sum(value.numel() * value.element_size() for value in net.state_dict().values())
        count = config.max_steps // config.snapshot_every
        record = {"stds": list(config.ema_std), "snapshot_every": config.snapshot_every,
                  "bytes_per_snapshot": per_profile * len(config.ema_std),
                  "bytes_over_the_run": per_profile * len(config.ema_std) * count}
        print(f"[cmt] power-function EMA stds {', '.join(f'{std:.3f}' for std in config.ema_std)}: "
              f"{record['bytes_per_snapshot'] / 2**20:.1f} MiB every {config.snapshot_every} steps, "
              f"{record['bytes_over_the_run'] / 2**20:.1f} MiB over the {count} snapshots of the run "
              f"(cmt-ema reconstructs any EMA length from them)", flush=True)
        return record

    def _save_state(self, step, skipped, net, ema, optimizer, data_state, final_record=None) -> None:
        """`training-state.pt` at `step` (every rank's `data_state` gathered on rank 0); at the last
        step it records that the final sampling follows and the last log record's training figures
        (`final_record`), which a resume of an interrupted end writes."""
        data_states = gather_object([data_state])
        if self.is_main:
            state = {
                "step": step, "skipped": skipped, "config": getattr(net, "config", None),
                "net": net.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler else None,
                "data": data_states, "run": self.run_record,
                "phema": self.power_ema.state_dict() if self.power_ema is not None else None,
            }
            if step == self.config.max_steps:
                state.update(evaluation="pending", final_record=final_record or {"step": step})
            write_state(self.out, state)
        self.saved_step = step
        self.accelerator.wait_for_everyone()
