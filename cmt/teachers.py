"""Resolve a teacher given by name or path to a network and a record of what it is.

Accepted:
- a path to one of our checkpoints (`.safetensors` from `save_network`, `.pt` training checkpoint);
- a built-in name: `mnist`, `toy:checkerboard`, `toy:8gaussians`, `toy:moons`, shipped as
  `cmt/assets/teachers/<name with ':' -> '-'>.safetensors`;
- `edm2` with `ckpt` = an official EDM2 `.pkl` (path or URL), a `.safetensors` export of one, or a
  preset name; or a preset name directly (`edm2-img64-s`, `edm2-img512-xs`, ...), downloaded into
  the cache (`cmt.download`, `$CMT_CACHE/edm2`) when online.

`convert_checkpoint` (the `cmt-convert` command) turns an official EDM2 pickle into our
`.safetensors`.
"""
import hashlib
import pickle
from pathlib import Path

from cmt.checkpoint import load_network, read_edm2_pickle, read_safetensors, save_network
from cmt.download import DownloadError, fetch, is_url
from cmt.errors import ArgumentError
from cmt.guidance import apply_guidance

BUILTIN_TEACHERS = ("mnist", "toy:checkerboard", "toy:8gaussians", "toy:moons")
# The share of label-free training of the built-in teachers (their recipes, cmt/assets/teachers/README.md):
# the class-conditional mnist teacher was trained without label dropout.
BUILTIN_LABEL_DROPOUT = {"mnist": 0.0}
TEACHER_DIR = Path(__file__).resolve().parent / "assets" / "teachers"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pkl")

EDM2_MODEL_ROOT = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions"
# EDM2's generate_images.py presets; the short names are its "-fid" ones.
_EDM2_PRESET_FILES = {
    "edm2-img512-xs": "edm2-img512-xs-2147483-0.135.pkl", "edm2-img512-xs-dino": "edm2-img512-xs-2147483-0.200.pkl",
    "edm2-img512-s": "edm2-img512-s-2147483-0.130.pkl", "edm2-img512-s-dino": "edm2-img512-s-2147483-0.190.pkl",
    "edm2-img512-m": "edm2-img512-m-2147483-0.100.pkl", "edm2-img512-m-dino": "edm2-img512-m-2147483-0.155.pkl",
    "edm2-img512-l": "edm2-img512-l-1879048-0.085.pkl", "edm2-img512-l-dino": "edm2-img512-l-1879048-0.155.pkl",
    "edm2-img512-xl": "edm2-img512-xl-1342177-0.085.pkl", "edm2-img512-xl-dino": "edm2-img512-xl-1342177-0.155.pkl",
    "edm2-img512-xxl": "edm2-img512-xxl-0939524-0.070.pkl",
    "edm2-img512-xxl-dino": "edm2-img512-xxl-0939524-0.150.pkl",
    "edm2-img64-s": "edm2-img64-s-1073741-0.075.pkl", "edm2-img64-m": "edm2-img64-m-2147483-0.060.pkl",
    "edm2-img64-l": "edm2-img64-l-1073741-0.040.pkl", "edm2-img64-xl": "edm2-img64-xl-0671088-0.040.pkl",
    # Autoguidance pairs of EDM2's README (main network, small guide network).
    "edm2-img64-s-autog": "edm2-img64-s-1073741-0.045.pkl", "edm2-img64-xs-guide": "edm2-img64-xs-0134217-0.110.pkl",
    "edm2-img512-s-autog": "edm2-img512-s-2147483-0.070.pkl",
    "edm2-img512-xs-guide": "edm2-img512-xs-0134217-0.125.pkl",
}
EDM2_PRESETS = {name: f"{EDM2_MODEL_ROOT}/{file}" for name, file in _EDM2_PRESET_FILES.items()}


def builtin_teacher_path(name):
    return TEACHER_DIR / (name.replace(":", "-") + ".safetensors")


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_edm2_checkpoint(name_or_url):
    """Local path of an EDM2 preset name or URL, downloaded once into `$CMT_CACHE/edm2`."""
    url = EDM2_PRESETS.get(name_or_url, name_or_url)
    if not is_url(url):
        raise ValueError(f"{name_or_url!r} is neither an EDM2 preset ({', '.join(sorted(EDM2_PRESETS))}) nor a URL")
    try:
        return fetch(url, subdir="edm2")
    except DownloadError as error:
        raise DownloadError(f"{error}, or pass the path of a local copy instead") from error


def _edm2_path(source):
    """A preset or URL fetched into the cache, or a local path as is."""
    return fetch_edm2_checkpoint(source) if source in EDM2_PRESETS or is_url(source) else Path(source)


def _identity(kind, path, net, **more):
    return {"kind": kind, "path": str(path), "sha256": file_sha256(path), "config": dict(net.config), **more}


def _accepted():
    return ("a checkpoint path (.safetensors, .pt, .pkl), a built-in name (" + ", ".join(BUILTIN_TEACHERS)
            + "), 'edm2' with a checkpoint, or an EDM2 preset (" + ", ".join(sorted(EDM2_PRESETS)) + ")")


