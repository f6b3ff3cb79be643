"""select_rows / concat_rollouts on VLM rollouts whose rows hold different numbers of images (DAPO refills, mini-batch
splits): tiny_vlm's [rows, images, 3, S, S] pixels and Qwen-VL's flattened patches + image grids + mm_token_type_ids.
Pure tensor tests; the same on the real tiny_vlm model is in tests/test_tiny_vlm.py."""

from __future__ import annotations

import pytest
import torch

from medix.grpo.rollout import Rollout, concat_rollouts, select_rows

PAD = 0
IMAGE_TOKEN = 99  # rows hold one image token per image in their prompt (enough for bookkeeping checks)


def make_rollout(tag: int, prompt_length: int, completion_length: int, counts: list[int], layout: str | None,
                 with_counts: bool = True) -> Rollout:
    """Rows whose every token, pixel and grid value says which rollout (`tag`) and row they come from.

    Each row: a left-padded prompt (row-specific pad count) ending with its image tokens, then a completion."""
    n = len(counts)
    ids = torch.full((n, prompt_length + completion_length), PAD, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for r, count in enumerate(counts):
        real = prompt_length - r % 2  # odd rows carry one pad token
        ids[r, prompt_length - real:prompt_length] = tag * 100 + 10 + r
        ids[r, prompt_length - count - 1:prompt_length - 1] = IMAGE_TOKEN
        attn[r, prompt_length - real:prompt_length] = 1
        length = completion_length - r % 3
        ids[r, prompt_length:prompt_length + length] = tag * 100 + 50 + r
        attn[r, prompt_length:prompt_length + length] = 1
    cmask = attn[:, prompt_length:].clone()
    extra = {}
    if layout == "tiny" and any(counts):
        pixels = torch.zeros(n, max(counts), 3, 2, 2)
        for r, count in enumerate(counts):
            for k in range(count):
                pixels[r, k] = tag * 100 + r * 10 + k + 1
        extra["pixel_values"] = pixels
    elif layout == "qwen" and any(counts):
        patches, grids = [], []
        for r, count in enumerate(counts):
            for k in range(count):
                h = 2 + (r + k) % 2  # images of different sizes: 4 or 6 patches
                grids.append([1, h, 2])
                patches.append(torch.full((h * 2, 5), float(tag * 100 + r * 10 + k + 1)))
        extra["pixel_values"] = torch.cat(patches)
        extra["image_grid_thw"] = torch.tensor(grids)
        extra["mm_token_type_ids"] = (ids == IMAGE_TOKEN).long()
    return Rollout(ids, attn, cmask, prompt_length, [f"t{tag}-{r}" for r in range(n)],
                   torch.tensor([bool(r % 2) for r in range(n)]), extra, counts if with_counts else None)


def row_images(rollout: Rollout, row: int) -> list[float]:
    """The image ids of one row (the constant each image's pixels were filled with), read back from extra_inputs."""
    extra = rollout.extra_inputs
    if "pixel_values" not in extra:
        return []
    if "image_grid_thw" in extra:
        counts = rollout.image_counts
        first = sum(counts[:row])
        sizes = extra["image_grid_thw"].prod(1).tolist()
        start = sum(sizes[:first])
        values = []
        for size in sizes[first:first + counts[row]]:
            block = extra["pixel_values"][start:start + size]
            assert (block == block[0, 0]).all()
            values.append(float(block[0, 0]))
            start += size
        return values
    pixels = extra["pixel_values"][row]
    return [float(p.flatten()[0]) for p in pixels if p.abs().sum() > 0]


def expected_images(tag: int, row: int, count: int) -> list[float]:
    return [float(tag * 100 + row * 10 + k + 1) for k in range(count)]


def assert_rows_kept(merged: Rollout, sources: list[tuple[Rollout, int]]) -> None:
    """Row i of `merged` is row sources[i][1] of rollout sources[i][0]: same real tokens, mask, text and images."""
    P = merged.prompt_length
    assert merged.input_ids.shape[0] == len(sources)
    for i, (src, r) in enumerate(sources):
        p = src.prompt_length
        prompt = src.input_ids[r, :p][src.attention_mask[r, :p].bool()]
        assert torch.equal(merged.input_ids[i, :P][merged.attention_mask[i, :P].bool()], prompt)
        assert merged.attention_mask[i, :P - p].sum() == 0  # extra left padding only
        comp = src.completion_mask.shape[1]
        assert torch.equal(merged.input_ids[i, P:P + comp], src.input_ids[r, p:])
        assert torch.equal(merged.completion_mask[i, :comp], src.completion_mask[r])
        assert merged.completion_mask[i, comp:].sum() == 0
        assert merged.texts[i] == src.texts[r] and bool(merged.truncated[i]) == bool(src.truncated[r])
        assert row_images(merged, i) == row_images(src, r)
        if "mm_token_type_ids" in merged.extra_inputs:
            assert torch.equal(merged.extra_inputs["mm_token_type_ids"][i], (merged.input_ids[i] == IMAGE_TOKEN).long())


@pytest.mark.parametrize("layout", ["tiny", "qwen"])
def test_rollouts_with_different_image_counts_join_row_by_row(layout):
    two = make_rollout(1, prompt_length=9, completion_length=5, counts=[2, 2, 1, 1], layout=layout)
    one = make_rollout(2, prompt_length=7, completion_length=8, counts=[1, 1], layout=layout)
    text = make_rollout(3, prompt_length=6, completion_length=3, counts=[0, 0], layout=layout)
    assert row_images(two, 1) == expected_images(1, 1, 2) and row_images(one, 0) == expected_images(2, 0, 1)
    merged = concat_rollouts([two, one, text], pad_token_id=PAD)
    assert merged.prompt_length == 9 and merged.input_ids.shape == (8, 9 + 8)
    assert merged.image_counts == [2, 2, 1, 1, 1, 1, 0, 0]
    assert_rows_kept(merged, [(two, r) for r in range(4)] + [(one, 0), (one, 1), (text, 0), (text, 1)])
    if layout == "tiny":  # padded to the most images of any row; a text-only rollout adds zero slots
        assert merged.extra_inputs["pixel_values"].shape == (8, 2, 3, 2, 2)
        assert merged.extra_inputs["pixel_values"][4:, 1].abs().sum() == 0
    else:  # one grid row per image, all patches in row order
        assert merged.extra_inputs["image_grid_thw"].shape[0] == 2 + 2 + 1 + 1 + 1 + 1
        assert merged.extra_inputs["mm_token_type_ids"].shape == merged.input_ids.shape


@pytest.mark.parametrize("layout", ["tiny", "qwen"])
def test_dapo_refill_then_mini_batches_keep_each_rows_images(layout):
    """What GRPOModule.collect/update do: keep some groups of each try, join, cut to size, split into mini-batches."""
    first = make_rollout(1, prompt_length=8, completion_length=4, counts=[2, 2, 0, 0, 1, 1], layout=layout)
    second = make_rollout(2, prompt_length=10, completion_length=6, counts=[1, 1, 3, 3], layout=layout)
    kept = [select_rows(first, [2, 3, 4, 5]), select_rows(second, [2, 3])]
    assert kept[0].image_counts == [0, 0, 1, 1] and row_images(kept[1], 0) == expected_images(2, 2, 3)
    merged = concat_rollouts(kept, pad_token_id=PAD)
    merged = select_rows(merged, list(range(6)))
    sources = [(first, 2), (first, 3), (first, 4), (first, 5), (second, 2), (second, 3)]
    assert_rows_kept(merged, sources)
    for rows in ([0, 1], [2, 3], [4, 5], [5, 0, 3]):  # mini-batches, in any order
        part = select_rows(merged, rows)
        assert_rows_kept(part, [sources[r] for r in rows])
        assert part.image_counts == [merged.image_counts[r] for r in rows]


def test_qwen_rows_without_recorded_counts_need_an_even_split():
    even = make_rollout(1, 6, 3, counts=[1, 1, 1, 1], layout="qwen", with_counts=False)
    part = select_rows(even, [3, 1])
    assert part.image_counts is None
    assert part.extra_inputs["image_grid_thw"].tolist() == [even.extra_inputs["image_grid_thw"][r].tolist() for r in (3, 1)]
    assert part.extra_inputs["pixel_values"][:, 0].unique().tolist() == [111.0, 131.0]
    assert float(part.extra_inputs["pixel_values"][0, 0]) == 131.0  # row 3's patches first
    uneven = make_rollout(1, 6, 3, counts=[2, 1, 0, 0], layout="qwen", with_counts=False)
    with pytest.raises(ValueError, match="images of each row are unknown"):
        select_rows(uneven, [0])


def test_joining_rollouts_that_disagree_on_an_unknown_input_is_an_error():
    a = make_rollout(1, 5, 3, counts=[0, 0], layout=None)
    b = make_rollout(2, 5, 3, counts=[0, 0], layout=None)
    a.extra_inputs["something_new"] = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="'something_new' is present in 1 of 2 rollouts"):
        concat_rollouts([a, b], pad_token_id=PAD)
    with pytest.raises(ValueError, match="image_counts has 3 entries for 2 rows"):
        Rollout(a.input_ids, a.attention_mask, a.completion_mask, 5, a.texts, a.truncated, {}, [0, 0, 0])
