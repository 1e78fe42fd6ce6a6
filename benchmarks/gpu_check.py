"""The CUDA paths of the pipeline, end to end, with their figures (run by benchmarks/gpu_check.sh).

1. bf16 mid-training (mixed_precision="bf16", the trainer's autocast) on the built-in MNIST teacher's
   trajectories;
2. fp32 post-training (ECT from that mid checkpoint; the default precision: float32, TF32 as the
   guard chooses: off at CMT's fixed gap);
3. the precision guard: the ECT residual at CMT's fixed gap against bf16 / fp16 rounding and
   against TF32's (emulated as the guard measures it, and TF32 itself on the GPU, stages 9 and 11),
   the loss under TF32 against float32, the objective under autocast equal to float32, and half
   precision refused by post_train;
4. EDM2 fp16 weights (use_fp16=True, as the official pickles): the U-Net's fp16 forward against
   float32, and the post-training student built from such a teacher in float32;
5. MeanFlow's JVP under the chosen precision: the loss under bf16 autocast equal to float32, and a
   short MeanFlow run.

Without CUDA every part runs on the CPU where it can (small sizes) and the CUDA-only figures are
reported as skipped. Prints one line per figure; exit status 1 if a check fails.
"""
import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from cmt.builders.build import build_trajectories
from cmt.checkpoint import load_network, save_network
from cmt.edm import broadcast_sigma, sample_lognormal_sigmas
from cmt.errors import ArgumentError
from cmt.networks import build_network
from cmt.teachers import resolve_teacher
from cmt.trainers.distances import make_distance
from cmt.trainers.loop import Context
from cmt.trainers.run_files import read_log
from cmt.trainers.mid import mid_train
from cmt.trainers import precision
from cmt.trainers.ect import ECT, consistency_training_loss, ect_target_sigma
from cmt.trainers.methods import MethodSetup
from cmt.trainers.meanflow import meanflow_loss
from cmt.trainers.post import post_train
from cmt.trainers.students import build_student, consistency_output, student_config

FAILURES = []


def figure(name, value, note=""):
    print(f"{name:<58} {value}{'  ' + note if note else ''}", flush=True)


def check(name, ok, detail=""):
    figure(name, "ok" if ok else "FAILED", detail)
    if not ok:
        FAILURES.append(name)


def skipped(name, why="no CUDA"):
    figure(name, f"skipped ({why})")


def context(device, seed=0):
    return Context(step=0, max_steps=1, generator=torch.Generator(device).manual_seed(seed), device=torch.device(device),
                   accelerator=None)


def mnist_batch(device, n):
    from cmt.datasets import resolve_data
    data = resolve_data("mnist")
    x, labels = data.sample(n, torch.Generator().manual_seed(0))
    return {"data": x.to(device), "label": labels.to(device)}


def residual_rounding(net, batch, device, dtype):
    """Median over samples of |rounding error of the residual| / |residual| at stage 11."""
    x = batch["data"]
    labels = torch.nn.functional.one_hot(batch["label"], net.label_dim).float() if net.label_dim else None
    generator = torch.Generator(device).manual_seed(1)
    t = sample_lognormal_sigmas(len(x), -1.1, 2.0, generator=generator, device=device)
    r = ect_target_sigma(t, 11)
    noise = torch.randn(x.shape, generator=generator, device=device)
    x_t, x_r = x + broadcast_sigma(t, x) * noise, x + broadcast_sigma(r, x) * noise
    with torch.no_grad():
        exact = consistency_output(net, net, x_t, t, labels) - consistency_output(net, net, x_r, r, labels)
        with torch.autocast(torch.device(device).type, dtype=dtype):
            rounded = (consistency_output(net, net, x_t, t, labels).float()
                       - consistency_output(net, net, x_r, r, labels).float())
    error = (rounded - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1).clamp(min=1e-20)
    return float(error.median())


