"""The weights two synchronous GRPO steps leave on the tiny Llama (HF generate, LoRA; GRPO, and DAPO with refills),
as per-parameter float64 sums: `tests/assets/sync_step_golden.json` holds them so a test can show
`rollout.max_staleness=0` still trains exactly as the synchronous step did. They were first computed by the code
before asynchronous rollouts (commit e4dc74c). They were regenerated once, when the HF engine's draw became Gumbel-max
(the same distribution from another random stream, so other tokens under the same seed). With generate's old draw put
back, the code of 89b891c still left e4dc74c's values for both algorithms.
Regenerate (only when the synchronous step is meant to change): `python tests/sync_golden.py > tests/assets/...`.

The sums are compared up to float32 reordering, which differs between CPUs (AVX-512 or AVX2 kernels, other BLAS
blocking): measured here with default kernels and with ATEN_CPU_CAPABILITY=avx2, a sum moved by at most 3.3e-6 of
its scale sqrt(numel * sum of squares) (a bound on the sum of |w|), a sum of squares by 2.2e-6 of itself; one GRPO
step more or fewer moves them by 4e-2 and 0.6. `TOLERANCE` = 1e-4 lies between."""

from __future__ import annotations

import json
import math

import torch

from medix.data.datamodule import PromptDataModule
from medix.grpo.module import GRPOModule
from medix.rollout.hf import HFEngine
from tiny_lm import TargetWordReward, algorithm, memory_logger, tiny_backbone, trainer, word_samples

PROMPTS, GROUP, TOKENS = 2, 4, 8
SETTINGS = dict(group_size=GROUP, prompts_per_step=PROMPTS, max_new_tokens=TOKENS, mini_batch_size=PROMPTS * GROUP,
                lr=1e-2, beta=0.01)
TOLERANCE = 1e-4
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


def mismatches(got: dict[str, list[float]], want: dict[str, list[float]], numel: dict[str, int]) -> list[str]:
    """The parameters whose digests differ by more than float32 reordering can explain (see TOLERANCE)."""
    bad = []
    for name, (total, squares) in want.items():
        scale = math.sqrt(numel[name] * squares)
        if abs(got[name][0] - total) > TOLERANCE * scale or abs(got[name][1] - squares) > TOLERANCE * squares:
            bad.append(f"{name}: got {got[name]}, want {[total, squares]}")
    return bad


def trainable_sizes() -> dict[str, int]:
    return {n: p.numel() for n, p in tiny_backbone(lora=True).model.named_parameters() if p.requires_grad}


if __name__ == "__main__":
    print(json.dumps({"torch": torch.__version__, **{name: digest(name) for name in ALGORITHMS}}, indent=1))
