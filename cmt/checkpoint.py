"""Saving and loading networks with their configs; no pickle that can run code is ever opened.

Two formats:
- `*.safetensors` written by `save_network`: the weights, with the network config (and any extra
  information) as JSON in the safetensors metadata and in a `.json` file beside it.
- training checkpoints `*.pt`: a dict `{"config", "net", "ema", ...}` read with
  `torch.load(weights_only=True)`; `"config"` is the network config, or a training config holding
  it as one of its values (e.g. under `"network"`).

A loaded network carries its file's record (`net.record`: the safetensors' extra information, a
training checkpoint's entries besides weights, an official pickle's encoder), so nothing
downstream opens the file again to learn what the network is or how to sample it. Inside
`reading_once()` (every command's entry point opens one) a file is read and parsed once, however
many loads ask for it.
"""
import argparse
import contextlib
import contextvars
import copy
import json
import pickle
import re
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from cmt.errors import FileFormatError

from cmt.outputs import write_safetensors, write_text
from cmt.networks import ARCHITECTURES, build_network, load_state_dict_strict_or_explain, network_config
from cmt.networks.nvlabs_pickle import load_nvlabs_pickle
from cmt.networks.sit import is_sit_state_dict


class OfficialSiTCheckpoint(FileFormatError):
    """An official SiT / MeanFlow-port `.pt` where one of our checkpoints was expected (`load_network`);
    `cmt.teachers.resolve_teacher` reads such a file by its path through `cmt.sit_checkpoint`."""


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
    write_safetensors(path, tensors, metadata={"format": "cmt", "config": json.dumps(config),
                                               "extra": json.dumps(extra)})
    write_text(path.with_suffix(".json"), json.dumps({"config": config, "extra": extra}, indent=2) + "\n")
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
    Python values only (and `argparse.Namespace`, a plain attribute bag: SiT's and MeanFlow's train.py
    store their args so). An empty, truncated or foreign file, or one holding objects whose pickle
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
        with torch.serialization.safe_globals([argparse.Namespace]):
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


_READ_ONCE = contextvars.ContextVar("cmt_checkpoint_reads", default=None)
# The entries of a training checkpoint that are weights or optimizer state, not its record.
_STATE_ENTRIES = ("net", "ema", "optimizer", "scaler", "data")


@contextlib.contextmanager
def reading_once():
    """Within the block every checkpoint file (same path, size and modification time) is read and
    parsed once; later loads of it build from what was read. Nested blocks share the outermost."""
    if _READ_ONCE.get() is not None:
        yield
        return
    token = _READ_ONCE.set({})
    try:
        yield
    finally:
        _READ_ONCE.reset(token)


