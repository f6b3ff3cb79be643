#!/usr/bin/env bash
# The device check for issues 4 and 9, in one call on a lent GPU (see README.md, "CUDA"):
#   1. gpu_probe.py: forward/backward of the random 0.4B Qwen2 at 128 rows × 320 tokens (the CUDA preset's batch),
#      bf16 autocast, an explicit attention mask, with and without PyTorch's cuDNN attention backend;
#   2. grpo_vs_trl.py --device cuda (bf16-mixed, the shape) with --check-finite and cuDNN attention off;
#      TRL's LM-head tile is set to 8192 rows (its default 32768 rows × 151,936 vocab is a 5·10⁹-element tile).
# Wheels for trl/transformers/datasets/peft/dill/multiprocess travel in .whl (carry it). Output lands in $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 90 python3 experiments/perf/gpu_probe.py --rows 128 --modes bf16-autocast --heads plain --mask --no-cudnn-sdp \
  2>&1 | grep -v Warning | tee "$OUT/probe.log"
timeout 240 python3 experiments/perf/grpo_vs_trl.py --device cuda --no-cudnn-sdp --check-finite --warmup 1 --steps 3 \
  --trl-logprob-chunk 8192 --json "$OUT/cuda_bf16.json" 2>&1 | grep -v "Warning\|^\[vm" | tee "$OUT/cuda_bf16.log"