def _resolve_edm2(source, device):
    """An official EDM2 network: a preset name, a URL, a `.pkl` path or a `.safetensors` export."""
    preset = source if source in EDM2_PRESETS else None
    path = _edm2_path(source)
    if not path.is_file():
        raise FileNotFoundError(f"EDM2 checkpoint not found: {path}")
    if path.suffix == ".pkl":
        loaded = read_edm2_pickle(path)
        net = loaded.net.to(device).eval()
        return net, _identity("edm2", path, net, preset=preset, encoder=loaded.encoder)
    net = load_network(path, device=device)
    encoder = read_safetensors(path)[2].get("encoder") if path.suffix == ".safetensors" else None
    return net, _identity("edm2", path, net, preset=preset, encoder=encoder or {"kind": "standard_rgb"})


def resolve_teacher(name_or_path, ckpt=None, device="cpu", guidance=None, guide_ckpt=None):
    """`(net, identity)` for a teacher; identity = {"kind", "path", "sha256", "config", ...}.

    `kind` is "checkpoint" (a path), "builtin" or "edm2" (edm2 identities also carry `preset` and
    `encoder`: the latent encoder settings of a latent-space model, or standard_rgb for pixels).
    With `guidance` (a weight other than 1) the net is a guided denoiser (`cmt.guidance.apply_guidance`):
    autoguidance by the teacher `guide_ckpt` names (any form accepted here), else classifier-free
    guidance; then `identity["guidance"]` holds its record. Guidance errors raise `ArgumentError`
    naming `guidance` or `guide_ckpt`.
    """
    net, identity = _resolve(str(name_or_path), ckpt, device)
    if guidance is None and guide_ckpt is None:
        return net, identity
    guide = guide_identity = None
    if guide_ckpt is not None:
        try:
            guide, guide_identity = _resolve(str(guide_ckpt), None, device)
        except (ValueError, OSError) as error:
            raise ArgumentError("guide_ckpt", str(error)) from None
    try:
        denoiser, record = apply_guidance(net, guidance, guide, guide_identity, teacher_label_dropout(identity))
    except ArgumentError as error:
        raise ArgumentError({"guide": "guide_ckpt"}.get(error.argument, error.argument), error.message) from None
    return denoiser, identity if record is None else dict(identity, guidance=record)


def teacher_label_dropout(identity):
    """The share of label-free training a teacher records: 0 for EDM2's official networks (EDM2 trains
    none) and the built-in teachers (`BUILTIN_LABEL_DROPOUT`), what `train_diffusion` records in our
    checkpoints (`label_dropout`), None when unknown (then classifier-free guidance is allowed)."""
    if identity.get("kind") == "edm2":
        return 0.0
    if identity.get("kind") == "builtin":
        return BUILTIN_LABEL_DROPOUT.get(identity.get("name"))
    path = Path(str(identity.get("path", "")))
    if path.suffix == ".safetensors" and path.is_file():
        return read_safetensors(path)[2].get("label_dropout")
    return None


def _resolve(name, ckpt, device):
    if name == "edm2":
        if ckpt is None:
            raise ValueError("teacher 'edm2' needs a checkpoint: a .pkl / .safetensors path, a URL or a preset name")
        return _resolve_edm2(str(ckpt), device)
    if name in EDM2_PRESETS or is_url(name):
        return _resolve_edm2(name, device)
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
            return _resolve_edm2(name, device)
        net = load_network(path, device=device)
        # A network trained on a latent set (cmt-encode) records the VAE and scaling that decode its samples.
        encoder = read_safetensors(path)[2].get("encoder") if path.suffix == ".safetensors" else None
        return net, _identity("checkpoint", path, net, **({"encoder": encoder} if encoder else {}))
    raise ValueError(f"unknown teacher {name!r}; accepted: {_accepted()}")


def convert_checkpoint(*, source, out, overwrite=False):
    """Convert an official EDM2 network pickle to our `.safetensors` (the `cmt-convert` command).

    `source`: a `.pkl` path, a URL or an EDM2 preset name (fetched into the cache). The pickle is
    read with the restricted unpickler of `cmt.networks.edm2_pickle`: no code from the file runs.
    Returns `{"out": Path, "source": Path, "parameters": int, "encoder": {...}}`.
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ArgumentError("out", f"{out} must end in .safetensors")
    if out.exists() and not overwrite:
        raise ArgumentError("out", f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    try:
        path = _edm2_path(str(source))
    except (FileNotFoundError, ValueError) as error:
        raise ArgumentError("source", str(error)) from None
    if not path.is_file():
        raise ArgumentError("source", f"file not found: {path}")
    try:
        loaded = read_edm2_pickle(path)
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise ArgumentError("source", str(error)) from None
    save_network(out, loaded.net, extra_config={"source": str(path), "encoder": loaded.encoder,
                                                "module_src_sha256": loaded.module_src_sha256})
    return {"out": out, "source": path, "parameters": sum(p.numel() for p in loaded.net.parameters()),
            "encoder": loaded.encoder}
