"""EDM (v1) students through the whole pipeline (issue 24): a tiny DDPM++ teacher (SongUNet under
EDMPrecond, 16x16 grayscale, MNIST's 10 classes), pickled as NVlabs/edm would, goes through cmt-build
(the command), mid-training (endpoint and flowmap), post-training (ECT and MeanFlow), sampling and
evaluation on the MNIST digits (the library entry points). The students keep the teacher's U-Net
and start as the teacher (consistency students are sony/cmt's ECMPrecond, flow maps get the
zero-initialised second time input); teacher-only preconditionings and unknown architectures are one
ArgumentError naming the teacher or init; the pixel recipes name their official teachers; bad inputs
are one line and write nothing."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cmt
from cmt.checkpoint import init_student_from_teacher
from cmt.cli.build import main as build_main
from cmt.cli.train import main as train_main
from cmt.errors import ArgumentError
from cmt.networks import build_network
from cmt.teachers import EDM_PRESETS, RECIPE_TEACHERS, load_teacher
from cmt.trainers import recipes
from cmt.trainers.post import METHODS
from cmt.trainers.students import consistency_student, student_config, student_learning_rate

from conftest import gmm_teacher
from edm_fixtures import formula_state, official_kwargs, tiny_network, write_edm_pickle

# EDM's ddpmpp network kwargs (NVlabs/edm train.py --arch=ddpmpp) at a tiny width, for MNIST's digits.
DDPMPP = dict(img_resolution=16, img_channels=1, label_dim=10, model_type="SongUNet", embedding_type="positional",
              encoder_type="standard", decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1],
              model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0)
RUN = dict(max_steps=2, batch_size=8, num_samples=16, log_every=1, progress=False)
QUIET = dict(progress=False, log=lambda message: None)


def ddpmpp_teacher():
    """The tiny DDPM++ teacher with formula weights (every layer non-zero, so nothing is trivial)."""
    net = build_network(dict(architecture="edm", precond="EDMPrecond", **DDPMPP))
    net.load_state_dict(formula_state({key: value.shape for key, value in net.state_dict().items()}), strict=False)
    return net.eval()


def pickled(path, net, kwargs):
    """`net` written as NVlabs/edm's training loop pickles it (code-free fake modules for the writing)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        write_edm_pickle(path, monkeypatch, net, kwargs, module_src="")
    return path


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """build -> mid (endpoint, flowmap) -> post (ECT from the endpoint student, MeanFlow from the flow
    map) -> sample -> evaluate, all on the tiny teacher; returns the paths and results."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("edm")
    teacher = pickled(root / "network-snapshot-ddpmpp.pkl", ddpmpp_teacher(), dict(DDPMPP))
    built = CliRunner().invoke(build_main, ["--teacher", "edm", "--teacher-ckpt", str(teacher), "--nfe", "4",
                                            "--num-trajectories", "16", "--batch-size", "8", "--shard-size", "8",
                                            "--out", str(root / "shards"), "--no-progress"])
    assert built.exit_code == 0, built.output
    runs = {"teacher": teacher, "shards": root / "shards"}
    for target in ("endpoint", "flowmap"):
        runs[f"mid-{target}"] = cmt.mid_train(data=root / "shards", out=root / f"mid-{target}", target=target,
                                              workers=0, **RUN)
    runs["post-ect"] = cmt.post_train(init=runs["mid-endpoint"]["checkpoint"], method="ect", data="mnist",
                                      out=root / "post-ect", **RUN)
    runs["post-ecd"] = cmt.post_train(init=runs["mid-endpoint"]["checkpoint"], method="ecd", data="mnist",
                                      out=root / "post-ecd", **RUN)   # the frozen teacher: the pickle mid.pt records
    runs["post-meanflow"] = cmt.post_train(init=runs["mid-flowmap"]["checkpoint"], method="meanflow", data="mnist",
                                           out=root / "post-meanflow", **RUN)
    for name in ("mid-endpoint", "mid-flowmap", "post-ect", "post-ecd", "post-meanflow"):
        sampled = cmt.sample(ckpt=runs[name]["model"], out=root / f"{name}.png", npz=root / f"{name}.npz",
                             num_samples=16, progress=False)
        runs[f"sample-{name}"] = sampled
        runs[f"eval-{name}"] = cmt.evaluate(samples=sampled["npz"], data="mnist")
    return runs


def test_edm_students_go_through_build_mid_post_sample_and_eval(pipeline):
    manifest = json.loads((pipeline["shards"] / "manifest.json").read_text())
    assert manifest["teacher"]["kind"] == "edm" and manifest["teacher"]["official_class"] == "EDMPrecond"
    assert manifest["data_shape"] == [1, 16, 16] and manifest["label_dim"] == 10
    expected = {   # run: (preconditioning, sigma_min, flow_map, sampler)
        "mid-endpoint": ("ECMPrecond", 0.003, False, "consistency"),
        "mid-flowmap": ("EDMPrecond", 0.0, True, "flowmap"),
        "post-ect": ("ECMPrecond", 0.003, False, "consistency"),
        "post-ecd": ("ECMPrecond", 0.003, False, "consistency"),
        "post-meanflow": ("EDMPrecond", 0.0, True, "flowmap"),
    }
    teacher = load_teacher(pipeline["teacher"]).state_dict()
    for name, (precond, sigma_min, flow_map, sampler) in expected.items():
        checkpoint = torch.load(pipeline[name]["checkpoint"], weights_only=True)
        config = checkpoint["config"]
        assert config["architecture"] == "edm" and config["model_type"] == "SongUNet", name
        assert (config["precond"], config["sigma_min"], config["flow_map"]) == (precond, sigma_min, flow_map), name
        assert checkpoint["sampler"]["kind"] == sampler, name
        # Started from the teacher's weights: two Adam steps at lr 2e-4 (mid) / 1e-4 (post) later, every
        # tensor is within a few steps of the teacher's, and the target_sigma input near its zero start.
        net = checkpoint["net"]
        assert set(net) == set(teacher) | ({"model.map_target.weight", "model.map_target.bias"} if flow_map else set())
        assert max((net[key] - teacher[key]).abs().max().item() for key in teacher) < 2e-3, name
        if flow_map:
            assert net["model.map_target.weight"].abs().max() < 2e-3
        samples = pipeline[f"sample-{name}"]["samples"]
        assert samples.shape == (16, 1, 16, 16) and torch.isfinite(samples).all(), name
        fd = pipeline[f"eval-{name}"]["metrics"]["fd_mnist"]
        assert np.isfinite(fd) and fd > 0, name
    # The post runs scored their 1- and 2-step samples on MNIST while training.
    log = [json.loads(line) for line in (pipeline["post-ect"]["log"]).read_text().splitlines()]
    assert any(np.isfinite(record.get("fd_mnist_2step", np.nan)) for record in log)
    # ECT from CMT weights keeps CMT's fixed gap; the mid checkpoint records the EDM teacher it came from.
    post = torch.load(pipeline["post-ect"]["checkpoint"], weights_only=True)
    assert post["stage"] == 11 and post["teacher"] == str(pipeline["teacher"])


def test_students_start_as_the_teacher():
    teacher = ddpmpp_teacher()
    torch.manual_seed(1)
    x, sigma = torch.randn(6, 1, 16, 16), torch.tensor([0.003, 0.02, 0.3, 1.0, 10.0, 80.0])
    labels = torch.nn.functional.one_hot(torch.arange(6) % 10, 10).float()
    with torch.no_grad():
        expected = teacher(x * (1 + sigma[:, None, None, None]), sigma, labels)

    def student(config):
        net = build_network(config)
        init_student_from_teacher(net, teacher.state_dict())
        return net

    # Consistency (mid endpoint, ECT): sony/cmt's ECMPrecond, the teacher's own form in train mode.
    consistency = student(student_config(teacher.config, flow_map=False, form=consistency_student))
    assert consistency.config["precond"] == "ECMPrecond" and consistency.sigma_min == 0.003
    assert consistency.config == student_config(teacher.config, form=METHODS["ect"].student)
    with torch.no_grad():
        assert torch.equal(consistency.train()(x * (1 + sigma[:, None, None, None]), sigma, labels), expected)
        boundary = consistency.eval()(x, torch.full((6,), 0.003), labels)
    torch.testing.assert_close(boundary, x, rtol=0, atol=1e-6)   # eval mode: f(x, sigma_min) = x
    # Flow maps (mid flowmap, MeanFlow): the teacher for every target sigma.
    for config in (student_config(teacher.config, flow_map=True, sigma_min=0.0),
                   student_config(teacher.config, form=METHODS["meanflow"].student)):
        flow_map = student(config).eval()
        assert flow_map.config["precond"] == "EDMPrecond" and flow_map.flow_map
        with torch.no_grad():
            for target in (torch.zeros(6), 0.5 * sigma, sigma):
                assert torch.equal(flow_map(x * (1 + sigma[:, None, None, None]), sigma, labels, target), expected)


@pytest.fixture(scope="module")
def vp_teacher(tmp_path_factory):
    """A VPPrecond teacher (EDM's baseline-*-vp kind) as an official pickle, and shards built by it."""
    root = tmp_path_factory.mktemp("vp")
    path = pickled(root / "baseline-vp.pkl", tiny_network("ddpmpp", "VPPrecond", 0), official_kwargs("ddpmpp", 0))
    cmt.build_trajectories(teacher=str(path), out=root / "shards", nfe=2, num_trajectories=4, batch_size=4,
                           shard_size=4, **QUIET)
    images = np.random.default_rng(0).integers(0, 256, size=(8, 8, 8, 3), dtype=np.uint8)
    np.savez(root / "rgb8.npz", x=images)
    return {"root": root, "teacher": path, "shards": root / "shards", "images": root / "rgb8.npz"}


@pytest.mark.parametrize("target", ["endpoint", "flowmap"])
def test_a_vp_teacher_for_a_student_names_the_teacher(vp_teacher, tmp_path, target):
    with pytest.raises(ArgumentError) as error:
        cmt.mid_train(data=vp_teacher["shards"], out=tmp_path / "mid", target=target, workers=0, **RUN)
    assert error.value.argument == "teacher" and "VPPrecond networks are teachers only" in error.value.message
    assert "edm-cifar10-32x32-uncond-vp" in error.value.message and not (tmp_path / "mid").exists()
    result = CliRunner().invoke(train_main, ["mid", "--data", str(vp_teacher["shards"]), "--target", target,
                                             "--out", str(tmp_path / "cli"), "--workers", "0", "--max-steps", "1",
                                             "--no-progress"])
    assert result.exit_code == 2 and "--teacher" in result.output and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("Error")] and not (tmp_path / "cli").exists()


