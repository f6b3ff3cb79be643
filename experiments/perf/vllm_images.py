"""Image rollouts of backbone=tiny_qwen_vl (the offline Qwen2.5-VL) through the vLLM engine and through HF generate,
side by side: the same prompts with their VQA-RAD images, G completions each of exactly N new tokens (min = max), the
same sampling (temperature 1, top_p 1). Prints completion tokens per second for each engine (the median of
--repeats rollouts after one warm-up), the vLLM server's start-up time, and one JSON line with everything.

    python experiments/perf/vllm_images.py --prompts 8 --group 4 --tokens 64 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def rollout_rate(engine, backbone, prompts, images, group: int, tokens: int, repeats: int) -> dict:
    from medix.rollout.base import Sampling

    sampling = Sampling(max_new_tokens=tokens, min_new_tokens=tokens)
    engine.generate(backbone, prompts[:1], images[:1], group_size=1, sampling=sampling)  # warm-up
    seconds, produced = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        rollout = engine.generate(backbone, prompts, images, group_size=group, sampling=sampling)
        seconds.append(time.perf_counter() - started)
        produced.append(int(rollout.completion_mask.sum()))
    rates = [n / s for n, s in zip(produced, seconds)]
    return {"seconds": seconds, "tokens": produced, "tokens_per_s": statistics.median(rates)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads for HF")
    parser.add_argument("--benchmark", default=str(REPO.parent / "shared" / "benchmarks" / "vqa_rad" / "test.jsonl"))
    parser.add_argument("--cache-dir", default=os.environ.get("MEDIX_CACHE_DIR", str(Path.home() / ".cache" / "medix")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from medix.data.images import load_image
    from medix.data.samples import Sample
    from medix.models.qwen_vl import load_qwen_vl
    from medix.rollout.hf import HFEngine
    from medix.rollout.vllm import VLLMEngine

    backbone = load_qwen_vl(name="tiny_qwen_vl", source="built", model="tiny_qwen_vl", dtype="float32",
                            gradient_checkpointing=False, train_vision_tower=True, cache_dir=args.cache_dir)
    benchmark = Path(args.benchmark)
    items = [json.loads(line) for line in benchmark.read_text().splitlines()]
    items = [i for i in items if i.get("image")][:args.prompts]
    samples = [Sample(i["id"], i["question"], "", "", i["answer"], [str(benchmark.parent / i["image"])], "vqa_rad")
               for i in items]
    prompts = [backbone.render(s, "thinking") for s in samples]
    images = [[load_image(p, min_pixels=3136, max_pixels=50176) for p in s.images] for s in samples]

    hf = rollout_rate(HFEngine(), backbone, prompts, images, args.group, args.tokens, args.repeats)
    with tempfile.TemporaryDirectory() as sync_dir:
        engine = VLLMEngine(sync_dir=sync_dir, server={"kv_cache_space_gib": 1.0, "images_per_prompt": 1})
        try:
            started = time.perf_counter()
            engine.start(backbone)
            startup = time.perf_counter() - started
            vllm = rollout_rate(engine, backbone, prompts, images, args.group, args.tokens, args.repeats)
        finally:
            engine.close()
    result = {"prompts": args.prompts, "group": args.group, "tokens": args.tokens, "threads": args.threads,
              "hf": hf, "vllm": vllm, "vllm_startup_s": startup, "load": os.getloadavg(),
              "speedup": vllm["tokens_per_s"] / hf["tokens_per_s"]}
    print(f"HF generate : {hf['tokens_per_s']:8.1f} tokens/s ({args.prompts} image prompts x {args.group}, "
          f"{args.tokens} tokens)")
    print(f"vLLM engine : {vllm['tokens_per_s']:8.1f} tokens/s (server start-up {startup:.0f} s, not counted)")
    print(f"vLLM / HF   : {result['speedup']:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
