"""SiT / MeanFlow students through the pipeline (issue 25): sampling in MeanFlow's time t from t = 1,
the native average velocity in MeanFlow's objective, students of SiT teachers (mid-training, ECT,
ECD, MeanFlow) and of MeanFlow-port checkpoints, the imagenet256-meanflow recipe from random weights
on a latent set and cmt-sample of its student, flow-map teachers in the builder, SiT's guidance in a
build, and the refusals of bad input."""
import io
import json
import math
import warnings
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import FIXTURES, MLP, context, invoke_command
from dinov2_formula import formula_weights

import cmt
from cmt.builders.build import build_trajectories
from cmt.checkpoint import load_network, save_network
from cmt.cli.build import main as build_main
from cmt.cli.evaluate import main as eval_main
from cmt.cli.sample import main as sample_main
from cmt.cli.train import main as train_main
from cmt.edm import sigma_grid, t_to_sigma, z_to_x
from cmt.errors import ArgumentError
from cmt.guidance import apply_guidance, classifier_free_guidance
from cmt.manifest import TrajectoryDataset
from cmt.networks import build_network
from cmt.networks.sit import SIT_CFG_CHANNELS, SIT_PRESETS, SiT
from cmt.sampling import (flow_map_sample_in_t, generate, recorded_sampler, sampled_t_max, seed_noise,
                          student_sampler)
from cmt.solvers import flow_map_step, sample_trajectory
from cmt.teachers import resolve_teacher
from cmt.trainers import students as students_module
from cmt.trainers.meanflow import MF_T_MAX, meanflow_loss
from cmt.trainers.students import average_velocity

TINY = dict(depth=2, hidden_size=32, num_heads=2)
CLASSES, SIDE = 3, 32          # 32 px images -> 4 x 4 x 4 latents (the SD VAE's 8x down)
SHAPE = (4, 4, 4)
QUIET = dict(progress=False, num_samples=4, log_every=1)


@pytest.fixture(autouse=True)
def tiny_sizes(monkeypatch):
    """Tiny sizes beside SiT's own, so students of a named size train in a second."""
    monkeypatch.setitem(SIT_PRESETS, "sit-t/2", dict(TINY, patch_size=2))
    monkeypatch.setitem(SIT_PRESETS, "sit-t/8", dict(TINY, patch_size=8))


def random_sit(seed, **options):
    """A tiny SiT with random weights everywhere (no zero layer: every input, r included, matters)."""
    torch.manual_seed(seed)
    net = SiT(**{**dict(data_shape=SHAPE, label_dim=CLASSES, patch_size=2, **TINY), **options})
    with torch.no_grad():
        for value in net.state_dict().values():
            if value.dtype.is_floating_point and not value.any():
                value.normal_(0, 0.1)
    return net.eval()


def one_hot(labels):
    return torch.nn.functional.one_hot(torch.as_tensor(labels), CLASSES).float()


# ---- sampling in MeanFlow's time -----------------------------------------------------------------

def test_a_meanflow_student_samples_in_t_from_pure_noise(tmp_path):
    net = random_sit(0, flow_map=True, time_convention="meanflow")
    noise = seed_noise([3, 4], SHAPE)
    labels = one_hot([0, 2])
    with torch.no_grad():
        one = flow_map_sample_in_t(net, noise, [1.0, 0.0], labels)
        two = flow_map_sample_in_t(net, noise, [1.0, 0.5, 0.0], labels)
        # MeanFlow's rule by hand: z_0 = z_1 - u(z_1, 1, 0); 2 steps through t = 0.5
        assert torch.equal(one, noise - net.average_velocity(noise, 1.0, 0.0, labels))
        half = noise - 0.5 * net.average_velocity(noise, 1.0, 0.5, labels)
        assert torch.equal(two, half - 0.5 * net.average_velocity(half, 0.5, 0.0, labels))
        assert torch.isfinite(one).all() and not torch.allclose(one, two)
        # generate with a student's t record: the same, sample by sample from its seed
        record = student_sampler("flowmap", mid_sigma=1.0, time="t")
        assert record == {"kind": "flowmap", "time": "t", "t_max": 1.0, "mid_sigma": 1.0, "mid_t": 0.5}
        for steps, expected in ((1, one), (2, two)):
            got = generate(net, [3, 4], torch.tensor([0, 2]), sampler="flowmap", steps=steps, mid_sigma=1.0,
                           time="t", t_max=record["t_max"])
            assert torch.equal(got, expected)
    # sigma-space records keep their form; the t_max a student's training must cover
    assert student_sampler("flowmap") == {"kind": "flowmap", "mid_sigma": 0.821, "sigma_max": 80.0}
    assert sampled_t_max(student_sampler("flowmap")) == MF_T_MAX and sampled_t_max(record) == 1.0
    with pytest.raises(ArgumentError, match="sampler: sampling in MeanFlow's time t needs a flow-map network"):
        generate(random_sit(1), [0], torch.tensor([0]), sampler="flowmap", steps=1, time="t")
    with pytest.raises(ValueError, match="'t' for flow maps only"):
        student_sampler("consistency", time="t")
    # A MeanFlow-port checkpoint records nothing: it is sampled as MeanFlow samples, in t.
    assert recorded_sampler(net) == record
    assert recorded_sampler(random_sit(2)) is None   # a SiT teacher: its ODE