def seconds_per_step(out):
    records = read_log(out)
    return records[-1].get("sec_per_step") if records else None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: 200 GPU, 4 CPU)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    steps = args.steps or (200 if cuda else 4)
    out = Path(args.out or tempfile.mkdtemp(prefix="cmt-gpu-check-"))
    figure("device", torch.cuda.get_device_name(0) if cuda else "cpu (no CUDA)")
    figure("torch", torch.__version__)
    figure("work folder", str(out))
    fast = dict(progress=False, num_samples=64, log_every=max(steps // 4, 1), ckpt_every=10 ** 6)

    # 1. bf16 mid-training ---------------------------------------------------------------------
    started = time.time()
    build_trajectories(teacher="mnist", out=out / "shards", nfe=16, num_trajectories=512 if cuda else 32,
                       batch_size=256, shard_size=256, progress=False, log=lambda message: None)
    figure("build: 16-step trajectories of the mnist teacher, s", f"{time.time() - started:.1f}")
    if cuda:
        mid = mid_train(data=out / "shards", out=out / "mid", recipe="mnist", max_steps=steps, mixed_precision="bf16",
                        workers=2, **fast)
        run = json.loads((out / "mid" / "run.json").read_text())
        check("mid (bf16 autocast): finite loss", all(torch.isfinite(torch.tensor(r["loss"])) for r in read_log(out / "mid")))
        figure("mid (bf16): mixed_precision recorded", run["train"]["mixed_precision"])
        figure("mid (bf16): s/step at batch 128", f"{seconds_per_step(out / 'mid'):.4f}")
        figure("mid (bf16): FD-MNIST 1/2-step (64 samples; noisy)",
               f"{mid['metrics'].get('fd_mnist_1step', float('nan')):.1f} / "
               f"{mid['metrics'].get('fd_mnist_2step', float('nan')):.1f}")
    else:
        skipped("mid (bf16 autocast on CUDA)")
        mid = mid_train(data=out / "shards", out=out / "mid", recipe="mnist", max_steps=steps, batch_size=32,
                        workers=0, **fast)
        figure("mid (CPU, float32): steps run", steps)

    # 2. fp32 post-training --------------------------------------------------------------------
    post = post_train(init=mid["checkpoint"], method="ect", data="mnist", out=out / "post", max_steps=steps,
                      **({} if cuda else {"batch_size": 32}), **fast)
    run = json.loads((out / "post" / "run.json").read_text())
    checkpoint = torch.load(post["checkpoint"], weights_only=True, map_location="cpu")
    check("post: default precision is float32 ('no')", run["train"]["mixed_precision"] == "no")
    check("post: fixed CMT gap from the mid checkpoint (stage 11)", checkpoint["stage"] == 11)
    figure("post: TF32 choice at the stage-11 gap", f"{'on' if run['tf32']['enabled'] else 'off'}",
           run["tf32"]["reason"])
    if cuda:
        check("post: TF32 off at CMT's fixed gap (auto)", not run["tf32"]["enabled"]
              and not torch.backends.cuda.matmul.allow_tf32)
        figure("post (fp32, TF32 as chosen): s/step at batch 128", f"{seconds_per_step(out / 'post'):.4f}")
    figure("post: FD-MNIST 1/2-step (64 samples; noisy)",
           f"{post['metrics'].get('fd_mnist_1step', float('nan')):.1f} / "
           f"{post['metrics'].get('fd_mnist_2step', float('nan')):.1f}")

    # 3. the precision guard -------------------------------------------------------------------
    teacher, _ = resolve_teacher("mnist", device=device)
    student = build_student(student_config(teacher.config, sigma_min=0.002), teacher.state_dict()).to(device)
    batch = mnist_batch(device, 256)
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        if dtype == torch.float16 and not cuda:
            skipped("guard: fp16 rounding / residual (median)", "CPU autocast has no fp16")
            continue
        figure(f"guard: {name} rounding / residual at stage 11 (median)",
               f"{residual_rounding(student, batch, device, dtype):.2f}", "(> 1: half precision trains on noise)")
    for stage in (9, 11):   # the TF32 guard: its CPU emulation, and TF32 itself on the GPU
        options = {**ECT.defaults(), "stage": stage, "stage_every": 100}
        probe = ECT.probe(MethodSetup(options=options, student=student, teacher=None, max_steps=100), batch,
                          torch.Generator(device).manual_seed(1))
        emulated = precision.rounding_ratio(student, *probe[:-1], precision.MANTISSA_BITS["tf32"])
        figure(f"guard: TF32 rounding / residual at stage {stage} (emulated)", f"{emulated:.2f}",
               f"(>= {precision.TF32_LIMIT:g}: TF32 off)")
        if cuda:
            x, sigma, labels, residual = probe[:-1]
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            with torch.no_grad():
                exact = consistency_output(student, student, x, sigma, labels).float()
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
                rounded = consistency_output(student, student, x, sigma, labels).float()
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            measured = float(((rounded - exact).flatten(1).norm(dim=1)
                              / residual.flatten(1).norm(dim=1).clamp(min=1e-20)).median())
            figure(f"guard: TF32 rounding / residual at stage {stage} (this GPU)", f"{measured:.2f}")
        else:
            skipped(f"guard: TF32 rounding / residual at stage {stage} (this GPU)")
    distance = make_distance("huber", student.data_shape, huber_c=0.0)
    if cuda:   # the ECT loss at the fixed gap: TF32 against float32
        losses = {}
        for enabled in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
            losses[enabled], _ = consistency_training_loss(copy.deepcopy(student), batch, context(device, 3),
                                                           distance=distance, stage=11)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        figure("guard: ECT loss at stage 11, |TF32 - float32| / float32 (median)",
               f"{float(((losses[True] - losses[False]).abs() / losses[False].abs().clamp(min=1e-12)).median()):.3f}")
    else:
        skipped("guard: ECT loss at stage 11, TF32 against float32")
    # EDM2 networks normalise their weights in place at each objective call, and the loss at this gap
    # feels that rounding (~1e-3): compare two copies of the same weights.
    reference, _ = consistency_training_loss(copy.deepcopy(student), batch, context(device, 3), distance=distance,
                                             stage=11)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        guarded, _ = consistency_training_loss(copy.deepcopy(student), batch, context(device, 3), distance=distance,
                                               stage=11)
    difference = float(((guarded - reference).abs() / reference.abs().clamp(min=1e-12)).max().detach())
    check("guard: ECT loss under bf16 autocast == float32", difference < 1e-4, f"max rel diff {difference:.2e}")
    try:
        post_train(init=mid["checkpoint"], method="ect", data="mnist", out=out / "refused", mixed_precision="bf16",
                   max_steps=1, progress=False)
        check("guard: post_train(mixed_precision='bf16') refused", False)
    except ArgumentError as error:
        check("guard: post_train(mixed_precision='bf16') refused", error.argument == "mixed_precision",
              error.message[:60] + "...")

    # 4. EDM2 fp16 weights ---------------------------------------------------------------------
    fp16_config = dict(teacher.config, use_fp16=True)
    fp16_teacher = build_network(fp16_config)
    fp16_teacher.load_state_dict(teacher.state_dict())
    path = save_network(out / "teacher-fp16.safetensors", fp16_teacher)
    if cuda:
        fp16_teacher = fp16_teacher.to(device).eval()
        x = torch.randn(256, *teacher.data_shape, device=device)
        sigma = torch.full((256,), 1.0, device=device)
        labels = torch.eye(10, device=device)[torch.arange(256, device=device) % 10]
        with torch.no_grad():
            half, full = fp16_teacher(x, sigma, labels), teacher.eval()(x, sigma, labels)
        figure("edm2 fp16 weights: |D_fp16 - D_fp32| / |D_fp32|",
               f"{float((half - full).norm() / full.norm()):.2e}")
    else:
        skipped("edm2 fp16 forward (fp16 runs on CUDA only)")
    post_train(init="teacher", teacher=str(path), method="ect", data="mnist", out=out / "post-fp16", max_steps=1,
               batch_size=32 if not cuda else 128, progress=False, num_samples=16)
    check("edm2 fp16 teacher: post-training student is float32",
          load_network(out / "post-fp16" / "post.pt").config["use_fp16"] is False)

    # 5. MeanFlow's JVP under the chosen precision ---------------------------------------------
    flow = build_student(student_config(teacher.config, flow_map=True), teacher.state_dict()).to(device)
    reference, _ = meanflow_loss(copy.deepcopy(flow), batch, context(device, 4))
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        guarded, _ = meanflow_loss(copy.deepcopy(flow), batch, context(device, 4))
    difference = float(((guarded - reference).abs() / reference.abs().clamp(min=1e-12)).max().detach())
    check("meanflow: loss (JVP) under bf16 autocast == float32", difference < 1e-4, f"max rel diff {difference:.2e}")
    mf = post_train(init="teacher", teacher="mnist", method="meanflow", data="mnist", out=out / "meanflow",
                    max_steps=steps, cfg_omega=1.0, cfg_kappa=0.5, label_dropout=0.1,
                    **({} if cuda else {"batch_size": 32}), **fast)
    check("meanflow (float32, CFG): finite loss",
          all(torch.isfinite(torch.tensor(r["loss"])) for r in read_log(out / "meanflow")))
    if cuda:
        figure("meanflow (float32 + TF32, CFG): s/step at batch 128", f"{seconds_per_step(out / 'meanflow'):.4f}")
    figure("meanflow: FD-MNIST 1/2-step (64 samples; noisy)",
           f"{mf['metrics'].get('fd_mnist_1step', float('nan')):.1f} / "
           f"{mf['metrics'].get('fd_mnist_2step', float('nan')):.1f}")

    figure("result", "FAILED: " + ", ".join(FAILURES) if FAILURES else "all checks passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    raise SystemExit(main())
