"""Post-training (phase 3): online consistency / flow-map training, started from mid-trained weights.

The methods are a table (`METHODS`; each one module: `cmt.trainers.ect` for ECT and ECD,
`cmt.trainers.meanflow` for MeanFlow, their contract in `cmt.trainers.methods`). `post_train` does
what every method shares: the init and its student, the data, the frozen teacher a method asks
for, the precision, the run and its report; it names no method.
"""
import dataclasses

import torch

from cmt.checkpoint import network_record
from cmt.edm import TWO_STEP_SIGMA
from cmt.errors import ArgumentError, InapplicableOption
from cmt.options import checked_keywords, document_keywords
from cmt.sampling import native_time, student_sampler
from cmt.teachers import BUILTIN_TEACHERS, resolve_teacher
from cmt.trainers import identity as identities, loop, precision, recipes
from cmt.trainers.config import TRAIN_DEFAULTS, TRAIN_HEADING, TRAIN_HELP, check_choice, train_config
from cmt.trainers.data import (PRETRAINING_ARCHITECTURES, STREAM_HELP, STUDENT_ARCHITECTURES, check_arch, check_batch_fits, check_data_fits,
                               check_stream_options, data_batches, default_arch, network_for, training_data)
from cmt.trainers.ect import ECD, ECT
from cmt.trainers.meanflow import MEANFLOW
from cmt.trainers.methods import MethodSetup
from cmt.trainers.students import (REPORT_HELP, build_student, check_report_options, recipe_teacher_errors,
                                   recorded_teacher_spec, resolve_teacher_or_fail, sampling_report, save_student,
                                   student_config, student_learning_rate, student_result)

# The post-training methods, one line each (`cmt.trainers.methods.PostMethod`).
METHODS = {method.name: method for method in (ECT, ECD, MEANFLOW)}
# The trainer options whose defaults differ from TRAIN_DEFAULTS in this phase.
POST_DEFAULTS = {"max_steps": 2000, "batch_size": 128, "lr": None}


# ---- the method and its options ---------------------------------------------------------------

def method_of(name):
    check_choice("method", name, METHODS)
    return METHODS[name]


def method_options(method, options):
    """`(the method's options resolved and checked, the trainer options)` of `post_train`'s
    keyword arguments: another method's option is an ArgumentError naming it, an unknown one a
    TypeError (as for any keyword)."""
    own = {name: option.check(name, options.pop(name)) if name in options else option.default
           for name, option in method.options.items()}
    others = {name: [other.name for other in METHODS.values() if name in other.options] for name in options}
    for name, owners in others.items():
        if owners:
            raise InapplicableOption(name, f"does not apply to method {method.name} (only to {', '.join(owners)}) "
                                           f"(got {options[name]!r}); leave it out", "method")
    unknown = sorted(set(options) - set(TRAIN_DEFAULTS))
    if unknown:
        raise TypeError(f"post_train() got unexpected keyword argument{'s' * (len(unknown) > 1)}: {', '.join(unknown)}")
    return own, options


def post_precision(mixed_precision, method):
    """Post-training's precision: float32 (TF32 as `tf32_for` decides) for 'auto'; a half
    precision asked for explicitly is refused, since the loss path would not use it."""
    if mixed_precision == "auto":
        return "no"
    if mixed_precision in ("bf16", "fp16"):
        raise ArgumentError("mixed_precision", f"{method.name} post-training runs its loss path in float32: the "
                                               f"residual {method.residual} is far below {mixed_precision}'s rounding "
                                               "error; use 'no' or 'auto' (float32; TF32 is --tf32's)")
    return mixed_precision


# ---- the init, its student and its teacher ----------------------------------------------------

def loaded_init(init):
    """`(network, identity)` of an init that names a network (a checkpoint or a built-in name)."""
    return resolve_teacher_or_fail(init, "init")


