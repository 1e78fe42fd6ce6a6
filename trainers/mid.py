"""CMT mid-training (phase 2b): regress a student from teacher-trajectory states onto fixed targets.

The targets were computed once by `cmt-build` (the teacher's ODE solve, stored in shards), so a
training step is one student forward and backward, with no teacher in the loop.

- `target="endpoint"` (CMT-CM): `d(f(x_i, sigma_i), x_end)` with the consistency parametrisation
  of the student's family (`students.consistency_student`: `sigma_min = SIGMA_MIN`, so f(x, sigma_min)
  = x; EDM networks become sony/cmt's ECMPrecond, boundary at 0.003 in eval mode).
- `target="flowmap"` (CMT-MF): for two states i, j of one trajectory (sigma_i > sigma_j), the
  student's average velocity from t_i to t_j regresses onto the secant `(z_i - z_j) / (t_i - t_j)`,
  in linear-interpolation time `t = sigma / (1 + sigma)`, `z = x / (1 + sigma)` (docs/design.md,
  "Flow maps"); summed squared error, as the official code. A share of each batch (`velocity_share`)
  trains the diagonal r = t instead: u(z_i, t_i, t_i) onto the teacher's own velocity at the stored
  state, one teacher forward per such row. Pairs alone leave u(z, t, t) untrained, and MeanFlow's
  post-training spends most of its batch there (r = t share 0.75), which moved the toy's CMT
  weights away from the flow map (docs/claim.md, "Why MeanFlow from CMT degraded on the toy, and the fix").
"""
import functools
import json

import torch

from cmt.datasets.shards import ShardReader, auto_workers, local_processes, state_choices
from cmt.edm import SIGMA_MAX, SIGMA_MIN, TWO_STEP_SIGMA, broadcast_sigma, sigma_to_t, x_to_z
from cmt.elatentlpips import augment_ops
from cmt.errors import ArgumentError
from cmt.guidance import apply_guidance
from cmt.manifest import TrajectoryDataset, check_verify
from cmt.options import checked_keywords, document_keywords
from cmt.sampling import student_sampler
from cmt.teachers import teacher_label_dropout
from cmt.trainers import identity as identities, loop, precision, recipes, run_files
from cmt.trainers.config import (TRAIN_DEFAULTS, TRAIN_HEADING, TRAIN_HELP, check_choice, micro_batch_size,
                                 train_config)
from cmt.trainers.distances import DISTANCES, make_distance, squared_l2
from cmt.trainers.students import (REPORT_HELP, STUDENT_INITS, average_velocity, build_student, check_report_options,
                                   consistency_output, consistency_student, network_labels, plain_network,
                                   recipe_teacher_errors, recorded_teacher_spec, refuse_inapplicable,
                                   resolve_teacher_or_fail, sampling_report, save_student, student_config,
                                   student_learning_rate, student_result, teacher_velocity)


def secant_velocity(x_i, sigma_i, x_j, sigma_j):
    """`(z_i - z_j) / (t_i - t_j)`: the average velocity between two states of one trajectory."""
    z_i, z_j = x_to_z(x_i, sigma_i), x_to_z(x_j, sigma_j)
    gap = sigma_to_t(sigma_i) - sigma_to_t(sigma_j)
    return (z_i - z_j) / broadcast_sigma(gap, z_i)


def endpoint_loss(net, batch, ctx, *, distance):
    """CMT-CM: `d(f(x_i, sigma_i), x_end)` per sample."""
    plain = plain_network(net, ctx)
    labels = network_labels(plain, batch.get("label"))
    prediction = consistency_output(net, plain, batch["state"], batch["sigma"], labels)
    return distance(prediction, batch["endpoint"].to(prediction.dtype))


