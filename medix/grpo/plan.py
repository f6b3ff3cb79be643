"""The shape of a GRPO update: which rollout rows each optimizer step takes (a mini-batch), and how those rows split
into forward/backward passes (micro-batches) whose gradients add up to the mini-batch's. Pure functions."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MicroBatch:
    """Rows for one forward/backward. `counted` False: a padding pass of a data-parallel rank that has fewer rows
    than another (its loss is multiplied by a zero mask: it adds no gradient and no metrics, but the rank takes part
    in the same number of backwards, whose collectives must match)."""

    rows: list[int]
    counted: bool = True


def update_plan(n_rows: int, mini_batch_size: int, micro_batch_size: int | None) -> list[list[MicroBatch]]:
    """One list of micro-batches per optimizer step: mini-batches of `mini_batch_size` consecutive rows (the last
    may be smaller), each cut into micro-batches of `micro_batch_size` rows (None: the whole mini-batch)."""
    if n_rows < 1 or mini_batch_size < 1 or (micro_batch_size is not None and micro_batch_size < 1):
        raise ValueError(f"update_plan: n_rows={n_rows}, mini_batch_size={mini_batch_size} and micro_batch_size="
                         f"{micro_batch_size} must be >= 1")
    size = min(mini_batch_size, n_rows)
    micro = micro_batch_size or size
    steps = []
    for start in range(0, n_rows, size):
        rows = list(range(start, min(start + size, n_rows)))
        steps.append([MicroBatch(rows[i:i + micro]) for i in range(0, len(rows), micro)])
    return steps


def padded_plan(plan: list[list[MicroBatch]], passes: list[int]) -> list[list[MicroBatch]]:
    """`plan` padded to `passes[i]` micro-batches in optimizer step i (and to len(passes) steps): what every rank
    runs when `passes` holds, step by step, the most micro-batches any rank has. A padding pass reuses row 0."""
    if len(passes) < len(plan) or any(n < len(step) for n, step in zip(passes, plan)):
        raise ValueError(f"padded_plan: passes={passes} has fewer steps or passes than the plan "
                         f"({[len(step) for step in plan]})")
    padding = MicroBatch([0], counted=False)
    return [(plan[i] if i < len(plan) else []) + [padding] * (n - (len(plan[i]) if i < len(plan) else 0))
            for i, n in enumerate(passes)]


def passes_per_step(plan: list[list[MicroBatch]], steps: int) -> list[int]:
    """The number of micro-batches in each of `steps` optimizer steps (0 past the plan's end)."""
    return [len(plan[i]) if i < len(plan) else 0 for i in range(steps)]
