#!/usr/bin/env bash
# Which batch shapes of the CUDA preset (random 0.4B Qwen2, bf16-mixed) diverge after one step? Two finite-checked
# steps per shape, both sides; each line of $OUT/bisect.log says the shape and any non-finite report.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu_bisect}; mkdir -p "$OUT"
for shape in "2 2 8 8" "16 8 64 16" "4 8 64 256" "16 8 64 64"; do
  set -- $shape
  echo "== prompts=$1 group=$2 prompt_tokens=$3 completion=$4" | tee -a "$OUT/bisect.log"
  timeout 45 python3 experiments/perf/grpo_vs_trl.py --device cuda --check-finite --warmup 0 --steps 2 \
    --prompts "$1" --group "$2" --prompt-tokens "$3" --completion "$4" --trl-logprob-chunk 8192 2>&1 \
    | grep -E "step [0-9]|non-finite|ratio|Error:" | tee -a "$OUT/bisect.log"
done
