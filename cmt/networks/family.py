"""The network contract, written once: what every network family provides, and the input
preamble the families share.

A family is one module under `cmt/networks/` holding its network class(es) and one `FAMILY`
record (`NetworkFamily`); `cmt.networks.FAMILIES` lists them, one line each. Everything downstream
(checkpoints, the trainers' default learning rates, students) reads the record and the network's
attributes, never the family's name.

Every network that `FAMILY.build(**kwargs)` returns has
- `config`: JSON-able init kwargs plus `"architecture"` (the family's name); `build_network(config)`
  rebuilds it;
- `data_shape` (e.g. `(3, 32, 32)`, `(4, 32, 32)` latents, `(2,)` points), `label_dim` (0:
  unconditional), `sigma_data`;
- `sigma_min`: 0 for a plain denoiser, > 0 for the consistency-model boundary form (identity at
  sigma_min);
- `flow_map`: True when it takes `target_sigma` (flow-map and mean-flow students); `flow_map_keys`:
  the state-dict keys only such a network has, which a student loaded from a teacher lacks and
  which start so that the student equals its teacher;
- `forward(x, sigma, labels=None, target_sigma=None, return_logvar=False) -> D(x; sigma)` in
  float32, in EDM sigma space; `labels` one-hot `[B, label_dim]` or None; `sigma` a scalar or `[B]`.

Students are configs of the same family: `NetworkFamily.consistency_student` turns a teacher's (or
an init's) config into the family's consistency-model form, `check_student` refuses configs that
cannot be students (a ValueError saying why; the trainers name the teacher or init that gave it).
"""
import dataclasses
from typing import Callable, Mapping

import torch

from cmt.edm import SIGMA_MIN

# Flow-map targets may be 0 (consistency models): their noise label is log(target + floor) / 4,
# smooth in target_sigma (so a JVP through it is finite at 0) and equal to EDM's log(sigma) / 4
# for targets well above the floor. The floor is EDM's sigma_min.
TARGET_SIGMA_FLOOR = SIGMA_MIN
PHASES = ("diffusion", "mid", "post")


def boundary_form(config):
    """The default consistency student: the same network with the boundary at EDM's sigma_min."""
    return {**config, "sigma_min": SIGMA_MIN}


def any_student(config):
    """The default student check: every network of the family can be a student."""
    return None


@dataclasses.dataclass(frozen=True)
class NetworkFamily:
    """What the project needs to know of a network family besides its networks' attributes.

    name: the `"architecture"` of its configs. build: `(**config without "architecture") -> network`.
    learning_rates: the default peak lr of each training phase (`PHASES`) for this family's
    networks, each with its source in the family's module.
    consistency_student: `(config) -> config` of the consistency-model (boundary) form of a
    network (default `boundary_form`: `sigma_min = SIGMA_MIN`); its weights are the given network's.
    check_student: `(config) -> None`, a ValueError when that config (with its `sigma_min` and
    `flow_map`) cannot be a student (default: every config can).
    """
    name: str
    build: Callable[..., torch.nn.Module]
    learning_rates: Mapping[str, float]
    consistency_student: Callable[[dict], dict] = boundary_form
    check_student: Callable[[dict], None] = any_student

    def __post_init__(self):
        missing = set(PHASES) - set(self.learning_rates)
        if missing:
            raise ValueError(f"network family {self.name!r} gives no learning rate for {', '.join(sorted(missing))}")


def batch_sigmas(x, sigma):
    """`sigma` (a number or `[1]` / `[B]` tensor) as float32 `[B]` on `x`'s device."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
    return sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma


def target_noise_labels(x, target_sigma):
    """The noise label of a flow-map network's `target_sigma` (`TARGET_SIGMA_FLOOR`), `[B]`; a
    flow-map network called without a target is a mistake, not a consistency jump."""
    if target_sigma is None:
        raise ValueError("this flow-map network needs target_sigma (0 for a consistency jump)")
    return (batch_sigmas(x, target_sigma) + TARGET_SIGMA_FLOOR).log() / 4
