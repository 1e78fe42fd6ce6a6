"""Networks: EDM2's U-Net (`edm2`), a small MLP (`mlp`) and SiT transformers (`sit`), all denoisers in EDM sigma space.

A network is described by a plain config dict: its init kwargs plus `"architecture"`. Model code
only: files (our checkpoints, downloads) are `cmt.checkpoint`'s and `cmt.teachers`'.
"""
import copy

from cmt.networks.edm2 import Precond
from cmt.networks.mlp import MLPDenoiser
from cmt.networks.sit import SiT

ARCHITECTURES = {"edm2": Precond, "mlp": MLPDenoiser, "sit": SiT}


def build_network(config):
    """Build a network from `config` (`{"architecture": "edm2" | "mlp" | "sit", **init_kwargs}`)."""
    kwargs = dict(config)
    architecture = kwargs.pop("architecture", None)
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown network architecture {architecture!r} in config; "
                         f"valid: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[architecture](**kwargs)


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


__all__ = ["ARCHITECTURES", "MLPDenoiser", "Precond", "SiT", "build_network", "load_state_dict_strict_or_explain",
           "network_config"]
