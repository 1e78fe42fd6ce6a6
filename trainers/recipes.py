"""Named recipes: every hyper-parameter of a phase, as the official code runs it, under one name.

A recipe is a plain dict of keyword arguments of `mid_train` / `post_train` (their trainer options
included). `recipe="cifar10"` (`--recipe cifar10`) fills in its values; an argument the caller gives
explicitly (a flag on the command line) wins over the recipe, and the recipe wins over the
function's defaults. The resolved values are printed at the start of a run and recorded in its
`run.json` and checkpoint (`"recipe"`, `"options"`).

Post-training recipes are per method (`"ect"`, `"ecd"`, `"meanflow"`): a recipe only sets what
applies to the method at hand. `mnist` and `toy` are this project's tuned settings for its built-in
teachers, and the defaults whenever the teacher is built in (the demo runs them).

Sources (docs/recipes.md has every value with its file): sony/cmt (`run_cmt_{cifar,ffhq,afhq}.sh`,
`run_cmt+ecm_*.sh`, `ct_train.py`, `training/loss.py`, `training/*_training_loop.py`, and the
`imagenet512/` tree: `run_cmt_512.sh`, `run_ect_512.sh`, `run_ecd_512.sh`, `cmt_512.py`,
`ct_train_512.py`, `cd_train_512.py`), locuslab/ect (branch `imgnet`: `run_imgnet_ecm.sh`,
`ct_train.py`), Gsunshine/meanflow (`configs/default.py`, `configs/run_b4.yml`, `meanflow.py`),
NVlabs/edm2 (`train_edm2.py`, `generate_images.py`).

One module of ~410 lines: a table of values, each with its source; the length is the citations.
"""
import functools
import inspect
import os
from pathlib import Path

from cmt.checkpoint import reading_once
from cmt.edm import TWO_STEP_SIGMA
from cmt.errors import ArgumentError, InapplicableOption
from cmt.teachers import RECIPE_TEACHERS
from cmt.trainers.config import TRAIN_DEFAULTS

PHASES = ("mid", "post", "diffusion")

# ---- the CIFAR-10 family (sony/cmt, EDM VP teachers) -------------------------------------------
# Mid: run_cmt_{cifar,ffhq,afhq}.sh -> run_cmt.py -> training/cmt_training_loop.py, loss.py:DPMSolverLoss.
_CMT_PIXEL_MID = dict(
    target="endpoint",
    optimizer="radam", betas=(0.9, 0.999),      # --optim=RAdam; run_cmt.py hard-codes the betas
    lr=2e-4, lr_schedule="linear",              # --lr=0.0002; cmt_training_loop.py decays lr (1 - kimg / total)
    warmup_steps=0,
    ema_beta=0.999,                             # --ema_beta 0.999 per step, no ramp-up
    dropout=0.2,                                # --dropout=0.2
    loss="lpips", lpips_resize=None,            # LPIPS-VGG at the native resolution (loss.py)
    batch_size=128, max_steps=300_000,          # --batch=128 (8 trajectories x 16 states), 38.4 Mimg
    mid_sigma=0.77569,                          # --mid_t=7.7569e-01 (a point of the 16-step logSNR grid)
    mixed_precision="no",                       # --fp16 False (run_cmt.py)
    tf32="off",                                 # run_cmt.py --tf32 default False (cmt_training_loop.py enable_tf32)
)
# Post: run_cmt+ecm_{cifar,ffhq,afhq}.sh -> ct_train.py -> training/ct_training_loop.py, loss.py:ECMLoss.
# The fixed gap: -q Q --double 10000 never doubles in the run, r = t (1 - n(t) / Q); with our q = 2
# that is stage log2(Q) - 1.
_ECT_PIXEL_POST = dict(
    optimizer="radam", betas=(0.9, 0.999),      # --optim=RAdam (ct_train.py betas)
    lr=1e-4, lr_schedule="linear",              # --lr=0.0001; ct_training_loop.py decays it linearly
    warmup_steps=0,
    ema_beta=0.9999,                            # --ema_beta 0.9999
    dropout=0.2,                                # --dropout=0.2
    loss="huber", huber_c=0.0,                  # -c default 0: the plain L2 norm (loss.py)
    weighting="gap",                            # 1 / (t - r) (loss.py)
    p_mean=-1.1, p_std=2.0,                     # ct_train.py defaults
    q=2.0, k=8.0, b=1.0,                        # ct_train.py -k/-b defaults
    batch_size=128, max_steps=100_000,          # --batch=128 --duration=12.8 (Mimg)
    mid_sigma=0.821,                            # ct_train.py --mid_t default
    mixed_precision="no",                       # fp32
    tf32="off",                                 # ct_train.py --tf32 default False (ct_training_loop.py enable_tf32)
)


