"""Official EDM2 network pickles, read without running any code from the file.

An EDM2 `.pkl` (NVlabs/edm2) is a pickled dict `{"ema", "encoder", "loss_fn", "dataset_kwargs"}`
whose networks were made with `torch_utils.persistence`: each persistent object pickles as
`torch_utils.persistence._reconstruct_persistent_obj(meta)` with
`meta = {"type": "class", "version": 6, "module_src": <source of the whole module>,
"class_name": ..., "state": <the object's __dict__>}`, and unpickling it with `pickle` would
`exec` `module_src`. Here a restricted unpickler answers only an explicit allow-list of globals:
persistent objects become inert `PersistentObject` records (the source is kept as text, never
run), tensors are rebuilt by torch's weights-only loader, and the few containers a module's
state uses become plain stand-ins. Any other global is refused with `UnsafePickleError`.
From the records we read the init kwargs and tensors of `ema` and build our own
`cmt.networks.edm2.Precond`; the `encoder` entry gives the latent settings (see cmt.latents).
The official presets, their download and `cmt-convert` are in `cmt.teachers` / `cmt.cli.convert`.
"""
import collections
import dataclasses
import hashlib
import io
import pickle
from pathlib import Path

import numpy as np
import torch

from cmt.networks import load_state_dict_strict_or_explain
from cmt.networks.edm2 import Precond


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asked for something outside the allow-list; nothing from it was run."""


@dataclasses.dataclass
class PersistentObject:
    """What `_reconstruct_persistent_obj` would have built, as inert data."""
    class_name: str
    module_src: str
    state: dict
    version: int = None

    @property
    def init_kwargs(self):
        return dict(self.state.get("_init_kwargs") or {})

    @property
    def init_args(self):
        return tuple(self.state.get("_init_args") or ())


class StateRecord:
    """Stand-in for a non-persistent class in the pickle (ModuleDict, ...): keeps its state.

    Pickle builds it with `cls.__new__(cls)` and `__setstate__(state)`, never `__init__`."""
    class_name = "object"
    state = None

    def __setstate__(self, state):
        self.state = state[0] if isinstance(state, tuple) else state


class RecordDict(dict):
    """Stand-in for `dnnlib.util.EasyDict` (a dict subclass)."""

    def __setstate__(self, state):
        pass


def _reconstruct_persistent_obj(meta):
    if not isinstance(meta, dict) or meta.get("type") != "class" or "class_name" not in meta:
        raise UnsafePickleError("malformed torch_utils.persistence record (expected meta dict of type 'class')")
    return PersistentObject(class_name=str(meta["class_name"]), module_src=str(meta.get("module_src", "")),
                            state=dict(meta.get("state") or {}), version=meta.get("version"))


_MODULE_RECORDS = {name: type(name, (StateRecord,), {"class_name": name})
                   for name in ("ModuleDict", "ModuleList", "Sequential")}


def _reconstructor(cls, base, state):
    if base is not object or not isinstance(cls, type) or not issubclass(cls, (StateRecord, RecordDict)):
        raise UnsafePickleError("copyreg._reconstructor is only allowed for the stand-in classes")
    return cls.__new__(cls)


def _load_storage_bytes(data):
    return torch.load(io.BytesIO(data), weights_only=True)  # torch's own allow-listed loader


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _numpy_dtype(name, align=False, copy=False):
    dtype = np.dtype(name, align, copy)  # a copy: BUILD then sets its state, never the shared one
    if dtype.hasobject:
        raise UnsafePickleError("numpy object arrays are not allowed")
    return dtype


def _numpy_global(name):
    try:  # numpy 2 (pickles from numpy 1 name numpy.core, which numpy 2 keeps as an alias)
        from numpy._core import multiarray
    except ImportError:
        from numpy.core import multiarray
    return getattr(multiarray, name)


ALLOWED_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): lambda: _reconstruct_persistent_obj,
    ("torch.storage", "_load_from_bytes"): lambda: _load_storage_bytes,
    ("torch._utils", "_rebuild_tensor_v2"): lambda: torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): lambda: _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): lambda: _rebuild_parameter,
    ("collections", "OrderedDict"): lambda: collections.OrderedDict,
    ("builtins", "set"): lambda: set,
    ("builtins", "frozenset"): lambda: frozenset,
    ("copyreg", "_reconstructor"): lambda: _reconstructor,
    ("builtins", "object"): lambda: object,
    ("dnnlib.util", "EasyDict"): lambda: RecordDict,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: _numpy_dtype,
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_global("_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_global("_reconstruct"),
    ("numpy.core.multiarray", "scalar"): lambda: _numpy_global("scalar"),
    ("numpy._core.multiarray", "scalar"): lambda: _numpy_global("scalar"),
    **{("torch.nn.modules.container", name): (lambda record=record: record) for name, record in _MODULE_RECORDS.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only `ALLOWED_GLOBALS` and never calls anything else."""

    def find_class(self, module, name):
        factory = ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise UnsafePickleError(f"refusing global '{module}.{name}': not in the EDM2 pickle allow-list "
                                    "(the file may be tampered with or is not an EDM2 network pickle)")
        return factory()

    def persistent_load(self, pid):
        raise UnsafePickleError("refusing persistent id in the pickle stream")