def flowmap_loss(net, batch, ctx, *, distance=squared_l2, clean_sigma=SIGMA_MIN, teacher=None, velocity_share=0.0):
    """CMT-MF: `d(u(z_i, t_i, t_j), (z_i - z_j) / (t_i - t_j))` per sample (a batch of state pairs).

    Later states at `sigma <= clean_sigma` (the solver's endpoint at sigma_min) count as clean data,
    t = 0, as the endpoint target does: the student learns the jump that 1-step sampling asks for.
    The first `velocity_share` of the rows (the reader shuffles them) regress u(z_i, t_i, t_i) onto
    `teacher_velocity` at their first state instead (`teacher`: the denoiser the build solved with).
    """
    plain = plain_network(net, ctx)
    labels = network_labels(plain, batch.get("label"))
    x_i, sigma_i = batch["state"], batch["sigma"]
    x_j, sigma_j = batch["target_state"], batch["target_sigma"]
    if not bool((sigma_i > sigma_j).all()):
        raise ValueError("flow-map mid-training pairs need sigma > target_sigma (the first state noisier)")
    sigma_j = torch.where(sigma_j <= clean_sigma, torch.zeros_like(sigma_j), sigma_j)
    target = secant_velocity(x_i, sigma_i, x_j, sigma_j)
    diagonal = int(x_i.shape[0] * velocity_share)
    if diagonal:
        sigma_j = torch.cat([sigma_i[:diagonal], sigma_j[diagonal:]])
        teacher_labels = None if labels is None else labels[:diagonal]
        target = torch.cat([teacher_velocity(teacher, x_i[:diagonal], sigma_i[:diagonal], teacher_labels).to(target.dtype),
                            target[diagonal:]])
    velocity = average_velocity(net, x_to_z(x_i, sigma_i), sigma_to_t(sigma_i), sigma_to_t(sigma_j), labels)
    return distance(velocity, target.to(velocity.dtype))


OBJECTIVES = {"endpoint": endpoint_loss, "flowmap": flowmap_loss}
# The trainer options whose defaults differ from TRAIN_DEFAULTS in this phase.
MID_DEFAULTS = {"max_steps": 2000, "batch_size": 128, "lr": None}
# The diagonal's share of a flow-map batch: 0.25 kept the toy's CMT weights under MeanFlow (2-step
# 1.04x / 1.06x / 0.88x after 250 steps over 3 seeds, against 2.29x with none; 0.5: 1.16x on seed 0;
# docs/claim.md). This project's measurement: the official CMT code trains no MeanFlow.
FLOWMAP_VELOCITY_SHARE = 0.25
# Reader settings that change no batch (left out of the options a resumed run must repeat).
READER_ONLY = ("cache_gb", "verify")


# ---- mid_train --------------------------------------------------------------------------------

def load_mid_teacher(manifest, teacher, need_weights, need_denoiser=False):
    """`(config, state_dict or None, identity, denoiser or None)` of the teacher that shapes (and
    starts) the student; `denoiser`: the frozen network the build solved with, guided as it records."""
    recorded = manifest.get("teacher") or {}
    spec = teacher or recorded_teacher_spec(recorded)
    if spec is None:
        if need_weights or need_denoiser or "config" not in recorded:
            raise ArgumentError("teacher", "the dataset manifest names no teacher file; name one")
        return recorded["config"], None, recorded, None
    if not (need_weights or need_denoiser) and teacher is None and "config" in recorded:
        return recorded["config"], None, recorded, None
    hint = "" if teacher else " (the teacher recorded in the dataset manifest; name another copy to use it)"
    net, identity = resolve_teacher_or_fail(spec, "teacher", hint)
    if teacher is None and recorded.get("sha256") and identity.get("sha256") != recorded["sha256"]:
        raise ArgumentError("teacher", f"{spec} is not the teacher the dataset was built with (sha256 differs); "
                                       "name it explicitly to use it anyway")
    denoiser = recorded_denoiser(net, identity, manifest.get("guidance")) if need_denoiser else None
    return net.config, net.state_dict(), identity, denoiser


def recorded_denoiser(net, identity, guidance):
    """`net` frozen, guided as the manifest's `guidance` record says (`cmt.guidance.apply_guidance`,
    the builder's own; the guide file must match the record)."""
    if guidance:
        recorded = guidance.get("guide") or {}
        guide = guide_identity = None
        if recorded.get("path"):
            guide, guide_identity = resolve_teacher_or_fail(recorded["path"], "teacher",
                                                            " (the guide the dataset manifest records)")
            if recorded.get("sha256") and guide_identity.get("sha256") != recorded["sha256"]:
                raise ArgumentError("teacher", f"the guide network {recorded['path']} is not the one the dataset "
                                               "was built with (sha256 differs)")
        net, _ = apply_guidance(net, guidance["weight"], guide, guide_identity, teacher_label_dropout(identity, net))
    return net.eval().requires_grad_(False)


