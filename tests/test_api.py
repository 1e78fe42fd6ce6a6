"""The Python entry points, end to end on toy data: pre-train, build, inspect, mid-train, post-train,
sample and evaluate, each returning what it wrote; bad arguments raise `cmt.ArgumentError` naming
the keyword."""
import json
import math

import numpy as np
import pytest
import torch

import cmt
from cmt.checkpoint import load_network

TOY = "toy:checkerboard"
QUIET = dict(progress=False)
TINY_TRAINING = dict(max_steps=2, batch_size=16, log_every=1, ckpt_every=2, **QUIET)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    built = cmt.build_trajectories(teacher=TOY, out=root / "shards", nfe=4, num_trajectories=32, batch_size=16,
                                   shard_size=16, log=lambda message: None, **QUIET)
    mid = cmt.mid_train(data=built["out"], out=root / "mid", target="endpoint", workers=0, num_samples=32,
                        **TINY_TRAINING)
    post = cmt.post_train(init=mid["checkpoint"], method="ect", data=TOY, out=root / "post", stage=11,
                          num_samples=32, **TINY_TRAINING)
    sampled = cmt.sample(ckpt=post["model"], out=root / "post.png", sampler="flowmap", steps=1, num_samples=64,
                         npz=root / "post.npz")
    evaluated = cmt.evaluate(samples=sampled["npz"], data=TOY)
    return {"build": built, "mid": mid, "post": post, "sample": sampled, "evaluate": evaluated}


def test_build_returns_the_dataset_it_wrote(pipeline):
    built = pipeline["build"]
    manifest = json.loads(built["manifest"].read_text())
    assert manifest["count"] == built["count"] == 32 and len(built["shards"]) == 2
    assert all(path.exists() for path in built["shards"])
    assert cmt.inspect_trajectories(built["out"], verify=True)["verify"]["ok"]


@pytest.mark.parametrize("phase", ["mid", "post"])
def test_training_phases_return_their_checkpoints(pipeline, phase):
    result = pipeline[phase]
    assert result["checkpoint"].name == f"{phase}.pt" and result["model"].name == f"{phase}.safetensors"
    checkpoint = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)
    assert {"config", "net", "ema"} <= set(checkpoint)
    net = load_network(result["model"])
    assert tuple(net.data_shape) == (2,)
    assert result["log"].is_file() and all(math.isfinite(value) for value in result["metrics"].values()
                                           if isinstance(value, float))


def test_sample_and_evaluate_return_files_and_finite_metrics(pipeline):
    sampled, evaluated = pipeline["sample"], pipeline["evaluate"]
    assert sampled["out"].stat().st_size > 1000
    with np.load(sampled["npz"]) as saved:
        assert saved["samples"].shape == (64, 2)
        assert saved["seeds"].tolist() == sampled["seeds"]
    assert evaluated["count"] == 64
    assert math.isfinite(evaluated["metrics"]["energy_distance"])


def test_pre_training_returns_a_teacher_that_samples(tmp_path):
    trained = cmt.train_diffusion(data=TOY, out=tmp_path / "teacher", num_samples=0, channels=16, num_blocks=1,
                                  **TINY_TRAINING)
    assert trained["model"].name == "teacher.safetensors"
    sampled = cmt.sample(ckpt=trained["model"], out=tmp_path / "teacher.png", steps=2, num_samples=8)
    assert sampled["samples"].shape == (8, 2) and bool(torch.isfinite(sampled["samples"]).all())


@pytest.mark.parametrize("call, argument", [
    (lambda tmp: cmt.build_trajectories(teacher=TOY, out=tmp / "shards", num_trajectories=0), "num_trajectories"),
    (lambda tmp: cmt.mid_train(data=tmp / "missing", out=tmp / "mid"), "data"),
    (lambda tmp: cmt.post_train(init="random", method="sgd", data=TOY, out=tmp / "post"), "method"),
    (lambda tmp: cmt.sample(ckpt=TOY, out=tmp / "samples.jpg"), "out"),
    (lambda tmp: cmt.evaluate(samples=np.zeros((8, 2)), data="toy:nowhere"), "data"),
])
def test_a_bad_argument_raises_an_argument_error_naming_it(tmp_path, call, argument):
    with pytest.raises(cmt.ArgumentError) as caught:
        call(tmp_path)
    assert isinstance(caught.value, ValueError)
    assert caught.value.argument == argument and str(caught.value).startswith(f"{argument}:")
