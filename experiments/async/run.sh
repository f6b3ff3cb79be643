#!/usr/bin/env bash
# Learning with asynchronous rollouts (see README.md): the offline default (`python -m medix.run`) with rollout=vllm,
# max_staleness 0 and 1, seeds 0 and 1, one run after the other (each starts its own vLLM and judge servers).
# Usage (from the repository root): bash experiments/async/run.sh [extra hydra overrides for every run]
set -euo pipefail
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
stamp=$(date +%Y-%m-%d_%H-%M-%S)
for seed in ${SEEDS:-0 1}; do
  for k in ${STALENESS:-0 1}; do
    "${PYTHON:-.venv/bin/python}" -m medix.run rollout=vllm rollout.max_staleness="$k" seed="$seed" \
      logger.tracking_uri=sqlite:///experiments/async/mlflow.db logger.experiment_name=async \
      hydra.run.dir="outputs/async/$stamp/seed${seed}_k${k}" "$@"
  done
done
