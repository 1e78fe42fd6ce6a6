"""Resolve a teacher given by name or path to a network and a record of what it is.

Accepted:
- a path to one of our checkpoints (`.safetensors` from `save_network`, `.pt` training checkpoint);
- a built-in name: `mnist`, `toy:checkerboard`, `toy:8gaussians`, `toy:moons`, shipped as
  `cmt/assets/teachers/<name with ':' -> '-'>.safetensors`;
- `edm2` with `ckpt` = an official EDM2 `.pkl` (path or URL), a `.safetensors` export of one, or a
  preset name; or a preset name directly (`edm2-img64-s`, `edm2-img512-xs`, ...), downloaded into
  a cache when online.
"""
import hashlib
from pathlib import Path

from cmt.checkpoint import load_network, read_safetensors

BUILTIN_TEACHERS = ("mnist", "toy:checkerboard", "toy:8gaussians", "toy:moons")
TEACHER_DIR = Path(__file__).resolve().parent / "assets" / "teachers"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pkl")


def builtin_teacher_path(name):
    return TEACHER_DIR / (name.replace(":", "-") + ".safetensors")


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _identity(kind, path, net, **more):
    return {"kind": kind, "path": str(path), "sha256": file_sha256(path), "config": dict(net.config), **more}


def _accepted():
    from cmt.networks.edm2_pickle import PRESETS
    return ("a checkpoint path (.safetensors, .pt, .pkl), a built-in name (" + ", ".join(BUILTIN_TEACHERS)
            + "), 'edm2' with a checkpoint, or an EDM2 preset (" + ", ".join(sorted(PRESETS)) + ")")


def _resolve_edm2(source, device, cache_dir):
    """An official EDM2 network: a preset name, a URL, a `.pkl` path or a `.safetensors` export."""
    from cmt.networks.edm2_pickle import PRESETS, fetch_checkpoint, is_url, load_edm2_pickle

    preset = source if source in PRESETS else None
    path = fetch_checkpoint(source, cache_dir=cache_dir) if (preset or is_url(source)) else Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"EDM2 checkpoint not found: {path}")
    if path.suffix == ".pkl":
        loaded = load_edm2_pickle(path)
        net = loaded.net.to(device).eval()
        return net, _identity("edm2", path, net, preset=preset, encoder=loaded.encoder)
    net = load_network(path, device=device)
    encoder = read_safetensors(path)[2].get("encoder") if path.suffix == ".safetensors" else None
    return net, _identity("edm2", path, net, preset=preset, encoder=encoder or {"kind": "standard_rgb"})


def resolve_teacher(name_or_path, ckpt=None, device="cpu", cache_dir=None, guidance=None, guide_ckpt=None):
    """`(net, identity)` for a teacher; identity = {"kind", "path", "sha256", "config", ...}.

    `kind` is "checkpoint" (a path), "builtin" or "edm2" (edm2 identities also carry `preset` and
    `encoder`: the latent encoder settings of a latent-space model, or standard_rgb for pixels).
    With `guidance` (a weight) the net is a guided denoiser (`cmt.guidance`): autoguidance by the
    teacher `guide_ckpt` names (any form accepted here), else classifier-free guidance; then
    `identity["guidance"]` holds its `describe()`.
    """
    net, identity = _resolve(str(name_or_path), ckpt, device, cache_dir)
    if guidance is None and guide_ckpt is None:
        return net, identity
    from cmt.guidance import autoguidance, classifier_free_guidance

    weight = 1.0 if guidance is None else float(guidance)
    if guide_ckpt is not None:
        guide, guide_identity = _resolve(str(guide_ckpt), None, device, cache_dir)
        guided = autoguidance(net, guide, weight, guide_identity=guide_identity)
    else:
        guided = classifier_free_guidance(net, weight)
    return guided.eval(), dict(identity, guidance=guided.describe())


def _resolve(name, ckpt, device, cache_dir):
    if name == "edm2":
        if ckpt is None:
            raise ValueError("teacher 'edm2' needs a checkpoint: a .pkl / .safetensors path, a URL or a preset name")
        return _resolve_edm2(str(ckpt), device, cache_dir)
    from cmt.networks.edm2_pickle import PRESETS, is_url
    if name in PRESETS or is_url(name):
        return _resolve_edm2(name, device, cache_dir)
    if name in BUILTIN_TEACHERS:
        path = builtin_teacher_path(name)
        if not path.is_file():
            raise FileNotFoundError(f"built-in teacher {name!r} is not available yet: {path} does not exist; "
                                    "train one with cmt-train and pass its checkpoint path instead")
        net = load_network(path, device=device)
        return net, _identity("builtin", path, net, name=name)
    path = Path(name)
    if path.suffix in CHECKPOINT_SUFFIXES or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"teacher checkpoint not found: {path}")
        if path.suffix == ".pkl":
            return _resolve_edm2(name, device, cache_dir)
        net = load_network(path, device=device)
        return net, _identity("checkpoint", path, net)
    raise ValueError(f"unknown teacher {name!r}; accepted: {_accepted()}")