def read_once(kind, path, read):
    """`read()` of the file `path` (its `kind` of reading), once per `reading_once` block; every
    time outside one."""
    cache = _READ_ONCE.get()
    if cache is None:
        return read()
    stat = path.stat()
    key = (kind, str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in cache:
        cache[key] = read()
    return cache[key]


def _parse_checkpoint(path):
    """`(config, {name: state dict}, record)` of one of our network files, read once per
    `reading_once` block."""
    if path.suffix == ".safetensors":
        state_dict, config, extra = read_safetensors(path)
        return config, {"ema": state_dict}, extra
    checkpoint = read_once("torch", path, lambda: read_torch_file(path))
    if not isinstance(checkpoint, dict):
        raise FileFormatError(f"{path}: expected a training checkpoint dict with 'config' and 'net'/'ema'")
    if "config" not in checkpoint and is_sit_state_dict(checkpoint.get("ema", checkpoint)):
        raise OfficialSiTCheckpoint(f"{path}: an official SiT / MeanFlow state dict, not a cmt checkpoint; load "
                                    "it as a SiT teacher: --teacher sit-xl/2 (its size) --teacher-ckpt PATH, or by "
                                    "its path alone (cmt.teachers.resolve_teacher(PATH))")
    config = _network_config_of(checkpoint, path)
    weights = {name: checkpoint[name] for name in ("net", "ema") if isinstance(checkpoint.get(name), dict)}
    record = {name: value for name, value in checkpoint.items() if name not in _STATE_ENTRIES + ("config",)}
    return config, weights, record


def load_network(path, key="ema", device="cpu"):
    """Build and load the network stored at `path`, in eval mode, with its file's record as
    `net.record` (a dict; see the module docstring).

    `.safetensors` from `save_network` / `cmt-convert`; `.pt` training checkpoints, where `key`
    picks the weights ("ema" by default, falling back to "net" when there is no EMA); `.pkl`
    official EDM / EDM2 pickles through the restricted loader of `cmt.networks.nvlabs_pickle`
    (the family from the pickled class of the network).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"network file not found: {path}")
    if path.suffix == ".pkl":
        return load_official_pickle(path, device=device)[0]
    if path.suffix not in (".safetensors", ".pt"):
        raise ValueError(f"{path}: unknown network file type {path.suffix!r}; expected .safetensors, .pt or .pkl")
    config, weights, record = read_once("checkpoint", path, lambda: _parse_checkpoint(path))
    if key == "ema" and key not in weights:
        key = "net"
    if key not in weights:
        raise FileFormatError(f"{path}: no weights under {key!r}; it has {', '.join(sorted(weights)) or 'none'}")
    state_dict = weights[key]
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
    net.record = copy.deepcopy(record)
    return net.to(device).eval()


def network_record(net):
    """What a loaded network's file records besides its weights (`load_network`); {} for a network
    that was not loaded from one of our files. Guided denoisers answer for the network they guide."""
    return getattr(net, "record", None) or getattr(getattr(net, "net", None), "record", None) or {}


def load_official_pickle(path, expect=None, device="cpu"):
    """`(net, NVlabsPickle)` of an official EDM / EDM2 pickle (`read_nvlabs_pickle`), read once per
    `reading_once` block; the network carries the pickle's record (its encoder, its class)."""
    path = Path(path)
    loaded = read_once(f"pickle-{expect}", path, lambda: read_nvlabs_pickle(path, expect=expect))
    net = copy.deepcopy(loaded.net) if _READ_ONCE.get() is not None else loaded.net   # the cache keeps its own
    net.record = {"encoder": loaded.encoder, "official_class": loaded.class_name,
                  "module_src_sha256": loaded.module_src_sha256}
    return net.to(device).eval(), loaded


_PICKLE_KINDS = {None: "EDM / EDM2", "edm": "EDM", "edm2": "EDM2"}


def read_nvlabs_pickle(path, expect=None):
    """An official EDM or EDM2 network pickle through the restricted unpickler of
    `cmt.networks.nvlabs_pickle` (no code from the file runs); `expect` "edm" / "edm2" refuses the
    other family. A refused, truncated or foreign file is a FileFormatError naming it."""
    path = Path(path)
    what = f"{_PICKLE_KINDS[expect]} network pickle"
    if path.is_file() and path.stat().st_size == 0:
        raise FileFormatError(f"{path}: empty file (0 bytes), not an {what}")
    try:
        return load_nvlabs_pickle(path, expect=expect)
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, AttributeError, IndexError, TypeError) as error:
        detail = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
        if isinstance(error, pickle.UnpicklingError):
            raise FileFormatError(f"{path}: refused or unreadable {what} ({detail}); nothing from it was run") \
                from None
        if str(error).startswith(str(path)):   # our own message, naming the file already
            raise FileFormatError(str(error).splitlines()[0]) from None
        raise FileFormatError(f"{path}: not a readable {what} ({type(error).__name__}: {detail})") from None


def init_student_from_teacher(student, teacher_state_dict, source="teacher"):
    """Load a teacher's weights into a (flow-map) student; only the student's flow-map keys may be missing."""
    return load_state_dict_strict_or_explain(student, teacher_state_dict, source=source,
                                             allow_missing=student.flow_map_keys)
