"""Named recipes: every recipe resolves for its phases, is recorded, yields to explicit arguments, and is
the built-in teachers' default."""
import json

import pytest
import torch
from click.testing import CliRunner
from conftest import FAST

from cmt.cli.train import main
from cmt.errors import ArgumentError
from cmt.trainers import recipes
from cmt.trainers.mid import mid_train
from cmt.trainers.post import post_train


def test_every_recipe_resolves_for_its_phases():
    for name, recipe in recipes.RECIPES.items():
        assert recipe["source"]
        if recipe["mid"] is not None:
            values, from_recipe = recipes.resolve_options(mid_train, "mid", {}, name)
            assert values["target"] == "endpoint" and from_recipe["mid_sigma"] > 0
        for method in recipe["post"]:
            values, _ = recipes.resolve_options(post_train, "post", {}, name, method)
            assert values["method"] == method and values["max_steps"] > 0 and values["lr"] > 0
    assert recipes.recipe_values("post", "cifar10", "ect")["stage"] == 11
    assert recipes.recipe_values("post", "afhq64", "ect")["stage"] == 9
    assert recipes.recipe_values("post", "imagenet512", "ecd")["guidance"] == 2.05
    assert recipes.recipe_values("mid", "cifar10")["mid_sigma"] == 0.77569
    with pytest.raises(ArgumentError, match="no mid-training settings"):
        recipes.recipe_values("mid", "imagenet256-meanflow")
    with pytest.raises(ArgumentError, match="method meanflow"):
        recipes.recipe_values("post", "cifar10", "meanflow")
    assert len(recipes.DIFFUSION_RECIPES) == 10
    edm2_s = recipes.recipe_values("diffusion", "edm2-img64-s")
    assert edm2_s["lr"] == 0.01 and edm2_s["channels"] == 192 and edm2_s["lr_ref_steps"] == 35000


def test_a_recipe_is_recorded_and_explicit_arguments_override_it(mid_students, tmp_path):
    # (pixel students: the recipe's E-LatentLPIPS gives way to the distance given)
    result = mid_train(data=mid_students["shards"], recipe="imagenet512", out=tmp_path / "mid", max_steps=2, workers=0,
                       lr=3e-4, loss="huber", huber_c=0.06, **FAST)
    run = json.loads((tmp_path / "mid" / "run.json").read_text())
    assert run["train"]["optimizer"] == "adam" and run["train"]["betas"] == [0.9, 0.999]
    assert run["train"]["ema_beta"] == 0.999 and run["train"]["lr"] == 3e-4 and run["train"]["max_steps"] == 2
    checkpoint = torch.load(result["checkpoint"], weights_only=True)
    assert checkpoint["recipe"]["name"] == "imagenet512" and "lr" not in checkpoint["recipe"]["values"]
    # the recipe's augmentation of the distance it names is left out with that distance (said, not recorded)
    assert "elatentlpips_augment" not in checkpoint["recipe"]["values"] and checkpoint["options"]["mid_sigma"] == 1.526
    assert checkpoint["options"]["loss"] == "huber" and "loss" not in checkpoint["recipe"]["values"]


def test_the_command_line_recipe_and_its_overrides(mid_students, tmp_path):
    out = tmp_path / "post"
    result = CliRunner().invoke(main, ["post", "--init", str(mid_students["endpoint"]), "--method", "ect", "--data",
                                       "toy:moons", "--recipe", "cifar10", "--lr", "3e-4", "--max-steps", "2",
                                       "--optimizer", "adam",   # the flag's default value, given: it wins
                                       "--batch-size", "16", "--num-samples", "64", "--no-progress",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "recipe cifar10" in result.output and "ema_beta=0.9999" in result.output
    run = json.loads((out / "run.json").read_text())
    assert run["train"]["optimizer"] == "adam" and run["train"]["lr"] == 3e-4 and run["train"]["ema_beta"] == 0.9999
    assert run["train"]["betas"] == [0.9, 0.999] and run["train"]["lr_schedule"] == "linear"
    checkpoint = torch.load(out / "post.pt", weights_only=True)
    assert checkpoint["options"]["huber_c"] == 0.0 and checkpoint["options"]["mid_sigma"] == 0.821
    assert checkpoint["stage"] == 11 and checkpoint["config"]["dropout"] == 0.2
    help_text = CliRunner().invoke(main, ["mid", "--help"]).output
    assert "--recipe" in help_text and "cifar10" in help_text and "imagenet512" in help_text


def test_builtin_teachers_default_to_their_recipe():
    assert recipes.builtin_recipe("mnist") == "mnist" and recipes.builtin_recipe("toy:moons") == "toy"
    assert recipes.builtin_recipe("runs/teacher.safetensors") is None
    from cmt.trainers.post import builtin_teacher_recipe
    assert builtin_teacher_recipe({"init": "mnist"}) == "mnist"
    assert builtin_teacher_recipe({"init": "random", "teacher": "toy:checkerboard"}) == "toy"
