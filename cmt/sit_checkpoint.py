"""Official SiT checkpoints and the MeanFlow port's, read into `cmt.networks.sit.SiT`.

Files (always `torch.load(weights_only=True)`, through `cmt.checkpoint.read_torch_file`):
- willisma/SiT's released `SiT-XL-2-256x256.pt` is the (EMA) state dict itself (download.py
  `download_model` loads it and hands it to `load_state_dict`);
- SiT's and the port's train.py checkpoints are `{"model", "ema", "opt", "args"}`: the EMA weights are
  used, as SiT's download.py `find_model` and the port's evaluate.py (`["ema"]`) do;
- our own `.safetensors` / `.pt` of architecture "sit" (`cmt.checkpoint.load_network`).

Everything about the network is read from the state dict: hidden size and latent grid from
`pos_embed` [1, (H / p)^2, hidden], patch size and channels from `x_embedder.proj.weight`
[hidden, C, p, p], depth from `blocks.N`, classes from `y_embedder.embedding_table.weight` (its last
row is the null class: SiT and the port train with class_dropout_prob 0.1), `learn_sigma` from the
output layer (2C channels), and a flow map (the port, MeanFlow's convention) from `r_embedder`. The
head count is not in the weights: it is the size's (`SIT_PRESETS`: S 6, B 12, L 16, XL 16).
"""
import re
from pathlib import Path

from cmt.checkpoint import load_network, read_once, read_torch_file
from cmt.errors import FileFormatError
from cmt.networks import build_network, load_state_dict_strict_or_explain
from cmt.networks.sit import SIT_PRESETS, is_sit_state_dict

# willisma/SiT download.py: the one released checkpoint (SiT-XL/2, ImageNet 256, learn_sigma).
SIT_XL2_256_FILE = "SiT-XL-2-256x256.pt"
SIT_XL2_256_URL = ("https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/SiT-XL-2-256.pt"
                   "?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=0")
# SiT's latents: 0.18215 * SD-VAE latents of pixels in [-1, 1] (train.py `.mul_(0.18215)`,
# Normalize(0.5, 0.5)); sample.py decodes with sd-vae-ft-mse by default.
SIT_ENCODER = {"kind": "stability_vae", "vae_name": "stabilityai/sd-vae-ft-mse", "scale": [0.18215] * 4,
               "bias": [0.0] * 4, "pixel_range": [-1.0, 1.0]}
# The MeanFlow port's latents: scale 0.18125 (sic, train.py / evaluate.py `latents_scale`), sd-vae-ft-ema.
MEANFLOW_PORT_ENCODER = {"kind": "stability_vae", "vae_name": "stabilityai/sd-vae-ft-ema", "scale": [0.18125] * 4,
                         "bias": [0.0] * 4, "pixel_range": [-1.0, 1.0]}
# SiT train.py trains with class_dropout_prob 0.1 (the share of label-free batches, for CFG).
SIT_LABEL_DROPOUT = 0.1


def size_name(config):
    """The `SIT_PRESETS` name of a SiT config, or None for a custom size."""
    for name, preset in SIT_PRESETS.items():
        if all(config.get(key) == value for key, value in preset.items()):
            return name
    return None


def _describe(depth, hidden, patch):
    return f"depth {depth}, hidden size {hidden}, patch {patch}"


def sit_config_of_state_dict(state_dict, size=None, source="state dict"):
    """The `SiT` config whose state dict `state_dict` is; `size` (a `SIT_PRESETS` name) must fit it,
    None takes the size its depth and width name. FileFormatError naming `source` otherwise."""
    if not is_sit_state_dict(state_dict):
        raise FileFormatError(f"{source}: not a SiT checkpoint (no x_embedder.proj.weight, pos_embed, "
                              "t_embedder.* tensors); expected an official SiT or MeanFlow-port state dict")
    _, tokens, hidden = state_dict["pos_embed"].shape
    _, channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    grid = round(tokens ** 0.5)
    if grid * grid != tokens:
        raise FileFormatError(f"{source}: pos_embed has {tokens} tokens, not a square grid of patches")
    depth = 1 + max((int(match.group(1)) for key in state_dict if (match := re.match(r"blocks\.(\d+)\.", key))),
                    default=-1)
    found = dict(depth=depth, hidden_size=hidden, patch_size=patch)
    if size is None:
        size = next((name for name, preset in SIT_PRESETS.items()
                     if all(preset[key] == value for key, value in found.items())), None)
        if size is None:
            raise FileFormatError(f"{source}: a SiT of {_describe(depth, hidden, patch)} is none of the sizes "
                                  f"{', '.join(SIT_PRESETS)}")
    elif size not in SIT_PRESETS:
        raise FileFormatError(f"{source}: unknown SiT size {size!r}; valid: {', '.join(SIT_PRESETS)}")
    preset = SIT_PRESETS[size]
    if any(preset[key] != value for key, value in found.items()):
        raise FileFormatError(f"{source}: holds a SiT of {_describe(depth, hidden, patch)}; {size} has "
                              f"{_describe(preset['depth'], preset['hidden_size'], preset['patch_size'])}")
    table = state_dict.get("y_embedder.embedding_table.weight")
    outputs = state_dict["final_layer.linear.weight"].shape[0] if "final_layer.linear.weight" in state_dict else 0
    if outputs not in (patch * patch * channels, 2 * patch * patch * channels):
        raise FileFormatError(f"{source}: final_layer.linear has {outputs} outputs; a SiT with patch {patch} and "
                              f"{channels} channels has {patch * patch * channels} (or twice that, learn_sigma)")
    flow_map = any(key.startswith("r_embedder.") for key in state_dict)
    return {"architecture": "sit", "data_shape": [channels, grid * patch, grid * patch],
            "label_dim": 0 if table is None else table.shape[0] - 1, **preset,
            "learn_sigma": outputs == 2 * patch * patch * channels, "null_class": True,
            "time_convention": "meanflow" if flow_map else "sit", "flow_map": flow_map}


