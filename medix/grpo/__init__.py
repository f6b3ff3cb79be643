"""GRPO-family training: advantages and losses (pure functions), rollout and the LightningModule."""
