#!/usr/bin/env bash
# The reward-design ablation at CPU scale (see README.md): one Hydra multirun, four reward mixes, same seed and data.
# Usage (from the repository root, venv active or PYTHON=.venv/bin/python): bash experiments/reward_ablation/run.sh
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"${PYTHON:-python}" -m medix.run -m reward=composite,llm_only,embed_only,llm_embed \
  judge=rule reward.embedding_mode=continuous \
  algorithm.lr=1e-4 algorithm.group_size=4 algorithm.prompts_per_step=2 algorithm.max_new_tokens=48 \
  trainer.max_steps=5 trainer.val_every=5 dataset.val_size=8 \
  logger.tracking_uri=sqlite:///experiments/reward_ablation/mlflow.db logger.experiment_name=reward_ablation \
  logger.sample_table_every=5 hydra.sweep.dir=outputs/reward_ablation/$(date +%Y-%m-%d_%H-%M-%S) "$@"
