"""The update plan (medix/grpo/plan.py): mini-batches of consecutive rows, micro-batches inside them, and the
padding that keeps data-parallel ranks in the same number of optimizer steps and backwards."""

from __future__ import annotations

import pytest

from medix.grpo.plan import MicroBatch, padded_plan, passes_per_step, update_plan


def rows(plan):
    return [[m.rows for m in step] for step in plan]


def test_mini_batches_split_into_micro_batches():
    plan = update_plan(10, mini_batch_size=4, micro_batch_size=3)
    assert rows(plan) == [[[0, 1, 2], [3]], [[4, 5, 6], [7]], [[8, 9]]]
    assert all(m.counted for step in plan for m in step)


def test_no_micro_batch_size_is_one_pass_per_mini_batch_and_a_large_mini_batch_takes_every_row():
    assert rows(update_plan(6, mini_batch_size=4, micro_batch_size=None)) == [[[0, 1, 2, 3]], [[4, 5]]]
    assert rows(update_plan(3, mini_batch_size=80, micro_batch_size=4)) == [[[0, 1, 2]]]


def test_a_rank_with_fewer_rows_pads_with_uncounted_passes():
    mine = update_plan(4, mini_batch_size=4, micro_batch_size=2)  # 1 step of 2 passes
    theirs = update_plan(8, mini_batch_size=4, micro_batch_size=2)  # 2 steps of 2 passes
    steps = max(len(mine), len(theirs))
    passes = [max(a, b) for a, b in zip(passes_per_step(mine, steps), passes_per_step(theirs, steps))]
    assert passes == [2, 2]
    padded = padded_plan(mine, passes)
    assert [len(step) for step in padded] == [2, 2]
    assert padded[1] == [MicroBatch([0], counted=False)] * 2 and all(m.counted for m in padded[0])
    assert padded_plan(theirs, passes) == theirs


@pytest.mark.parametrize("args", [(0, 4, 2), (4, 0, 2), (4, 4, 0)])
def test_bad_sizes_are_refused(args):
    with pytest.raises(ValueError, match="must be >= 1"):
        update_plan(*args)


def test_padding_never_drops_a_pass():
    with pytest.raises(ValueError, match="fewer steps or passes"):
        padded_plan(update_plan(8, 4, 2), [2])
