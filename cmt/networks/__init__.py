"""Networks: one module per family (EDM2's U-Net `edm2`; EDM's (v1) U-Nets under its
preconditionings `edm`; SiT / DiT transformers `sit`; a small MLP `mlp`), each a denoiser D(x; sigma)
in EDM sigma space, each family described by its `FAMILY` record (`cmt.networks.family`, the
network contract).

A network is described by a plain config dict: its init kwargs plus `"architecture"`, the name of
its family. Model code only: files (our checkpoints, downloads) are `cmt.checkpoint`'s and
`cmt.teachers`'.

To add a family: one module with its networks and a `FAMILY = NetworkFamily(...)`, and one line in
`FAMILIES` below (docs/design.md, "How to add a network family").
"""
import copy

from cmt.networks import edm, edm2, mlp, sit
from cmt.networks.edm2 import Precond
from cmt.networks.family import NetworkFamily
from cmt.networks.mlp import MLPDenoiser

FAMILIES = {family.name: family for family in (edm2.FAMILY, edm.FAMILY, sit.FAMILY, mlp.FAMILY)}
# The build function of each architecture (what `build_network` looks up).
ARCHITECTURES = {name: family.build for name, family in FAMILIES.items()}


def family_of(config):
    """The `NetworkFamily` of a network config (or of its `"architecture"` name); a ValueError that
    names the known families otherwise."""
    architecture = config.get("architecture") if isinstance(config, dict) else config
    if architecture not in FAMILIES:
        raise ValueError(f"unknown network architecture {architecture!r}; valid: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[architecture]


def learning_rates(phase):
    """`{architecture: default lr}` of a training phase ("diffusion", "mid", "post")."""
    return {name: family.learning_rates[phase] for name, family in FAMILIES.items()}


def build_network(config):
    """Build a network from `config` (`{"architecture": family name, **init_kwargs}`)."""
    kwargs = dict(config)
    return family_of(kwargs.pop("architecture", None)).build(**kwargs)


def network_config(net):
    """The config dict that `build_network` turns back into a network like `net`."""
    return copy.deepcopy(net.config)


def load_state_dict_strict_or_explain(net, state_dict, source="state dict", allow_missing=()):
    """Load `state_dict` into `net`; on any mismatch raise one ValueError that names the keys.

    `allow_missing`: keys `net` has that may be absent from `state_dict` (they keep their
    initial values), e.g. a flow-map student's extra embedding when loading its teacher.
    """
    expected = net.state_dict()
    mismatched = [f"'{key}': file has {list(value.shape)}, network expects {list(expected[key].shape)}"
                  for key, value in state_dict.items() if key in expected and value.shape != expected[key].shape]
    missing = sorted(set(expected) - set(state_dict) - set(allow_missing))
    unexpected = sorted(set(state_dict) - set(expected))
    problems = []
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched))
    if missing:
        problems.append(f"missing keys ({len(missing)}): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:20])
                        + (" ..." if len(unexpected) > 20 else ""))
    if problems:
        raise ValueError(f"{source} does not fit the network ({net.config.get('architecture')}): " + " | ".join(problems))
    net.load_state_dict(state_dict, strict=False)
    return net


__all__ = ["ARCHITECTURES", "FAMILIES", "MLPDenoiser", "NetworkFamily", "Precond", "build_network", "family_of",
           "learning_rates", "load_state_dict_strict_or_explain", "network_config"]
