"""Power-function EMA (cmt.phema) and post-hoc EMA reconstruction (cmt.posthoc_ema, cmt-ema): EDM2's
formulas against numbers of the official phema.py, the tracker's recursion against its closed form,
resume, snapshot files, and a reconstruction on a real (tiny) training run."""
import json
import math

import numpy as np
import pytest
import torch

import cmt
from cmt.checkpoint import load_network, read_safetensors, save_network
from cmt.cli.ema import main as ema_main
from cmt.datasets import resolve_data
from cmt.errors import FileFormatError
from cmt.networks import build_network
from cmt.phema import (DEFAULT_STDS, MAX_STD, PowerFunctionEMA, exp_to_std, p_dot_p, power_function_beta,
                       snapshot_name, solve_posthoc_coefficients, std_to_exp)
from cmt.posthoc_ema import reconstruct_ema
from conftest import FAST, FIXTURES, POST_FAST, TEACHER, invoke_command

EDM2 = json.loads((FIXTURES / "edm2_phema.json").read_text())


# ---- EDM2's formulas --------------------------------------------------------------------------

def test_exponents_stds_and_betas_match_edm2():
    for row in EDM2["std_to_exp"]:
        assert std_to_exp(row["std"]) == pytest.approx(row["exp"], rel=1e-12)
        assert exp_to_std(row["exp"]) == pytest.approx(row["std"], rel=1e-12)   # the round trip
    for row in EDM2["exp_to_std"]:
        assert exp_to_std(row["exp"]) == pytest.approx(row["std"], rel=1e-12)
    for row in EDM2["power_function_beta"]:
        assert power_function_beta(row["std"], row["t_next"], row["t_delta"]) == pytest.approx(row["beta"], rel=1e-12,
                                                                                                 abs=1e-300)
    for row in EDM2["p_dot_p"]:
        assert p_dot_p(row["a_ofs"], row["a_std"], row["b_ofs"], row["b_std"]) == pytest.approx(row["p_dot_p"],
                                                                                                rel=1e-12)
    assert DEFAULT_STDS == (0.050, 0.100) and MAX_STD == pytest.approx(exp_to_std(0.0))


@pytest.mark.parametrize("setup", EDM2["solve_posthoc_coefficients"], ids=lambda setup: setup["name"])
def test_posthoc_coefficients_match_edm2(setup):
    coefficients = solve_posthoc_coefficients(setup["in_ofs"], setup["in_std"], setup["out_ofs"], setup["out_std"])
    expected = np.array(setup["coefficients"])
    # The Gram matrices reach condition numbers of ~6e3: agreement to 1e-11 of the largest coefficient.
    np.testing.assert_allclose(coefficients, expected, rtol=0, atol=1e-11 * np.abs(expected).max())
    np.testing.assert_allclose(coefficients.sum(axis=0), 1.0, rtol=1e-12)


def test_a_tracked_profile_reconstructs_as_itself():
    times = np.repeat([10.0, 20.0, 30.0], 2)
    stds = np.tile([0.05, 0.1], 3)
    coefficients = solve_posthoc_coefficients(times, stds, 30.0, [0.1])
    np.testing.assert_allclose(coefficients[:, 0], [0, 0, 0, 0, 0, 1], atol=1e-9)


# ---- the tracker --------------------------------------------------------------------------------

def scalar_net(dtype=torch.float64):
    """A network with one parameter (plus a buffer), to watch the average of a known sequence."""
    net = build_network({**TEACHER, "width": 4, "num_blocks": 1, "emb_width": 4, "fourier_freqs": 2}).to(dtype)
    return net


def test_update_is_the_power_function_average_of_the_weights_seen():
    """The discrete update with EDM2's betas is exactly the continuous profile p(tau) = (g + 1) tau^g /
    T^(g + 1) over weights held constant between updates: the weights w_i of step i (time t_i) count
    with ((t_i / T)^(g + 1) - (t_(i-1) / T)^(g + 1)). Checked with gaps between updates (every 1, then
    every 3 steps) and a changed batch size, in float64."""
    net = scalar_net()
    ema = PowerFunctionEMA(net, stds=(0.05, 0.2))
    times, values, last = [0.0], [], 0
    schedule = [(step, 8) for step in range(1, 21)] + [(step, 5) for step in range(23, 60, 3)]
    for step, batch_size in schedule:
        with torch.no_grad():
            for param in net.parameters():
                param.fill_(math.sin(step) + step / 10)
        ema.update(net, step, batch_size)
        times.append(times[-1] + (step - last) * batch_size)
        values.append(math.sin(step) + step / 10)
        last = step
    assert ema.step == 59 and ema.nimg == times[-1]
    t = np.array(times) / times[-1]
    for std, profile in zip(ema.stds, ema.averages):
        weights = t[1:] ** (std_to_exp(std) + 1) - t[:-1] ** (std_to_exp(std) + 1)
        expected = float(np.dot(weights, values))
        for average in profile:
            torch.testing.assert_close(average, torch.full_like(average, expected), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="step"):
        ema.update(net, 59, 5)   # not after the last update