def check_agreement(manifest, net, data):
    """The trajectories must fit the student: one clear error before training if they do not."""
    shape, label_dim = tuple(manifest.get("data_shape", ())), int(manifest.get("label_dim", 0))
    if shape != tuple(net.data_shape) or label_dim != net.label_dim:
        raise ArgumentError(
            "data", f"{data} holds states of shape {shape} with {label_dim} classes, but the student "
                    f"({net.config['architecture']}) takes shape {tuple(net.data_shape)} with {net.label_dim} "
                    "classes; build the dataset with this teacher or name the matching teacher")


def states_per_trajectory_count(value):
    """'all', or a positive count (an int, or its text as a command line gives it)."""
    if value == "all":
        return value
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = 0
    if count < 1 or count != float(value):
        raise ArgumentError("states_per_trajectory", f"'all' or a positive integer, got {value!r}")
    return count


def reader_workers(workers, config, num_processes):
    """The reader processes per rank: `workers`, or for "auto" the resumed run's count (run.json;
    the data stream depends on it) or `auto_workers` of this machine."""
    if workers != "auto":
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ArgumentError("workers", f"'auto' or a count >= 0, got {workers!r}")
        return workers
    if config.resume:
        try:
            recorded = json.loads((config.out / run_files.RUN_FILE).read_text()).get("options", {}).get("workers")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded >= 0:
            return recorded
    return auto_workers(local_processes(num_processes))


def cache_bytes_per_reader(cache_gb, workers):
    """`cache_gb` (GiB per rank, shared by its reader processes) as ShardReader's `cache_bytes`;
    None: the reader's default (a share of the machine's memory)."""
    if cache_gb is None:
        return None
    if isinstance(cache_gb, bool) or not isinstance(cache_gb, (int, float)) or not cache_gb >= 0:
        raise ArgumentError("cache_gb", f"must be >= 0 (0: no cache; None: from the machine's memory), got {cache_gb!r}")
    return int(cache_gb * 2**30) // max(1, workers)


def check_batch_fits(config, dataset, states_per_trajectory, pairs, data):
    """batch_size at most the samples of one epoch of the set (a larger batch repeats samples within
    itself, and one far above it spends step 1 reading the set over and over): an ArgumentError
    naming it and the set's count before anything is made."""
    per_trajectory = state_choices(len(dataset.manifest["kept_states"]), pairs, exclude_endpoint=not pairs)
    if states_per_trajectory != "all":
        per_trajectory = min(per_trajectory, states_per_trajectory)
    epoch = len(dataset) * per_trajectory
    if config.batch_size > epoch:
        raise ArgumentError("batch_size", f"{config.batch_size} is more than one epoch of {data}: {len(dataset)} "
                                          f"trajectories x {per_trajectory} {'state pairs' if pairs else 'states'} = "
                                          f"{epoch} samples; give at most {epoch} (or build more trajectories)")


def check_velocity_rows(velocity_share, micro_batch, default):
    """A flow-map batch's diagonal rows are int(micro-batch x velocity_share): a share that gives none
    (below 1 / micro-batch) is refused rather than train no velocity row without a word."""
    if velocity_share and int(micro_batch * velocity_share) == 0:
        given = f"the default {velocity_share}" if default else f"{velocity_share}"
        raise ArgumentError("velocity_share", f"{given} of a micro-batch of {micro_batch} rows is "
                                              f"{micro_batch * velocity_share:.3g} rows, so none would train the "
                                              f"velocity: give at least {1 / micro_batch:.4g} (1 row), or 0 for "
                                              "pairs only (or a larger batch_size)")


def builtin_teacher_recipe(given):
    """The implicit recipe of a mid-training run: the built-in teacher's (mnist, toy), if the dataset
    manifest names one and no other teacher is given."""
    if given.get("teacher") is not None:
        return recipes.builtin_recipe(str(given["teacher"]))
    try:
        recorded = TrajectoryDataset(given["data"]).manifest.get("teacher") or {}
    except (KeyError, ValueError, OSError):
        return None   # mid_train names the fault itself
    return recipes.builtin_recipe(recorded.get("name")) if recorded.get("kind") == "builtin" else None


