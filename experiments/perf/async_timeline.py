"""A small timeline model of a GRPO step with synchronous and asynchronous rollouts (`rollout.max_staleness`).

It replays medix's two loops with given phase times: the producer thread (generate R under the engine's lock, then
score J; position q starts once the trainer has taken q - k) and the trainer (take; log-prob forwards F and the update U;
sync S under the same lock, so it waits for the request in flight). k = 0 is the synchronous step, R + max(J, F) + U + S
(the judge already overlaps the trainer's forwards). Two inputs:

  --measured <async_bench.py --json>   the CPU phases of the max_staleness=0 run; the model's k = 1, 2 step times
                                       next to the ones measured in the same file (the model assumes the engine and
                                       the trainer do not share hardware; on the 2-core CPU they do)
  (always)                             the paper's shape on GPUs (8 x H100 per node, Qwen3-VL-8B, 512 prompts x 5
                                       completions of up to 4,096 tokens), phases derived from token counts and
                                       throughputs stated below, for colocated sync (verl's baseline: every GPU
                                       generates, then every GPU trains), split sync (medix's rollout=vllm with the
                                       engine on its own GPUs), split async (max_staleness >= 1), and split async with
                                       streaming scoring (the judge scores each completion as it finishes)

    python experiments/perf/async_timeline.py [--measured experiments/perf/async_cpu_<date>.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Phases:
    """Seconds per GRPO step: R generation (engine), J reward (judge, on its own hardware), F the trainer's log-prob
    forwards (overlapping J in the synchronous step), U the update, S the sync."""

    R: float
    J: float
    F: float
    U: float
    S: float


def simulate(p: Phases, k: int, steps: int = 40, streaming: bool = False) -> tuple[float, float]:
    """Mean step time over the second half of `steps` GRPO steps, and the engine's idle share. `streaming`: the
    producer scores while it samples (its cycle is max(R, J) instead of R + J)."""
    if k == 0:
        step = p.R + max(p.J, p.F) + p.U + p.S
        return step, 1 - p.R / step
    lock_until, ready, taken = 0.0, {}, {}
    producer_t, q = 0.0, 0
    trainer_t, position, state, ends = 0.0, 0, "take", []
    busy = 0.0
    while position < steps:
        if state == "take" and position in ready:
            taken[position] = max(trainer_t, ready[position])
            trainer_t = taken[position] + p.F + p.U
            state = "sync"
            continue
        producer_request = None
        if q - k < 0 or (q - k) in taken:
            producer_request = max(producer_t, taken.get(q - k, 0.0))
        trainer_request = trainer_t if state == "sync" else None
        if trainer_request is not None and (producer_request is None or trainer_request <= producer_request):
            start = max(trainer_request, lock_until)
            lock_until = trainer_t = start + p.S
            ends.append(trainer_t)
            position, state = position + 1, "take"
        elif producer_request is not None:
            start = max(producer_request, lock_until)
            lock_until = start + p.R
            busy += p.R
            cycle = max(p.R, p.J) if streaming else p.R + p.J
            ready[q] = producer_t = start + cycle
            q += 1
        else:
            raise RuntimeError("timeline deadlock")  # cannot happen: the producer is gated by takes only
    half = ends[len(ends) // 2:]
    step = (half[-1] - ends[len(ends) // 2 - 1]) / len(half)
    return step, 1 - busy / ends[-1] if ends[-1] else 0.0


# ---- the paper's shape on GPUs ------------------------------------------------------------------------------------
# Every number here is an assumption, stated so it can be changed; none is measured on a GPU by medix.
PAPER = dict(
    completions=512 * 5,  # data.rollout_batch_size 512 prompts x rollout.n 5 (conf/experiment/_paper.yaml)
    prompt_tokens=1000,  # a chat prompt with one 512x512-ish image (Qwen-VL: ~256-1000 visual tokens)
    mean_completion=1000,  # mean completion tokens (max 4,096)
    params=8.8e9,  # Qwen3-VL-8B
    decode_tokens_per_gpu_s=3000.0,  # vLLM bf16 decode of an 8B model at a few hundred sequences per H100
    tail_utilisation=0.6,  # mean engine utilisation over a batch while its long completions finish
    train_tflops_per_gpu=350.0,  # ~35 % MFU of an H100's 989 dense bf16 TFLOP/s under FSDP2
    recompute=4 / 3,  # activation checkpointing: one more forward in the backward
    judge_s=30.0,  # 2,560 short judgements by Qwen3-4B on its own 2 GPUs
    sync_split_s=30.0,  # full 8B weights (16 GB) reloaded from disk by the engine (medix today, rollout.sync_dir)
    sync_colocated_s=5.0,  # weights resharded in memory between training and generation (verl's hybrid engine)
    gpus=8,
)


def paper_work(c: dict) -> tuple[float, float, float]:
    """GPU-seconds per step at full utilisation: generation, log-prob forwards, update."""
    tokens = c["completions"] * (c["prompt_tokens"] + c["mean_completion"])
    gen = c["completions"] * c["mean_completion"] / c["decode_tokens_per_gpu_s"] / c["tail_utilisation"]
    flops = c["train_tflops_per_gpu"] * 1e12
    forward = 2 * c["params"] * tokens / flops  # old log-probs (DAPO: beta 0, no reference)
    update = 6 * c["params"] * tokens * c["recompute"] / flops
    return gen, forward, update


def paper_modes(c: dict) -> dict[str, tuple[float, str]]:
    gen, forward, update = paper_work(c)
    n = c["gpus"]
    colocated = Phases(gen / n, c["judge_s"], forward / n, update / n, c["sync_colocated_s"])
    out = {"colocated sync": (simulate(colocated, 0)[0], f"{n} GPUs take turns")}

    def best(k: int, streaming: bool = False) -> tuple[float, str]:
        options = []
        for engine in range(1, n):
            phases = Phases(gen / engine, c["judge_s"], forward / (n - engine), update / (n - engine),
                            c["sync_split_s"])
            options.append((simulate(phases, k, streaming=streaming)[0], f"{engine} engine + {n - engine} trainer GPUs"))
        return min(options)

    out["split sync (k=0)"] = best(0)
    out["split async (k=1)"] = best(1)
    out["split async (k=2)"] = best(2)
    out["split async + streaming scoring (k=1)"] = best(1, streaming=True)
    return out


def measured_block(path: Path) -> None:
    data = json.loads(path.read_text())
    skip = data.get("skip", 1)
    runs = {r["max_staleness"]: r for r in data["runs"]}

    def med(run, key):
        values = run["steps"].get(key, [])
        return statistics.median(values[skip:] or values) if values else 0.0

    base = runs[0]
    update, waited = med(base, "time/update_s"), med(base, "time/reward_wait_s")
    phases = Phases(R=med(base, "time/rollout_s"), J=med(base, "time/reward_s"), F=0.0, U=update,
                    S=med(base, "rollout/sync_s"))
    # update_s excludes the reward wait; the synchronous step measured = R + wait + U + S (+ logging)
    print(f"measured phases (max_staleness=0, medians after {skip} step(s)): R {phases.R:.2f} s, J {phases.J:.2f} s "
          f"(waited for {waited:.2f} s of it), update {phases.U:.2f} s, sync {phases.S:.2f} s")
    print("| max_staleness | model step (s) | measured median step (s) | model engine idle |")
    print("| --- | --- | --- | --- |")
    for k, run in sorted(runs.items()):
        model = Phases(phases.R, waited if k == 0 else phases.J, 0.0, phases.U, phases.S)
        step, idle = simulate(model, k)
        print(f"| {k} | {step:.2f} | {med(run, 'time/step_s'):.2f} | {idle:.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measured", type=Path, help="an async_bench.py --json file")
    args = parser.parse_args()
    if args.measured:
        measured_block(args.measured)
        print()
    print("paper shape on 8 GPUs (assumptions in PAPER):")
    for label, changes in [("as assumed", {}), ("short completions (mean 400)", {"mean_completion": 400}),
                           ("long tail (utilisation 0.35)", {"tail_utilisation": 0.35}),
                           ("NCCL weight sync (5 s)", {"sync_split_s": 5.0})]:
        modes = paper_modes({**PAPER, **changes})
        colocated, split = modes["colocated sync"][0], modes["split sync (k=0)"][0]
        print(f"\n{label}:")
        print("| mode | step (s) | vs colocated sync | vs split sync | GPUs |")
        print("| --- | --- | --- | --- | --- |")
        for mode, (step, gpus) in modes.items():
            print(f"| {mode} | {step:.1f} | {colocated / step:.2f}x | {split / step:.2f}x | {gpus} |")
    print("\nverl fully-async (published): 2.35-2.67x over colocated sync, Qwen2.5-Math-7B on 128 H20 (about 2x on "
          "32-64), with partial rollouts and long responses")


if __name__ == "__main__":
    main()