def _pixel_recipe(name, stage, source):
    """A pixel recipe: the settings above, its post-training gap, and its official teacher
    (`cmt.teachers.RECIPE_TEACHERS`, which brings the architecture: DDPM++ under EDMPrecond, FFHQ and
    AFHQv2 with channel_mult 1,2,2,2), used where neither the caller nor the input names a teacher.
    Post-training is ECT only: sony/cmt publishes no ECD for pixels (its ECD is the ImageNet-512 tree's)."""
    post = dict(_ECT_PIXEL_POST, stage=stage)
    return {"mid": dict(_CMT_PIXEL_MID), "post": {"ect": post}, "teacher": RECIPE_TEACHERS[name], "source": source}


# ---- ImageNet-512, EDM2 latents (sony/cmt imagenet512/) -----------------------------------------
_IMAGENET512_POST = dict(
    optimizer="adam", betas=(0.9, 0.99),        # preset edm2-img512-xxl-safe (ct_train_512.py)
    lr=1e-6, lr_schedule="constant",            # run_ect_512.sh --lr 1e-6 --sch Constant
    warmup_steps=0,
    ema_beta=0.9999,                            # --ema_beta=0.9999
    dropout=0.0,                                # -safe preset
    loss="huber", huber_c=0.06,                 # ct_train_512.py -c 0.06 (absolute, over 4x64x64)
    weighting="snr",                            # --wt snrpk: 1 / t^2 + 1 / sigma_data^2
    p_mean=-0.8, p_std=1.6,                     # preset mean/std
    q=2.0, stage=9, k=8.0, b=1.0,               # -q 1024 --double 50000 (never reached): fixed gap n(t) / 1024
    batch_size=128,
    max_steps=125_000,                          # unbounded in run_ect_512.sh (--duration 1e8); 2500 ticks of
                                                # 6.4 kimg per eval_imgnet512.sh's file name (unverified)
    mid_sigma=1.526,                            # --mid_t=1.526
    mixed_precision="no",                       # --fp16=0
    tf32="on",                                  # training/ct_training_loop_simpleema_512.py: allow_tf32 = True
)
IMAGENET512 = {
    # run_cmt_512.sh -> cmt_512.py -> training/cmt_training_loop_simpleema_512.py
    "mid": dict(
        target="endpoint",
        optimizer="adam", betas=(0.9, 0.999),   # --optim Adam, cmt_512.py --betas default
        lr=2e-4, lr_schedule="linear", warmup_steps=0,
        ema_beta=0.999,                         # --ema_beta=0.999
        dropout=0.0,                            # preset edm2-img512-xxl (dropout 0)
        # --loss_metric=ELatentLPIPS (training/loss.py DPMSolverLoss: ELatentLPIPS2, aug_type "bgcfnc",
        # p 1): E-LatentLPIPS with the authors' published SD-VAE (sd15) weights, since sony/cmt's own
        # latent VGG (vgg.pt, from train_latent_vgg.py) is not published; of "bgcfnc" the transforms the
        # package's augmentation has: blit, geometric, colour, noise, cutout (docs/recipes.md).
        loss="elatentlpips", elatentlpips_augment="bgcno",
        batch_size=128, max_steps=100_000,      # --batch 128, --duration=12.8 (Mimg)
        mid_sigma=1.526,                        # --mid_t=1.526
        mixed_precision="no",                   # --fp16=0
        tf32="on",                              # training/cmt_training_loop_simpleema_512.py: allow_tf32 = True
    ),
    "post": {
        "ect": dict(_IMAGENET512_POST),         # run_ect_512.sh, ct_train_512.py, loss.py:ECMLoss
        # run_ecd_512.sh, cd_train_512.py, loss.py:ECDGuidLoss: the xxl teacher (0.075) guided by the
        # m network (0.155) with w = 2.05 (EDM2's edm2-img512-xxl-autog-fid), x_r one Heun step.
        "ecd": dict(_IMAGENET512_POST, teacher="edm2-img512-xxl-0939524-0.075.pkl", guidance=2.05,
                    guide_ckpt="edm2-img512-m-0268435-0.155.pkl"),
    },
    "teacher": RECIPE_TEACHERS["imagenet512"],   # cmt-build --recipe imagenet512 builds from it
    "source": "sony/cmt imagenet512/ (run_cmt_512.sh, run_ect_512.sh, run_ecd_512.sh)",
}

