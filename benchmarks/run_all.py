"""`make bench`: every benchmark's `--quick` form in turn, each in its own process.

The quick forms run every stage of each script at small sizes (about ten minutes in all on 2 CPU
cores): they show the scripts work, not the figures of docs/benchmarks.md, docs/claim.md and
docs/trajectories.md, whose documents give the full commands. Exits non-zero when any benchmark fails.

    python benchmarks/run_all.py
"""
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main():
    failed = []
    with tempfile.TemporaryDirectory(prefix="cmt-bench-") as scratch:
        for script, *args in (["bench_build.py", "--quick"], ["bench_mid.py", "--quick"],
                              ["bench_mid.py", "--quick", "--sit", "sit-tiny/2", "--latent-side", "8", "--batch-size",
                               "4", "--nfe", "4", "--num-trajectories", "4", "--rounds", "1"],
                              ["sit_parity.py"], ["bench_reader.py", "--quick"],
                              ["bench_ema.py", "--quick"], ["bench_posthoc_ema.py", "--quick"],
                              ["bench_images.py", "--quick"],
                              ["bench_claim.py", "--quick", "--out", str(Path(scratch) / "claim")],
                              ["bench_trajectories.py", "--quick", "--out", str(Path(scratch) / "trajectories")]):
            print(f"== {script} {' '.join(args)}", flush=True)
            started = time.perf_counter()
            if subprocess.run([sys.executable, str(HERE / script), *args]).returncode:
                failed.append(script)
            print(f"== {script}: {time.perf_counter() - started:.0f} s\n", flush=True)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
