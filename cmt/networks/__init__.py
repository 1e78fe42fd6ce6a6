"""Networks: EDM2's U-Net (`edm2`) and a small MLP (`mlp`), both EDM-preconditioned denoisers.

A network is described by a plain config dict: its init kwargs plus `"architecture"`.
"""
import copy

from cmt.networks.edm2 import Precond
from cmt.networks.mlp import MLPDenoiser

ARCHITECTURES = {"edm2": Precond, "mlp": MLPDenoiser}


def build_network(config):
    """Build a network from `config` (`{"architecture": "edm2" | "mlp", **init_kwargs}`)."""
    kwargs = dict(config)
    architecture = kwargs.pop("architecture", None)
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown network architecture {architecture!r} in config; "
                         f"valid: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[architecture](**kwargs)


def network_config(net):
    """The config dict that `build_network` turns back into a network like `net`."""
    return copy.deepcopy(net.config)


__all__ = ["ARCHITECTURES", "MLPDenoiser", "Precond", "build_network", "network_config"]