# ---- ImageNet-64: no official CMT recipe; ECT's own (locuslab/ect branch imgnet) ----------------
IMAGENET64_ECT = {
    "mid": None,
    "post": {"ect": dict(
        init="edm2-img64-s-1073741-0.075.pkl",  # run_imgnet_ecm.sh --transfer: ECT starts from EDM2-S (EDM2's
                                                # edm2-img64-s preset)
        optimizer="adam", betas=(0.9, 0.99),    # ct_train.py preset edm2-img64-s
        lr=1e-3, lr_schedule="invsqrt",         # preset lr 1e-3; EDM2's lr_ref / sqrt(max(n / (2000 batch), 1))
        lr_ref_steps=2000, warmup_steps=0,
        ema_beta=0.9999,                        # TraditionalEMA 0.9999 (the power EMA is not reproduced)
        dropout=0.4, dropout_res=16,            # preset edm2-img64-s: dropout=0.40, dropres=16 (networks_edm2.py:
                                                # blocks above 16 px run without dropout)
        loss="huber", huber_c=0.06,             # -c 0.06
        weighting="snr",                        # snrpk
        p_mean=-0.8, p_std=1.6,                 # preset
        q=4.0, k=8.0, b=1.0, stage_every=25_000,  # q 4, --double 500 ticks x 6.4 kimg / 128 = 25k steps
        batch_size=128, max_steps=100_000,      # --batch 128, 12.8 Mimg
        mid_sigma=1.526,                        # --mid_t=1.526
        mixed_precision="no",                   # --fp16=0
        tf32="on",                              # ect64 training/ct_training_loop.py: allow_tf32 = True
    )},
    "source": "locuslab/ect@imgnet (run_imgnet_ecm.sh, ct_train.py); ECT only, not CMT",
}