def read_sit_state_dict(path):
    """The state dict in an official SiT / MeanFlow-port `.pt` (the EMA weights of a train.py checkpoint)."""
    return _state_dict_of(read_torch_file(path, what="SiT checkpoint"), path)


def _state_dict_of(checkpoint, path):
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("ema"), dict):
        checkpoint = checkpoint["ema"]
    if not isinstance(checkpoint, dict):
        raise FileFormatError(f"{path}: expected a SiT state dict (or a train.py checkpoint with 'ema'), "
                              f"found {type(checkpoint).__name__}")
    return checkpoint


def load_sit_checkpoint(path, size=None, flow_map=None, device="cpu"):
    """A SiT network (eval mode) from an official SiT / MeanFlow-port `.pt` or our own checkpoint.

    `size`: a `SIT_PRESETS` name the file must fit (None: any). `flow_map`: False refuses a MeanFlow
    flow-map checkpoint (a teacher is wanted), True requires one, None takes either. Every mismatch is
    one FileFormatError naming the file and what was expected.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SiT checkpoint not found: {path}")
    if path.suffix == ".pkl":
        raise FileFormatError(f"{path}: an EDM / EDM2 network pickle, not a SiT checkpoint (.pt state dict); "
                              "pass it as an EDM2 teacher (--teacher edm2 --teacher-ckpt PATH) instead")
    ours = path.suffix == ".safetensors"
    if not ours:   # (read once per command: load_network below reuses this read)
        checkpoint = read_once("torch", path, lambda: read_torch_file(path, what="SiT checkpoint"))
        ours = isinstance(checkpoint, dict) and "config" in checkpoint
    if ours:
        net = load_network(path, device=device)
        config = net.config
        if config.get("architecture") != "sit":
            raise FileFormatError(f"{path}: holds a network of architecture {config.get('architecture')!r}, not a "
                                  f"SiT ({size or 'sit-*'}); pass it as a teacher by its path instead")
        found = size_name(config)
        if size is not None and found != size:
            raise FileFormatError(f"{path}: holds a SiT of "
                                  f"{_describe(config['depth'], config['hidden_size'], config['patch_size'])} "
                                  f"({found or 'a custom size'}); expected {size}")
    else:
        state_dict = _state_dict_of(checkpoint, path)
        config = sit_config_of_state_dict(state_dict, size=size, source=str(path))
        net = build_network(config)
        try:
            load_state_dict_strict_or_explain(net, state_dict, source=str(path))
        except ValueError as error:
            raise FileFormatError(str(error)) from None
        net = net.to(device).eval()
    if flow_map is False and net.flow_map:
        raise FileFormatError(f"{path}: a MeanFlow flow-map network (it has r_embedder), not a SiT teacher; give its "
                              "path alone (cmt-train post --init PATH, cmt-sample --ckpt PATH, or cmt-build --teacher "
                              "PATH as a flow-map teacher)")
    if flow_map is True and not net.flow_map:
        raise FileFormatError(f"{path}: a SiT without r_embedder (a velocity teacher), not a MeanFlow flow map")
    return net


def load_meanflow_checkpoint(path, size=None, device="cpu"):
    """A MeanFlow flow-map student from the port's checkpoint (zhuyu-cs/MeanFlow train.py) or ours."""
    return load_sit_checkpoint(path, size=size, flow_map=True, device=device)
