#!/usr/bin/env bash
# Offline evaluation of the default backbone (SmolLM2-135M-Instruct, no training) on the first 25 items of every
# paper task that has a local copy in /work/shared/benchmarks (12 tasks, 300 items), judged by the offline local
# judge (judge=local: Qwen2.5-Coder-1.5B-Instruct Q4_K_M on llama.cpp) with its own tuned YES/NO prompt and logprob
# verdict (judge_protocol.prompt=judge, as in training). Resumable: rerun the same command to continue.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-outputs/eval_offline}
mkdir -p "$OUT"
exec python -m medix.evaluate \
  benchmark=all benchmark.data_dir="${BENCHMARKS:-/work/shared/benchmarks}" benchmark.missing=skip benchmark.limit=25 \
  generation.max_new_tokens=48 generation.batch_size=8 judge_protocol.prompt=judge \
  judge.timeout_s=300 eval.output_dir="$OUT" eval.run_name=smollm2_135m-offline-300 \
  logger.tracking_uri="sqlite:///$OUT/mlflow.db" hydra.run.dir="$OUT/hydra" "$@"