@dataclasses.dataclass
class EDM2Pickle:
    net: Precond               # the `ema` network, float32, eval mode
    init_kwargs: dict          # Precond's kwargs as recorded in the pickle
    encoder: dict              # {"kind": "standard_rgb"} or {"kind": "stability_vae", "vae_name", "scale", "bias"}
    module_src_sha256: str     # digest of the (never run) network source stored in the file


def _module_tree_tensors(obj, prefix, out):
    """Flatten a tree of persistent modules / stand-ins into `{dotted name: tensor}`."""
    state = obj.state or {}
    for group in ("_parameters", "_buffers"):
        for name, tensor in (state.get(group) or {}).items():
            if tensor is not None:
                if not torch.is_tensor(tensor):
                    raise UnsafePickleError(f"{prefix}{name}: expected a tensor, found {type(tensor).__name__}")
                out[prefix + name] = tensor
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            if not isinstance(child, (PersistentObject, StateRecord)):
                raise UnsafePickleError(f"{prefix}{name}: unexpected module record {type(child).__name__}")
            _module_tree_tensors(child, f"{prefix}{name}.", out)
    return out


def _encoder_info(record):
    if record is None:
        return {"kind": "standard_rgb"}
    if not isinstance(record, PersistentObject):
        raise ValueError(f"unexpected encoder entry of type {type(record).__name__}")
    if record.class_name == "StandardRGBEncoder":
        return {"kind": "standard_rgb"}
    if record.class_name == "StabilityVAEEncoder":
        state = record.state
        return {"kind": "stability_vae", "vae_name": str(state.get("vae_name")),
                "scale": [float(v) for v in np.asarray(state["scale"]).reshape(-1)],
                "bias": [float(v) for v in np.asarray(state["bias"]).reshape(-1)]}
    raise ValueError(f"unknown EDM2 encoder class {record.class_name!r}")


_PRECOND_POSITIONAL = ("img_resolution", "img_channels", "label_dim")


def precond_from_record(record, source="pickle"):
    """Our `Precond` with the weights of an EDM2 `Precond` record (float32, eval mode)."""
    if not isinstance(record, PersistentObject) or record.class_name != "Precond":
        found = record.class_name if isinstance(record, PersistentObject) else type(record).__name__
        raise ValueError(f"{source}: 'ema' is not an EDM2 Precond network (found {found})")
    kwargs = dict(zip(_PRECOND_POSITIONAL, record.init_args), **record.init_kwargs)
    kwargs.pop("class_name", None)
    net = Precond(**kwargs)
    tensors = {key: value.to(torch.float32) for key, value in _module_tree_tensors(record, "", {}).items()}
    load_state_dict_strict_or_explain(net, tensors, source=source)
    return net.eval()


def load_edm2_pickle(path_or_file):
    """Read an official EDM2 network pickle without running code from it -> `EDM2Pickle`."""
    source = getattr(path_or_file, "name", str(path_or_file))
    if isinstance(path_or_file, (str, Path)):
        with open(path_or_file, "rb") as handle:
            data = RestrictedUnpickler(handle).load()
    else:
        data = RestrictedUnpickler(path_or_file).load()
    if isinstance(data, PersistentObject):  # a bare pickled network
        data = {"ema": data}
    if not isinstance(data, dict) or "ema" not in data:
        raise ValueError(f"{source}: not an EDM2 network pickle (expected a dict with an 'ema' entry)")
    record = data["ema"]
    net = precond_from_record(record, source)
    return EDM2Pickle(net=net, init_kwargs=dict(net.config), encoder=_encoder_info(data.get("encoder")),
                      module_src_sha256=hashlib.sha256(record.module_src.encode()).hexdigest())
