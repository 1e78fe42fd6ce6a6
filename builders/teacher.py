"""The teacher of a build: what the builder needs of it (`Teacher`), how a named one is loaded and
guided (`load_teacher`), and the official teacher and targets of a recipe (`recipe_teacher`,
`RECIPE_TARGETS`)."""

import torch

from cmt.errors import ArgumentError
from cmt.teachers import RECIPE_TEACHERS, resolve_teacher, teacher_label_dropout


class Teacher:
    """What the builder needs of a teacher: `denoiser(x, sigma, labels_one_hot)`, shapes, identity.

    identity: JSON-able description stored in the manifest (`name`, `path`, `sha256`, `config`...);
    everything but `path` is part of the build configuration, as is `guidance` (the record
    `cmt.guidance.apply_guidance` returns with the denoiser: None when unguided). A denoiser with
    `flow_map` True is a flow-map teacher (`denoiser(x, sigma, labels, target_sigma=...)`), built with
    solver "flowmap"; its identity then says `"flow_map": True`.
    """

    def __init__(self, denoiser, data_shape, label_dim, identity, dtype=torch.float32, device="cpu", guidance=None,
                 label_dropout=None):
        self.denoiser = denoiser
        self.label_dropout = label_dropout   # its share of label-free training (None: unknown), for labels "none"
        self.flow_map = bool(getattr(denoiser, "flow_map", False))
        self.guidance = guidance
        self.data_shape = tuple(data_shape)
        self.label_dim = int(label_dim)
        self.identity = dict(identity)
        self.dtype = dtype
        self.device = torch.device(device)


# What the recipes build (sony/cmt training/loss.py DPMSolverLoss, the official mid-training targets:
# DPM-Solver++ of order 3, multistep (training/dpm_solver.py sample(order=3)), on logSNR time steps from
# T = 80 to t_0 = 0.002, --nfe=16 in run_cmt_{cifar,ffhq,afhq}.sh): build_trajectories' defaults.
RECIPE_TARGETS = dict(solver="dpm++3m", nfe=16, grid="logsnr", sigma_max=80.0, sigma_min=0.002)


def recipe_teacher(recipe, teacher, settings, log):
    """The teacher of a build: `teacher`, else the official one of `recipe` (`cmt.teachers.RECIPE_TEACHERS`).
    With a recipe, one line to `log` (None: silent) says what it set and which of the solver
    `settings` differ from its `RECIPE_TARGETS`."""
    if recipe is None:
        if teacher is None:
            raise ArgumentError("teacher", "give a checkpoint path, a built-in name, 'edm2' / 'edm' with teacher_ckpt, "
                                           f"a preset, or a recipe ({', '.join(RECIPE_TEACHERS)}) whose teacher to use")
        return teacher
    if recipe not in RECIPE_TEACHERS:
        raise ArgumentError("recipe", f"{recipe!r} is not one of {', '.join(RECIPE_TEACHERS)}")
    filled = f"from the recipe: teacher={RECIPE_TEACHERS[recipe]}" if teacher is None else "the teacher given"
    differs = [f"{name}={settings[name]} (the recipe's {value})" for name, value in RECIPE_TARGETS.items()
               if settings[name] is not None and settings[name] != value]   # solver None: dpm++3m
    if log is not None:
        log(f"[cmt] build: recipe {recipe}; {filled}; solver " + (", ".join(differs) if differs else
            "dpm++3m, 16 steps, logsnr grid 80 -> 0.002 (sony/cmt's mid-training targets)"))
    return RECIPE_TEACHERS[recipe] if teacher is None else teacher


def load_teacher(teacher, teacher_ckpt=None, guidance=None, guide_ckpt=None, device="cpu"):
    """The `Teacher` the builder needs for a teacher named as `cmt-build --teacher` takes it, guided
    as `cmt.guidance.apply_guidance` does it (through `resolve_teacher`); errors name the keyword at
    fault (teacher, teacher_ckpt, guidance, guide_ckpt)."""
    if teacher is None or not str(teacher):
        raise ArgumentError("teacher", "give a checkpoint path, a built-in name, 'edm2' with teacher_ckpt, or a preset")
    try:
        net, identity = resolve_teacher(str(teacher), ckpt=teacher_ckpt, device=device, guidance=guidance,
                                        guide_ckpt=guide_ckpt)
    except ArgumentError as error:
        if error.argument in ("guidance", "guide_ckpt"):
            raise
        raise ArgumentError(_teacher_argument(teacher, teacher_ckpt), error.message) from None
    except (ValueError, OSError) as error:
        raise ArgumentError(_teacher_argument(teacher, teacher_ckpt), str(error)) from None
    net.requires_grad_(False)
    identity = dict(identity)
    if getattr(net, "flow_map", False):
        identity["flow_map"] = True   # a flow-map teacher: built by its own jumps (solver flowmap)
    record = identity.pop("guidance", None)
    return Teacher(net, net.data_shape, net.label_dim, identity, dtype=next(net.parameters()).dtype, device=device,
                   guidance=record, label_dropout=teacher_label_dropout(identity, net))


def _teacher_argument(teacher, teacher_ckpt):
    """Which keyword a teacher that cannot be loaded is named by: 'edm2' and 'edm' need their checkpoint."""
    return "teacher_ckpt" if teacher_ckpt is not None or str(teacher) in ("edm2", "edm") else "teacher"