def test_the_native_average_velocity_is_the_round_trip_through_sigma(monkeypatch):
    """students.average_velocity dispatches to SiT's own u (no sigma round trip); both agree to float32
    rounding, and MeanFlow's objective gives the same loss either way. At t = 1 only the native one
    exists (sigma = inf)."""
    net = random_sit(3, flow_map=True)
    generator = torch.Generator().manual_seed(4)
    z = torch.randn(4, *SHAPE, generator=generator)
    t, r, labels = torch.tensor([0.9, 0.6, 0.3, 0.05]), torch.tensor([0.2, 0.6, 0.0, 0.01]), one_hot([0, 1, 2, 0])
    with torch.no_grad():
        native = average_velocity(net, z, t, r, labels)
        round_trip = (z - net(z_to_x(z, t), t_to_sigma(t), labels, target_sigma=t_to_sigma(r))) / t[:, None, None, None]
        assert torch.equal(native, net.average_velocity(z, t, r, labels))
        assert ((native - round_trip).abs().max() / native.abs().max()) < 1e-5
        assert torch.isfinite(average_velocity(net, z, torch.ones(4), r, labels)).all()
    batch = {"data": torch.randn(8, *SHAPE, generator=generator), "label": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])}
    options = dict(cfg_omega=1.0, cfg_kappa=0.5, label_dropout=0.25)
    loss, _ = meanflow_loss(net, batch, context(seed=5), **options)
    monkeypatch.setattr(students_module, "native_time", lambda net: False)   # force the round trip
    slow, _ = meanflow_loss(net, batch, context(seed=5), **options)
    assert torch.allclose(loss, slow, rtol=1e-4, atol=1e-6)


# ---- students on a latent set -----------------------------------------------------------------------

def png(seed):
    array = np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, "png")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """A latent set as MeanFlow's recipe wants it (cmt-encode --scaling sd --flips) of 12 random 32 px
    images in 3 classes, through a tiny random SD-shaped VAE; and a tiny SiT teacher as SiT's train.py
    saves its checkpoints."""
    pytest.importorskip("diffusers")
    from cmt.builders.encode import encode_dataset
    from edm2_fixtures import save_tiny_vae
    root = tmp_path_factory.mktemp("sit-latents")
    with zipfile.ZipFile(root / "images.zip", "w") as archive:
        for i in range(12):
            archive.writestr(f"img{i:04d}.png", png(i))
        archive.writestr("dataset.json", json.dumps({"labels": [[f"img{i:04d}.png", i % CLASSES] for i in range(12)]}))
    vae = save_tiny_vae(root / "vae")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encode_dataset(source=root / "images.zip", out=root / "latents", vae=str(vae), scaling="sd", flips=True,
                       shard_size=6, batch_size=6, workers=0, progress=False, log=lambda line: None)
    teacher = root / "SiT-T-2.pt"
    torch.save({"ema": random_sit(6, learn_sigma=True).state_dict(), "model": {}}, teacher)
    return root


