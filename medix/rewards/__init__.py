"""The MediX-R1 composite reward: format, modality, embedding similarity and LLM-judge components (and yours)."""

from medix.rewards.composite import PAPER_COMPONENTS, CompositeReward, RewardBatch

__all__ = ["PAPER_COMPONENTS", "CompositeReward", "RewardBatch"]
