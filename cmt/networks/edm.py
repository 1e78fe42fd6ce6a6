"""EDM's (v1) preconditionings around its U-Nets, as our own code, and the family's defaults.

`EDMPrecond`, `VPPrecond`, `VEPrecond`, `iDDPMPrecond` follow NVlabs/edm `training/networks.py`
(commit 008a4e5), `ECMPrecond` sony/cmt's (= locuslab/ect's) `training/networks.py`. The U-Net sits
under `model`, so state-dict names (and iDDPM's `u` buffer) are the official ones and an official
checkpoint's weights load by name (`cmt.networks.nvlabs_pickle`). Every class is a network of this
project (docs/design.md, "Networks"): config `{"architecture": "edm", "precond": CLASS, "model_type":
"SongUNet" | "DhariwalUNet", ...init kwargs}`, `forward(x, sigma, labels=None, target_sigma=None,
return_logvar=False)` -> D(x; sigma) in float32.

What each preconditioning computes, D = c_skip x + c_out F(c_in x; c_noise):
- EDMPrecond: EDM's scalings (`cmt.edm.edm_scalings`), c_noise = log(sigma) / 4.
- ECMPrecond: the same in train mode; in eval mode the consistency boundary form with its
  `sigma_min` (official default 0.003, which neither ECT nor sony/cmt overrides): c_skip =
  sd^2 / ((sigma - sigma_min)^2 + sd^2), c_out = (sigma - sigma_min) sd / sqrt(sigma^2 + sd^2),
  which is `edm_scalings(sigma, sd, sigma_min)` exactly. The train-mode form (no boundary) is the
  official one too: ECT / CMT train with it and sample in eval mode.
- VPPrecond: c_skip 1, c_out -sigma, c_in 1 / sqrt(sigma^2 + 1), c_noise = (M - 1) t(sigma) with
  t(sigma) the inverse of the VP schedule sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1).
- VEPrecond: c_skip 1, c_out sigma, c_in 1, c_noise = log(sigma / 2).
- iDDPMPrecond: c_skip 1, c_out -sigma, c_in 1 / sqrt(sigma^2 + 1), c_noise = M - 1 - j where j
  is the index of the nearest of the M + 1 discrete sigmas `u` (the buffer); the U-Net has twice
  the image channels (iDDPM's learned variance) and only the first half is used.

Ours, beyond the official classes:
- `sigma_min` is this project's boundary (docs/design.md): 0 = plain denoiser; > 0 the consistency
  form, for EDMPrecond in both modes (`edm_scalings`), for ECMPrecond as above. The official
  `sigma_min` / `sigma_max` of EDMPrecond and VEPrecond (and VPPrecond's derived ones) only bound
  generate.py's sampler and never enter D, so they are not kept (`config_from_official`).
- `flow_map=True`: the U-Net's zero-initialised `map_target` embeds the target noise label
  log(target_sigma + SIGMA_MIN) / 4 (finite and smooth at target_sigma = 0; EDM's own log(sigma) / 4
  for targets well above 0.002), so a student made from a teacher's weights starts as the teacher.
- Students (sigma_min > 0 or flow_map) exist for EDMPrecond and ECMPrecond only (the CMT paper's
  teachers are all EDMPrecond). VP / VE / iDDPM networks are teachers: their c_skip = 1 has no
  boundary form, and their noise labels (DDPM time steps, log(sigma / 2)) are not EDM's, so a
  student of them raises ArgumentError naming what is supported (`check_student`).
- The family's consistency student is sony/cmt's: an EDMPrecond (or ECMPrecond) network becomes
  ECMPrecond with the official sigma_min 0.003 (`consistency_student`; sony/cmt run_cmt.py and
  ct_train.py build the student as `training.networks.ECMPrecond` around the teacher's U-Net, with
  the teacher's EDMPrecond weights copied in: the same state dict). It trains in the plain EDM form
  (train mode) and samples with the boundary (eval mode), as the official students do. Flow-map
  students keep the teacher's preconditioning with `flow_map=True`.
- `use_fp16` is kept in the config and honoured on CUDA only; on CPU everything runs in float32.
- `return_logvar=True` returns logvar = 0: EDM (v1) has no uncertainty head (its loss is the plain
  EDM-weighted one, which an uncertainty-weighted loss with logvar 0 equals).
"""
import contextlib
import math

