"""Test helpers for EDM (v1) networks: the fixture configs, weights from a formula, official-format pickles.

`formula_state(shapes)` gives every parameter (and NCSN++'s `freqs` buffer) a value from a closed
form of its name and index (tests/fixtures/README.md, "EDM networks"), so the parity fixtures hold
only inputs and outputs and the same weights are rebuilt here bit for bit. `write_edm_pickle`
emulates NVlabs/edm's `torch_utils.persistence` the way `edm2_fixtures.write_edm2_pickle` does for
EDM2 (it is that function with EDM's classes): every module of the network pickles as
`_reconstruct_persistent_obj(meta)` with its state, the top level as EDM's training loop writes it.
"""
import json
import math
import zlib

import numpy as np
import torch
from safetensors.torch import load_file

from cmt.networks import build_network, edm, edm_unets
from cmt.networks.edm import config_from_official

from conftest import FIXTURES
from edm2_fixtures import Persistent, write_edm2_pickle

TINY = json.loads((FIXTURES / "edm_tiny.json").read_text())
EDM_PERSISTENT = (edm_unets.Linear, edm_unets.Conv2d, edm_unets.GroupNorm, edm_unets.UNetBlock,
                  edm_unets.PositionalEmbedding, edm_unets.FourierEmbedding, edm_unets.SongUNet,
                  edm_unets.DhariwalUNet, *edm.PRECONDS.values())


def formula_tensor(name, shape):
    """The fixture value of the tensor `name`: an integer hash of (crc32(name), index) mapped to
    [-1, 1), scaled by the kind of tensor (float64 arithmetic, then float32)."""
    count = math.prod(shape)
    key = np.uint64(zlib.crc32(name.encode()))
    mask = np.uint64(0xFFFFFFFF)
    h = (np.arange(count, dtype=np.uint64) * np.uint64(2654435761) + key * np.uint64(40503) + np.uint64(12345)) & mask
    h ^= h >> np.uint64(15)
    h = (h * np.uint64(2246822519)) & mask
    h ^= h >> np.uint64(13)
    unit = h.astype(np.float64) / 2.0 ** 32 * 2 - 1
    if name.endswith(".freqs"):
        scale, offset = 4.0, 0.0
    elif name.endswith(".bias"):
        scale, offset = 0.2, 0.0
    elif len(shape) == 1:           # GroupNorm weights
        scale, offset = 0.25, 1.0
    else:                            # linear / conv weights: variance 1 / fan_in
        scale, offset = math.sqrt(3 * shape[0] / count), 0.0
    return torch.from_numpy(unit * scale + offset).to(torch.float32).reshape(shape)


def formula_state(shapes):
    """`{name: tensor}` for every parameter and `freqs` buffer among `shapes` ({name: shape});
    computed buffers (`resample_filter`, iDDPM's `u`) keep their constructed values."""
    return {name: formula_tensor(name, tuple(shape)) for name, shape in shapes.items()
            if not name.endswith(".resample_filter") and name != "u"}


def official_kwargs(network, label_dim):
    """The init kwargs the official class records for a fixture network."""
    return dict(TINY["interface"], label_dim=label_dim, **TINY["networks"][network])


def tiny_network(network, precond, label_dim, **overrides):
    """Our network for a fixture case, with the formula weights (float32, eval mode)."""
    config = dict(config_from_official(precond, (), official_kwargs(network, label_dim)), **overrides)
    net = build_network(config)
    state = formula_state({key: value.shape for key, value in net.state_dict().items()
                           if key not in net.flow_map_keys})
    net.load_state_dict(state, strict=False)
    return net.eval()


def fixture_io():
    """The parity fixture's inputs and the official outputs (tests/fixtures/README.md)."""
    return load_file(str(FIXTURES / "edm_tiny_io.safetensors"))


def write_edm_pickle(path, monkeypatch, net, kwargs, module_src, **entries):
    """Pickle `net` as NVlabs/edm's training loop would (`{"ema", "loss_fn", "augment_pipe",
    "dataset_kwargs"}` unless `entries` say otherwise), its init kwargs recorded as `kwargs`."""
    net._official_init_kwargs = kwargs
    data = dict(ema=net, loss_fn=Persistent("EDMLoss", P_mean=-1.2, P_std=1.2, sigma_data=0.5),
                augment_pipe=None, dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset",
                                                       path="datasets/tiny.zip", use_labels=bool(net.label_dim)))
    data.update(entries)
    write_edm2_pickle(path, monkeypatch, data, module_src, persistent=EDM_PERSISTENT)
    return path
