"""Official NVlabs network pickles (EDM and EDM2), read without running any code from the file.

An NVlabs/edm or NVlabs/edm2 `.pkl` is a pickled dict whose `ema` entry is the network: EDM2's
`{"ema", "encoder", "loss_fn", "dataset_kwargs"}` (training_loop.py / reconstruct_phema.py), EDM's
`{"ema", "loss_fn", "augment_pipe", "dataset_kwargs"}` (training/training_loop.py; ECT's
ct_training_loop.py writes the same, sony/cmt's loops leave `loss_fn` out). The networks were made
with `torch_utils.persistence`: each persistent object pickles as
`torch_utils.persistence._reconstruct_persistent_obj(meta)` with
`meta = {"type": "class", "version": 6, "module_src": <source of the whole module>,
"class_name": ..., "state": <the object's __dict__>}`, and unpickling it with `pickle` would
`exec` `module_src`. Here a restricted unpickler answers only an explicit allow-list of globals:
persistent objects become inert `PersistentObject` records (the source is kept as text, never
run), tensor storages are read by torch's weights-only loader (a storage blob is itself a torch
file, so it gets the same refusal), and the few containers and callables a pickle of a module
names become plain stand-ins (a bound method, e.g. ECT's `ECMLoss.t_to_r`, is a `MethodRecord`:
never looked up). Any other global is refused with `UnsafePickleError`.

Which network it is comes from the pickled class of `ema`, never from the file name: `Precond` is
EDM2's (our `cmt.networks.edm2.Precond`), `EDMPrecond`, `VPPrecond`, `VEPrecond`, `iDDPMPrecond`
(NVlabs/edm) and `ECMPrecond` (locuslab/ect, sony/cmt) are EDM's (`cmt.networks.edm`). From the
record we read the init kwargs and tensors and build our own network; EDM2's `encoder` entry gives
the latent settings (see cmt.latents). The official presets, their download and `cmt-convert` are
in `cmt.teachers` / `cmt.cli.convert`.
"""
import collections
import dataclasses
import hashlib
import io
import pickle
import re
from pathlib import Path

import numpy as np
import torch

from cmt.networks import build_network, load_state_dict_strict_or_explain
from cmt.networks.edm import PRECONDS as EDM_PRECONDS
from cmt.networks.edm import config_from_official
from cmt.networks.edm2 import Precond

# The pickled class of `ema` -> which family it is.
EDM2_CLASSES = ("Precond",)
EDM_CLASSES = tuple(EDM_PRECONDS)
KINDS = {"edm2": EDM2_CLASSES, "edm": EDM_CLASSES}


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


