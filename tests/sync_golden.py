"""The weights two synchronous GRPO steps leave on the tiny Llama (HF generate, LoRA; GRPO, and DAPO with refills),
as per-parameter float64 sums: `tests/assets/sync_step_golden.json` holds them as the code before asynchronous
rollouts computed them (commit e4dc74c), so a test can show `rollout.max_staleness=0` still trains exactly so.
Regenerate (only when the synchronous step is meant to change): `python tests/sync_golden.py > tests/assets/...`."""

from __future__ import annotations

import json

import torch

from medix.data.datamodule import PromptDataModule
from medix.grpo.module import GRPOModule
from medix.rollout.hf import HFEngine
from tiny_lm import TargetWordReward, algorithm, memory_logger, tiny_backbone, trainer, word_samples

PROMPTS, GROUP, TOKENS = 2, 4, 8
SETTINGS = dict(group_size=GROUP, prompts_per_step=PROMPTS, max_new_tokens=TOKENS, mini_batch_size=PROMPTS * GROUP,
                lr=1e-2, beta=0.01)
ALGORITHMS = {"grpo": {}, "dapo": {"dynamic_sampling.max_tries": 3, "dynamic_sampling.min_mean": 0.2}}


def digest(name: str, engine=None, steps: int = 2) -> dict[str, list[float]]:
    """{parameter: [sum, sum of squares]} of the trainable weights after `steps` GRPO steps of algorithm `name`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        algo = algorithm(name, **SETTINGS, **ALGORITHMS[name])
        module = GRPOModule(tiny_backbone(lora=True), engine or HFEngine(), TargetWordReward(max_new_tokens=TOKENS),
                            algorithm=algo, reasoning_tag="thinking", seed=0)
        data = PromptDataModule.from_samples(word_samples(8), [], batch_size=PROMPTS, seed=0)
        trainer(max_steps=steps, logger=memory_logger()).fit(module, datamodule=data)
    finally:
        torch.set_num_threads(threads)
    return {n: [float(p.detach().double().sum()), float(p.detach().double().pow(2).sum())]
            for n, p in module.model.named_parameters() if p.requires_grad}


if __name__ == "__main__":
    print(json.dumps({"torch": torch.__version__, **{name: digest(name) for name in ALGORITHMS}}, indent=1))