import torch

from cmt.edm import SIGMA_DATA, edm_scalings
from cmt.errors import ArgumentError
from cmt.networks.family import NetworkFamily, batch_sigmas, target_noise_labels
from cmt.networks.edm_unets import MODEL_TYPES

# The official defaults of each preconditioning's own parameters (training/networks.py); EDM's
# ECMPrecond sigma_min from sony/cmt / locuslab/ect training/networks.py.
OFFICIAL_PRECOND_DEFAULTS = {
    "EDMPrecond": dict(model_type="DhariwalUNet", sigma_data=0.5),
    "ECMPrecond": dict(model_type="DhariwalUNet", sigma_data=0.5, sigma_min=0.003),
    "VPPrecond": dict(model_type="SongUNet", beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5),
    "VEPrecond": dict(model_type="SongUNet"),
    "iDDPMPrecond": dict(model_type="DhariwalUNet", C_1=0.001, C_2=0.008, M=1000),
}

STUDENT_PRECONDS = ("EDMPrecond", "ECMPrecond")


def teachers_only(precond):
    """Why a network of `precond` cannot be a student, and what can."""
    return (f"{precond} networks are teachers only (no consistency boundary form, noise labels other than EDM's): "
            f"consistency and flow-map students of the EDM family are built from {' or '.join(STUDENT_PRECONDS)} "
            "networks, such as EDM's edm-* presets (edm-cifar10-32x32-uncond-vp, ...; the baseline-* presets are "
            "VP / VE / iDDPM networks)")


def check_student(config):
    """ValueError unless a student of `config` (sigma_min > 0 or flow_map) has a student preconditioning."""
    precond = config.get("precond", "EDMPrecond")
    if (config.get("sigma_min") or config.get("flow_map")) and precond not in STUDENT_PRECONDS:
        raise ValueError(teachers_only(precond))


def consistency_student(config):
    """The EDM family's consistency student of `config`: ECMPrecond (sony/cmt's student class) with its
    own sigma_min for an ECMPrecond network, else the official default 0.003 (sony/cmt run_cmt.py and
    ct_train.py: `c.network_kwargs.class_name = 'training.networks.ECMPrecond'` with the EDMPrecond
    teacher's weights; training/networks.py ECMPrecond's sigma_min default, which neither overrides)."""
    precond = config.get("precond", "EDMPrecond")
    if precond not in STUDENT_PRECONDS:
        raise ValueError(teachers_only(precond))
    sigma_min = config.get("sigma_min") if precond == "ECMPrecond" else 0.0
    return {**config, "precond": "ECMPrecond",
            "sigma_min": sigma_min or OFFICIAL_PRECOND_DEFAULTS["ECMPrecond"]["sigma_min"]}