# ---- ImageNet-256 MeanFlow (Gsunshine/meanflow, MF-B/4) ----------------------------------------
# Data: ImageNet-256 as SD-VAE latents, 0.18215 x the posterior draw of pixels in [-1, 1] with a random
# horizontal flip (utils/vae_util.py, input_pipeline.py `use_flip=True`): a latent set of
# `cmt-encode --scaling sd --flips` (both flips stored; training draws one at random, as
# zhuyu-cs/MeanFlow dataset.py flip_prob 0.5).
IMAGENET256_MEANFLOW = {
    "mid": None,   # no CMT + MeanFlow code is published
    "post": {"meanflow": dict(
        init="random", arch="sit-b/4",          # run_b4.yml model.cls DiT_B_4, trained from scratch
        optimizer="adam", betas=(0.9, 0.95),    # optax.adamw b2 0.95, weight decay 0 (train.py, default.py)
        weight_decay=0.0,
        lr=1e-4, lr_schedule="constant", warmup_steps=0,   # run_b4.yml lr 1e-4 (a constant)
        ema_beta=0.9999,                        # ema_val 0.9999, ema_type const
        dropout=0.0,
        p_mean=-0.4, p_std=1.0,                 # logit-normal (default.py)
        equal_share=0.75,                       # data_proportion 0.75
        norm_p=1.0, norm_eps=0.01,              # adaptive weight (default.py)
        cfg_omega=1.0, cfg_kappa=0.5, cfg_t_min=0.0, cfg_t_max=1.0,   # guidance_eq cfg (default.py)
        label_dropout=0.1,                      # class_dropout_prob 0.1
        batch_size=256, max_steps=1_200_960,    # run_b4.yml: batch 256, 240 epochs of 5004 batches (1,281,167
                                                # images; utils/input_pipeline.py drops the partial last one)
        # 2 steps t = 1 -> 0.5 -> 0 (sigma 1 is t = 0.5): zhuyu-cs/MeanFlow meanflow_sampler.py linspace(1, 0, 3);
        # the official code samples 1 step (sampling.num_steps 1, schedule [1.0, 0.0]). A SiT student
        # samples in t from t = 1 (`cmt.sampling.student_sampler(time="t")`).
        mid_sigma=1.0,
        mixed_precision="no",                   # half_precision False
    )},
    "source": "Gsunshine/meanflow (configs/default.py, configs/run_b4.yml, meanflow.py)",
}

# ---- this project's built-in teachers (tuned on a 2-core CPU; docs/demo.md) --------------------
def _builtin_recipe(*, batch_size, mid_lr, mid_steps, post_lr, post_steps, meanflow_lr, meanflow_batch_size=None):
    """Mid-training onto the endpoint, then ECT/ECD (the same settings) at CMT's fixed gap, or
    MeanFlow (at `meanflow_batch_size`, None: the same batch) with the plain L2 loss: MeanFlow's
    adaptive weight (norm_p 1) makes the exact flow map a non-stationary point of its loss, so
    post-training trains the CMT weights away from it (tests/test_recipes.py, docs/claim.md)."""
    post = dict(lr=post_lr, batch_size=batch_size, max_steps=post_steps, stage=11, q=2.0, weighting="gap",
                loss="huber", mid_sigma=TWO_STEP_SIGMA)
    meanflow = dict(lr=meanflow_lr, batch_size=meanflow_batch_size or batch_size, max_steps=post_steps, norm_p=0.0,
                    mid_sigma=TWO_STEP_SIGMA)
    return {
        "mid": dict(target="endpoint", lr=mid_lr, batch_size=batch_size, max_steps=mid_steps, loss="l2",
                    mid_sigma=TWO_STEP_SIGMA),
        "post": {"ect": post, "ecd": dict(post), "meanflow": meanflow},
        "source": "this project (cmt/demo.py; docs/demo.md)",
    }


# MeanFlow lr: MNIST, 60 steps at 2e-4 from a CMT flow map gave 2-step FD-MNIST 41.8 (5e-5: 42.3)
# against 44.7 before (500 samples, not the same noise); toy, 1e-5 keeps the CMT flow map where 1e-4
# wanders (docs/claim.md, "Why MeanFlow degrades"). Toy batch 1024: near the teacher's flow map the
# conditional velocity e - x makes MeanFlow's gradient mostly noise (loss 1.44 against 0.004 with the
# teacher's velocity), and at batch 256 the CMT weights' 1-step metric drifted 1.04 / 2.46 / 1.40x
# in 250 steps; at 1024, 1.06 / 0.99 / 1.11x, with 2-step 0.81 / 0.74 / 0.73x (docs/claim.md, "the
# toy's 1-step drift").
MNIST = _builtin_recipe(batch_size=128, mid_lr=5e-3, mid_steps=600, post_lr=2e-4, post_steps=200, meanflow_lr=2e-4)
TOY = _builtin_recipe(batch_size=256, mid_lr=2e-4, mid_steps=1000, post_lr=3e-5, post_steps=500, meanflow_lr=1e-5,
                      meanflow_batch_size=1024)