def test_imagenet256_meanflow_recipe_trains_a_sit_from_random_weights_and_cmt_sample_draws_it(latents, tmp_path):
    out = tmp_path / "mf"
    result = cmt.post_train(recipe="imagenet256-meanflow", arch="sit-t/2", data=str(latents / "latents"), out=out,
                            max_steps=2, batch_size=4, **QUIET)
    student = load_network(result["model"])
    config = student.config
    assert config["architecture"] == "sit" and config["depth"] == 2 and config["patch_size"] == 2
    assert config["flow_map"] and config["time_convention"] == "meanflow" and not config["learn_sigma"]
    assert config["data_shape"] == list(SHAPE) and config["label_dim"] == CLASSES
    record = student.record
    assert record["init"] == "random" and record["method"] == "meanflow" and record["recipe"]["name"] == \
        "imagenet256-meanflow"
    assert record["sampler"] == student_sampler("flowmap", mid_sigma=1.0, time="t")   # t = 1 -> 0.5 -> 0
    assert record["encoder"]["scaling"] == "sd"      # the latent set's VAE, which decodes the samples
    run = json.loads((out / "run.json").read_text())
    assert run["options"]["arch"] == "sit-t/2" and run["options"]["cfg_kappa"] == 0.5
    # cmt-sample: 2 jumps in t (the record's), decoded through the recorded VAE for the picture
    code, output = invoke_command(sample_main, "--ckpt", result["model"], "--num-samples", 3, "--seed", 7,
                                  "--labels", "cycle", "--out", tmp_path / "mf.png", "--npz", tmp_path / "mf.npz",
                                  "--no-progress")
    assert code == 0, output
    samples = torch.from_numpy(np.load(tmp_path / "mf.npz")["samples"])
    with torch.no_grad():
        expected = flow_map_sample_in_t(student, seed_noise([7, 8, 9], SHAPE), [1.0, 0.5, 0.0], one_hot([0, 1, 2]))
    torch.testing.assert_close(samples, expected, rtol=1e-5, atol=1e-5)
    assert PIL.Image.open(tmp_path / "mf.png").mode == "RGB"
    # cmt-eval: the latents decoded through the set's VAE, FD-DINOv2 against the images they were encoded
    # from (a tiny DINOv2-shaped network with formula weights).
    weights = tmp_path / "dinov2_tiny.pth"
    torch.save(formula_weights(json.loads((FIXTURES / "dinov2_tiny.json").read_text())["shapes"]), weights)
    code, output = invoke_command(eval_main, "--samples", tmp_path / "mf.npz", "--data", latents / "latents",
                                  "--fd-dinov2", "--dinov2", weights)
    assert code == 0 and "fd_dinov2" in output, output
    scored = cmt.evaluate(samples=tmp_path / "mf.npz", data=str(latents / "latents"), fd_dinov2=True, dinov2=str(weights))
    assert scored["count"] == 3 and math.isfinite(scored["metrics"]["fd_dinov2"]) and scored["metrics"]["fd_dinov2"] > 0
    code, output = invoke_command(sample_main, "--ckpt", result["model"], "--sigma-max", 10, "--out",
                                  tmp_path / "x.png", "--no-progress")
    assert code == 2 and "--sigma-max" in output and "MeanFlow's time" in output
    code, output = invoke_command(sample_main, "--ckpt", result["model"], "--sampler", "ode", "--out",
                                  tmp_path / "x.png", "--no-progress")
    assert code == 2 and "--sampler" in output and "sampled by its jumps" in output
    assert not (tmp_path / "x.png").exists()


@pytest.fixture(scope="module")
def sit_mids(latents, tmp_path_factory):
    """A SiT teacher given by the path of its official .pt: its trajectories and its mid-trained
    students of both targets."""
    root = tmp_path_factory.mktemp("sit-mids")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(SIT_PRESETS, "sit-t/2", dict(TINY, patch_size=2))
        built = build_trajectories(teacher=str(latents / "SiT-T-2.pt"), out=root / "shards", nfe=4, num_trajectories=8,
                                   batch_size=8, shard_size=8, progress=False, log=lambda line: None)
        mids = {target: cmt.mid_train(data=root / "shards", out=root / target, target=target, max_steps=1,
                                      batch_size=8, workers=0, **QUIET)["checkpoint"]
                for target in ("endpoint", "flowmap")}
    return json.loads(built["manifest"].read_text()), mids, root / "shards"