def test_the_tracker_follows_a_network_converted_after_it_was_made():
    """`net.to(...)` after the tracker was built gives the parameters new data: updates read it (and the
    averages follow the new device and dtype)."""
    torch.manual_seed(0)
    net = build_network(TEACHER)
    ema = PowerFunctionEMA(net, stds=(0.1,))
    net.to(torch.float64)
    with torch.no_grad():
        for param in net.parameters():
            param.fill_(2.0)
    ema.update(net, 1, 8)   # the first update copies the weights
    assert all(torch.equal(average, torch.full_like(average, 2.0)) for average in ema.averages[0])
    assert all(average.dtype == torch.float64 for average in ema.averages[0])


def test_resume_from_the_state_dict_is_exact(tmp_path):
    torch.manual_seed(0)
    net = build_network(TEACHER)
    whole, first = PowerFunctionEMA(net), PowerFunctionEMA(net)
    generator = torch.Generator().manual_seed(1)
    for step in range(1, 21):
        with torch.no_grad():
            for param in net.parameters():
                param.add_(torch.randn(param.shape, generator=generator), alpha=0.1)
        whole.update(net, step, 16)
        if step <= 10:
            first.update(net, step, 16)
        if step == 10:
            torch.save(first.state_dict(), tmp_path / "state.pt")
            resumed = PowerFunctionEMA(net)
            resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
        if step > 10:
            resumed.update(net, step, 16)
    assert (resumed.step, resumed.nimg) == (whole.step, whole.nimg) == (20, 320)
    for a, b in zip(sum(whole.averages, []), sum(resumed.averages, [])):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="stds"):
        PowerFunctionEMA(net, stds=(0.1,)).load_state_dict(whole.state_dict())


def test_snapshots_keep_the_models_dtype_and_load_as_networks(tmp_path):
    torch.manual_seed(0)
    net = build_network(TEACHER).to(torch.bfloat16)
    ema = PowerFunctionEMA(net)
    assert all(average.dtype == torch.float32 for average in ema.averages[0])   # half-precision sums lose updates
    for step in range(1, 4):
        ema.update(net, step, 32)
    written = ema.snapshot(tmp_path, extra={"phase": "diffusion", "data": "toy:checkerboard"})
    assert [path.name for path in written["files"]] == [snapshot_name(3, 0.05), snapshot_name(3, 0.1)] == \
        ["phema-0000003-0.050.safetensors", "phema-0000003-0.100.safetensors"]
    assert written["bytes"] == sum(path.stat().st_size for path in written["files"])
    state, config, extra = read_safetensors(written["files"][1])
    assert extra["phema"] == {"std": 0.1, "exp": pytest.approx(std_to_exp(0.1)), "step": 3, "nimg": 96}
    assert extra["phase"] == "diffusion" and extra["step"] == 3
    assert all(value.dtype == torch.bfloat16 for value in state.values())
    assert torch.equal(state["emb_fourier.freqs"], net.emb_fourier.freqs)   # buffers are the network's
    loaded = load_network(written["files"][0])
    assert loaded.config == net.config
    with pytest.raises(ValueError, match="step"):
        ema.snapshot(tmp_path, step=2)


# ---- reconstruction on a real training run ----------------------------------------------------------

@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A small MLP denoiser trained 300 Adam steps on checkerboard points (batch 64): snapshots of the
    default profiles (0.05, 0.10) every 10 steps, plus a directly tracked 0.075 profile and every
    step's weights (for the error bound)."""
    root = tmp_path_factory.mktemp("phema-run")
    torch.manual_seed(0)
    net = build_network(TEACHER)
    tracked, direct = PowerFunctionEMA(net), PowerFunctionEMA(net, stds=(0.075,))
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    data, generator = resolve_data("toy:checkerboard"), torch.Generator().manual_seed(0)
    history = []
    for step in range(1, 301):
        x0, _ = data.sample(64, generator)
        sigma = (torch.randn(64, generator=generator) * 1.2 - 1.2).exp()
        noisy = x0 + sigma[:, None] * torch.randn(x0.shape, generator=generator)
        loss = (net(noisy, sigma) - x0).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        tracked.update(net, step, 64)
        direct.update(net, step, 64)
        history.append(torch.cat([param.detach().flatten() for param in net.parameters()]))
        if step % 10 == 0:
            tracked.snapshot(root / "snapshots", extra={"phase": "diffusion", "data": "toy:checkerboard"})
    return {"root": root, "net": net, "tracked": tracked, "direct": direct, "history": torch.stack(history)}