RECIPES = {
    # sony/cmt run_cmt_cifar.sh + run_cmt+ecm_cifar.sh: -q 4096 = 2^12 -> stage 11
    "cifar10": _pixel_recipe("cifar10", 11, "sony/cmt run_cmt_cifar.sh, run_cmt+ecm_cifar.sh"),
    # run_cmt+ecm_ffhq.sh: -q 512 = 2^9 -> stage 8
    "ffhq64": _pixel_recipe("ffhq64", 8, "sony/cmt run_cmt_ffhq.sh, run_cmt+ecm_ffhq.sh"),
    # run_cmt+ecm_afhq.sh: -q 1024 = 2^10 -> stage 9
    "afhq64": _pixel_recipe("afhq64", 9, "sony/cmt run_cmt_afhq.sh, run_cmt+ecm_afhq.sh"),
    "imagenet512": IMAGENET512,
    "imagenet64-ect": IMAGENET64_ECT,
    "imagenet256-meanflow": IMAGENET256_MEANFLOW,
    "mnist": MNIST,
    "toy": TOY,
}
# The fixed ECT/ECD gap after mid-training when neither a stage nor a recipe says otherwise: the
# official CIFAR-10 setting, -q 4096 --double 10000 (sony/cmt run_cmt+ecm_cifar.sh) = stage 11, q 2.
CMT_POST_STAGE = 11

# EDM2's pre-training presets (NVlabs/edm2 train_edm2.py): keyword arguments of train_diffusion.
# Durations are in images (<< 20 = Mi); lr decays as lr_ref / sqrt(max(step / t_ref, 1)) after a
# 10 Mimg ramp-up (training_loop.py); the power-function EMA is replaced by the loop's half-life EMA.
_EDM2_PRESETS = {   # name: (duration Mimg, channels, lr_ref, dropout, p_mean, p_std, t_ref batches)
    "edm2-img512-xs": (2048, 128, 0.0120, 0.00, -0.4, 1.0, 70000),
    "edm2-img512-s": (2048, 192, 0.0100, 0.00, -0.4, 1.0, 70000),
    "edm2-img512-m": (2048, 256, 0.0090, 0.10, -0.4, 1.0, 70000),
    "edm2-img512-l": (1792, 320, 0.0080, 0.10, -0.4, 1.0, 70000),
    "edm2-img512-xl": (1280, 384, 0.0070, 0.10, -0.4, 1.0, 70000),
    "edm2-img512-xxl": (896, 448, 0.0065, 0.10, -0.4, 1.0, 70000),
    "edm2-img64-s": (1024, 192, 0.0100, 0.00, -0.8, 1.6, 35000),
    "edm2-img64-m": (2048, 256, 0.0090, 0.10, -0.8, 1.6, 35000),
    "edm2-img64-l": (1024, 320, 0.0080, 0.10, -0.8, 1.6, 35000),
    "edm2-img64-xl": (640, 384, 0.0070, 0.10, -0.8, 1.6, 35000),
}
DIFFUSION_RECIPES = {
    name: dict(arch="edm2", channels=channels, channel_mult=(1, 2, 3, 4), num_blocks=3, attn_res=(16, 8),
               label_dropout=0.0, lr=lr, lr_schedule="invsqrt", lr_ref_steps=t_ref,
               warmup_steps=(10 << 20) // 2048, dropout=dropout, p_mean=p_mean, p_std=p_std,
               batch_size=2048, max_steps=(duration << 20) // 2048, optimizer="adam", betas=(0.9, 0.99),
               mixed_precision="fp16", uncertainty=True)
    for name, (duration, channels, lr, dropout, p_mean, p_std, t_ref) in _EDM2_PRESETS.items()
}


def recipe_names(phase):
    """The recipes that have settings for `phase`."""
    if phase == "diffusion":
        return tuple(DIFFUSION_RECIPES)
    return tuple(name for name, recipe in RECIPES.items() if recipe.get(phase))


