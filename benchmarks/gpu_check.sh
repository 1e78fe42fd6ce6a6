#!/usr/bin/env bash
# The CUDA paths end to end (bf16 mid-training, fp32 post-training, the precision guard, EDM2 fp16
# weights, MeanFlow's JVP under the chosen precision), with their figures; docs/gpu.md.
# Under 8 minutes on one GPU (200 steps per run). Without CUDA it runs what it can on the CPU with
# tiny sizes and prints what it skipped. Usage: benchmarks/gpu_check.sh [--steps N] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" benchmarks/gpu_check.py "$@"
