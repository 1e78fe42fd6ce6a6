"""Which float formats a training phase can afford: TF32 is switched off where its rounding reaches the
residual that the loss must resolve, as half precision is refused in post-training for the same reason.

TF32 (CUDA matmuls and cuDNN convolutions) keeps 10 bits of mantissa, as fp16 does. At CMT's fixed
ECT gap the loss resolves f(x_t, t) - f(x_r, r), a residual of a thousandth of f at stage 11: the
measure is `rounding_ratio`, the median over a batch of |f_TF32(x_t) - f(x_t)| / |residual|, where
f_TF32 is the network with 10 bits kept of every mantissa that enters a matrix product or a
convolution (`ReducedProducts`: TF32's arithmetic, emulated on any device). A method
whose loss has such a residual declares how to probe it (`cmt.trainers.methods.PostMethod.probe`).

`--tf32 auto|on|off` (a trainer option): `auto` is per phase. Pre-training and mid-training keep TF32
off, as the official training loops do (NVlabs/edm2 training/training_loop.py, sony/cmt
training/cmt_training_loop.py: `allow_tf32 = False`); a recipe whose official run forces it on
(sony/cmt's ImageNet-512 tree) says `tf32="on"`. Post-training measures the ratio at the run's
finest gap on CUDA runs: TF32 on while its rounding stays below the residual (`TF32_LIMIT`), off
beyond; methods without a probe (MeanFlow: no small residual) keep it on. The choice is printed at
the start and recorded in run.json (`"tf32"`).
"""
from dataclasses import asdict, dataclass

import torch

TF32_SETTINGS = ("auto", "on", "off")
# Mantissa bits of each format (IEEE half, bfloat16, TensorFloat-32).
MANTISSA_BITS = {"tf32": 10, "fp16": 10, "bf16": 7}
# TF32 stays on while its rounding is below the residual the loss resolves.
TF32_LIMIT = 1.0
# Rows of the batch the ratio is measured on.
PROBE_ROWS = 256


@dataclass
class TF32Choice:
    """What a run does with TF32, and why (printed at the start, recorded in run.json)."""
    setting: str            # the option given: auto, on, off
    enabled: bool
    reason: str
    ratio: float = None     # the measured rounding / residual, when measured

    def line(self):
        return f"[cmt] TF32 {'on' if self.enabled else 'off'}: {self.reason}"

    def record(self):
        return asdict(self)


def round_mantissa(x, bits):
    """`x` with `bits` bits of mantissa (round to nearest), as a format of that precision holds it."""
    mantissa, exponent = torch.frexp(x)
    scale = 2.0 ** (bits + 1)   # frexp's mantissa lies in [0.5, 1): one more bit before the point
    return torch.ldexp(torch.round(mantissa * scale) / scale, exponent)


# The operations TF32 runs in reduced precision: matrix products and convolutions (both operands).
_PRODUCTS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.bmm, torch.addmm,
             torch.baddbmm, torch.einsum, torch.nn.functional.linear, torch.nn.functional.conv2d,
             torch.nn.functional.conv_transpose2d, torch.nn.functional.scaled_dot_product_attention}


class ReducedProducts(torch.overrides.TorchFunctionMode):
    """Inside the block, every matrix product and convolution sees its float32 operands with `bits`
    bits of mantissa: TF32's arithmetic (10 bits) emulated on any device, the CPU included."""

    def __init__(self, bits):
        super().__init__()
        self.bits = bits

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _PRODUCTS:
            rounded = lambda value: round_mantissa(value, self.bits) \
                if torch.is_tensor(value) and value.dtype == torch.float32 else value
            args, kwargs = torch.utils._pytree.tree_map(rounded, (args, kwargs or {}))
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def rounding_ratio(net, x, sigma, labels, residual, bits):
    """Median over rows of |f_rounded(x) - f(x)| / |residual|: how large the rounding of a format of
    `bits` mantissa bits in every matrix product and convolution (`ReducedProducts`) is against the
    residual the loss resolves (`f`: `net`'s consistency output, the denoiser at `target_sigma` 0 for
    a flow map)."""
    target = torch.zeros_like(sigma) if getattr(net, "flow_map", False) else None
    exact = net(x, sigma, labels, target_sigma=target).float()
    with ReducedProducts(bits):
        rounded = net(x, sigma, labels, target_sigma=target).float()
    rows = residual.flatten(1).norm(dim=1)
    ratio = (rounded - exact).flatten(1).norm(dim=1) / rows.clamp(min=torch.finfo(torch.float32).tiny)
    return float(ratio[rows > 0].median()) if bool((rows > 0).any()) else 0.0


def fixed_choice(setting, default_reason):
    """The TF32 choice of a phase that measures nothing: `on` / `off` as given; `auto` off, for
    `default_reason` (the official loop's setting)."""
    if setting == "auto":
        return TF32Choice(setting, False, default_reason)
    return TF32Choice(setting, setting == "on", "as asked (--tf32 " + setting + ")")


def measured_choice(setting, measure):
    """The TF32 choice of a phase whose loss resolves a small residual: `auto` measures
    (`measure() -> (ratio, what the residual is)`) and keeps TF32 on below `TF32_LIMIT`; `on` / `off`
    as given."""
    if setting != "auto":
        return fixed_choice(setting, "")
    ratio, what = measure()
    if ratio < TF32_LIMIT:
        return TF32Choice(setting, True, f"its rounding is {ratio:.2g}x the residual of {what}, below "
                                         f"{TF32_LIMIT:g}x", ratio)
    return TF32Choice(setting, False, f"its rounding is {ratio:.2g}x the residual of {what} (--tf32 on to force "
                                      "it)", ratio)


def apply_tf32(choice, device):
    """Set torch's TF32 switches (matmuls and cuDNN both) for a run on `device`."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = choice.enabled
        torch.backends.cudnn.allow_tf32 = choice.enabled