def recipe_help(phase):
    """What the `recipe` keyword of `phase` means (its docstring and the command's --recipe help)."""
    names = recipe_names(phase)
    default = ("none (EDM2's presets, NVlabs/edm2 train_edm2.py)" if phase == "diffusion" else
               "the built-in teacher's recipe (mnist, toy) when the teacher is built in, else the defaults shown here")
    return ("A named set of every setting of this phase, from the official code (docs/recipes.md): "
            f"{', '.join(names)}. "
            "Arguments given explicitly override it; the resolved values are printed and recorded in run.json and "
            "the checkpoint." + ("" if phase == "diffusion" else " cifar10, ffhq64 and afhq64 also name EDM's official "
                                 "teacher, used when neither --teacher nor the input names one.")
            + f" Default: {default}.")


def builtin_recipe(teacher_name):
    """The project's recipe for a built-in teacher's name (mnist, toy:NAME), else None."""
    if teacher_name == "mnist":
        return "mnist"
    if isinstance(teacher_name, str) and teacher_name.startswith("toy:"):
        return "toy"
    return None


def recipe_values(phase, name, method=None, explicit=True):
    """The keyword arguments recipe `name` sets for `phase` (post: for `method`). An explicit
    recipe without settings for the phase or method is an ArgumentError; an implicit one (the
    built-in teacher's) then sets nothing."""
    table = DIFFUSION_RECIPES if phase == "diffusion" else RECIPES
    if name not in table:
        raise ArgumentError("recipe", f"{name!r} is not one of {', '.join(recipe_names(phase))}")
    if phase == "diffusion":
        return dict(table[name])
    settings = table[name].get(phase)
    if settings is None:
        if not explicit:
            return {}
        raise ArgumentError("recipe", f"{name} has no {phase}-training settings (the official code publishes none); "
                                      f"recipes with them: {', '.join(recipe_names(phase))}")
    if phase == "post":
        if method not in settings:
            if not explicit:
                return {}
            raise ArgumentError("recipe", f"{name} has no post-training settings for method {method}; it has "
                                          f"{', '.join(settings)}")
        return {"method": method, **settings[method]}
    return dict(settings)


def post_recipe_method(name):
    """The method of a post-training recipe when it has only one (imagenet256-meanflow: meanflow)."""
    settings = (RECIPES.get(name) or {}).get("post") or {}
    return next(iter(settings)) if len(settings) == 1 else None


def resolve_options(function, phase, given, name, method=None, explicit=True):
    """`(values, recipe_part)`: every keyword of `function` with its resolved value (the defaults
    of its signature, under the recipe's values, under `given`), and what the recipe set."""
    defaults = {key: parameter.default for key, parameter in inspect.signature(function).parameters.items()
                if parameter.default is not inspect.Parameter.empty}
    from_recipe = recipe_values(phase, name, method, explicit) if name is not None else {}
    return {**defaults, **from_recipe, **given}, {key: value for key, value in from_recipe.items() if key not in given}


