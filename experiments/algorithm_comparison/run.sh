#!/usr/bin/env bash
# GRPO vs DAPO vs GSPO at CPU scale (see README.md): one Hydra multirun, same reward, seed and data.
# Usage (from the repository root, venv active or PYTHON=.venv/bin/python): bash experiments/algorithm_comparison/run.sh
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"${PYTHON:-python}" -m medix.run -m algorithm=grpo,dapo,gspo callbacks.warm_start.steps=0 \
  judge=rule reward.components.embedding.mode=continuous \
  algorithm.optimizer.lr=1e-4 algorithm.group_size=4 algorithm.prompts_per_step=2 algorithm.sampling.max_new_tokens=48 \
  algorithm.mini_batch_size=8 algorithm.dynamic_sampling.max_tries=3 \
  trainer.max_steps=4 trainer.val_check_interval=4 dataset.val_size=8 \
  logger.tracking_uri=sqlite:///experiments/algorithm_comparison/mlflow.db \
  logger.experiment_name=algorithm_comparison callbacks.samples.every_n_steps=4 \
  hydra.sweep.dir=outputs/algorithm_comparison/$(date +%Y-%m-%d_%H-%M-%S) "$@"