class _Precond(torch.nn.Module):
    """What the five preconditionings share: config, labels, dtype, the U-Net call and the output."""
    precond = None          # the official class name
    out_channel_factor = 1  # iDDPM's U-Net predicts twice the image channels

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, model_type=None, sigma_min=0.0,
                 flow_map=False, precond_kwargs=None, **model_kwargs):
        super().__init__()
        model_type = model_type or OFFICIAL_PRECOND_DEFAULTS[self.precond]["model_type"]
        if model_type not in MODEL_TYPES:
            raise ArgumentError("model_type", f"{model_type!r} is not an EDM U-Net; valid: {', '.join(MODEL_TYPES)}")
        if (sigma_min or flow_map) and self.precond not in STUDENT_PRECONDS:
            raise ArgumentError("sigma_min" if sigma_min else "flow_map", teachers_only(self.precond))
        self.config = dict(architecture="edm", precond=self.precond, model_type=model_type,
                           img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                           use_fp16=use_fp16, sigma_min=sigma_min, flow_map=flow_map, **(precond_kwargs or {}),
                           **{key: list(value) if isinstance(value, tuple) else value
                              for key, value in model_kwargs.items()})
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.data_shape = (img_channels, img_resolution, img_resolution)
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = float(sigma_min)
        self.sigma_data = SIGMA_DATA
        self.flow_map = flow_map
        self.model = MODEL_TYPES[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                             out_channels=img_channels * self.out_channel_factor, label_dim=label_dim,
                                             flow_map=flow_map, **model_kwargs)

    @property
    def flow_map_keys(self):
        """State-dict keys that exist only because of `flow_map=True` (absent from a teacher)."""
        return {key for key in self.state_dict() if key.startswith("model.map_target.")} if self.flow_map else set()

    @contextlib.contextmanager
    def frozen_weight_norm(self):
        """No-op twin of the EDM2 network's (EDM's U-Nets have no forced weight normalisation)."""
        yield self

    def scalings(self, sigma):
        """`(c_skip, c_out, c_in, c_noise)` for a float32 `[B]` sigma."""
        raise NotImplementedError

    def forward(self, x, sigma, labels=None, target_sigma=None, return_logvar=False, augment_labels=None,
                force_fp32=False):
        x = x.to(torch.float32)
        sigma = batch_sigmas(x, sigma)
        if self.label_dim == 0:
            labels = None
        elif labels is None:   # the official unconditional call of a conditional network
            labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            labels = labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == "cuda") else torch.float32

        target_noise = target_noise_labels(x, target_sigma) if self.flow_map else None

        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        F_x = self.model((_image(c_in) * x).to(dtype), c_noise, labels, augment_labels=augment_labels,
                         target_noise_labels=target_noise)
        D_x = _image(c_skip) * x + _image(c_out) * F_x[:, :self.img_channels].to(torch.float32)
        if return_logvar:
            return D_x, torch.zeros([x.shape[0], 1, 1, 1], device=x.device)
        return D_x

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


def _image(c):
    """A `[B]` scaling as `[B, 1, 1, 1]` (python numbers pass through)."""
    return c.reshape(-1, 1, 1, 1) if torch.is_tensor(c) else c


class EDMPrecond(_Precond):
    precond = "EDMPrecond"

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, model_type="DhariwalUNet",
                 sigma_data=0.5, sigma_min=0.0, flow_map=False, **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, sigma_min, flow_map,
                         dict(sigma_data=sigma_data), **model_kwargs)
        self.sigma_data = sigma_data

    def scalings(self, sigma):
        return edm_scalings(sigma, self.sigma_data, self.sigma_min)


class ECMPrecond(EDMPrecond):
    """sony/cmt's and ECT's consistency preconditioning: the boundary form in eval mode only."""
    precond = "ECMPrecond"

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, model_type="DhariwalUNet",
                 sigma_data=0.5, sigma_min=0.003, flow_map=False, **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, sigma_data, sigma_min,
                         flow_map, **model_kwargs)

    def scalings(self, sigma):
        return edm_scalings(sigma, self.sigma_data, 0.0 if self.training else self.sigma_min)


class VPPrecond(_Precond):
    precond = "VPPrecond"

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, model_type="SongUNet",
                 beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5, sigma_min=0.0, flow_map=False, **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, sigma_min, flow_map,
                         dict(beta_d=beta_d, beta_min=beta_min, M=M, epsilon_t=epsilon_t), **model_kwargs)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t

    def sigma_inv(self, sigma):
        """The VP time t of a sigma (the inverse of sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1))."""
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def scalings(self, sigma):
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)


class VEPrecond(_Precond):
    precond = "VEPrecond"

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, model_type="SongUNet",
                 sigma_min=0.0, flow_map=False, **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, sigma_min, flow_map,
                         None, **model_kwargs)

    def scalings(self, sigma):
        return 1, sigma, 1, (0.5 * sigma).log()