def announce(phase, name, from_recipe, given):
    """One line at the start of a run (rank 0 only): the recipe and what it and the caller set."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    filled = ", ".join(f"{key}={value}" for key, value in from_recipe.items())
    explicit = ", ".join(f"{key}={value}" for key, value in given.items()
                         if key not in ("out", "data", "init", "progress", "recipe"))
    print(f"[cmt] {phase}: recipe {name or 'none'}" + (f"; from the recipe: {filled}" if filled else "")
          + (f"; given: {explicit}" if explicit else ""), flush=True)


def recorded_options(values):
    """The resolved options of a run, as run.json and the checkpoint record them (JSON-friendly)."""
    def plain(value):
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, tuple):
            return list(value)
        return value
    return {key: plain(value) for key, value in values.items()}


def official_teacher(name, given, from_recipe, names_a_teacher):
    """The recipe's official teacher (`"teacher"` of a pixel recipe) when neither the caller (`given`),
    nor the recipe's phase settings, nor the input (`names_a_teacher(given)`: the dataset manifest, the
    init checkpoint) name one; else None."""
    official = (RECIPES.get(name) or {}).get("teacher")
    if official is None or given.get("teacher") is not None or "teacher" in from_recipe:
        return None
    return None if names_a_teacher is not None and names_a_teacher(given) else official


def with_recipe(phase, default_recipe=None, method_names=None, names_a_teacher=None):
    """Decorator for a phase's entry point: `recipe=` fills in a recipe's values under the
    arguments given explicitly (and over the defaults); `default_recipe(given)` names the implicit
    recipe (the built-in teacher's) when none is given. The function receives every option
    resolved, plus `recipe` (the name) and `resolved_options`: what the run records (run.json and its
    checkpoint), `{"options": every phase option resolved, "recipe": {"name", "values": what the
    recipe set}}` (the trainer options are recorded as run.json's "train"). post: `method_names()`
    lists the methods a missing `method` is asked among. `names_a_teacher(given)`: whether the input
    (dataset, init) names the teacher; if not, an explicit recipe with an official teacher
    (`official_teacher`) fills in `teacher` and says so. The whole call reads each checkpoint file
    once (`cmt.checkpoint.reading_once`)."""
    def decorate(function):
        @functools.wraps(function)
        def wrapper(**given):
            with reading_once():
                return resolve_and_call(dict(given))

        def resolve_and_call(given):
            name = given.pop("recipe", None)
            explicit = name is not None
            if name is None and default_recipe is not None:
                name = default_recipe(given)
            method = None
            if phase == "post":
                method = given.get("method") or (post_recipe_method(name) if explicit else None)
                if method is None:
                    raise ArgumentError("method", "name one: " + ", ".join(method_names()) +
                                        (f" (recipe {name} has several)" if explicit else ""))
            values, from_recipe = resolve_options(function, phase, given, name, method, explicit)
            teacher = official_teacher(name, given, from_recipe, names_a_teacher) if explicit else None
            if teacher is not None:
                values["teacher"] = from_recipe["teacher"] = teacher
            if method is not None:
                values["method"] = method
            if not from_recipe and not explicit:
                name = None
            announce(phase, name, from_recipe, given)
            values.pop("recipe", None)
            values.pop("resolved_options", None)
            for _ in range(len(from_recipe) + 1):
                options = recorded_options({key: value for key, value in values.items() if key not in TRAIN_DEFAULTS})
                record = {"options": options,
                          "recipe": None if name is None else {"name": name, "values": recorded_options(from_recipe)}}
                try:
                    return function(**values, recipe=name, resolved_options=record)
                except InapplicableOption as error:
                    leave_out_or_name_the_recipe(error, phase, name, function, values, from_recipe, given)
            raise AssertionError("unreachable: every retry leaves out one more of the recipe's values")
        return wrapper
    return decorate


def leave_out_or_name_the_recipe(error, phase, name, function, values, from_recipe, given):
    """A recipe's value that does not apply to what the caller chose (the recipe's huber_c under a
    given loss lpips) is left out (back to the function's default), said on rank 0, and the call is
    tried again; a value the caller gave that does not apply to the recipe's choice is refused naming
    the recipe too. Anything else is raised as it is."""
    if error.argument in from_recipe and error.argument not in given and error.because in given:
        dropped = from_recipe.pop(error.argument)
        default = inspect.signature(function).parameters.get(error.argument)
        if default is not None and default.default is not inspect.Parameter.empty:
            values[error.argument] = default.default
        else:
            values.pop(error.argument, None)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"[cmt] {phase}: recipe {name}'s {error.argument}={dropped} does not apply to the given "
                  f"{error.because} {given[error.because]}: left out", flush=True)
        return
    if error.argument in given and error.because in from_recipe:
        raise ArgumentError(error.argument, f"{error.message} (recipe {name} sets {error.because} "
                                            f"{from_recipe[error.because]})") from None
    raise error
