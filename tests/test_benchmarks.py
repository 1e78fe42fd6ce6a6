"""The claim and trajectory-count benchmarks: their cost arithmetic, and their smallest form end to end
(every stage, the JSON schema of docs/claim.md and docs/trajectories.md, the files)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TWO_CPU_ENV

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import bench_claim  # noqa: E402
from cmt.trainers.mid import FLOWMAP_VELOCITY_SHARE  # noqa: E402


def curve(values, batch=10, setup=0.0):
    """Points every 10 steps with the given 2-step metrics."""
    return {"curve": [{"step": 10 * i, "passes": setup + 10 * i * batch, "wall_s": setup / 100 + i,
                       "metric_2step": value} for i, value in enumerate(values)]}


def test_cost_ratio_counts_a_baseline_that_never_reaches_with_its_whole_budget():
    cmt = curve([3.0, 1.4, 1.0], setup=500.0)           # reaches 1.5 at step 10: 500 + 100 passes
    slow = curve([9.0, 5.0, 2.0, 1.45, 1.2])             # reaches 1.5 at step 30: 300 passes
    never = curve([9.0, 8.0, 7.0, 6.0, 5.0])             # never: its whole budget, 400 passes
    assert bench_claim.first_reach(cmt["curve"], 1.5)["step"] == 10
    ratio, best = bench_claim.seed_ratio(cmt, [slow, never], 1.5, "passes")
    assert best == 300 and ratio == pytest.approx(600 / 300)
    ratio, best = bench_claim.seed_ratio(cmt, [never], 1.5, "passes")
    assert best == 400 and ratio == pytest.approx(600 / 400)
    assert bench_claim.seed_ratio(cmt, [slow], 0.5, "passes") == (None, None)   # the CMT start never gets there
    assert bench_claim.median_ratio([0.5, None, 0.25]) == 0.5
    assert bench_claim.median_ratio([0.5, None, None]) is None
    assert bench_claim.cumulative_wall([{"step": 5, "sec_per_step": 2.0}, {"step": 10, "sec_per_step": 1.0}]) == \
        [[0, 0.0], [5, 10.0], [10, 15.0]]
    assert bench_claim.wall_at([[0, 0.0], [5, 10.0], [10, 15.0]], 7) == pytest.approx(12.0)


def run_script(script, out, *args):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--out", str(out), "--smoke", *args],
                            env=TWO_CPU_ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def test_claim_smoke_writes_the_summary_schema_curves_and_figures(tmp_path):
    out = tmp_path / "claim"
    run_script("bench_claim.py", out, "--docs", tmp_path / "docs")
    claim = json.loads((tmp_path / "docs" / "claim.json").read_text())
    assert set(claim) == {"toy"} and set(claim["toy"]) == {"ect", "meanflow"}
    for method, entry in claim["toy"].items():
        for key in ("cost_ratio_q1", "cost_ratio_q2", "final_2step_over_teacher"):
            assert key in entry
        assert entry["final_2step_over_teacher"] > 0 and "whole budget" in entry["not_reached"]
        cmt_start = bench_claim.CMT_START[method]
        assert set(entry["curves"]) == {name for name, (m, _) in bench_claim.STARTS.items() if m == method}
        cmt, baseline = entry["curves"][cmt_start]["0"], entry["curves"][entry["baselines"][0]]["0"]
        assert baseline["steps"] == 4 * cmt["steps"]                       # baselines run 4x the CMT start
        assert [p["step"] for p in cmt["curve"]] == [0, 2] and [p["step"] for p in baseline["curve"]] == [0, 2, 4, 6, 8]
        # The CMT start's cost includes the build (64 x 16 teacher forwards at 1/3) and mid-training (4 x 32,
        # and for flow maps the velocity rows' teacher forwards at 1/3).
        velocity_rows = 4 * 32 * FLOWMAP_VELOCITY_SHARE if method == "meanflow" else 0   # one teacher forward each
        assert cmt["curve"][0]["passes"] == pytest.approx((64 * 16 + velocity_rows) / 3 + 4 * 32)
        assert baseline["curve"][0]["passes"] == 0
        assert cmt["curve"][-1]["passes"] - cmt["curve"][0]["passes"] == pytest.approx(2 * cmt["batch_size"])
        assert all(math.isfinite(p["metric_2step"]) for p in cmt["curve"] + baseline["curve"])
    for name in ("claim.md", "claim_cost_checkerboard.png", "claim_cost_checkerboard_samples.png"):
        assert (out / name).stat().st_size > 0
    assert (tmp_path / "docs" / "img" / "claim_cost_checkerboard.png").is_file()
    # A rerun finds every stage done and trains nothing; a stage whose model exists but whose result
    # and evaluations were lost (an interruption after training) is evaluated again, not retrained.
    seed_folder = out / "checkerboard" / "seed0"
    before = (seed_folder / "ect-random.json").stat().st_mtime_ns
    (seed_folder / "ect-cmt.json").unlink()
    (seed_folder / "ect-cmt" / "curve.json").unlink()
    output = run_script("bench_claim.py", out)
    assert "$ cmt-train" not in output and (seed_folder / "ect-random.json").stat().st_mtime_ns == before
    assert json.loads((seed_folder / "ect-cmt" / "curve.json").read_text())[-1][0] == 2
    assert json.loads((out / "claim.json").read_text())["toy"]["ect"]["curves"]["ect-cmt"]["0"]["steps"] == 2


def test_trajectories_smoke_writes_rows_for_every_size(tmp_path):
    out = tmp_path / "trajectories"
    run_script("bench_trajectories.py", out)
    summary = json.loads((out / "trajectories.json").read_text())
    assert [row["size"] for row in summary["rows"]] == [16, 64]
    for run in summary["runs"]:
        for name in ("mid", "ect"):
            values = run[name]
            assert values["metric_gap"] == pytest.approx(values["metric_1step_heldout_noise"]
                                                         - values["metric_1step_train_noise"])
            assert all(math.isfinite(v) for v in values.values())
    runs = {json.loads((out / "seed0" / f"n{size}" / "mid" / "run.json").read_text())["trajectories"]
            for size in (16, 64)}
    assert runs == {16, 64}   # each mid-training saw only its prefix of the build
    assert (out / "trajectories.png").stat().st_size > 0 and (out / "trajectories.md").is_file()


# The quick forms, smaller still (the test shows the script runs and ends with its named ratios).
QUICK_FORMS = {
    "bench_posthoc_ema.py": ((), ("gain_moons",)),
    "bench_reader.py": (("--num-trajectories", "32", "--shard-size", "8", "--rounds", "1", "--batches", "3"),
                        ("reader_vs_memmap", "reader_vs_memmap_1thread", "wds_vs_zarr", "workers2_vs_workers0",
                         "rss_4x_vs_1x")),
    "bench_mid.py": (("--num-trajectories", "16", "--steps", "1", "--warmup", "1", "--rounds", "1"),
                     ("step_vs_bare", "mid_vs_official")),
    # a SiT student (tiny) and MeanFlow post-training, through the trainer and written out plainly
    "bench_mid.py --sit": (("sit-tiny/2", "--latent-side", "8", "--batch-size", "4", "--nfe", "4", "--num-trajectories",
                            "4", "--steps", "1", "--warmup", "1", "--rounds", "1"),
                           ("step_vs_bare", "mid_vs_official", "meanflow_vs_bare")),
    "gpu_sit.py": ((), ("sit-tiny2_mid_fp32_s_per_step", "sit-tiny2_meanflow_bf16_s_per_step",
                        "build_fp32_trajectories_per_s")),
    "gpu_data_path.py": ((), ("build_vs_bare", "build_trajectories_per_s", "mid_step_s", "data_wait_share")),
    "gpu_edm.py": ((), ("build_vs_bare", "build_trajectories_per_s", "mid_s_per_step", "mid_states_per_s")),
    # EDM's DDPM++ CIFAR-10 teacher (random weights, full size): 2 trajectories of 2 steps.
    "bench_build.py": (("--teacher", "ddpmpp-cifar10", "--num-trajectories", "2", "--batch-size", "2", "--shard-size",
                        "2", "--nfe", "2", "--reader-batches", "5", "--reader-batch-size", "8", "--no-step-rate"),
                       ("build_vs_bare",)),
    "bench_ema.py": (("--steps", "1", "--warmup", "0", "--rounds", "1", "--batch-size", "4", "--update-calls", "2"),
                     ("phema_vs_plain", "update_ms", "update_share", "memory_vs_state")),
    "bench_images.py": (("--small", "200", "--large", "400", "--distinct", "16", "--rounds", "1", "--batches", "2",
                         "--rss-batches", "2", "--encode-count", "16"),
                        ("stream0_vs_bare", "stream_auto_vs_bare", "rss_large_vs_small", "encode_vs_bare")),
    "gpu_latents.py": ((), ("encode_vs_bare", "post_s_per_step", "post_images_per_s", "data_wait_share")),
    "bench_meanflow_drift.py": (("--num-trajectories", "32", "--mid-steps", "4", "--steps", "2", "--num-samples", "200"),
                                ("share0_u_error_r=0", "share0_dudt_error_r=0", "share0_u_error_r=t",
                                 "share0.25_recipe_seed0_2step_vs_start", "share0.25_u_error_r=t")),
}


@pytest.mark.parametrize("script", sorted(QUICK_FORMS))
def test_quick_form_ends_with_its_ratios(script):
    args, names = QUICK_FORMS[script]
    script, *variant = script.split()
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick", *variant, *args], env=TWO_CPU_ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    pairs = dict(pair.rsplit("=", 1) for pair in result.stdout.strip().splitlines()[-1].split())
    for name in names:
        assert math.isfinite(float(pairs[name])) and float(pairs[name]) > 0, (name, pairs)


def test_edm_parity_prints_the_table_of_docs_parity():
    result = subprocess.run([sys.executable, str(BENCHMARKS / "edm_parity.py")], env=TWO_CPU_ENV, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| ddpmpp |" in result.stdout and "noise equal, labels equal" in result.stdout
    pairs = dict(pair.rsplit("=", 1) for pair in result.stdout.strip().splitlines()[-1].split())
    assert int(pairs["network_cases"]) == 42 and float(pairs["networks_max_rel"]) <= 1e-5
    assert 0 < float(pairs["trajectory_max_rel"]) <= 2e-6


def test_sit_parity_table_is_measured_from_the_fixtures():
    result = subprocess.run([sys.executable, str(BENCHMARKS / "sit_parity.py")], env=TWO_CPU_ENV, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    pairs = {name: float(value) for name, value in
             (pair.rsplit("=", 1) for pair in result.stdout.strip().splitlines()[-1].split())}
    assert all(pairs[f"{name}_{kind}"] < 1e-5 for name in ("sit_p2_ls", "sit_p4", "sit_p8_ls", "port_p2")
               for kind in ("native", "D"))
    assert pairs["ode_euler"] < 1e-5 and pairs["ode_euler_cfg4"] < 1e-5 and pairs["ode_heun2_in_t"] < 1e-5
    assert 0.01 < pairs["ode_heun2"] < 0.1   # SiT's Heun averages slopes in t, ours in sigma (docs/benchmarks.md)
