#!/usr/bin/env bash
# The QC benchmark on a GPU machine that has JAX but no TensorFlow (see README, "Speed").
# Needs wheels for keras, namex, optree and SimpleITK in .whl/ (Python 3.12, manylinux).
# Usage: bash bench/gpu.sh RESULTS_DIR [MODES]
set -euo pipefail
results=${1:?results folder}; modes=${2:-fast,mixed,naive}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD KERAS_BACKEND=jax PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m dqc.bench --synthetic 40,360 --shape 160x192x160 --cycles 1 --modes "$modes" \
  --eval-batch-size 20 --out /tmp/bench --quiet 2>&1 | grep -v '^warning' \
  | tee "$results/bench.log" || echo "benchmark stopped early"
cp /tmp/bench/bench.json "$results/" 2>/dev/null || true