def test_mid_training_from_a_sit_teacher_and_from_a_meanflow_port(sit_mids, latents, tmp_path):
    manifest, mids, shards = sit_mids
    assert manifest["teacher"]["kind"] == "sit" and manifest["teacher"]["size"] == "sit-t/2"
    assert manifest["solver"] == "dpm++3m" and "flow_map" not in manifest["teacher"]
    for target, path in mids.items():
        student = load_network(path)
        assert student.config["time_convention"] == "sit" and student.flow_map == (target == "flowmap")
    assert recorded_sampler(load_network(mids["flowmap"])) == student_sampler("flowmap")   # trained from sigma 80
    drawn = cmt.sample(ckpt=mids["flowmap"], out=tmp_path / "mid.png", num_samples=2, vae=str(latents / "vae"),
                       progress=False)   # decoded through the teacher's VAE scaling (SiT's 0.18215), recorded
    assert drawn["identity"]["encoder"]["scale"] == [0.18215] * 4 and drawn["samples"].shape == (2, *SHAPE)
    # a MeanFlow-port checkpoint starts mid-training too (its r_embedder kept: an endpoint student jumps to 0)
    port = tmp_path / "port.pt"
    torch.save({"ema": random_sit(14, flow_map=True, time_convention="meanflow").state_dict()}, port)
    from_port = cmt.mid_train(data=shards, out=tmp_path / "from-port", teacher=str(port), max_steps=1, batch_size=8,
                              workers=0, **QUIET)
    student = load_network(from_port["model"])
    assert student.config["time_convention"] == "meanflow" and student.flow_map and student.sigma_min == 0.002


def test_post_training_students_of_a_sit_teacher(sit_mids, latents, tmp_path):
    """MeanFlow from the flow-map mid (then sampled in t), ECT from the teacher's weights, ECD with it."""
    _, mids, _ = sit_mids
    teacher, data = latents / "SiT-T-2.pt", str(latents / "latents")
    meanflow = cmt.post_train(init=mids["flowmap"], method="meanflow", data=data, out=tmp_path / "mf", max_steps=1,
                              batch_size=4, **QUIET)
    assert load_network(meanflow["model"]).record["sampler"]["time"] == "t"
    ect = cmt.post_train(init="teacher", teacher=str(teacher), method="ect", data=data, out=tmp_path / "ect",
                         max_steps=1, batch_size=4, **QUIET)
    ect_student = load_network(ect["model"])
    assert ect_student.sigma_min == 0.002 and ect_student.record["sampler"]["kind"] == "consistency"
    ecd = cmt.post_train(init=mids["endpoint"], method="ecd", data=data, out=tmp_path / "ecd", max_steps=1,
                         batch_size=4, **QUIET)   # the teacher the mid checkpoint records, by its path
    assert load_network(ecd["model"]).record["teacher"] == str(teacher)


def test_a_meanflow_port_checkpoint_is_an_init_by_its_path(latents, tmp_path):
    port = random_sit(7, flow_map=True, time_convention="meanflow")
    path = tmp_path / "0100000.pt"   # the port's train.py checkpoint
    torch.save({"model": port.state_dict(), "ema": port.state_dict(), "opt": {}}, path)
    net, identity = resolve_teacher(str(path))
    assert identity["kind"] == "sit" and identity["size"] == "sit-t/2" and net.flow_map
    assert identity["encoder"]["scale"] == [0.18125] * 4          # the port's own scaling (train.py)
    result = cmt.post_train(init=str(path), method="meanflow", data=str(latents / "latents"), out=tmp_path / "mf",
                            max_steps=1, batch_size=4, lr=1e-12, **QUIET)
    student = load_network(result["model"])
    assert student.config == port.config and student.record["sampler"]["time"] == "t"
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():   # started from the port's weights (a step of lr 1e-12 moves nothing visible)
        torch.testing.assert_close(student(x, 2.0, one_hot([0, 1]), target_sigma=0.5),
                                   port(x, 2.0, one_hot([0, 1]), target_sigma=0.5), rtol=1e-5, atol=1e-5)


# ---- flow-map teachers in the builder --------------------------------------------------------------

def random_flow_map_mlp(seed):
    torch.manual_seed(seed)
    net = build_network({**MLP, "flow_map": True})
    with torch.no_grad():
        for value in net.state_dict().values():   # the target gain starts at zero: make r matter
            if value.dtype.is_floating_point and not value.any():
                value.normal_(0, 0.3)
    return net.eval()


