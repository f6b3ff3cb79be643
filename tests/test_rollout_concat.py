"""select_rows / concat_rollouts keep each row's images, whatever each row holds (DAPO refills, mini-batch splits):
rows with two, one and no images of different sizes, in tiny_vlm's layout (a [n, 3, S, S] tensor per row) and in
Qwen-VL's (each row's share of the processor's flattened patches + grid rows, split by `split_images`, and
mm_token_type_ids per token). What matters is what the model sees: the backbone's `image_inputs` batches a selection
back into the model's layout, and the model hands images to image tokens in order. Pure tensor tests; the same on the
real models is in tests/test_tiny_vlm.py and tests/test_qwen_vl_rollout.py."""

from __future__ import annotations

import pytest
import torch

from medix.models.qwen_vl import QwenVL, split_images
from medix.models.tiny_vlm import TinyVLMBackbone
from medix.rollout.base import Rollout, concat_rollouts, select_rows
from tiny_lm import word_tokenizer

PAD = 0
IMAGE_TOKEN = 99  # one image token per image in a row's prompt (enough for the bookkeeping)
BACKBONES = {"tiny": TinyVLMBackbone(None, word_tokenizer(), "tiny_vlm"),
             "qwen": QwenVL(None, word_tokenizer(), "qwen_vl")}  # their image layouts; no model is needed


def image_value(tag: int, row: int, k: int) -> float:
    """The constant that fills image k of `row` in rollout `tag`: says where an image came from."""
    return float(tag * 100 + row * 10 + k + 1)


