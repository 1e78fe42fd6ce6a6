"""Resolve a teacher given by name or path to a network and a record of what it is.

Accepted:
- a path to one of our checkpoints (`.safetensors` from `save_network`, `.pt` training checkpoint);
- a built-in name: `mnist`, `toy:checkerboard`, `toy:8gaussians`, `toy:moons`, shipped as
  `cmt/assets/teachers/<name with ':' -> '-'>.safetensors`;
- `edm2` with `ckpt` = an official EDM2 `.pkl` (path or URL), a `.safetensors` export of one, or a
  preset name; or a preset name directly (`edm2-img64-s`, `edm2-img512-xs`, ...), downloaded into
  the cache (`cmt.download`, `$CMT_CACHE/edm2`) when online;
- `edm` with `ckpt` = an official EDM (v1) `.pkl` (NVlabs/edm's presets and snapshots, ECT's and
  sony/cmt's `network-snapshot-*.pkl`), a `.safetensors` export of one, or a preset name; or a
  preset name directly (`edm-cifar10-32x32-uncond-vp`, `baseline-cifar10-32x32-uncond-ve`, ...),
  downloaded into `$CMT_CACHE/edm`;
- any `.pkl` path or URL: EDM or EDM2 by the pickled class of its network (never by its name).
- a SiT size (`sit-s/2` ... `sit-xl/8`) with `ckpt` = an official SiT `.pt` (or ours) of that size;
  `sit-xl/2` without one is SiT's released ImageNet-256 checkpoint, downloaded into `$CMT_CACHE/sit`;
- the path of an official SiT or MeanFlow-port `.pt` alone: its size read from the state dict (kind
  "sit"; a port checkpoint, with `r_embedder`, is a MeanFlow flow-map student: `flow_map` True,
  MeanFlow's time convention, the port's VAE scaling).

`load_teacher` gives the network alone; `convert_checkpoint` (the `cmt-convert` command) turns an
official EDM or EDM2 pickle into our `.safetensors`.
"""
import hashlib
import pickle
import zipfile
from pathlib import Path

from cmt.checkpoint import (OfficialSiTCheckpoint, load_network, load_official_pickle, network_record,
                            read_nvlabs_pickle, read_once, read_safetensors, save_network)
from cmt.download import DownloadError, fetch, is_url
from cmt.errors import ArgumentError, FileFormatError
from cmt.guidance import apply_guidance
from cmt.networks.sit import SIT_PRESETS
from cmt.options import checked_keywords, document_keywords
from cmt.sit_checkpoint import (MEANFLOW_PORT_ENCODER, SIT_ENCODER, SIT_LABEL_DROPOUT, SIT_XL2_256_FILE,
                                SIT_XL2_256_URL, load_sit_checkpoint, size_name)

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
    # EDM2's edm2-img512-xxl-autog-fid (generate_images.py): net and gnet, w = 2.05; sony/cmt's ImageNet-512
    # ECD teacher and guide (imagenet512/run_ecd_512.sh --transfer, --gnet).
    "edm2-img512-xxl-autog": "edm2-img512-xxl-0939524-0.075.pkl", "edm2-img512-m-guide": "edm2-img512-m-0268435-0.155.pkl",
}
EDM2_PRESETS = {name: f"{EDM2_MODEL_ROOT}/{file}" for name, file in _EDM2_PRESET_FILES.items()}

EDM_MODEL_ROOT = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained"
# NVlabs/edm README, "Pre-trained models": EDM's own networks (config F) in pretrained/, the baselines
# (config A: VPPrecond / VEPrecond around Song et al.'s DDPM++ / NCSN++, iDDPMPrecond around ADM) in
# pretrained/baseline/. The README names baseline-cifar10-32x32-uncond-{vp,ve} and
# baseline-imagenet-64x64-cond-adm; the other baseline names (config A of every data set of the paper's
# Table 2) follow the same pattern, as third-party code that downloads them spells them (not checked here).
# The "-vp" / "-ve" EDM networks are EDMPrecond around DDPM++ / NCSN++ (the suffix names the architecture).
_EDM_DATASETS = ["cifar10-32x32-cond-vp", "cifar10-32x32-cond-ve", "cifar10-32x32-uncond-vp", "cifar10-32x32-uncond-ve",
                 "ffhq-64x64-uncond-vp", "ffhq-64x64-uncond-ve", "afhqv2-64x64-uncond-vp", "afhqv2-64x64-uncond-ve",
                 "imagenet-64x64-cond-adm"]