def tf32_for(method, setup, data, setting, trainer):
    """The run's TF32 choice (`cmt.trainers.precision`), set, and said on rank 0: measured with the
    method's probe on a batch of the data on CUDA, on for a method whose loss has no small residual."""
    if trainer.device.type != "cuda":
        choice = precision.TF32Choice(setting, False, "a CPU run (TF32 is CUDA's)")
    elif method.probe is None:
        choice = precision.fixed_choice(setting, "") if setting != "auto" else \
            precision.TF32Choice(setting, True, f"{method.name}'s loss resolves no small residual")
    else:
        def measure():
            generator = torch.Generator().manual_seed(trainer.config.seed)
            images, labels = data.sample(precision.PROBE_ROWS, generator)
            batch = {"data": images.to(trainer.device), "label": labels.to(trainer.device)}
            probe = method.probe(dataclasses.replace(setup, student=setup.student.to(trainer.device)), batch,
                                 torch.Generator(trainer.device).manual_seed(trainer.config.seed))
            return precision.rounding_ratio(setup.student, *probe[:-1], precision.MANTISSA_BITS["tf32"]), probe[-1]
        choice = precision.measured_choice(setting, measure)
    return trainer.set_tf32(choice)


def builtin_teacher_recipe(given):
    """The implicit recipe of a post-training run: the built-in teacher's (mnist, toy) when the
    teacher (given, or recorded in `init`) is built in. (Inside the recipe layer's
    `reading_once` block: the init is read here once, and `post_train` builds from that read.)"""
    teacher = given.get("teacher")
    if teacher is None:
        init = str(given.get("init"))
        if init in BUILTIN_TEACHERS:
            teacher = init
        elif init not in ("random", "teacher"):
            try:
                net, _ = loaded_init(init)
            except ArgumentError:
                return None   # post_train names the fault itself
            recorded = network_record(net).get("teacher")
            teacher = recorded_teacher_spec(recorded) if recorded else None
    return recipes.builtin_recipe(str(teacher)) if teacher is not None else None


def init_names_a_teacher(given):
    """Whether `init` names a teacher by itself (`load_init` finds one: recorded in it, or the init is a
    diffusion model); if not, an explicit recipe's official teacher is filled in."""
    init = str(given.get("init"))
    if init in ("teacher", "random"):
        return False
    if init in BUILTIN_TEACHERS:
        return True
    try:
        net, _ = loaded_init(init)
    except ArgumentError:
        return True   # post_train names the fault itself
    return bool(network_record(net).get("teacher")) or not (net.sigma_min or net.flow_map)


def teacher_guidance_of(guidance, guide_ckpt, init_record):
    """The frozen teacher's guidance `(weight, guide)`: as given ("none": unguided), or with
    guidance='manifest' the one the mid checkpoint records from its dataset manifest."""
    if guidance == "none":
        return None, None
    if guidance != "manifest":
        try:
            return (None if guidance is None else float(guidance)), guide_ckpt
        except ValueError:
            raise ArgumentError("guidance", f"a weight (EDM2 uses about 1.4 to 2.5) or 'manifest', got {guidance!r}") \
                from None
    record = init_record.get("guidance")
    if "guidance" not in init_record:
        raise ArgumentError("guidance", "'manifest' takes the guidance recorded in a mid checkpoint's dataset "
                                        "manifest; --init records none")
    if record is None:
        return None, guide_ckpt
    guide = (record.get("guide") or {}).get("path")
    return float(record["weight"]), guide_ckpt if guide_ckpt is not None else guide


def frozen_teacher(teacher, guidance, guide_ckpt, init_record, student, needed_by):
    """`(denoiser, guidance record, identity)`: the frozen teacher a method asked for
    (`PostMethod.teacher`), guided as asked (`teacher_guidance_of`), checked against the student."""
    if teacher is None:
        raise ArgumentError("teacher", f"{needed_by} needs a diffusion teacher: name one")
    weight, guide = teacher_guidance_of(guidance, guide_ckpt, init_record)
    try:
        net, identity = resolve_teacher(teacher, guidance=weight, guide_ckpt=guide)
    except ArgumentError:
        raise
    except (ValueError, OSError) as error:
        raise ArgumentError("teacher", str(error)) from None
    if tuple(net.data_shape) != tuple(student.data_shape) or net.label_dim != student.label_dim:
        raise ArgumentError("teacher", f"{teacher} does not take the student's data (shape "
                                       f"{tuple(student.data_shape)}, {student.label_dim} classes)")
    return net.eval().requires_grad_(False), identity.get("guidance"), identity