def flat_parameters(state, net):
    return torch.cat([state[name].flatten() for name, _ in net.named_parameters()])


def test_reconstruction_of_an_untracked_std_matches_tracking_it_up_to_the_snapshot_spacing(toy_run, tmp_path):
    """The discrete EMA is exactly a power-function profile (test above), so the reconstruction's error
    is `int (q - p) (W(tau) - c) dtau`, q the combined profile, p the target, W the weights; by
    Cauchy-Schwarz it is at most `|q - p| |W - c|`, where `|q - p|^2 = fit_error |p|^2` shrinks as the
    snapshots get denser. The test checks that bound (the tolerance, plus float32 rounding), that the
    error grows with the spacing (10, 30, 50 steps), and that at a spacing of 10 steps it is below
    0.1% of the distance between the two tracked profiles (measured 0.002%)."""
    net, direct, history = toy_run["net"], toy_run["direct"], toy_run["history"]
    target = flat_parameters(direct.averaged_state_dict(0.075), net).double()
    separation = (flat_parameters(toy_run["tracked"].averaged_state_dict(0.05), net)
                  - flat_parameters(toy_run["tracked"].averaged_state_dict(0.1), net)).norm().item()
    snapshots = sorted((toy_run["root"] / "snapshots").glob("phema-*.safetensors"))
    errors = []
    for spacing in (10, 30, 50):
        chosen = [path for path in snapshots if int(path.name.split("-")[1]) % spacing == 0
                  or int(path.name.split("-")[1]) == 300]
        result = reconstruct_ema(snapshots=chosen, std=0.075, out=tmp_path / f"every{spacing}")
        state, _, extra = read_safetensors(result["models"][0])
        error = (flat_parameters(state, net).double() - target).norm().item()
        profile_norm = math.sqrt(p_dot_p(300 * 64, 0.075, 300 * 64, 0.075))
        spread = math.sqrt(64 * (history.double() - target).square().sum().item())   # |W - c| over tau in images
        bound = math.sqrt(result["fit_error"][0]) * profile_norm * spread
        assert error <= bound + 1e-6 * target.norm().item(), (spacing, error, bound)
        assert extra["posthoc_ema"]["std"] == 0.075 and extra["phase"] == "diffusion" and extra["step"] == 300
        errors.append(error)
    assert errors[0] < errors[1] < errors[2]
    assert errors[0] < 1e-3 * separation, (errors, separation)


def test_reconstructing_a_tracked_std_gives_that_snapshot(toy_run, tmp_path):
    result = cmt.reconstruct_ema(snapshots=toy_run["root"] / "snapshots", std=[0.1, 0.05], out=tmp_path)
    assert result["stds"] == [0.05, 0.1] and result["step"] == 300 and len(result["snapshots"]) == 60
    for std, model in zip(result["stds"], result["models"]):
        state, _, _ = read_safetensors(model)
        tracked = toy_run["tracked"].averaged_state_dict(std)
        for name, value in tracked.items():
            torch.testing.assert_close(state[name], value, rtol=0, atol=1e-6)
    # At an earlier step, only the snapshots up to it count.
    earlier = reconstruct_ema(snapshots=toy_run["root"] / "snapshots", std=0.05, out=tmp_path / "earlier", step=150)
    assert len(earlier["snapshots"]) == 30 and earlier["models"][0].name == "ema-0000150-0.050.safetensors"


@pytest.mark.parametrize("options, argument", [
    (dict(std=0.3), "std"), (dict(std=[0.05, -0.1]), "std"), (dict(std=0.1, step=7), "step"),
    (dict(std=0.1, eval_data="toy:nowhere"), "eval_data"), (dict(std=0.1, eval_data="mnist"), "eval_data"),
    (dict(std=0.1, eval_steps=2), "eval_steps"), (dict(std=0.1, out="s3://bucket/ema"), "out"),
])
def test_bad_arguments_name_their_keyword(toy_run, tmp_path, options, argument):
    options = {"snapshots": toy_run["root"] / "snapshots", "out": tmp_path / "out", **options}
    with pytest.raises(cmt.ArgumentError) as caught:
        reconstruct_ema(**options)
    assert caught.value.argument == argument


def test_missing_or_foreign_snapshots_are_refused(tmp_path):
    with pytest.raises(cmt.ArgumentError) as caught:
        reconstruct_ema(snapshots=tmp_path / "none", std=0.1, out=tmp_path / "out")
    assert caught.value.argument == "snapshots"
    with pytest.raises(cmt.ArgumentError, match="no power-function EMA snapshots"):
        reconstruct_ema(snapshots=tmp_path, std=0.1, out=tmp_path / "out")
    plain = save_network(tmp_path / "phema-0000001-0.050.safetensors", build_network(TEACHER))
    with pytest.raises(FileFormatError, match="not a power-function EMA snapshot"):
        reconstruct_ema(snapshots=[plain], std=0.1, out=tmp_path / "out")