EDM_PRESETS = {**{f"edm-{name}": f"{EDM_MODEL_ROOT}/edm-{name}.pkl" for name in _EDM_DATASETS},
               **{f"baseline-{name}": f"{EDM_MODEL_ROOT}/baseline/baseline-{name}.pkl" for name in _EDM_DATASETS}}
# The official teacher of each named recipe (cmt.trainers.recipes, cmt-build --recipe): sony/cmt
# run_cmt_cifar.sh, run_cmt_ffhq.sh, run_cmt_afhq.sh --transfer=https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/
# edm-{cifar10-32x32,ffhq-64x64,afhqv2-64x64}-uncond-vp.pkl (EDMPrecond around DDPM++; FFHQ and AFHQv2
# with --cres=1,2,2,2, which the pickles record).
# ImageNet-512: the unguided EDM2-XXL (sony/cmt imagenet512/run_cmt_512.sh
# --transfer=.../edm2-img512-xxl-0939524-0.070.pkl, EDM2's edm2-img512-xxl preset).
RECIPE_TEACHERS = {"cifar10": "edm-cifar10-32x32-uncond-vp", "ffhq64": "edm-ffhq-64x64-uncond-vp",
                   "afhq64": "edm-afhqv2-64x64-uncond-vp", "imagenet512": "edm2-img512-xxl"}
# teacher kind -> its presets; the kind is also the cache folder of its downloads.
OFFICIAL_PRESETS = {"edm2": EDM2_PRESETS, "edm": EDM_PRESETS}
# An official file's own name (as the official scripts' URLs end, `edm2-img512-xxl-0939524-0.075.pkl`)
# names its preset when no local file has that name.
PRESET_OF_FILE = {url.rsplit("/", 1)[-1]: name for presets in OFFICIAL_PRESETS.values() for name, url in presets.items()}
_OFFICIAL_NAMES = {"edm2": "EDM2", "edm": "EDM"}


def builtin_teacher_path(name):
    return TEACHER_DIR / (name.replace(":", "-") + ".safetensors")


def file_sha256(path):
    """The sha256 of a file (once per `cmt.checkpoint.reading_once` block)."""
    def digest():
        hashed = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                hashed.update(chunk)
        return hashed.hexdigest()
    return read_once("sha256", Path(path), digest)


def fetch_official_checkpoint(name_or_url, kind):
    """Local path of an official preset name or URL (`kind` "edm" or "edm2"), downloaded once into
    `$CMT_CACHE/<kind>`; offline, a DownloadError names the file and where to put it."""
    presets = OFFICIAL_PRESETS[kind]
    url = presets.get(name_or_url, name_or_url)
    if not is_url(url):
        raise ValueError(f"{name_or_url!r} is neither an {_OFFICIAL_NAMES[kind]} preset "
                         f"({', '.join(sorted(presets))}) nor a URL")
    try:
        return fetch(url, subdir=kind)
    except DownloadError as error:
        raise DownloadError(f"{error}, or pass the path of a local copy instead") from error


def fetch_edm2_checkpoint(name_or_url):
    """Local path of an EDM2 preset name or URL, downloaded once into `$CMT_CACHE/edm2`."""
    return fetch_official_checkpoint(name_or_url, "edm2")


def fetch_edm_checkpoint(name_or_url):
    """Local path of an EDM preset name (`edm-*`, `baseline-*`) or URL, downloaded once into `$CMT_CACHE/edm`."""
    return fetch_official_checkpoint(name_or_url, "edm")


