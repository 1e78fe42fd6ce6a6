"""Saving and loading networks with their configs; no pickle that can run code is ever opened.

Two formats:
- `*.safetensors` written by `save_network`: the weights, with the network config (and any extra
  information) as JSON in the safetensors metadata and in a `.json` file beside it.
- training checkpoints `*.pt`: a dict `{"config", "net", "ema", ...}` read with
  `torch.load(weights_only=True)`; `"config"` is the network config, or a training config holding
  it as one of its values (e.g. under `"network"`).
"""
import json
import pickle
import re
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cmt.errors import FileFormatError

from cmt.outputs import use_default_mode
from cmt.networks import ARCHITECTURES, build_network, load_state_dict_strict_or_explain, network_config
from cmt.networks.edm2_pickle import load_edm2_pickle


def save_network(path, net, extra_config=None):
    """Write `net`'s weights and config to `path` (`.safetensors`) and its config to `path.json`."""
    return save_weights(path, net.state_dict(), network_config(net), extra_config)


def save_weights(path, state_dict, config, extra_config=None):
    """`save_network` for weights held apart from a module (averaged EMA weights, a post-hoc EMA
    reconstruction): `state_dict` (name -> tensor, as `net.state_dict()` names them) and the
    network `config` that `build_network` turns into the module they fit."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: save_network writes .safetensors files")
    config = dict(config)
    extra = dict(extra_config or {})
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state_dict.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "cmt", "config": json.dumps(config),
                                            "extra": json.dumps(extra)})
    use_default_mode(path)   # save_file creates its file 0600
    path.with_suffix(".json").write_text(json.dumps({"config": config, "extra": extra}, indent=2) + "\n")
    return path


def read_json_file(path, what="JSON file"):
    """The JSON value in the file `path`; FileFormatError naming the file if it is not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FileFormatError(f"{path}: not a valid {what} ({error})") from None


def read_torch_file(path, what="checkpoint", mmap=False):
    """The contents of a `.pt` file, read with `torch.load(weights_only=True)`: tensors and plain
    Python values only. An empty, truncated or foreign file, or one holding objects whose pickle
    could run code, is a FileFormatError naming the file (and never suggests weights_only=False)."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise FileFormatError(f"{path}: empty file (0 bytes), not a {what}")
    if not zipfile.is_zipfile(path):
        raise FileFormatError(f"{path}: not a torch {what} (a .pt written by torch.save); the file is foreign "
                              "or truncated")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        # torch's message ends in advice to load it unsafely; keep only what it refused
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        refused = f" (unsupported global {found.group(1)})" if found else ""
        raise FileFormatError(f"{path}: refused: it holds Python objects other than tensors and plain values"
                              f"{refused}, whose unpickling could run code; cmt reads only {what}s written by "
                              "cmt") from None
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as error:
        raise FileFormatError(f"{path}: truncated or corrupt {what} ({type(error).__name__}: "
                              f"{str(error).splitlines()[0][:200] if str(error) else 'no detail'})") from None


def read_safetensors(path, tensors=True):
    """`(state_dict, config, extra)` of a file written by `save_network` (config from the metadata,
    or from the `.json` beside the file when the metadata has none). tensors=False reads the
    metadata only (state_dict None)."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"network file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state_dict = {key: handle.get_tensor(key) for key in handle.keys()} if tensors else None
    except (SafetensorError, OSError) as error:
        raise FileFormatError(f"{path}: not a readable .safetensors file ({error}); empty, truncated or "
                              "another format") from None
    try:
        if "config" in metadata:
            config, extra = json.loads(metadata["config"]), json.loads(metadata.get("extra", "{}"))
            side = None
        else:
            side = path.with_suffix(".json")
    except json.JSONDecodeError as error:
        raise FileFormatError(f"{path}: its metadata 'config' is not valid JSON ({error})") from None
    if side is not None and side.is_file():
        side = read_json_file(side, "network config (.json beside the .safetensors)")
        if not isinstance(side, dict):
            raise FileFormatError(f"{path.with_suffix('.json')}: expected a JSON object with 'config'")
        config, extra = side.get("config", side), side.get("extra", {})
    elif side is not None:
        raise FileFormatError(f"{path}: no network config in its metadata and no {path.with_suffix('.json').name} "
                         "beside it; write it with cmt.checkpoint.save_network or cmt-convert")
    if not isinstance(config, dict) or not isinstance(extra, dict):
        raise FileFormatError(f"{path}: its network config and extra information must be JSON objects")
    return state_dict, config, extra


def _network_config_of(checkpoint, path):
    config = checkpoint.get("config")
    if isinstance(config, dict) and "architecture" not in config:
        nested = [value for value in config.values() if isinstance(value, dict) and "architecture" in value]
        config = nested[0] if len(nested) == 1 else config
    if not isinstance(config, dict) or "architecture" not in config:
        raise FileFormatError(f"{path}: no network config (a dict with 'architecture') under 'config' "
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
        checkpoint = read_torch_file(path)
        if not isinstance(checkpoint, dict):
            raise FileFormatError(f"{path}: expected a training checkpoint dict with 'config' and 'net'/'ema'")
        config = _network_config_of(checkpoint, path)
        if checkpoint.get(key) is None and key == "ema":
            key = "net"
        if checkpoint.get(key) is None:
            raise FileFormatError(f"{path}: no weights under {key!r}; it has {', '.join(map(str, sorted(checkpoint)))}")
        state_dict = checkpoint[key]
    elif path.suffix == ".pkl":
        return read_edm2_pickle(path).net.to(device).eval()
    else:
        raise ValueError(f"{path}: unknown network file type {path.suffix!r}; expected .safetensors, .pt or .pkl")
    if config.get("architecture") not in ARCHITECTURES:
        raise FileFormatError(f"{path}: unknown architecture {config.get('architecture')!r}; "
                         f"valid: {', '.join(sorted(ARCHITECTURES))}")
    try:
        net = build_network(config)
    except (TypeError, ValueError) as error:
        raise FileFormatError(f"{path}: its network config does not describe a network ({error})") from None
    try:
        load_state_dict_strict_or_explain(net, state_dict, source=str(path))
    except ValueError as error:
        raise FileFormatError(str(error)) from None
    return net.to(device).eval()


def read_edm2_pickle(path):
    """An official EDM2 network pickle through the restricted unpickler of `cmt.networks.edm2_pickle`
    (no code from the file runs); a refused, truncated or foreign file is a FileFormatError naming it."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise FileFormatError(f"{path}: empty file (0 bytes), not an EDM2 network pickle")
    try:
        return load_edm2_pickle(path)
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, AttributeError, IndexError) as error:
        detail = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        if isinstance(error, pickle.UnpicklingError):
            raise FileFormatError(f"{path}: refused or unreadable EDM2 network pickle ({detail}); nothing from "
                                  "it was run") from None
        raise FileFormatError(f"{path}: not a readable EDM2 network pickle ({detail})") from None


def init_student_from_teacher(student, teacher_state_dict, source="teacher"):
    """Load a teacher's weights into a (flow-map) student; only the student's flow-map keys may be missing."""
    return load_state_dict_strict_or_explain(student, teacher_state_dict, source=source,
                                             allow_missing=student.flow_map_keys)
