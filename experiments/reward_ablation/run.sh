#!/usr/bin/env bash
# The reward-design ablation at CPU scale (see README.md): one Hydra multirun, four reward mixes, the same seed, data,
# warm start and judge (the offline judge=local, Qwen2.5-Coder-1.5B); every mix validated with the composite reward.
# The embedding component is continuous (cosine clipped to [0, 1]) in training and validation: the paper's binary
# cosine >= 0.8 is almost never reached by this policy, which would leave embed_only without a signal.
# Usage (from the repository root): PYTHON=.venv/bin/python bash experiments/reward_ablation/run.sh [overrides]
# REWARDS=llm_only,embed_only runs only those mixes (e.g. to finish a sweep that stopped).
set -euo pipefail
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"${PYTHON:-python}" -m medix.run -m reward=${REWARDS:-composite,llm_only,embed_only,llm_embed} +reward@val_reward=composite \
  reward.components.embedding.mode=continuous val_reward.components.embedding.mode=continuous \
  algorithm.optimizer.lr=3e-4 trainer.max_steps=16 trainer.val_check_interval=8 \
  callbacks.samples.every_n_steps=1 callbacks.reward_hacking.window=6 \
  logger.tracking_uri=sqlite:///experiments/reward_ablation/mlflow.db logger.experiment_name=reward_ablation \
  hydra.sweep.dir=outputs/reward_ablation/$(date +%Y-%m-%d_%H-%M-%S) "$@"