def make_rollout(tag: int, prompt_length: int, completion_length: int, counts: list[int], layout: str | None,
                 engine_logprobs: bool = False) -> Rollout:
    """Rows whose every token, pixel and log-prob says which rollout (`tag`) and row they come from. Each row: a
    left-padded prompt (odd rows carry one more pad) ending with its image tokens, then a completion whose length
    depends on the row."""
    n = len(counts)
    ids = torch.full((n, prompt_length + completion_length), PAD, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for r, count in enumerate(counts):
        real = prompt_length - r % 2
        ids[r, prompt_length - real:prompt_length] = tag * 100 + 10 + r
        ids[r, prompt_length - count - 1:prompt_length - 1] = IMAGE_TOKEN
        attn[r, prompt_length - real:prompt_length] = 1
        length = completion_length - r % 3
        ids[r, prompt_length:prompt_length + length] = tag * 100 + 50 + r
        attn[r, prompt_length:prompt_length + length] = 1
    cmask = attn[:, prompt_length:].clone()
    sequence, row_images = {}, None
    if layout == "tiny" and any(counts):
        row_images = [torch.stack([torch.full((3, 2, 2), image_value(tag, r, k)) for k in range(count)])
                      if count else None for r, count in enumerate(counts)]
    elif layout == "qwen":
        sequence["mm_token_type_ids"] = (ids == IMAGE_TOKEN).long()
        if any(counts):  # as the processor returns them: every image's patches in one tensor, one grid row each
            patches, grids = [], []
            for r, count in enumerate(counts):
                for k in range(count):
                    h = 2 + (r + k) % 2  # images of different sizes: 4 or 6 patches
                    grids.append([1, h, 2])
                    patches.append(torch.full((h * 2, 5), image_value(tag, r, k)))
            row_images = split_images(torch.cat(patches), torch.tensor(grids), counts)
    logprobs = -(tag + torch.arange(n * completion_length, dtype=torch.float32).view(n, completion_length) / 100)
    return Rollout(ids, attn, cmask, prompt_length, [f"t{tag}-{r}" for r in range(n)],
                   torch.tensor([bool(r % 2) for r in range(n)]), sequence, row_images,
                   logprobs * cmask if engine_logprobs else None)


def images_seen(layout: str, rollout: Rollout) -> list[list[float]]:
    """The images each row's image tokens get from the batched model inputs of `rollout`, as the models assign
    them: tiny_vlm reads a row's first (its image tokens) slots; Qwen-VL hands the flattened images to the image
    tokens in row order, each image taking the patches its grid row says."""
    inputs = BACKBONES[layout].image_inputs(rollout.row_images)
    counts = ((rollout.input_ids == IMAGE_TOKEN) & rollout.attention_mask.bool()).sum(1).tolist()
    if not any(counts):
        assert inputs == {}  # no image inputs at all: the model sees text only
        return [[] for _ in counts]
    if layout == "tiny":
        pixels = inputs["pixel_values"]
        assert pixels.shape[:2] == (len(rollout), max(counts))
        return [[float(pixels[i, k].flatten()[0]) for k in range(count)] for i, count in enumerate(counts)]
    patches, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    assert grid.shape[0] == sum(counts) and patches.shape[0] == int(grid.prod(1).sum())
    seen, image, start = [], 0, 0
    for count in counts:
        row = []
        for size in grid[image:image + count].prod(1).tolist():
            block = patches[start:start + size]
            assert (block == block[0, 0]).all()  # one image's patches, whole
            row.append(float(block[0, 0]))
            start += size
        image += count
        seen.append(row)
    return seen


def expected_images(tag: int, row: int, count: int) -> list[float]:
    return [image_value(tag, row, k) for k in range(count)]


def assert_rows_kept(layout: str, merged: Rollout, sources: list[tuple[Rollout, int, int, int]]) -> None:
    """Row i of `merged` is row r of rollout src (made with `tag` and `count` images): same real tokens, masks,
    text, truncation, engine log-probs, per-token inputs and the images its tokens get."""
    P = merged.prompt_length
    assert len(merged) == len(sources)
    seen = images_seen(layout, merged)
    for i, (src, r, tag, count) in enumerate(sources):
        p = src.prompt_length
        prompt = src.input_ids[r, :p][src.attention_mask[r, :p].bool()]
        assert torch.equal(merged.input_ids[i, :P][merged.attention_mask[i, :P].bool()], prompt)
        assert merged.attention_mask[i, :P - p].sum() == 0  # extra left padding only
        comp = src.completion_mask.shape[1]
        assert torch.equal(merged.input_ids[i, P:P + comp], src.input_ids[r, p:])
        assert torch.equal(merged.completion_mask[i, :comp], src.completion_mask[r])
        assert merged.completion_mask[i, comp:].sum() == 0
        assert merged.texts[i] == src.texts[r] and bool(merged.truncated[i]) == bool(src.truncated[r])
        assert seen[i] == expected_images(tag, r, count)
        if src.engine_logprobs is not None:
            assert torch.equal(merged.engine_logprobs[i, :comp], src.engine_logprobs[r])
            assert merged.engine_logprobs[i, comp:].abs().sum() == 0
        if layout == "qwen":
            assert torch.equal(merged.sequence_inputs["mm_token_type_ids"][i],
                               (merged.input_ids[i] == IMAGE_TOKEN).long())


@pytest.mark.parametrize("layout", ["tiny", "qwen"])
def test_rollouts_with_different_image_counts_join_row_by_row(layout):
    two = make_rollout(1, prompt_length=9, completion_length=5, counts=[2, 2, 1, 1], layout=layout)
    one = make_rollout(2, prompt_length=7, completion_length=8, counts=[1, 1], layout=layout)
    text = make_rollout(3, prompt_length=6, completion_length=3, counts=[0, 0], layout=layout)
    assert text.row_images is None and images_seen(layout, text) == [[], []]
    merged = concat_rollouts([two, one, text], pad_token_id=PAD)
    assert merged.prompt_length == 9 and merged.input_ids.shape == (8, 9 + 8)
    assert [r is None for r in merged.row_images] == [False] * 6 + [True] * 2  # the text rollout's rows: no images
    assert_rows_kept(layout, merged, [(two, r, 1, c) for r, c in enumerate([2, 2, 1, 1])]
                     + [(one, 0, 2, 1), (one, 1, 2, 1), (text, 0, 3, 0), (text, 1, 3, 0)])


@pytest.mark.parametrize("layout", ["tiny", "qwen"])
def test_dapo_refill_then_mini_batches_keep_each_rows_images(layout):
    """What GRPOModule.collect/update do: keep some groups of each try, join, cut to size, split into mini-batches
    (in any order); a mini-batch of text rows gets no image inputs."""
    first = make_rollout(1, prompt_length=8, completion_length=4, counts=[2, 2, 0, 0, 1, 1], layout=layout,
                         engine_logprobs=True)
    second = make_rollout(2, prompt_length=10, completion_length=6, counts=[1, 1, 3, 3], layout=layout,
                          engine_logprobs=True)
    kept = [select_rows(first, [2, 3, 4, 5]), select_rows(second, [2, 3])]
    merged = select_rows(concat_rollouts(kept, pad_token_id=PAD), list(range(6)))
    sources = [(first, 2, 1, 0), (first, 3, 1, 0), (first, 4, 1, 1), (first, 5, 1, 1), (second, 2, 2, 3),
               (second, 3, 2, 3)]
    assert_rows_kept(layout, merged, sources)
    for rows in ([0, 1], [2, 3], [4, 5], [5, 0, 3]):
        assert_rows_kept(layout, select_rows(merged, rows), [sources[r] for r in rows])
    assert BACKBONES[layout].image_inputs(select_rows(merged, [1, 0]).row_images) == {}


def test_split_images_gives_each_row_its_patches_and_checks_the_counts():
    grid = torch.tensor([[1, 2, 2], [1, 2, 3], [1, 2, 2]])  # 4, 6 and 4 patches
    patches = torch.cat([torch.full((4, 3), 1.0), torch.full((6, 3), 2.0), torch.full((4, 3), 3.0)])
    rows = split_images(patches, grid, [0, 2, 1])
    assert rows[0] is None
    assert rows[1][0].unique().tolist() == [1.0, 2.0] and rows[1][0].shape[0] == 10
    assert rows[1][1].tolist() == [[1, 2, 2], [1, 2, 3]] and rows[2][0].unique().tolist() == [3.0]
    with pytest.raises(ValueError, match=r"image counts \[1, 1\] add up to 2 but image_grid_thw holds 3 images"):
        split_images(patches, grid, [1, 1])
    with pytest.raises(ValueError, match="describes 14 patches but pixel_values holds 13"):
        split_images(patches[:13], grid, [1, 1, 1])


def test_rollouts_that_cannot_be_joined_or_whose_rows_disagree_are_errors():
    a = make_rollout(1, 5, 3, counts=[0, 0], layout=None)
    b = make_rollout(2, 5, 3, counts=[0, 0], layout=None)
    a.sequence_inputs["something_new"] = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="per-token input 'something_new' is missing from some"):
        concat_rollouts([a, b], pad_token_id=PAD)
    with pytest.raises(ValueError, match="only some carry engine log-probs"):
        concat_rollouts([make_rollout(1, 5, 3, [0, 0], None, engine_logprobs=True), b], pad_token_id=PAD)
    with pytest.raises(ValueError, match="row_images has 3 entries for 2 rows"):
        Rollout(b.input_ids, b.attention_mask, b.completion_mask, 5, b.texts, b.truncated, {}, [None] * 3)
    with pytest.raises(ValueError, match="texts has 1 entries for 2 rows"):
        Rollout(b.input_ids, b.attention_mask, b.completion_mask, 5, b.texts[:1], b.truncated)