def dataset_names_a_teacher(given):
    """Whether the dataset's manifest names the teacher it was built with (then a recipe's official
    teacher is not filled in: the student comes from the teacher of its trajectories)."""
    try:
        recorded = TrajectoryDataset(given["data"]).manifest.get("teacher") or {}
    except (KeyError, ValueError, OSError):
        return True   # mid_train names the fault itself
    return recorded_teacher_spec(recorded) is not None


# What each keyword of `mid_train` means: its docstring and `cmt-train mid --help`
# (`cmt.options.document_keywords`); the shared trainer options are `TRAIN_HELP`'s.
MID_HELP = {
    "data": "A cmt-build trajectory dataset (folder or fsspec URL).",
    "out": TRAIN_HELP["out"],
    "target": "endpoint: CMT-CM, jump to the trajectory's endpoint; flowmap: CMT-MF, average velocity to a later "
              "state of the trajectory.",
    "loss": f"The distance to the target, one of {', '.join(DISTANCES)}. The official CMT runs use lpips on pixel "
            "data and elatentlpips (E-LatentLPIPS, SD-VAE latents) on ImageNet-512; flowmap takes l2 (the official "
            "code's) or huber.",
    "huber_c": "Pseudo-Huber constant [default: 0.00054 sqrt(dim)].",
    "lpips_resize": "Upsample images to this side before LPIPS [default: their own size].",
    "elatentlpips_augment": "Pair augmentation of --loss elatentlpips, letters of b (flip, 90-degree turns, integer "
                            "shifts), g (scale, rotation, anisotropy, fractional shifts), c (brightness, contrast, "
                            "saturation), n (noise), o (cutout); none: off [default: bg, the elatentlpips package's; "
                            "the imagenet512 recipe: bgcno].",
    "teacher": "Teacher name or checkpoint giving the student's architecture and initial weights [default: the one "
               "recorded in the dataset manifest, else the recipe's official teacher].",
    "student_init": "teacher (its weights) or random.",
    "velocity_share": "flowmap: share of each batch that trains the diagonal u(z, t, t) onto the teacher's velocity at "
                      "the stored state (one teacher forward per such row, in float32; the teacher recorded, guided "
                      f"as recorded); 0: pairs only [default: {FLOWMAP_VELOCITY_SHARE}].",
    "states_per_trajectory": "States (flowmap: state pairs) drawn per trajectory and epoch: all, or K.",
    "max_trajectories": "Train on the first N trajectories of the set only (by index) [default: all].",
    "dropout": "Student dropout [default: the teacher's].",
    "workers": "Shard reader processes per rank; auto: 2 when each rank has 4 cores or more, else 0, where they only "
               "add inter-process copies (cmt.datasets.shards.auto_workers; on --resume: the run's own count).",
    "cache_gb": "GiB of decoded shards each rank keeps in memory, shared by its reader processes; 0: read from "
                "storage every epoch [default: a quarter of the machine's memory over its reader processes].",
    "verify": "How the reader checks shards: the sha256 at each reader process's first read of a shard, then once: "
              "the files' sizes on re-reads; crc32c: sizes and crc32c; sha256: the sha256 on every read.",
    "eval_data": "Data set whose built-in metric scores 1- and 2-step samples (toy:NAME, mnist) [default: the "
                 "teacher's built-in name, if any].",
    **REPORT_HELP,
    "recipe": recipes.recipe_help("mid"),
    "resolved_options": "(Filled in by the recipe layer) what run.json and mid.pt record.",
}


