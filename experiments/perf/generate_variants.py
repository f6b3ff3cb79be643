"""The HF engine's rollout alone, its variants taking turns in one process (so a busy machine slows each alike):
the group's prompt KV in transformers' dynamic cache or in a static cache sized for the completions, and a LoRA
policy sampling unmerged or with its adapters folded into temporary weight copies (`rollout.merge_lora`).

    python experiments/perf/generate_variants.py                 # SmolLM2-135M + LoRA r16, 4 prompts x 4 x 32 tokens
    python experiments/perf/generate_variants.py --repeats 5

Per variant: the median seconds of one `HFEngine.generate` call and its minor page faults; then whether every variant
sampled the same tokens as the first under the same seed. The LoRA B matrices get small random values first (a
fresh adapter's are zero, which would make merging a no-op).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_vs_trl  # noqa: E402 (the CPU preset's backbone and prompts)

import medix.rollout.hf as hf  # noqa: E402
from medix.rollout.base import Sampling  # noqa: E402


def dynamic_group_cache(model, cache, rows, max_length):
    """The rollout as it was before the static cache: the prompt's dynamic cache, reordered to the group's rows."""
    cache.reorder_cache(rows)
    return cache


VARIANTS = {  # name: (static cache, merged LoRA)
    "dynamic cache, LoRA unmerged": (False, False),
    "static cache, LoRA unmerged": (True, False),
    "dynamic cache, LoRA merged": (False, True),
    "static cache, LoRA merged (default)": (True, True),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32)
    args = p.parse_args(argv)
    backbone = grpo_vs_trl.smollm2_backbone(types.SimpleNamespace(dtype="float32", tuning="lora"))
    with torch.no_grad():
        for name, param in backbone.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    prompts = [backbone.render(s, "thinking") for s in grpo_vs_trl.medix_mini_prompts(args.prompts)]
    sampling = Sampling(max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    static_group_cache = hf.group_cache
    hf.HFEngine().generate(backbone, prompts, group_size=args.group, sampling=Sampling(max_new_tokens=2), seed=0)
    results = {name: [] for name in VARIANTS}
    for repeat in range(args.repeats):
        for name, (static, merged) in VARIANTS.items():
            hf.group_cache = static_group_cache if static else dynamic_group_cache
            engine = hf.HFEngine(merge_lora=merged)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            rollout = engine.generate(backbone, prompts, group_size=args.group, sampling=sampling, seed=repeat)
            seconds = time.perf_counter() - start
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            results[name].append((seconds, faults, rollout.input_ids))
            print(f"repeat {repeat}  {name:36s} {seconds:6.2f} s  {faults / 1e3:5.0f}k minor faults", flush=True)
    hf.group_cache = static_group_cache
    first = next(iter(VARIANTS))
    print(f"\n{args.prompts} prompts x {args.group} completions x {args.tokens} tokens, median of {args.repeats}")
    for name, runs in results.items():
        seconds = sorted(r[0] for r in runs)
        same = all(torch.equal(r[2], f[2]) for r, f in zip(runs, results[first]))
        print(f"{name:36s} {seconds[len(seconds) // 2]:6.2f} s (min {seconds[0]:.2f}, max {seconds[-1]:.2f})  "
              f"same tokens as '{first}': {same}")


if __name__ == "__main__":
    main()
