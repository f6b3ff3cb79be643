#!/usr/bin/env bash
# The reward-design ablation at CPU scale (see README.md): four reward mixes x three seeds, the same data split and
# order (dataset.seed=0; the seed changes the LoRA init and the sampling), warm start and judge (the offline judge=local,
# Qwen2.5-Coder-1.5B); every mix validated with the composite reward at the last step. One Hydra multirun per seed, so a
# seed that fails leaves the others standing.
# The embedding component is continuous (cosine clipped to [0, 1]) in training and validation: the paper's binary
# cosine >= 0.8 is almost never reached by this policy, which would leave embed_only without a signal.
# Usage (from the repository root): PYTHON=.venv/bin/python bash experiments/reward_ablation/run.sh [overrides]
# SEEDS="2 3" and REWARDS=llm_only,embed_only run only those (e.g. to finish a sweep that stopped).
set -uo pipefail
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
status=0
for seed in ${SEEDS:-1 2 3}; do
  "${PYTHON:-python}" -m medix.run -m seed="$seed" reward=${REWARDS:-composite,llm_only,embed_only,llm_embed} \
    +reward@val_reward=composite dataset.seed=0 \
    reward.components.embedding.mode=continuous val_reward.components.embedding.mode=continuous \
    algorithm.optimizer.lr=3e-4 algorithm.prompts_per_step=1 algorithm.mini_batch_size=4 \
    trainer.max_steps=24 trainer.val_check_interval=24 \
    callbacks.samples.every_n_steps=1 callbacks.reward_hacking.window=6 \
    logger.tracking_uri=sqlite:///experiments/reward_ablation/mlflow.db logger.experiment_name=reward_ablation_seeds \
    hydra.sweep.dir=outputs/reward_ablation/seed$seed-$(date +%Y-%m-%d_%H-%M-%S) "$@" || status=$?
done
exit $status