def preset_name(name):
    """The preset an official file name stands for (`PRESET_OF_FILE`) when no local file is called
    that, else `name` itself."""
    name = str(name)
    return PRESET_OF_FILE[name] if name in PRESET_OF_FILE and not Path(name).exists() else name


def _preset_kind(name):
    return next((kind for kind, presets in OFFICIAL_PRESETS.items() if name in presets), None)


def _official_path(source, kind=None):
    """A preset or URL fetched into the cache (an URL of EDM's folder into `edm/`, others into `edm2/`
    unless `kind` says), or a local path as is."""
    preset_kind = _preset_kind(source)
    if preset_kind is not None:
        return fetch_official_checkpoint(source, preset_kind)
    if is_url(source):
        return fetch_official_checkpoint(source, kind or ("edm" if source.startswith(EDM_MODEL_ROOT + "/") else "edm2"))
    return Path(source)


def fetch_sit_checkpoint(name_or_url=SIT_XL2_256_FILE):
    """Local path of SiT's released `SiT-XL-2-256x256.pt` (by that name) or a URL, downloaded once into
    `$CMT_CACHE/sit` (willisma/SiT download.py's URL)."""
    official = name_or_url == SIT_XL2_256_FILE
    try:
        return fetch(SIT_XL2_256_URL if official else name_or_url, subdir="sit",
                     filename=SIT_XL2_256_FILE if official else None)
    except DownloadError as error:
        raise DownloadError(f"{error}, or pass the path of a local copy instead") from error


def _resolve_sit_file(path, device):
    """An official SiT or MeanFlow-port `.pt` given by its path alone: its size from the state dict; a
    port checkpoint (r_embedder) is a MeanFlow flow-map student, recorded with the port's VAE scaling."""
    net = load_sit_checkpoint(path, size=None, flow_map=None, device=device)
    encoder = MEANFLOW_PORT_ENCODER if net.flow_map else SIT_ENCODER
    return net, _identity("sit", path, net, size=size_name(net.config), encoder=encoder)


def _resolve_sit(size, ckpt, device):
    """A SiT velocity teacher of the named size: a checkpoint path or URL, or SiT's release (sit-xl/2)."""
    if ckpt is None and size != "sit-xl/2":
        raise ValueError(f"teacher {size!r} needs a checkpoint (a SiT .pt state dict or ours); only sit-xl/2 "
                         "(ImageNet 256) is released")
    source = SIT_XL2_256_FILE if ckpt is None else str(ckpt)
    download = is_url(source) or (source == SIT_XL2_256_FILE and not Path(source).is_file())
    path = fetch_sit_checkpoint(source) if download else Path(source)
    net = load_sit_checkpoint(path, size=size, flow_map=False, device=device)
    encoder = network_record(net).get("encoder")
    return net, _identity("sit", path, net, preset=SIT_XL2_256_FILE if source == SIT_XL2_256_FILE else None,
                          size=size, encoder=encoder or SIT_ENCODER)


def _identity(kind, path, net, **more):
    return {"kind": kind, "path": str(path), "sha256": file_sha256(path), "config": dict(net.config), **more}


def _accepted():
    return ("a checkpoint path (.safetensors, .pt, .pkl), a built-in name (" + ", ".join(BUILTIN_TEACHERS)
            + "), 'edm2' or 'edm' with a checkpoint, an EDM2 preset (" + ", ".join(sorted(EDM2_PRESETS))
            + "), an EDM preset (" + ", ".join(sorted(EDM_PRESETS)) + ") or a SiT size ("
            + ", ".join(SIT_PRESETS) + ") with a checkpoint (or an official SiT / MeanFlow-port .pt by its path)")


