#!/usr/bin/env bash
# Issue 23's device check, in one call on a lent GPU (README.md, "CUDA"). Carry .whl (trl, transformers, datasets,
# peft, dill, multiprocess wheels; README.md says which); everything lands in $OUT, each step also as it happens in
# $OUT/*.steps.jsonl (a time limit keeps what ran).
#   (The divergence of 2026-11-26 is explained and fixed: README.md, "CUDA, H200, 2026-12-04"; step_probe.py stays
#   for the next one.)
#   1. grpo_vs_trl.py --device cuda: the CUDA preset (random 0.46B Qwen2, 16x8, 64-token prompts, 256 new tokens,
#      bf16-mixed), medix (trainer=gpu, the whole mini-batch per forward/backward as TRL) and TRL 1.16 in one
#      process, 2 warm-up + 10 timed steps, finite-checked. TRL's LM-head tile: 8192 rows.
#   2. the same shape with medix under FSDP2 on the one card (trainer=fsdp: bf16 units, fp32 masters).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, trl, peft, lightning; print('torch', torch.__version__, 'transformers',
  transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'lightning', lightning.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"
timeout 300 python3 experiments/perf/grpo_vs_trl.py --device cuda --check-finite --warmup 2 --steps 10 \
  --trl-logprob-chunk 8192 --json "$OUT/cuda_bf16.json" 2>&1 | grep -v "Warning\|^\[vm\|warn" | tee "$OUT/cuda_bf16.log"
timeout 200 python3 experiments/perf/grpo_vs_trl.py --device cuda --check-finite --warmup 2 --steps 10 --sides medix \
  --medix-strategy fsdp --json "$OUT/cuda_fsdp.json" 2>&1 | grep -v "Warning\|^\[vm\|warn" | tee "$OUT/cuda_fsdp.log"
