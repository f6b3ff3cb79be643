#!/usr/bin/env bash
# The learning-curve run (see README.md): SmolLM2-135M + LoRA on medix_mini, rule judge, continuous embedding reward,
# after a 6-step format warm start (warm_start_probe.py: the policy then writes the form in ~60% of samples).
# Usage (from the repository root, venv active or PYTHON=.venv/bin/python): bash experiments/learning_curve/run.sh [extra hydra overrides]
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=outputs/learning_curve/$(date +%Y-%m-%d_%H-%M-%S)
"${PYTHON:-python}" -m medix.run judge=rule reward.components.embedding.mode=continuous \
  callbacks.warm_start.steps=6 callbacks.warm_start.lr=1e-3 \
  algorithm.optimizer.lr=1e-4 algorithm.group_size=4 algorithm.prompts_per_step=2 algorithm.sampling.max_new_tokens=64 \
  trainer.max_steps=30 trainer.val_check_interval=10 dataset.val_size=8 \
  logger.tracking_uri=sqlite:///experiments/learning_curve/mlflow.db logger.experiment_name=learning_curve \
  callbacks.samples.every_n_steps=5 hydra.run.dir="$out" "$@"