@pytest.mark.parametrize("method", ["ect", "meanflow"])
def test_a_vp_teacher_or_init_for_post_training_names_it(vp_teacher, tmp_path, method):
    common = dict(method=method, data=vp_teacher["images"], out=tmp_path / "post", **RUN)
    for init, teacher, argument in (("teacher", vp_teacher["teacher"], "teacher"), (vp_teacher["teacher"], None, "init")):
        with pytest.raises(ArgumentError) as error:
            cmt.post_train(init=init, teacher=teacher, **common)
        assert error.value.argument == argument and "teachers only" in error.value.message
    assert not (tmp_path / "post").exists()


def test_an_unknown_architecture_is_an_argument_error_never_a_key_error(vp_teacher, tmp_path):
    foreign = {"architecture": "resnet", "img_resolution": 8}
    for phase, argument in (("mid", "teacher"), ("post", "init")):
        with pytest.raises(ArgumentError, match="unknown network architecture 'resnet'") as error:
            student_learning_rate(foreign, phase)
        assert error.value.argument == argument
    with pytest.raises(ArgumentError, match="unknown network architecture") as error:
        student_config(foreign, form=consistency_student, argument="init")
    assert error.value.argument == "init"
    # A dataset whose manifest records a teacher of an unknown family (a random student needs no weights).
    shards = tmp_path / "shards"
    import shutil
    shutil.copytree(vp_teacher["shards"], shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["teacher"]["config"] = foreign
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArgumentError, match="unknown network architecture 'resnet'") as error:
        cmt.mid_train(data=shards, out=tmp_path / "mid", student_init="random", workers=0, **RUN)
    assert error.value.argument == "teacher" and not (tmp_path / "mid").exists()