class iDDPMPrecond(_Precond):  # noqa: N801 (the official class name)
    precond = "iDDPMPrecond"
    out_channel_factor = 2

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, model_type="DhariwalUNet",
                 C_1=0.001, C_2=0.008, M=1000, sigma_min=0.0, flow_map=False, **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, sigma_min, flow_map,
                         dict(C_1=C_1, C_2=C_2, M=M), **model_kwargs)
        self.C_1, self.C_2, self.M = C_1, C_2, M
        # The M + 1 discrete sigmas of iDDPM's cosine schedule, largest first, computed in float32 on
        # the CPU the way the official constructor does (also when building on the meta device).
        u = torch.zeros(M + 1, device="cpu")
        for j in range(M, 0, -1):
            ratio = (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=C_1)
            u[j - 1] = ((u[j] ** 2 + 1) / ratio - 1).sqrt()
        self.register_buffer("u", u.to(self.model.map_layer0.weight.device))

    def alpha_bar(self, j):
        j = torch.as_tensor(j, device="cpu")
        return (0.5 * math.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    def round_sigma(self, sigma, return_index=False):
        """The nearest of the discrete sigmas `u` (or its index)."""
        sigma = torch.as_tensor(sigma)
        sigma_column = sigma.to(self.u.device).to(torch.float32).reshape(1, -1, 1)
        index = torch.cdist(sigma_column, self.u.reshape(1, -1, 1)).argmin(2)   # cdist as the official
        result = index if return_index else self.u[index.flatten()].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)

    def scalings(self, sigma):
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), c_noise


PRECONDS = {cls.precond: cls for cls in (EDMPrecond, ECMPrecond, VPPrecond, VEPrecond, iDDPMPrecond)}


def build_edm_network(precond="EDMPrecond", **kwargs):
    """The network of config `{"architecture": "edm", "precond": CLASS, ...}` (build_network's entry)."""
    if precond not in PRECONDS:
        raise ArgumentError("precond", f"{precond!r} is not an EDM preconditioning; valid: {', '.join(PRECONDS)}")
    return PRECONDS[precond](**kwargs)


_POSITIONAL = ("img_resolution", "img_channels", "label_dim", "use_fp16")
# Official init kwargs that only bound generate.py's sampler (they never enter D(x; sigma)).
_SAMPLER_RANGE = {"EDMPrecond": ("sigma_min", "sigma_max"), "VEPrecond": ("sigma_min", "sigma_max"),
                  "ECMPrecond": ("sigma_max",)}


def config_from_official(class_name, init_args=(), init_kwargs=None):
    """Our config for an official network recorded as `class_name(*init_args, **init_kwargs)`.

    ECMPrecond's sigma_min (its boundary) is made explicit, with the official default 0.003 when
    the record leaves it out; the sampler-range kwargs listed in `_SAMPLER_RANGE` are dropped.
    """
    if class_name not in PRECONDS:
        raise ValueError(f"{class_name!r} is not an EDM preconditioning ({', '.join(PRECONDS)})")
    kwargs = dict(zip(_POSITIONAL, init_args), **(init_kwargs or {}))
    kwargs.pop("class_name", None)
    for key in _SAMPLER_RANGE.get(class_name, ()):
        kwargs.pop(key, None)
    if class_name == "ECMPrecond":
        kwargs.setdefault("sigma_min", OFFICIAL_PRECOND_DEFAULTS["ECMPrecond"]["sigma_min"])
    kwargs.setdefault("model_type", OFFICIAL_PRECOND_DEFAULTS[class_name]["model_type"])
    return dict(architecture="edm", precond=class_name, **{key: _plain(value) for key, value in kwargs.items()})


def _plain(value):
    """A recorded init kwarg as plain JSON-able Python (numpy scalars, tuples and EasyDicts unwrapped)."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


# Default learning rates (the official runs of CIFAR-10, FFHQ-64 and AFHQv2-64, all DDPM++ under
# EDMPrecond / ECMPrecond): pre-training, EDM train.py --lr default 10e-4 (CIFAR-10; its README's
# FFHQ / AFHQv2 runs use 2e-4, ImageNet-64 ADM 1e-4); mid-training, sony/cmt run_cmt_{cifar,ffhq,afhq}.sh
# --lr=0.0002; post-training, sony/cmt run_cmt+ecm_{cifar,ffhq,afhq}.sh --lr=0.0001 (locuslab/ect
# run_ecm.sh's too). The recipes (cmt.trainers.recipes) carry the rest of those runs' settings.
FAMILY = NetworkFamily(name="edm", build=build_edm_network,
                       learning_rates={"diffusion": 1e-3, "mid": 2e-4, "post": 1e-4},
                       consistency_student=consistency_student, check_student=check_student)