def test_a_flow_map_student_is_a_teacher_whose_trajectory_is_its_own_jumps(tmp_path):
    net = random_flow_map_mlp(9)
    path = save_network(tmp_path / "mf.safetensors", net, extra_config={"phase": "post", "method": "meanflow",
                                                                       "sampler": student_sampler("flowmap")})
    built = build_trajectories(teacher=str(path), out=tmp_path / "shards", nfe=4, num_trajectories=6, batch_size=3,
                               shard_size=6, dtype="float32", progress=False, log=lambda line: None)
    manifest = json.loads(built["manifest"].read_text())
    assert manifest["solver"] == "flowmap" and manifest["nfe"] == 4 and manifest["steps"] == 4
    assert manifest["teacher"]["flow_map"] is True and manifest["teacher"]["config"]["flow_map"] is True
    dataset = TrajectoryDataset(tmp_path / "shards")
    arrays = dataset.read_shard(dataset.shards[0])
    sigmas = sigma_grid("logsnr", 4).tolist()
    x = torch.from_numpy(arrays["noise"]) * sigmas[0]
    with torch.no_grad():
        for index, (sigma, next_sigma) in enumerate(zip(sigmas[:-1], sigmas[1:]), start=1):
            denoised = net(x, sigma, None, target_sigma=next_sigma)
            x = denoised + (next_sigma / sigma) * (x - denoised)   # the flow map's jump, by hand
            np.testing.assert_allclose(arrays["states"][:, index], x.numpy(), rtol=1e-5, atol=1e-5)
    # A diffusion teacher's ODE solvers do not take it, nor guidance; "flowmap" takes flow maps only.
    for options, argument in ((dict(solver="dpm++3m"), "solver"), (dict(guidance=2.0), "guidance")):
        with pytest.raises(ArgumentError) as error:
            build_trajectories(teacher=str(path), out=tmp_path / "refused", progress=False, **options)
        assert error.value.argument == argument
    diffusion = save_network(tmp_path / "teacher.safetensors", build_network(MLP))
    with pytest.raises(ArgumentError, match="solver: flowmap takes a flow-map teacher"):
        build_trajectories(teacher=str(diffusion), out=tmp_path / "refused", solver="flowmap", progress=False)
    assert not (tmp_path / "refused").exists()
    # Mid-training runs on the set: flow-map targets (its diagonal rows: the teacher's u(z, t, t)), and
    # the endpoint target (a consistency student keeping the teacher's target input, jumping to 0).
    for target, init in (("flowmap", "teacher"), ("endpoint", "teacher"), ("endpoint", "random")):
        out = tmp_path / f"{target}-{init}"
        result = cmt.mid_train(data=tmp_path / "shards", out=out, target=target, student_init=init, max_steps=2,
                               batch_size=8, workers=0, **QUIET)
        assert np.isfinite(result["metrics"]["loss"])
        student = load_network(result["model"])
        assert student.flow_map and student.record["sampler"]["kind"] == ("flowmap" if target == "flowmap" else
                                                                          "consistency")