def test_cmt_ema_evaluates_the_sweep_and_reports_the_best(toy_run, tmp_path):
    code, output = invoke_command(ema_main, "--snapshots", toy_run["root"] / "snapshots", "--std", "0.05,0.15",
                                  "--out", tmp_path, "--eval", "toy:checkerboard", "--eval-steps", 4,
                                  "--num-samples", 256, "--no-progress")
    assert code == 0, output
    table = json.loads((tmp_path / "ema-eval.json").read_text())
    assert table["data"] == "toy:checkerboard" and table["metric"] == "energy_distance"
    assert table["sampler"] == "ode" and table["steps"] == 4 and table["tracked_stds"] == [0.05, 0.1]
    values = [row["energy_distance"] for row in table["rows"]]
    assert [row["std"] for row in table["rows"]] == [0.05, 0.15] and all(math.isfinite(v) for v in values)
    assert table["best"]["energy_distance"] == min(values)
    assert (tmp_path / "ema-eval.png").stat().st_size > 0
    assert (tmp_path / "eval" / "ema-0000300-0.150.png").is_file()
    assert f"best: std {table['best']['std']:.3f}" in output and "cmt-ema: 2 reconstruction(s) at step 300" in output
    code, output = invoke_command(ema_main, "--snapshots", toy_run["root"] / "snapshots", "--std", "0.05,x",
                                  "--out", tmp_path)
    assert code == 2 and "--std" in output


# ---- in the training loop: every phase ------------------------------------------------------------

def test_every_phase_keeps_power_ema_snapshots_that_resume_exactly_and_reconstruct(mid_students, tmp_path):
    common = dict(data=mid_students["shards"], workers=0, ema_std=(0.05, 0.1), snapshot_every=2, ckpt_every=2,
                  **FAST)
    cmt.mid_train(out=tmp_path / "whole", max_steps=4, **common)
    cmt.mid_train(out=tmp_path / "split", max_steps=2, **common)
    cmt.mid_train(out=tmp_path / "split", max_steps=4, resume=True, **common)
    for step in (2, 4):
        for std in ("0.050", "0.100"):
            name = f"phema-{step:07d}-{std}.safetensors"
            whole, split = (read_safetensors(tmp_path / run / "snapshots" / name)[0] for run in ("whole", "split"))
            assert all(torch.equal(whole[key], split[key]) for key in whole), name
    short, long = (read_safetensors(tmp_path / "whole" / "snapshots" / f"phema-0000004-{std}.safetensors")[0]
                   for std in ("0.050", "0.100"))
    assert any(not torch.equal(short[key], long[key]) for key in short)   # two different averages
    cost = json.loads((tmp_path / "whole" / "run.json").read_text())["power_ema"]
    written = sum(path.stat().st_size for path in (tmp_path / "whole" / "snapshots").glob("phema-0000004-*"))
    assert cost["stds"] == [0.05, 0.1] and cost["bytes_per_snapshot"] <= written <= cost["bytes_per_snapshot"] + 2**16
    assert cost["bytes_over_the_run"] == 2 * cost["bytes_per_snapshot"]
    result = reconstruct_ema(snapshots=tmp_path / "whole" / "snapshots", std=0.07, out=tmp_path / "ema", progress=False)
    assert load_network(result["models"][0]).config == load_network(tmp_path / "whole" / "mid.pt").config
    # pre-training and post-training keep them too
    cmt.train_diffusion(data="toy:moons", out=tmp_path / "teacher", arch="mlp", channels=16, num_blocks=1,
                        max_steps=2, batch_size=8, num_samples=0, ema_std=(0.1,), snapshot_every=1, progress=False)
    cmt.post_train(init=mid_students["endpoint"], method="ect", out=tmp_path / "post", max_steps=2, ema_std=(0.05,),
                   snapshot_every=1, **POST_FAST)
    for run, step, std in (("teacher", 2, "0.100"), ("post", 2, "0.050")):
        assert (tmp_path / run / "snapshots" / f"phema-{step:07d}-{std}.safetensors").is_file()


@pytest.mark.parametrize("options, argument", [(dict(ema_std=(0.05,)), "snapshot_every"),
                                               (dict(ema_std=(0.5,), snapshot_every=1), "ema_std")])
def test_power_ema_options_are_checked_before_anything_is_written(mid_students, tmp_path, options, argument):
    with pytest.raises(cmt.ArgumentError) as error:
        cmt.mid_train(data=mid_students["shards"], out=tmp_path / "run", workers=0, max_steps=2, **options, **FAST)
    assert error.value.argument == argument and not (tmp_path / "run").exists()
