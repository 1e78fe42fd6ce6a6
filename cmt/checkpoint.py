"""Saving and loading networks with their configs; no pickle that can run code is ever opened.

Two formats:
- `*.safetensors` written by `save_network`: the weights, with the network config (and any extra
  information) as JSON in the safetensors metadata and in a `.json` file beside it.
- training checkpoints `*.pt`: a dict `{"config", "net", "ema", ...}` read with
  `torch.load(weights_only=True)`; `"config"` is the network config, or a training config holding
  it as one of its values (e.g. under `"network"`).
"""
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cmt.networks import ARCHITECTURES, build_network, load_state_dict_strict_or_explain, network_config
from cmt.networks.edm2_pickle import load_edm2_pickle


def save_network(path, net, extra_config=None):
    """Write `net`'s weights and config to `path` (`.safetensors`) and its config to `path.json`."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: save_network writes .safetensors files")
    config = network_config(net)
    extra = dict(extra_config or {})
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in net.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "cmt", "config": json.dumps(config),
                                            "extra": json.dumps(extra)})
    path.with_suffix(".json").write_text(json.dumps({"config": config, "extra": extra}, indent=2) + "\n")
    return path


def read_safetensors(path):
    """`(state_dict, config, extra)` of a file written by `save_network` (config from the metadata,
    or from the `.json` beside the file when the metadata has none)."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        state_dict = {key: handle.get_tensor(key) for key in handle.keys()}
    if "config" in metadata:
        config, extra = json.loads(metadata["config"]), json.loads(metadata.get("extra", "{}"))
    elif path.with_suffix(".json").is_file():
        side = json.loads(path.with_suffix(".json").read_text())
        config, extra = side.get("config", side), side.get("extra", {})
    else:
        raise ValueError(f"{path}: no network config in its metadata and no {path.with_suffix('.json').name} "
                         "beside it; write it with cmt.checkpoint.save_network or cmt-convert")
    return state_dict, config, extra


def _network_config_of(checkpoint, path):
    config = checkpoint.get("config")
    if isinstance(config, dict) and "architecture" not in config:
        nested = [value for value in config.values() if isinstance(value, dict) and "architecture" in value]
        config = nested[0] if len(nested) == 1 else config
    if not isinstance(config, dict) or "architecture" not in config:
        raise ValueError(f"{path}: no network config (a dict with 'architecture') under 'config' "
                         "or one of its values")
    return config


def load_network(path, key="ema", device="cpu"):
    """Build and load the network stored at `path`, in eval mode.

    `.safetensors` from `save_network` / `cmt-convert`; `.pt` training checkpoints, where `key`
    picks the weights ("ema" by default, falling back to "net" when there is no EMA); `.pkl`
    official EDM2 pickles through the restricted loader of `cmt.networks.edm2_pickle`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"network file not found: {path}")
    if path.suffix == ".safetensors":
        state_dict, config, _ = read_safetensors(path)
    elif path.suffix == ".pt":
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(checkpoint, dict):
            raise ValueError(f"{path}: expected a training checkpoint dict with 'config' and 'net'/'ema'")
        config = _network_config_of(checkpoint, path)
        if checkpoint.get(key) is None and key == "ema":
            key = "net"
        if checkpoint.get(key) is None:
            raise ValueError(f"{path}: no weights under {key!r}; it has {', '.join(sorted(checkpoint))}")
        state_dict = checkpoint[key]
    elif path.suffix == ".pkl":
        return load_edm2_pickle(path).net.to(device).eval()
    else:
        raise ValueError(f"{path}: unknown network file type {path.suffix!r}; expected .safetensors, .pt or .pkl")
    if config.get("architecture") not in ARCHITECTURES:
        raise ValueError(f"{path}: unknown architecture {config.get('architecture')!r}; "
                         f"valid: {', '.join(sorted(ARCHITECTURES))}")
    net = build_network(config)
    load_state_dict_strict_or_explain(net, state_dict, source=str(path))
    return net.to(device).eval()


def init_student_from_teacher(student, teacher_state_dict, source="teacher"):
    """Load a teacher's weights into a (flow-map) student; only the student's flow-map keys may be missing."""
    return load_state_dict_strict_or_explain(student, teacher_state_dict, source=source,
                                             allow_missing=student.flow_map_keys)