def test_a_sit_meanflow_student_as_a_flow_map_teacher(tmp_path):
    net = random_sit(10, flow_map=True, time_convention="meanflow")
    path = save_network(tmp_path / "mf.safetensors", net)
    build_trajectories(teacher=str(path), out=tmp_path / "shards", nfe=2, grid="karras", num_trajectories=2,
                       batch_size=2, shard_size=2, dtype="float32", progress=False, log=lambda line: None)
    dataset = TrajectoryDataset(tmp_path / "shards")
    arrays = dataset.read_shard(dataset.shards[0])
    labels = one_hot(torch.from_numpy(arrays["label"]))
    sigmas = sigma_grid("karras", 2).tolist()   # ends at 0: the last jump is the consistency jump
    expected = sample_trajectory(lambda x, sigma, labels, **target: net(x, sigma, labels, **target),
                                 torch.from_numpy(arrays["noise"]), sigmas, solver="flowmap", labels=labels)
    np.testing.assert_allclose(arrays["states"], expected.states.transpose(0, 1).numpy(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        x = flow_map_step(net, torch.from_numpy(arrays["noise"]) * sigmas[0], sigmas[0], sigmas[1], labels)
    np.testing.assert_allclose(arrays["states"][:, 1], x.numpy(), rtol=1e-5, atol=1e-5)


# ---- SiT's classifier-free guidance in a build ------------------------------------------------------

def test_sit_guidance_guides_three_channels_as_sits_forward_with_cfg(tmp_path):
    teacher = random_sit(11)
    path = tmp_path / "SiT-T-2.pt"
    torch.save(teacher.state_dict(), path)
    guided, identity = resolve_teacher("sit-t/2", ckpt=path, guidance=4.0)
    assert identity["guidance"] == {"kind": "classifier_free", "weight": 4.0, "guide": None,
                                    "channels": SIT_CFG_CHANNELS}
    x, sigma, labels = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(12)) * 3, 2.0, one_hot([1, 2])
    reference = classifier_free_guidance(teacher, 4.0, channels=3)
    with torch.no_grad():
        assert torch.equal(guided(x, sigma, labels), reference(x, sigma, labels))
        # channel 3 keeps the conditional output; 0-2 are guided
        conditional = teacher(x, sigma, labels)
        assert torch.equal(guided(x, sigma, labels)[:, 3], conditional[:, 3])
        assert not torch.allclose(guided(x, sigma, labels)[:, :3], conditional[:, :3])
    assert apply_guidance(teacher, 4.0, label_dropout=0.1)[1]["channels"] == 3
    built = build_trajectories(teacher="sit-t/2", teacher_ckpt=str(path), guidance=4.0, solver="euler", nfe=3,
                               out=tmp_path / "shards", num_trajectories=3, batch_size=3, shard_size=3, dtype="float32",
                               progress=False, log=lambda line: None)
    assert json.loads(built["manifest"].read_text())["guidance"]["channels"] == 3
    dataset = TrajectoryDataset(tmp_path / "shards")
    arrays = dataset.read_shard(dataset.shards[0])
    expected = sample_trajectory(reference, torch.from_numpy(arrays["noise"]), sigma_grid("logsnr", 3),
                                 solver="euler", labels=one_hot(torch.from_numpy(arrays["label"])))
    np.testing.assert_allclose(arrays["states"], expected.states.transpose(0, 1).numpy(), rtol=1e-5, atol=1e-5)


# ---- bad input: one line naming the file or flag, exit 2, nothing written ------------------------------

def test_bad_sit_input_is_one_line_and_writes_nothing(latents, tmp_path):
    sit = tmp_path / "sit.pt"
    torch.save(random_sit(13).state_dict(), sit)
    cases = [
        # a SiT checkpoint passed as an EDM / EDM2 teacher
        ((build_main, "--teacher", "edm", "--teacher-ckpt", sit), "--teacher-ckpt", "sit.pt: an official SiT"),
        ((build_main, "--teacher", "edm2", "--teacher-ckpt", sit), "--teacher-ckpt", "sit.pt: an official SiT"),
        # names and shapes that do not fit the chosen size
        ((build_main, "--teacher", "sit-t/8", "--teacher-ckpt", sit), "--teacher-ckpt",
         "sit.pt: holds a SiT of depth 2, hidden size 32, patch 2; sit-t/8 has"),
        # a flow-map teacher is sampled by its jumps only
        ((build_main, "--teacher", sit, "--solver", "flowmap"), "--solver", "flowmap takes a flow-map teacher"),
    ]
    for (command, *args), flag, message in cases:
        code, output = invoke_command(command, *args, "--out", tmp_path / "out", "--no-progress")
        assert code == 2 and flag in output and message in " ".join(output.split()), output
        assert "Traceback" not in output
    # a patch size that does not divide the latents (4 x 4): refused before anything is written
    code, output = invoke_command(train_main, "post", "--recipe", "imagenet256-meanflow", "--arch", "sit-b/8",
                                  "--data", latents / "latents", "--out", tmp_path / "out", "--no-progress")
    assert code == 2 and "--arch" in output and "divisible by its patch size 8" in output, output
    with pytest.raises(ArgumentError, match="arch: .*needs square latents"):
        cmt.post_train(init="random", method="meanflow", arch="sit-t/8", data=str(latents / "latents"),
                       out=tmp_path / "out")
    with pytest.raises(ArgumentError, match="init: name one"):
        cmt.post_train(method="meanflow", data=str(latents / "latents"), out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
