"""The Qwen-VL backbone's input layout through the HF engine and the training forward, on a real Qwen2-VL
architecture (tiny, random-initialised, on SmolLM2's tokenizer with Qwen's vision tokens; the real processor):
each row's flattened patches + image grids and mm_token_type_ids, for rows with two, one and no images of different
sizes. The training forward scores completions exactly as the sampler did (M-RoPE positions included), per row, in
mini-batches and after DAPO-style joins."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medix.data.images import load_image
from medix.grpo.logprobs import completion_logprobs
from medix.models.gguf import smollm2_folder
from medix.models.qwen_vl import QwenVL
from medix.models.base import left_padded_positions
from medix.rollout.base import Sampling, concat_rollouts, select_rows
from medix.rollout.hf import HFEngine
from tiny_lm import CACHE_DIR, one_thread, record_generate  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def qwen():
    """(QwenVL backbone, [56x56, 84x56, 56x84] images)."""
    from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder(CACHE_DIR))
    tokenizer.add_tokens(VISION_TOKENS, special_tokens=True)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    # 28-pixel merge units: 56x56 -> 4 image tokens, 84x56 -> 6 (images of different sizes).
    # Without torchvision (the CPU setup has none) transformers' video-processor base class is a placeholder, and the
    # processor's constructor-time class check of its (unused, None) video processor fails; skip only that check.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)
        processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil(min_pixels=28 * 28,
                                                                              max_pixels=28 * 28 * 6),
                                     tokenizer=tokenizer, video_processor=None)
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    backbone = QwenVL(model, tokenizer, "tiny_qwen2_vl", processor)
    ct = load_image(REPO / "tests" / "assets" / "ct_small_axial.png", min_pixels=1, max_pixels=10**6)
    mr = load_image(REPO / "tests" / "assets" / "mr_small_16bit.png", min_pixels=1, max_pixels=10**6)
    return backbone, [ct.resize((56, 56)), mr.resize((84, 56)), ct.resize((56, 84))]


def prompt(n_images: int, question: str) -> str:
    return f"<|im_start|>user\n{IMAGE * n_images}{question}<|im_end|>\n<|im_start|>assistant\n"


def sample(backbone, prompts, images, max_new_tokens, seed=0):
    torch.manual_seed(seed)
    return HFEngine().generate(backbone, prompts, images, group_size=2,
                               sampling=Sampling(max_new_tokens=max_new_tokens))


def image_counts(rollout) -> list[int]:
    return [0 if row is None else row[1].shape[0] for row in (rollout.row_images or [None] * len(rollout))]


def logprobs(backbone, rollout):
    return completion_logprobs(backbone.model, rollout.input_ids, rollout.attention_mask, rollout.prompt_length,
                               backbone.model_inputs(rollout))[0]


def test_training_forward_scores_what_generate_sampled_from(qwen):
    """M-RoPE: the scored positions are the sampler's 3-D positions (1-D ones from the mask score differently)."""
    backbone, images = qwen
    model = backbone.model
    calls = record_generate(model)
    try:
        rollout = sample(backbone, [prompt(2, "Compare."), prompt(1, "Which modality is this?")],
                         [images[:2], [images[2]]], max_new_tokens=6)
    finally:
        del model.generate  # the class's own generate again
    assert image_counts(rollout) == [2, 2, 1, 1]
    inputs = backbone.model_inputs(rollout)
    assert inputs["image_grid_thw"].prod(1).tolist() == [16, 24, 16, 24, 24, 24]  # each row's own images, in order
    assert calls[0]["mm_token_type_ids"].shape == calls[0]["input_ids"].shape
    sampled = torch.log_softmax(calls[0]["scores"].float(), -1)
    sampled = sampled.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
    mask = rollout.completion_mask.bool()
    with torch.no_grad():
        logp = logprobs(backbone, rollout)
        flat = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                     position_ids=left_padded_positions(rollout.attention_mask), **inputs).logits
    assert torch.allclose(logp[mask], sampled[mask], atol=1e-4)
    P = rollout.prompt_length
    flat = torch.log_softmax(flat[:, P - 1:-1].float(), -1).gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
    assert (flat[mask] - sampled[mask]).abs().max() > 1e-3


def test_rows_with_different_image_counts_score_alike_alone_batched_and_joined(qwen):
    backbone, images = qwen
    mixed = sample(backbone, [prompt(2, "Compare the two studies."), prompt(1, "Which organ?"), prompt(0, "Any text?")],
                   [images[:2], [images[2]], []], max_new_tokens=5)
    assert image_counts(mixed) == [2, 2, 1, 1, 0, 0]
    assert backbone.model_inputs(mixed)["image_grid_thw"].shape[0] == 6
    assert mixed.sequence_inputs["mm_token_type_ids"].shape == mixed.input_ids.shape
    one = sample(backbone, [prompt(1, "Name the modality of this study, briefly please.")], [[images[1]]],
                 max_new_tokens=7, seed=1)
    batched = logprobs(backbone, mixed)
    for row in range(6):  # each row alone: its own patches, grids and token types (no image inputs for a text row)
        alone = select_rows(mixed, [row])
        assert ("pixel_values" in backbone.model_inputs(alone)) == (row < 4)
        mask = alone.completion_mask.bool()
        assert torch.allclose(logprobs(backbone, alone)[mask], batched[row:row + 1][mask], atol=1e-4)
    kept = [2, 3, 4, 5, 0, 1]  # DAPO: the kept groups of one try, in another order, then a refill
    merged = concat_rollouts([select_rows(mixed, kept), one], pad_token_id=backbone.tokenizer.pad_token_id)
    assert image_counts(merged) == [1, 1, 0, 0, 2, 2, 1, 1]
    joined = logprobs(backbone, merged)
    T = mixed.completion_mask.shape[1]
    mask = mixed.completion_mask[kept].bool()
    assert torch.allclose(joined[:6, :T][mask], batched[kept][mask], atol=1e-4)
    own = logprobs(backbone, one)
    assert torch.allclose(joined[6:, :own.shape[1]][one.completion_mask.bool()], own[one.completion_mask.bool()],
                          atol=1e-4)
    chunk = select_rows(merged, [7, 2, 4])  # a mini-batch across the join
    assert image_counts(chunk) == [1, 0, 2]
    assert torch.allclose(logprobs(backbone, chunk)[chunk.completion_mask.bool()],
                          joined[[7, 2, 4]][chunk.completion_mask.bool()], atol=1e-4)

