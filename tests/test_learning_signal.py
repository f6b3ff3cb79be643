"""A learnable reward rises under GRPO: a tiny random Llama, full fine-tune, fixed seed, a fixed number of steps.

The reward is the share of completion tokens among 4 target words of a 32-word vocabulary (about 1/8 for the random
policy). The run goes through Lightning and every part of the GRPO step of `algorithm=grpo` (rollout, group
advantages, the clipped loss with the KL term against the frozen reference copy, AdamW, gradient clipping); only the
lr is raised so that a dozen steps are enough.
"""

from __future__ import annotations

import pytest

import lightning as L

from medix.data.datamodule import PromptDataModule
from medix.grpo.module import GRPOModule
from medix.rollout.hf import HFEngine
from tiny_lm import TargetWordReward, algorithm, memory_logger, one_thread, tiny_backbone, trainer, word_samples  # noqa: F401

pytestmark = pytest.mark.slow  # many GRPO steps in process

STEPS, TOKENS = 12, 8


def test_grpo_raises_a_learnable_reward(one_thread):
    L.seed_everything(0)
    algo = algorithm("grpo", group_size=8, prompts_per_step=4, max_new_tokens=TOKENS, mini_batch_size=32, lr=1e-2)
    reward = TargetWordReward(max_new_tokens=TOKENS)
    module = GRPOModule(tiny_backbone(lora=False, seed=0), HFEngine(), reward, algorithm=algo, reasoning_tag="thinking",
                        seed=0)
    logger = memory_logger()
    data = PromptDataModule.from_samples(word_samples(16), [], batch_size=4, seed=0)
    trainer(max_steps=STEPS, logger=logger).fit(module, datamodule=data)
    curve = reward.history  # mean reward of each step's 32 completions, before that step's update
    print("reward per step:", [round(r, 3) for r in curve])
    assert len(curve) == STEPS and sorted(logger.steps) == list(range(1, STEPS + 1))
    assert [logger.steps[s]["reward/overall/mean"] for s in range(1, STEPS + 1)] == curve
    first, last = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
    assert curve[0] < 0.2  # the random policy: about 4 of its 32 words are targets
    assert last > first + 0.3, curve
