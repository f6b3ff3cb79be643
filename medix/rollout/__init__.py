"""Rollout engines: sample G completions per prompt from the policy (hf: in-process generate; vllm: a server)."""
