"""The MediX-R1 composite reward: format, modality, embedding similarity and LLM-judge components."""

from medix.rewards.composite import COMPONENTS, CompositeReward, RewardBatch, build_reward

__all__ = ["COMPONENTS", "CompositeReward", "RewardBatch", "build_reward"]
