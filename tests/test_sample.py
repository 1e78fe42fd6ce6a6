"""Sampling (`cmt.sampling`, `cmt-sample`): PNG + npz outputs, per-sample seeds, labels, the flow-map
sampler, clean errors."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import cmt
from cmt.checkpoint import load_network, save_network
from cmt.cli.sample import main
from cmt.edm import TWO_STEP_SIGMA, flow_map_jump
from cmt.errors import ArgumentError
from cmt.labels import pick_labels
from cmt.networks import build_network
from cmt.sampling import flow_map_sample, generate


@pytest.fixture(scope="module")
def image_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    net = build_network(dict(architecture="edm2", img_resolution=8, img_channels=1, label_dim=10,
                             model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[]))
    with torch.no_grad():   # EDM2 starts with zero gains (output, embeddings): make the net use its inputs
        for name, parameter in net.named_parameters():
            if name.endswith(("out_gain", "emb_gain")):
                parameter.fill_(0.5)
    return save_network(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", net, extra_config={"data": "mnist"})


@pytest.fixture(scope="module")
def points_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    net = build_network(dict(architecture="mlp", data_shape=[2], width=32, num_blocks=1))
    return save_network(tmp_path_factory.mktemp("ckpt") / "toy.safetensors", net,
                        extra_config={"data": "toy:moons"})


def sample(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def test_images_grid_and_npz(tmp_path, image_ckpt):
    out, npz = tmp_path / "grid.png", tmp_path / "samples.npz"
    result = sample("--ckpt", image_ckpt, "--steps", 3, "--num", 6, "--seed", 5, "--labels", 3,
                    "--out", out, "--npz", npz)
    assert result.exit_code == 0, result.output
    assert "seeds 5-10" in result.output
    saved = np.load(npz)
    assert saved["samples"].shape == (6, 1, 8, 8) and np.isfinite(saved["samples"]).all()
    assert saved["labels"].tolist() == [3] * 6 and saved["seeds"].tolist() == list(range(5, 11))
    # 6 tiles of 8 px, enlarged 8x to the readable 64 px, with 2 px padding on a 3 x 2 layout.
    assert Image.open(out).size == (3 * 66 + 2, 2 * 66 + 2)


def test_each_sample_depends_only_on_its_seed_and_label(tmp_path, image_ckpt):
    npz = tmp_path / "a.npz"
    assert sample("--ckpt", image_ckpt, "--steps", 2, "--num", 4, "--seed", 0, "--labels", "cycle",
                  "--out", tmp_path / "a.png", "--npz", npz).exit_code == 0
    saved = np.load(npz)
    assert saved["labels"].tolist() == [0, 1, 2, 3]
    # Samples 2 and 3 are remade alone from their seeds and labels; other labels give other digits.
    net = load_network(image_ckpt)
    again = generate(net, [2, 3], torch.tensor([2, 3]), steps=2)
    np.testing.assert_allclose(again.numpy(), saved["samples"][2:], rtol=1e-5, atol=1e-6)
    relabelled = generate(net, [2, 3], torch.tensor([5, 6]), steps=2)
    assert (relabelled - again).abs().max() > 1e-3


def test_points_scatter_and_npz(tmp_path, points_ckpt):
    out, npz = tmp_path / "points.png", tmp_path / "points.npz"
    result = sample("--ckpt", points_ckpt, "--num", 300, "--steps", 4, "--out", out, "--npz", npz)
    assert result.exit_code == 0, result.output
    saved = np.load(npz)
    assert saved["samples"].shape == (300, 2) and saved["labels"].tolist() == [-1] * 300
    assert Image.open(out).size == (400, 400)


def test_flow_map_sampler_follows_the_jumps():
    torch.manual_seed(0)
    student = build_network(dict(architecture="mlp", data_shape=[2], width=32, num_blocks=1, flow_map=True)).eval()
    with torch.no_grad():
        for parameter in student.emb_target.parameters():
            parameter.normal_()   # a student whose jumps depend on the target sigma
    noise = torch.randn(5, 2)
    with torch.no_grad():
        x = 80 * noise
        x = flow_map_jump(x, 80.0, 1.5, student(x, 80.0, None, target_sigma=1.5))
        expected = flow_map_jump(x, 1.5, 0.0, student(x, 1.5, None, target_sigma=0.0))
        got = flow_map_sample(student, noise, [80.0, 1.5, 0.0])
    torch.testing.assert_close(got, expected)

    consistency = build_network(dict(architecture="mlp", data_shape=[2], width=32, num_blocks=1,
                                     sigma_min=0.002)).eval()
    with torch.no_grad():
        one = flow_map_sample(consistency, noise, [80.0, 0.0])
        torch.testing.assert_close(one, consistency(80 * noise, 80.0))
        two_a = flow_map_sample(consistency, noise, [80.0, 1.0, 0.0], generator=torch.Generator().manual_seed(3))
        two_b = flow_map_sample(consistency, noise, [80.0, 1.0, 0.0], generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(two_a, two_b)
    assert not torch.allclose(two_a, one)


def test_flowmap_cli_on_a_student(tmp_path):
    torch.manual_seed(0)
    student = build_network(dict(architecture="mlp", data_shape=[2], width=32, num_blocks=1, flow_map=True))
    ckpt = save_network(tmp_path / "student.safetensors", student)
    npz = tmp_path / "s.npz"
    result = sample("--ckpt", ckpt, "--sampler", "flowmap", "--steps", 2, "--mid-sigma", 0.8, "--num", 10,
                    "--out", tmp_path / "s.png", "--npz", npz)
    assert result.exit_code == 0, result.output
    assert np.load(npz)["samples"].shape == (10, 2)
    # --mid-sigma defaults to the CMT setting TWO_STEP_SIGMA, as in training.
    default_mid = sample("--ckpt", ckpt, "--sampler", "flowmap", "--steps", 2, "--num-samples", 10,
                         "--out", tmp_path / "t.png", "--npz", tmp_path / "t.npz")
    explicit_mid = sample("--ckpt", ckpt, "--sampler", "flowmap", "--steps", 2, "--num-samples", 10,
                          "--mid-sigma", TWO_STEP_SIGMA, "--out", tmp_path / "u.png", "--npz", tmp_path / "u.npz")
    assert default_mid.exit_code == explicit_mid.exit_code == 0, default_mid.output
    np.testing.assert_array_equal(np.load(tmp_path / "t.npz")["samples"], np.load(tmp_path / "u.npz")["samples"])
    assert not np.array_equal(np.load(tmp_path / "t.npz")["samples"], np.load(npz)["samples"])


def test_labels():
    assert pick_labels("cycle", 5, 3).tolist() == [0, 1, 2, 0, 1]
    assert pick_labels("random", 4, 0).tolist() == [-1] * 4
    assert torch.equal(pick_labels("random", 50, 10, seed=1), pick_labels("random", 50, 10, seed=1))
    with pytest.raises(ValueError, match="class id"):
        pick_labels("10", 2, 10)


@pytest.mark.parametrize("args, hint", [
    (["--ckpt", "no/such.safetensors"], "--ckpt"),
    (["--ckpt", "not-a-teacher"], "--ckpt"),
    (["--out", "grid.jpg"], "--out"),
])
def test_bad_input_is_a_clean_error(tmp_path, image_ckpt, args, hint):
    base = {"--ckpt": str(image_ckpt), "--out": str(tmp_path / "grid.png")}
    base.update(dict(zip(args[::2], args[1::2])))
    result = sample(*[item for pair in base.items() for item in pair], "--num", 2, "--steps", 1)
    assert result.exit_code == 2 and hint in result.output
    assert not (tmp_path / "grid.png").exists()


def test_bad_label_for_the_network(tmp_path, image_ckpt):
    result = sample("--ckpt", image_ckpt, "--labels", 12, "--out", tmp_path / "g.png", "--num", 2)
    assert result.exit_code == 2 and "--labels" in result.output



def test_sample_entry_point_returns_what_it_wrote(tmp_path, points_ckpt):
    written = cmt.sample(ckpt=points_ckpt, out=tmp_path / "p.png", npz=tmp_path / "p.npz", num_samples=20, steps=3, seed=4)
    assert written["out"] == tmp_path / "p.png" and written["out"].is_file()
    assert written["npz"] == tmp_path / "p.npz" and written["seeds"] == list(range(4, 24))
    saved = np.load(written["npz"])
    np.testing.assert_array_equal(saved["samples"], written["samples"].numpy())
    assert written["identity"]["path"] == str(points_ckpt)
    # The command writes the same samples from the same options.
    assert sample("--ckpt", points_ckpt, "--out", tmp_path / "q.png", "--npz", tmp_path / "q.npz", "--num", 20,
                  "--steps", 3, "--seed", 4).exit_code == 0
    np.testing.assert_array_equal(np.load(tmp_path / "q.npz")["samples"], saved["samples"])


@pytest.mark.parametrize("kwargs, argument", [
    ({"out": "grid.jpg"}, "out"),
    ({"npz": "s.txt"}, "npz"),
    ({"ckpt": "no/such.safetensors"}, "ckpt"),
    ({"sampler": "flowmap", "steps": 2, "mid_sigma": 100.0}, "mid_sigma"),   # None: the model's own
    ({"sampler": "flowmap", "steps": 3}, "steps"),
    ({"solver": "rk4"}, "solver"),
    ({"sigma_min": 90.0}, "sigma_min"),
    ({"labels": 12}, "labels"),
])
def test_sample_errors_name_the_argument(tmp_path, image_ckpt, kwargs, argument):
    options = {"ckpt": image_ckpt, "out": tmp_path / "grid.png", "num_samples": 2, "steps": 1, **kwargs}
    with pytest.raises(ArgumentError) as error:
        cmt.sample(**options)
    assert error.value.argument == argument
    assert not (tmp_path / "grid.png").exists()
