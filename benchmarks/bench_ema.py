"""Benchmark of EDM2's power-function EMA during training; prints the figures (no pass/fail).

Two contenders, taking optimizer steps in turn (the first of each pair alternates, so a change of
machine load hits both), each round `--steps` timed steps each after `--warmup`, on a small
EDM2 U-Net (`cmt.networks.edm2.Precond`, the MNIST-sized network of bench_mid.py) with the EDM2
denoising loss of `cmt-train diffusion`:

- plain: forward, backward, Adam, and the loop's one traditional EMA (`cmt.trainers.schedules.update_ema`);
- phema: the same step plus `cmt.phema.PowerFunctionEMA.update` of EDM2's two profiles (std 0.050
  and 0.100). `phema_vs_plain`: the median over rounds of each round's median ratio of paired steps
  (one of each, back to back); target <= 1.05.

It also times `update()` alone (median of `--update-calls` calls) and counts the memory the two
profiles hold against the training state (parameters, gradients, Adam's two moments, the EMA).

    OMP_NUM_THREADS=1 python benchmarks/bench_ema.py                  # the default sizes
    python benchmarks/bench_ema.py --quick                            # seconds: the script works

The last line holds the figures as name=value pairs.
"""
import copy
import functools
import statistics
import time

import click
import torch

from cmt.networks import build_network
from cmt.phema import DEFAULT_STDS, PowerFunctionEMA
from cmt.trainers import loop, schedules
from cmt.trainers.config import TRAIN_DEFAULTS
from cmt.trainers.diffusion import diffusion_loss
from quick import quick_option

# The network bench_mid.py times: `cmt-train diffusion --data mnist`'s EDM2 U-Net (16x16, 10 classes).
MNIST_SIZED = dict(architecture="edm2", img_resolution=16, img_channels=1, label_dim=10, model_channels=32,
                   channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
QUICK = {"steps": 2, "warmup": 1, "rounds": 2, "batch_size": 16, "update_calls": 5}
EMA_BETA = 0.999


def tensor_bytes(tensors):
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


class Contender:
    """One training setup: its own copy of the network, Adam, the loop's EMA and, with `phema`, the
    power-function EMA of the default profiles; `step(batch)` returns its seconds."""

    def __init__(self, net, phema):
        self.net = copy.deepcopy(net)
        self.ema = copy.deepcopy(net).eval().requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=1e-3, betas=TRAIN_DEFAULTS["betas"])
        self.phema = PowerFunctionEMA(self.net) if phema else None
        self.objective = functools.partial(diffusion_loss, label_dim=net.label_dim)
        self.steps = 0

    def step(self, batch):
        ctx = loop.Context(step=self.steps, max_steps=10**6, generator=torch.Generator().manual_seed(self.steps),
                           device=torch.device("cpu"), accelerator=None)
        start = time.perf_counter()
        loss, _ = self.objective(self.net, batch, ctx)
        self.optimizer.zero_grad(set_to_none=True)
        loss.mean().backward()
        self.optimizer.step()
        schedules.update_ema(self.ema, self.net, EMA_BETA)
        self.steps += 1
        if self.phema is not None:
            self.phema.update(self.net, self.steps, len(batch["data"]))
        return time.perf_counter() - start


def update_seconds(net, calls, batch_size):
    """Median seconds of one `PowerFunctionEMA.update` of the default profiles."""
    phema = PowerFunctionEMA(net)
    times = []
    for step in range(1, calls + 2):
        start = time.perf_counter()
        phema.update(net, step, batch_size)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


@click.command()
@quick_option(QUICK)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, help="Images per optimizer step.")
@click.option("--steps", type=click.IntRange(min=1), default=10, help="Timed steps per contender and round.")
@click.option("--warmup", type=click.IntRange(min=0), default=2)
@click.option("--rounds", type=click.IntRange(min=1), default=5, help="Rounds of the two contenders in turn.")
@click.option("--update-calls", type=click.IntRange(min=1), default=200, help="Calls timed for update() alone.")
def main(batch_size, steps, warmup, rounds, update_calls):
    torch.manual_seed(0)
    net = build_network(MNIST_SIZED).train()
    generator = torch.Generator().manual_seed(0)
    batches = [{"data": torch.randn(batch_size, 1, 16, 16, generator=generator).clamp(-1, 1),
                "label": torch.randint(10, (batch_size,), generator=generator)} for _ in range(warmup + steps)]
    params = list(net.parameters())
    print(f"EDM2 U-Net {sum(p.numel() for p in params) / 1e6:.2f} M parameters (16x16, 32 channels, 10 classes); "
          f"batch {batch_size}; {torch.get_num_threads()} threads; {rounds} rounds of {steps} steps (+{warmup} "
          f"warm-up) per contender; profiles {', '.join(f'{std:.3f}' for std in DEFAULT_STDS)}")

    times, ratios = {"plain": [], "phema": []}, []
    for k in range(rounds):
        # Step by step in turn (the first of each pair alternates), so a change of machine load between
        # steps hits both contenders alike; each round's figure is the median of its timed steps.
        contenders = {"plain": Contender(net, phema=False), "phema": Contender(net, phema=True)}
        seconds = {name: [] for name in contenders}
        for step, batch in enumerate(batches):
            names = list(contenders) if (step + k) % 2 == 0 else list(contenders)[::-1]
            for name in names:
                seconds[name].append(contenders[name].step(batch))
        for name in contenders:
            times[name].append(statistics.median(seconds[name][warmup:]))
        # The ratio of the steps of one pair (run back to back), median over the round's pairs.
        ratios.append(statistics.median(a / b for a, b in zip(seconds["phema"][warmup:], seconds["plain"][warmup:])))
        print(f"  round {k}: " + ", ".join(f"{name} {times[name][-1]:.4f} s/step" for name in contenders)
              + f", paired ratio {ratios[-1]:.3f}")
    update = update_seconds(copy.deepcopy(net), update_calls, batch_size)

    parameter_bytes = tensor_bytes(params)
    phema_bytes = tensor_bytes(sum(PowerFunctionEMA(net).averages, []))
    state_bytes = parameter_bytes * 5   # parameters, gradients, Adam's two moments, the loop's EMA
    plain, phema = statistics.median(times["plain"]), statistics.median(times["phema"])
    print(f"{'contender':48s} {'s/step (median)':>16s}")
    print(f"{'plain step (fwd, bwd, Adam, loop EMA)':48s} {plain:16.4f}")
    print(f"{'plain step + PowerFunctionEMA.update (2 profiles)':48s} {phema:16.4f}")
    print(f"phema / plain = {statistics.median(ratios):.3f} median of {rounds} rounds (spread {min(ratios):.3f}-"
          f"{max(ratios):.3f}; target <= 1.05); update() alone {update * 1e3:.2f} ms = "
          f"{update / plain:.2%} of the plain step")
    print(f"memory: the two profiles hold {phema_bytes / 2**20:.2f} MiB = {phema_bytes / state_bytes:.2f}x the training "
          f"state ({state_bytes / 2**20:.2f} MiB: parameters, gradients, Adam moments, EMA)")
    print(f"phema_vs_plain={statistics.median(ratios):.3f} update_ms={update * 1e3:.3f} "
          f"update_share={update / plain:.4f} memory_vs_state={phema_bytes / state_bytes:.3f}")


if __name__ == "__main__":
    main()