# ---- recipes name their official teachers ------------------------------------------------------

def test_pixel_recipes_name_their_official_teachers():
    pixel = {name: preset for name, preset in RECIPE_TEACHERS.items() if name != "imagenet512"}
    assert pixel == {"cifar10": "edm-cifar10-32x32-uncond-vp", "ffhq64": "edm-ffhq-64x64-uncond-vp",
                     "afhq64": "edm-afhqv2-64x64-uncond-vp"}
    assert RECIPE_TEACHERS["imagenet512"] == recipes.RECIPES["imagenet512"]["teacher"] == "edm2-img512-xxl"
    for name, preset in pixel.items():
        assert recipes.RECIPES[name]["teacher"] == preset and preset in EDM_PRESETS
        assert recipes.RECIPES[name]["mid"]["dropout"] == recipes.RECIPES[name]["post"]["ect"]["dropout"] == 0.2


def test_a_recipe_without_teacher_resolves_and_announces_the_official_one(offline_hub, tmp_path, capsys):
    preset = "edm-cifar10-32x32-uncond-vp"
    images = tmp_path / "rgb8.npz"
    np.savez(images, x=np.random.default_rng(0).integers(0, 256, size=(8, 8, 8, 3), dtype=np.uint8))
    # Offline: one line naming the file and where to put it; nothing written.
    result = CliRunner().invoke(build_main, ["--recipe", "cifar10", "--out", str(tmp_path / "offline")])
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert result.exit_code == 2 and len(errors) == 1 and "--recipe" in errors[0], result.output
    assert f"{preset}.pkl by hand and put it at" in result.output and "cmt-cache/edm" in result.output
    assert not (tmp_path / "offline").exists()
    with pytest.raises(ArgumentError) as error:
        cmt.post_train(init="teacher", method="ect", recipe="cifar10", data=images, out=tmp_path / "post-offline", **RUN)
    assert error.value.argument == "recipe" and f"{preset}.pkl by hand" in error.value.message
    assert not (tmp_path / "post-offline").exists()
    # A dataset whose manifest names no teacher file (built from an in-memory teacher): the recipe's.
    cmt.build_trajectories(teacher=gmm_teacher((3, 8, 8)), out=tmp_path / "gmm-shards", nfe=2, num_trajectories=4,
                           batch_size=4, shard_size=4, **QUIET)
    with pytest.raises(ArgumentError) as error:
        cmt.mid_train(data=tmp_path / "gmm-shards", recipe="cifar10", loss="l2", out=tmp_path / "mid-offline",
                      workers=0, **RUN)
    assert error.value.argument == "recipe" and f"{preset}.pkl by hand" in error.value.message
    assert not (tmp_path / "mid-offline").exists()
    # The official file in the cache (a stand-in of the same format and class): found, used, announced.
    cached = offline_hub / "cmt-cache" / "edm" / f"{preset}.pkl"
    cached.parent.mkdir(parents=True, exist_ok=True)
    assert not list(cached.parent.iterdir())   # the failed download left nothing behind
    pickled(cached, tiny_network("ddpmpp", "EDMPrecond", 0), official_kwargs("ddpmpp", 0))
    result = CliRunner().invoke(build_main, ["--recipe", "cifar10", "--nfe", "2", "--num-trajectories", "4",
                                             "--batch-size", "4", "--shard-size", "4", "--out", str(tmp_path / "shards"),
                                             "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"[cmt] build: recipe cifar10; from the recipe: teacher={preset}; solver nfe=2 (the recipe's 16)" \
        in result.output
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["teacher"]["preset"] == preset
    capsys.readouterr()
    post = cmt.post_train(init="teacher", method="ect", recipe="cifar10", data=images, out=tmp_path / "post",
                          **dict(RUN, max_steps=1, batch_size=4, num_samples=4))
    assert f"teacher={preset}" in capsys.readouterr().out
    checkpoint = torch.load(post["checkpoint"], weights_only=True)
    assert checkpoint["config"]["precond"] == "ECMPrecond" and checkpoint["config"]["dropout"] == 0.2
    assert checkpoint["recipe"]["values"]["teacher"] == preset and checkpoint["init_identity"]["preset"] == preset
    # Mid-training takes the teacher its dataset records; the recipe then fills none in.
    cmt.mid_train(data=tmp_path / "shards", recipe="cifar10", loss="l2", out=tmp_path / "mid", workers=0,
                  **dict(RUN, max_steps=1, batch_size=4, num_samples=4))
    announced = capsys.readouterr().out
    assert "[cmt] mid: recipe cifar10" in announced and "teacher=" not in announced
    # A teacher given explicitly wins over the recipe's.
    result = CliRunner().invoke(build_main, ["--recipe", "cifar10", "--teacher", str(cached), "--nfe", "2",
                                             "--num-trajectories", "4", "--batch-size", "4", "--out",
                                             str(tmp_path / "given"), "--no-progress"])
    assert result.exit_code == 0 and "recipe cifar10; the teacher given" in result.output, result.output


# ---- bad input: one line, nothing written -------------------------------------------------------

def test_a_conditional_edm_teacher_without_labels_is_refused(pipeline, tmp_path):
    result = CliRunner().invoke(build_main, ["--teacher", str(pipeline["teacher"]), "--labels", "none", "--out",
                                             str(tmp_path / "shards")])
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert result.exit_code == 2 and len(errors) == 1 and "--labels" in errors[0], result.output
    assert "class-conditional (10 classes)" in errors[0] and not (tmp_path / "shards").exists()


def test_post_training_on_images_of_another_resolution_is_refused(pipeline, tmp_path):
    mid = str(pipeline["mid-endpoint"]["checkpoint"])
    digits = tmp_path / "digits8.npz"
    np.savez(digits, x=np.random.default_rng(0).integers(0, 256, size=(8, 8, 8), dtype=np.uint8),
             labels=np.arange(8) % 10)
    rgb = tmp_path / "rgb16.npz"
    np.savez(rgb, x=np.random.default_rng(0).integers(0, 256, size=(8, 16, 16, 3), dtype=np.uint8))
    for args, flag, expected in (
            (["--data", str(digits), "--resolution", "8"], "--resolution", "takes 16x16 images"),
            (["--data", "mnist", "--resolution", "12"], "--resolution", "takes 16x16 images"),
            (["--data", str(rgb)], "--data", "(3, 16, 16)")):
        out = tmp_path / "post"
        result = CliRunner().invoke(train_main, ["post", "--init", mid, "--method", "ect", "--out", str(out),
                                                 "--max-steps", "1", "--no-progress", *args])
        errors = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert result.exit_code == 2 and len(errors) == 1 and flag in errors[0] and expected in errors[0], result.output
        assert "Traceback" not in result.output and not out.exists()