def _resolve_official(source, device, expect=None):
    """An official EDM / EDM2 network: a preset name (or its file's name), a URL, a `.pkl` path or a
    `.safetensors` export. `expect` ("edm" / "edm2", the teacher kind asked for) refuses a file of the other family."""
    source = preset_name(source)
    preset = source if _preset_kind(source) else None
    if preset and expect and _preset_kind(source) != expect:
        raise ValueError(f"{source!r} is an {_OFFICIAL_NAMES[_preset_kind(source)]} preset; use teacher "
                         f"'{_preset_kind(source)}' (or give the preset name alone)")
    what = _OFFICIAL_NAMES.get(expect, "EDM / EDM2")
    path = _official_path(source, expect)
    if not path.is_file():
        raise FileNotFoundError(f"{what} checkpoint not found: {path}")
    if path.suffix == ".pkl":
        net, loaded = load_official_pickle(path, expect=expect, device=device)
        # (an EDM2 identity stays as it was: it is hashed into the build configurations of existing sets)
        more = dict(official_class=loaded.class_name) if loaded.kind == "edm" else {}
        return net, _identity(loaded.kind, path, net, preset=preset, encoder=loaded.encoder, **more)
    net = load_network(path, device=device)
    kind = net.config.get("architecture")
    if expect is not None and kind != expect:
        raise ValueError(f"{path}: a network of architecture {kind!r}, not an {what} one"
                         + (f"; use teacher '{kind}'" if kind in OFFICIAL_PRESETS else ""))
    encoder = network_record(net).get("encoder")
    return net, _identity(kind if kind in OFFICIAL_PRESETS else "checkpoint", path, net, preset=preset,
                          encoder=encoder or {"kind": "standard_rgb"})