@document_keywords(MID_HELP, (TRAIN_HEADING, TRAIN_HELP, {**TRAIN_DEFAULTS, **MID_DEFAULTS}))
@checked_keywords
@recipes.with_recipe("mid", default_recipe=builtin_teacher_recipe, names_a_teacher=dataset_names_a_teacher)
def mid_train(*, data, out, target="endpoint", loss="l2", huber_c=None, lpips_resize=None,
              elatentlpips_augment=None, teacher=None,
              student_init="teacher", velocity_share=None, states_per_trajectory="all", max_trajectories=None,
              dropout=None, workers="auto", cache_gb=None, verify="once", eval_data=None, num_samples=1000,
              mid_sigma=TWO_STEP_SIGMA, recipe=None, resolved_options=None, **train_options):
    """CMT mid-training: regress a student onto the stored teacher trajectories -> `out/mid.pt`.
    lr=None takes the student's network family's mid-training rate (`cmt.networks.learning_rates("mid")`).

    Returns `{"out", "checkpoint" (mid.pt), "model" (mid.safetensors), "log", "state": Path,
    "metrics": the last logged scalars}`.
    """
    check_choice("target", target, OBJECTIVES)
    check_choice("loss", loss, DISTANCES)
    check_choice("student_init", student_init, STUDENT_INITS)
    states_per_trajectory = states_per_trajectory_count(states_per_trajectory)
    if workers != "auto":
        reader_workers(workers, None, 1)   # a bad count fails before anything is read or made
    cache_bytes_per_reader(cache_gb, 1)
    check_verify(verify)
    if max_trajectories is not None and (isinstance(max_trajectories, bool) or not isinstance(max_trajectories, int)
                                         or max_trajectories < 1):
        raise ArgumentError("max_trajectories", f"must be a positive integer, got {max_trajectories!r}")
    try:
        dataset = TrajectoryDataset(data, max_trajectories=max_trajectories)
    except (ValueError, FileNotFoundError, OSError) as error:
        raise ArgumentError("data", str(error)) from None
    manifest = dataset.manifest
    if max_trajectories is not None and max_trajectories > manifest["count"]:
        raise ArgumentError("max_trajectories", f"{data} holds {manifest['count']} trajectories, fewer than "
                                                f"{max_trajectories}")
    default_share = velocity_share is None
    if target != "flowmap":
        refuse_inapplicable(mid_train, locals(), ("velocity_share",), f"to target {target} (only to flowmap)", "target")
    elif velocity_share is None:
        velocity_share = FLOWMAP_VELOCITY_SHARE
    elif isinstance(velocity_share, bool) or not isinstance(velocity_share, (int, float)) or not 0 <= velocity_share < 1:
        raise ArgumentError("velocity_share", f"must be a number in [0, 1), got {velocity_share!r}")
    if loss != "huber":
        refuse_inapplicable(mid_train, locals(), ("huber_c",), f"to loss {loss} (only to huber)", "loss")
    if loss != "lpips":
        refuse_inapplicable(mid_train, locals(), ("lpips_resize",), f"to loss {loss} (only to lpips)", "loss")
    if loss != "elatentlpips":
        refuse_inapplicable(mid_train, locals(), ("elatentlpips_augment",), f"to loss {loss} (only to elatentlpips)",
                            "loss")
    else:
        try:
            augment_ops(elatentlpips_augment)
        except ValueError as error:
            raise ArgumentError("elatentlpips_augment", str(error)) from None
    dataset.check_shards_present()
    with recipe_teacher_errors(resolved_options):
        teacher_config, teacher_state, identity, denoiser = load_mid_teacher(
            manifest, teacher, student_init == "teacher", need_denoiser=bool(velocity_share))
    config = train_config(out, MID_DEFAULTS, train_options, default_lr=student_learning_rate(teacher_config, "mid"))
    flow_map = target == "flowmap"
    init_state = teacher_state if student_init == "teacher" else None   # the velocity rows may load it anyway
    # The endpoint target's student is its family's consistency form (EDM: sony/cmt's ECMPrecond); the
    # flowmap target's, the teacher's network with the zero-initialised target_sigma input. A flow-map
    # teacher's (a set built by a flow-map student's jumps) weights need that input: its endpoint
    # student keeps it, in the boundary form at SIGMA_MIN, and jumps to 0 (a consistency model).
    if flow_map or teacher_config.get("flow_map"):
        network = student_config(teacher_config, flow_map=True, sigma_min=0.0 if flow_map else SIGMA_MIN,
                                 dropout=dropout)
    else:
        network = student_config(teacher_config, dropout=dropout, form=consistency_student)
    student = build_student(network, init_state, source=f"teacher {identity.get('path', identity.get('name'))}",
                            seed=config.seed)
    check_agreement(manifest, student, data)
    if flow_map and loss in ("lpips", "elatentlpips"):
        raise ArgumentError("loss", "flowmap regresses velocities: use l2 or huber")
    try:
        distance = make_distance(loss, student.data_shape, huber_c=huber_c, lpips_resize=lpips_resize,
                                 elatentlpips_augment=elatentlpips_augment, encoder=identity.get("encoder"))
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as error:
        raise ArgumentError("loss", str(error)) from None
    if eval_data is None and identity.get("kind") == "builtin":
        eval_data = identity.get("name")
    check_report_options(student, eval_data=eval_data, mid_sigma=mid_sigma,
                         sigma_max=float(manifest.get("sigma_max", SIGMA_MAX)))
    check_batch_fits(config, dataset, states_per_trajectory, flow_map, data)
    if flow_map:
        check_velocity_rows(velocity_share, micro_batch_size(config), default_share)
    trainer = loop.Trainer(config)
    # sony/cmt's pixel mid-training runs without TF32 (cmt_training_loop.py enable_tf32=False); its
    # ImageNet-512 recipe turns it on (tf32="on")
    trainer.set_tf32(precision.fixed_choice(config.tf32, "sony/cmt's mid-training runs without it (--tf32 on: "
                                                         "its ImageNet-512 run's setting)"))
    workers = reader_workers(workers, config, trainer.num_processes)
    cache_bytes = cache_bytes_per_reader(cache_gb, workers)
    # The endpoint target never feeds the endpoint state itself (its loss is 0 by the boundary
    # condition): the official 16 states (sony/cmt loss.py trains on Traj[:-1]).
    batches = ShardReader(dataset, trainer.micro_batch_size, seed=trainer.shared_seed_for(0), pairs=flow_map,
                          states_per_trajectory=states_per_trajectory, rank=trainer.rank,
                          world_size=trainer.num_processes, num_workers=workers, exclude_endpoint=not flow_map,
                          cache_bytes=cache_bytes, verify=verify, dtype=None)   # stored dtype; the loop upcasts on the device
    if resolved_options is not None:   # what the run records: the worker count used (resume needs it)
        resolved_options = {**resolved_options, "options": {**resolved_options["options"], "workers": workers}}
    sampler = student_sampler("flowmap" if flow_map else "consistency", mid_sigma=mid_sigma,
                              sigma_max=float(manifest.get("sigma_max", SIGMA_MAX)))
    info = {"phase": "mid", "target": target, "loss": loss, "velocity_share": velocity_share, "data": str(data),
            "teacher": identity, "sampler": sampler,
            "guidance": manifest.get("guidance"), **(resolved_options or {"recipe": recipe}),
            # a latent teacher's VAE and scaling (SiT, EDM2 img512): what decodes the student's samples
            **({"encoder": identity["encoder"]} if identity.get("encoder") else {})}
    # The cache and the checks change no batch: a resumed run may set others (and runs saved before
    # them had none).
    run_options = {"recipe": recipe, **(resolved_options or run_files.phase_options(mid_train, locals()))}
    run_options = {key: value for key, value in run_options.items() if key not in READER_ONLY}
    if isinstance(run_options.get("options"), dict):
        run_options["options"] = {key: value for key, value in run_options["options"].items()
                                  if key not in READER_ONLY}

    def sample_fn(ema, step, out):
        return sampling_report(ema, out, step, sampler=sampler["kind"], eval_data=eval_data, num_samples=num_samples,
                               mid_sigma=mid_sigma, encoder=identity.get("encoder"),
                               sigma_max=float(manifest.get("sigma_max", SIGMA_MAX)), progress=config.progress)

    settings = {}
    if flow_map:
        settings = {"clean_sigma": float(manifest.get("sigma_min", SIGMA_MIN)), "velocity_share": velocity_share,
                    "teacher": None if denoiser is None else denoiser.to(trainer.device)}
    trainer.fit(student, functools.partial(OBJECTIVES[target], distance=distance, **settings), batches,
                sample_fn=sample_fn,
                save_final=lambda ema, net, out: save_student(out, "mid", ema, net, info),
                run_info={**info, "student": student.config, "student_init": student_init,
                          "states_per_trajectory": states_per_trajectory, "trajectories": len(dataset)},
                run_options=run_options, inputs=identities.input_identities(dataset, teacher=identity))
    return student_result(config.out, "mid")