def load_init(init, teacher, data, arch):
    """`(config, state_dict or None, identity, teacher, record)` of the network post-training starts
    from; `teacher` is the given teacher spec, else the one recorded in `init`, else `init` itself
    when it is a plain diffusion model; `record`: what the init's file records (`network_record`).

    init: a checkpoint (mid.pt, ...) or built-in name; "teacher" (the teacher's weights); "random"
    (the teacher's architecture, or the diffusion phase's default network of `arch` for `data`).
    """
    if init == "random":
        if teacher is not None:
            net, identity = resolve_teacher_or_fail(teacher, "teacher")
            return net.config, None, {"kind": "random", "like": identity}, teacher, {}
        return network_for(data, arch).config, None, {"kind": "random"}, None, {}
    if init == "teacher":
        if teacher is None:
            raise ArgumentError("teacher", "init 'teacher' starts from the teacher: name one (a built-in name or "
                                           "a checkpoint)")
        net, identity = resolve_teacher_or_fail(teacher, "teacher")
        return net.config, net.state_dict(), identity, teacher, network_record(net)
    net, identity = loaded_init(init)
    record = network_record(net)
    if teacher is None:
        if record.get("teacher"):
            teacher = recorded_teacher_spec(record["teacher"])
        elif not (net.sigma_min or net.flow_map):
            teacher = init
    return net.config, net.state_dict(), identity, teacher, record


# ---- post_train -------------------------------------------------------------------------------

# What each keyword of `post_train` means: its docstring and `cmt-train post --help`
# (`cmt.options.document_keywords`); the shared trainer options are `TRAIN_HELP`'s, the methods' own
# their tables' (`cmt.trainers.methods.PostMethod.options`).
POST_HELP = {
    "init": "mid.pt (or another checkpoint of ours, a built-in teacher name, or an official MeanFlow-port .pt: a SiT "
            "flow-map student), 'teacher' (the --teacher weights) or 'random'. Required unless --recipe names it "
            "(imagenet256-meanflow: random).",
    "method": "; ".join(f"{method.name}: {method.summary.rstrip('.')}" for method in METHODS.values())
              + ". Required, unless --recipe has one method (imagenet256-meanflow).",
    "data": "mnist, toy:NAME, an image folder / .npz / EDM .zip, or a cmt-encode latent set.",
    "out": TRAIN_HELP["out"],
    "teacher": "Diffusion teacher (name or checkpoint): the frozen teacher a method asks for (ECD's solver, MeanFlow's "
               "--velocity teacher), and what 'teacher' / 'random' inits copy [default: the teacher recorded in "
               "--init, else the init itself when it is a diffusion model, else the recipe's official teacher: "
               "cifar10, ffhq64, afhq64 name EDM's].",
    "arch": "--init random without --teacher: the diffusion command's default network of this kind, or a SiT / DiT "
            f"of this size ({STUDENT_ARCHITECTURES[len(PRETRAINING_ARCHITECTURES)]} ... {STUDENT_ARCHITECTURES[-1]}) "
            "for the data's shape and classes.",
    "guidance": "Guide the frozen teacher of ECD or of MeanFlow's --velocity teacher with this weight (autoguidance "
                "with --guide-ckpt, else classifier-free; cmt.guidance.apply_guidance); 'manifest': the guidance "
                "recorded in --init's dataset manifest; 'none': unguided [default: MeanFlow's --velocity teacher "
                "follows the manifest (the flow map mid-training fitted), ECD unguided].",
    "guide_ckpt": "The guide network of --guidance (EDM2's autoguidance: a smaller or less trained model; an "
                  "unconditional model: classifier-free guidance against it).",
    "dropout": "Student dropout [default: the init's].",
    "dropout_res": "EDM2 students: dropout only in the blocks at feature resolutions up to this one (ECT's ImageNet-64 "
                   "presets: 16) [default: everywhere].",
    "resolution": "Resize images [default: the student's; another is refused].",
    **STREAM_HELP,
    "eval_data": "Data set whose built-in metric scores samples [default: --data if built in].",
    **REPORT_HELP,
    "recipe": recipes.recipe_help("post"),
    "resolved_options": "(Filled in by the recipe layer) what run.json and post.pt record.",
}