def resolve_teacher(name_or_path, ckpt=None, device="cpu", guidance=None, guide_ckpt=None):
    """`(net, identity)` for a teacher; identity = {"kind", "path", "sha256", "config", ...}.

    `kind` is "checkpoint" (a path), "builtin", "edm2", "edm" or "sit" (official identities also
    carry `preset` and `encoder`: the latent encoder settings of a latent-space model, or
    standard_rgb for pixels; a pickle's also `official_class`, the pickled class of its network;
    sit ones their `size`).
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
        denoiser, record = apply_guidance(net, guidance, guide, guide_identity, teacher_label_dropout(identity, net))
    except ArgumentError as error:
        raise ArgumentError({"guide": "guide_ckpt"}.get(error.argument, error.argument), error.message) from None
    return denoiser, identity if record is None else dict(identity, guidance=record)


def teacher_label_dropout(identity, net):
    """The share of label-free training a teacher records: 0 for EDM2's official networks (EDM2 trains
    none), the U-Net's `label_dropout` for EDM's (0 unless set: EDM's train.py never sets it), the
    built-in teachers' (`BUILTIN_LABEL_DROPOUT`), what `train_diffusion` records in our checkpoints
    (`label_dropout`, in `net`'s record), None when unknown (then classifier-free guidance is allowed)."""
    if identity.get("kind") == "edm2":
        return 0.0
    if identity.get("kind") == "edm":
        return float((identity.get("config") or {}).get("label_dropout", 0.0))
    if identity.get("kind") == "sit":
        return SIT_LABEL_DROPOUT
    if identity.get("kind") == "builtin":
        return BUILTIN_LABEL_DROPOUT.get(identity.get("name"))
    return network_record(net).get("label_dropout")


@checked_keywords
def load_teacher(teacher, ckpt=None, device="cpu"):
    """The teacher's network alone: a `torch.nn.Module` denoiser `net(x, sigma, labels=None) -> D(x; sigma)`
    (eval mode, float32), for every teacher the commands accept (see `resolve_teacher`): a built-in
    name, one of our checkpoints, `"edm2"` / `"edm"` with `ckpt` (a .pkl, URL, preset or .safetensors
    export), a preset name, or any official .pkl. `net.data_shape`, `net.label_dim` and `net.config`
    describe it; labels are one-hot `[B, label_dim]`."""
    return _resolve(str(teacher), None if ckpt is None else str(ckpt), device)[0]


def _resolve(name, ckpt, device):
    name = preset_name(name)
    if name in OFFICIAL_PRESETS:   # "edm2" / "edm" with a checkpoint
        if ckpt is None:
            raise ValueError(f"teacher {name!r} needs a checkpoint: a .pkl / .safetensors path, a URL or a preset "
                             f"name ({', '.join(sorted(OFFICIAL_PRESETS[name]))})")
        return _resolve_official(str(ckpt), device, expect=name)
    if _preset_kind(name) or is_url(name):
        return _resolve_official(name, device)
    if name in SIT_PRESETS:
        return _resolve_sit(name, ckpt, device)
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
            return _resolve_official(name, device)
        try:
            net = load_network(path, device=device)
        except OfficialSiTCheckpoint:   # SiT's or the MeanFlow port's own .pt, by its path alone
            return _resolve_sit_file(path, device)
        # A network trained on a latent set (cmt-encode) records the VAE and scaling that decode its samples.
        encoder = network_record(net).get("encoder")
        return net, _identity("checkpoint", path, net, **({"encoder": encoder} if encoder else {}))
    raise ValueError(f"unknown teacher {name!r}; accepted: {_accepted()}")


def needs_no_conversion(path):
    """What a file that cmt reads as it is holds ("already a cmt network (.safetensors)", "a torch.save
    checkpoint (.pt)"), or None (an official pickle, or something else `read_nvlabs_pickle` judges)."""
    if zipfile.is_zipfile(path):   # torch.save writes a zip archive; EDM / EDM2 pickles are bare pickles
        return "a torch.save checkpoint (.pt: a cmt training checkpoint or an official SiT / MeanFlow file)"
    try:
        read_safetensors(path, tensors=False)
    except FileFormatError:
        return None
    return "already a cmt network (.safetensors)"


# What each keyword of `convert_checkpoint` means: its docstring and cmt-convert's help
# (`cmt.options.document_keywords`).
CONVERT_HELP = {
    "source": "An official EDM or EDM2 network pickle: a .pkl path, a URL or a preset name (EDM2's or EDM's, "
              "downloaded into $CMT_CACHE/edm2 or $CMT_CACHE/edm, default ~/.cache/cmt/...). It is read with a "
              "restricted unpickler: no code from the file runs; EDM or EDM2 is told from its network's pickled class.",
    "out": "The .safetensors file to write.",
    "overwrite": "Replace OUT if it exists.",
}


@document_keywords(CONVERT_HELP)
def convert_checkpoint(*, source, out, overwrite=False):
    """Convert an official EDM or EDM2 network pickle to our `.safetensors` (the `cmt-convert` command),
    with the restricted unpickler of `cmt.networks.nvlabs_pickle`.

    Returns `{"out": Path, "source": Path, "parameters": int, "encoder": {...}, "kind": "edm" | "edm2",
    "official_class"}`.
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ArgumentError("out", f"{out} must end in .safetensors")
    if out.exists() and not overwrite:
        raise ArgumentError("out", f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    try:
        path = _official_path(str(source))
    except (FileNotFoundError, ValueError) as error:
        raise ArgumentError("source", str(error)) from None
    if not path.is_file():
        raise ArgumentError("source", f"file not found: {path}")
    ours = needs_no_conversion(path)
    if ours is not None:
        raise ArgumentError("source", f"{path} is {ours}, not an EDM / EDM2 network pickle: nothing to convert; "
                                      "cmt-sample --ckpt, cmt-build --teacher and cmt-train take it as it is")
    try:
        loaded = read_nvlabs_pickle(path)
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise ArgumentError("source", str(error)) from None
    save_network(out, loaded.net, extra_config={"source": str(path), "encoder": loaded.encoder,
                                                "module_src_sha256": loaded.module_src_sha256,
                                                "official_class": loaded.class_name})
    return {"out": out, "source": path, "parameters": sum(p.numel() for p in loaded.net.parameters()),
            "encoder": loaded.encoder, "kind": loaded.kind, "official_class": loaded.class_name}