@dataclasses.dataclass
class MethodRecord:
    """What `getattr(owner, name)` would have returned (a bound method in an object's state), unresolved."""
    owner: object
    name: str


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
    """A tensor storage: the blob is a torch file, read by torch's own allow-listed (weights-only) loader."""
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError("a tensor storage must be stored as bytes")
    try:
        storage = torch.load(io.BytesIO(data), weights_only=True)
    except pickle.UnpicklingError as error:   # torch's message ends in advice to load it unsafely
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        raise UnsafePickleError(f"refusing a tensor storage that holds Python objects"
                                f"{f' (global {found.group(1)})' if found else ''}") from None
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise UnsafePickleError(f"a tensor storage blob holds a {type(storage).__name__}, not a storage")
    return storage


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """torch's `_rebuild_tensor_v2` without the pickled backward hooks (nothing stored is ever called)."""
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise UnsafePickleError(f"a tensor needs a storage, found {type(storage).__name__}")
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, False, collections.OrderedDict())


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _method_record(owner, name):
    return MethodRecord(owner, str(name))


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
    ("torch._utils", "_rebuild_tensor_v2"): lambda: _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): lambda: _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): lambda: _rebuild_parameter,
    ("collections", "OrderedDict"): lambda: collections.OrderedDict,
    ("builtins", "set"): lambda: set,
    ("builtins", "frozenset"): lambda: frozenset,
    ("copyreg", "_reconstructor"): lambda: _reconstructor,
    ("builtins", "object"): lambda: object,
    ("builtins", "getattr"): lambda: _method_record,
    ("dnnlib.util", "EasyDict"): lambda: RecordDict,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: _numpy_dtype,
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_global("_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_global("_reconstruct"),
    ("numpy.core.multiarray", "scalar"): lambda: _numpy_global("scalar"),
    ("numpy._core.multiarray", "scalar"): lambda: _numpy_global("scalar"),
    **{("torch.nn.modules.container", name): (lambda record=record: record)
       for name, record in _MODULE_RECORDS.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only `ALLOWED_GLOBALS` and never calls anything else."""

    def find_class(self, module, name):
        factory = ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise UnsafePickleError(f"refusing global '{module}.{name}': not in the allow-list of NVlabs network "
                                    "pickles (the file may be tampered with, or is not an EDM / EDM2 network pickle)")
        return factory()

    def persistent_load(self, pid):
        raise UnsafePickleError("refusing persistent id in the pickle stream")


@dataclasses.dataclass
class NVlabsPickle:
    net: torch.nn.Module       # the `ema` network as ours (edm2 Precond or an edm preconditioning), float32, eval
    kind: str                  # "edm2" or "edm"
    class_name: str            # the pickled class of `ema` (Precond, EDMPrecond, ECMPrecond, ...)
    init_kwargs: dict          # our network's config, from the kwargs recorded in the pickle
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
_KIND_NAMES = {"edm2": "EDM2 (NVlabs/edm2)", "edm": "EDM (NVlabs/edm, ECT, sony/cmt)"}


def kind_of_record(record):
    """"edm2" or "edm" from the pickled class of a network record, else None."""
    name = record.class_name if isinstance(record, PersistentObject) else None
    return next((kind for kind, classes in KINDS.items() if name in classes), None)


def network_from_record(record, source="pickle", expect=None):
    """Our network with the weights of an official network record (float32, eval mode).

    `expect`: "edm" or "edm2" to accept only that family (a file of the other is refused, naming the
    teacher kind that reads it); None accepts both.
    """
    kind = kind_of_record(record)
    if kind is None or (expect is not None and kind != expect):
        found = record.class_name if isinstance(record, PersistentObject) else type(record).__name__
        wanted = [expect] if expect else list(KINDS)
        expected = " or ".join(f"an {_KIND_NAMES[name]} network ({', '.join(KINDS[name])})" for name in wanted)
        hint = f"; it is an {_KIND_NAMES[kind]} network: use teacher '{kind}'" if kind else ""
        raise ValueError(f"{source}: its 'ema' network is of class {found}; expected {expected}{hint}")
    if kind == "edm2":
        kwargs = dict(zip(_PRECOND_POSITIONAL, record.init_args), **record.init_kwargs)
        kwargs.pop("class_name", None)
        net = Precond(**kwargs)
    else:
        net = build_network(config_from_official(record.class_name, record.init_args, record.init_kwargs))
    tensors = {key: value.to(torch.float32) for key, value in _module_tree_tensors(record, "", {}).items()}
    load_state_dict_strict_or_explain(net, tensors, source=source)
    return net.eval()


def load_nvlabs_pickle(path_or_file, expect=None):
    """Read an official EDM or EDM2 network pickle without running code from it -> `NVlabsPickle`.

    `expect`: "edm" / "edm2" to refuse the other family (ValueError naming the kind that reads it).
    """
    source = getattr(path_or_file, "name", str(path_or_file))
    if isinstance(path_or_file, (str, Path)):
        with open(path_or_file, "rb") as handle:
            data = RestrictedUnpickler(handle).load()
    else:
        data = RestrictedUnpickler(path_or_file).load()
    if isinstance(data, PersistentObject):  # a bare pickled network
        data = {"ema": data}
    if not isinstance(data, dict) or "ema" not in data:
        found = (f"a dict with {', '.join(map(repr, list(data)[:8]))}" if isinstance(data, dict)
                 else f"a {type(data).__name__}")
        raise ValueError(f"{source}: not an EDM / EDM2 network pickle: expected a dict with an 'ema' network, "
                         f"found {found}")
    record = data["ema"]
    net = network_from_record(record, source, expect)
    kind = kind_of_record(record)
    encoder = _encoder_info(data.get("encoder")) if kind == "edm2" else {"kind": "standard_rgb"}
    return NVlabsPickle(net=net, kind=kind, class_name=record.class_name, init_kwargs=dict(net.config),
                        encoder=encoder, module_src_sha256=hashlib.sha256(record.module_src.encode()).hexdigest())


def load_edm2_pickle(path_or_file):
    """An official EDM2 network pickle (an EDM one is refused) -> `NVlabsPickle`."""
    return load_nvlabs_pickle(path_or_file, expect="edm2")


def load_edm_pickle(path_or_file):
    """An official EDM (v1) network pickle, ECT's and sony/cmt's included (an EDM2 one is refused)."""
    return load_nvlabs_pickle(path_or_file, expect="edm")