@document_keywords(POST_HELP, (TRAIN_HEADING, TRAIN_HELP, {**TRAIN_DEFAULTS, **POST_DEFAULTS}),
                   *((f"The {method.name} method's own options ({method.summary.rstrip('.')})",
                      {name: option.help for name, option in method.options.items()},
                      {name: option.default for name, option in method.options.items()}) for method in METHODS.values()))
@checked_keywords
@recipes.with_recipe("post", default_recipe=builtin_teacher_recipe, method_names=lambda: list(METHODS),
                     names_a_teacher=init_names_a_teacher)
def post_train(*, init=None, method=None, data, out, teacher=None, arch=None, guidance=None, guide_ckpt=None,
               dropout=None, dropout_res=None, resolution=None, xflip=None, workers="auto", eval_data=None,
               num_samples=1000,
               mid_sigma=TWO_STEP_SIGMA, recipe=None,
               resolved_options=None, **options):
    """Post-train a student with a post-training method (`METHODS`: ECT, ECD, MeanFlow) -> `out/post.pt`
    (1- and 2-step sampling).

    Precision: the loss path runs in float32; mixed_precision 'auto' means that, and bf16 / fp16 are
    refused (`cmt.trainers.students.full_precision`); TF32 is `tf32`'s ('auto': measured against the
    method's residual at the run's gap, `cmt.trainers.precision`). `options`: the method's own
    options (below) and the shared trainer options; lr=None takes the student's network family's
    post-training rate (`cmt.networks.learning_rates("post")`).

    Returns `{"out", "checkpoint" (post.pt), "model" (post.safetensors), "log", "state": Path,
    "metrics": the last logged scalars}`.
    """
    if init is None:
        raise ArgumentError("init", "name one: a checkpoint (mid.pt, ...), a built-in teacher name, 'teacher' or "
                                    "'random' (a recipe may name it: imagenet256-meanflow starts from random weights)")
    init, teacher = str(init), None if teacher is None else str(teacher)   # names or paths, as recorded
    chosen = method_of(method)
    own, train_options = method_options(chosen, dict(options))
    if arch is not None:
        check_arch(arch, STUDENT_ARCHITECTURES)
    data_spec = data
    check_stream_options(xflip, workers)
    data = training_data(data_spec, resolution)
    arch = arch or default_arch(data)
    with recipe_teacher_errors(resolved_options):
        init_config, init_state, identity, teacher, init_record = load_init(init, teacher, data, arch)
    train_options["mixed_precision"] = post_precision(train_options.get("mixed_precision", "auto"), chosen)
    # The network the student copies: the teacher's (init 'teacher' / 'random' with a teacher), else the init's.
    source = "teacher" if init in ("teacher", "random") and teacher is not None else "init"
    config = train_config(out, POST_DEFAULTS, train_options,
                               default_lr=student_learning_rate(init_config, "post", argument=source))
    prepared = chosen.prepare(own, init_record, config.max_steps)
    network = student_config(init_config, dropout=dropout, dropout_res=dropout_res, form=chosen.student,
                             argument=source)
    if network.get("use_fp16"):
        network["use_fp16"] = False   # EDM2's fp16 U-Net (official pickles): the student trains in float32
    student = build_student(network, init_state, source=f"init {init}", seed=config.seed)
    if len(student.data_shape) == 3 and data.kind == "images":
        side = student.data_shape[-1]
        if resolution is not None and resolution != side:
            raise ArgumentError("resolution", f"{resolution}: the student ({init_config['architecture']}, from "
                                              f"{teacher if source == 'teacher' else init}) takes {side}x{side} "
                                              f"images; leave it out to bring {data.name} to that size")
        if resolution is None:
            data = training_data(data_spec, side)
    check_data_fits(data, student)
    chosen.check(prepared, student)
    needed_by = chosen.teacher(prepared)
    if needed_by is None and (guidance is not None or guide_ckpt is not None):
        raise ArgumentError("guidance" if guidance is not None else "guide_ckpt",
                            f"guides the frozen teacher of a method that asks for one (ECD, MeanFlow's velocity "
                            f"'teacher'); method {chosen.name} with these options uses none")
    teacher_net = guidance_record = teacher_identity = None
    if needed_by is not None:
        with recipe_teacher_errors(resolved_options):
            if guidance is None and chosen.follows_guidance and init_record.get("guidance"):
                guidance = "manifest"   # the flow map mid-training fitted is the guided teacher's
            teacher_net, guidance_record, teacher_identity = frozen_teacher(teacher, guidance, guide_ckpt, init_record,
                                                                            student, needed_by)
    # A flow-map student with its own time (SiT) is sampled as MeanFlow samples, in t from t = 1.
    time = "t" if chosen.sampler == "flowmap" and native_time(student) else "sigma"
    if eval_data is None and (data.kind == "toy" or data.name == "mnist"):
        eval_data = data.name
    check_report_options(student, eval_data=eval_data, mid_sigma=mid_sigma)
    sampler = student_sampler(chosen.sampler, mid_sigma=mid_sigma, time=time)
    setup = MethodSetup(options=prepared, student=student, teacher=teacher_net, max_steps=config.max_steps,
                        sampler=sampler)
    objective = chosen.build(setup)
    info = {"phase": "post", "method": chosen.name, "init": str(init), "init_identity": identity, "teacher": teacher,
            "data": data.name, **chosen.record(prepared), "teacher_guidance": guidance_record, "sampler": sampler,
            **(resolved_options or {"recipe": recipe}),
            **({"encoder": data.encoder} if data.encoder else {})}   # a latent set's VAE: decodes samples
    check_batch_fits(data, config.batch_size)
    trainer = loop.Trainer(config)
    tf32_for(chosen, setup, data, config.tf32, trainer)
    if teacher_net is not None:
        teacher_net.to(trainer.device)  # the frozen teacher the method asked for; fit() moves the student

    def sample_fn(ema, step, out):
        return sampling_report(ema, out, step, sampler=sampler["kind"], eval_data=eval_data, num_samples=num_samples,
                               mid_sigma=mid_sigma, progress=config.progress, time=time,
                               encoder=data.encoder or init_record.get("encoder"))

    run_options = {"recipe": recipe, **(resolved_options or {"options": {}})}
    # (the DataLoader workers change no batch: a resumed run may use another count)
    run_options["options"] = {**{key: value for key, value in run_options.get("options", {}).items() if key != "workers"},
                              **recipes.recorded_options(own)}
    # What the method resolved from the init and the run's length (ECT: its curriculum's pace, which a
    # longer max_steps would change).
    run_options.update(recipes.recorded_options({f"resolved_{name}": value for name, value in prepared.items()
                                                 if value != own[name]}))
    trainer.fit(student, objective, data_batches(data, trainer.micro_batch_size, trainer.seed_for(0), workers=workers,
                                                 xflip=xflip),
                sample_fn=sample_fn, save_final=lambda ema, net, out: save_student(out, "post", ema, net, info),
                run_info={**info, "student": student.config}, run_options=run_options,
                inputs=identities.input_identities(data, init=identity, teacher=teacher_identity))
    return student_result(config.out, "post")
