"""The Qwen-VL input layout through the rollout code, on a real Qwen2-VL architecture (tiny, random-initialised, on
SmolLM2's tokenizer with Qwen's vision tokens; the real processor): flattened patches + image grids + mm_token_type_ids
for rows with two, one and no images of different sizes. The training forward must score completions exactly as the
sampler did (M-RoPE positions included), per row, in mini-batches and after DAPO-style joins."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from medix.data.images import load_image
from medix.grpo.rollout import completion_logprobs, concat_rollouts, generate_completions, select_rows
from medix.models.backbone import resolve_model_path

REPO = Path(__file__).resolve().parents[1]
CACHE_DIR = os.environ.get("MEDIX_CACHE_DIR", str(Path.home() / ".cache" / "medix"))
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def qwen():
    from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    path = resolve_model_path(OmegaConf.load(REPO / "conf" / "backbone" / "smollm2_135m.yaml"), CACHE_DIR)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_tokens(VISION_TOKENS, special_tokens=True)
    tokenizer.padding_side = "left"
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
    ct = load_image(REPO / "tests" / "assets" / "ct_small_axial.png", min_pixels=1, max_pixels=10**6)
    mr = load_image(REPO / "tests" / "assets" / "mr_small_16bit.png", min_pixels=1, max_pixels=10**6)
    images = [ct.resize((56, 56)), mr.resize((84, 56)), ct.resize((56, 84))]
    return model, tokenizer, processor, images


def prompt(n_images: int, question: str) -> str:
    return f"<|im_start|>user\n{IMAGE * n_images}{question}<|im_end|>\n<|im_start|>assistant\n"


def sample(qwen, prompts, images, max_new_tokens, seed=0):
    model, tokenizer, processor, _ = qwen
    torch.manual_seed(seed)
    return generate_completions(model, tokenizer, prompts, group_size=2, max_new_tokens=max_new_tokens,
                                temperature=1.0, top_p=1.0, processor=processor, images=images)


def logprobs(model, rollout):
    return completion_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_length,
                               rollout.extra_inputs)[0]


def test_training_forward_scores_what_greedy_generate_chose(qwen):
    """M-RoPE: the scored positions are the sampler's 3-D positions (not 1-D ones from the mask)."""
    model, tokenizer, processor, images = qwen
    enc = processor(text=[prompt(2, "Compare."), prompt(1, "Which modality is this?")],
                    images=[images[:2], [images[2]]], return_tensors="pt", padding=True)
    assert "mm_token_type_ids" in enc and enc["image_grid_thw"].prod(1).tolist() == [16, 24, 24]
    out = model.generate(**enc, do_sample=False, max_new_tokens=6, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    P = enc["input_ids"].shape[1]
    completion = out.sequences[:, P:]
    chosen = torch.stack([torch.log_softmax(l.float(), -1) for l in out.logits], 1)
    chosen = chosen.gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    attention = torch.cat([enc["attention_mask"], torch.ones_like(completion)], 1)
    extra = {"pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"],
             "mm_token_type_ids": torch.nn.functional.pad(enc["mm_token_type_ids"], (0, completion.shape[1]))}
    logp, _ = completion_logprobs(model, out.sequences, attention, P, extra)
    assert torch.allclose(logp, chosen, atol=1e-4)


def test_rows_with_different_image_counts_score_alike_alone_batched_and_joined(qwen):
    model, tokenizer, processor, images = qwen
    mixed = sample(qwen, [prompt(2, "Compare the two studies."), prompt(1, "Which organ?"), prompt(0, "Any text?")],
                   [images[:2], [images[2]], []], max_new_tokens=5)
    assert mixed.image_counts == [2, 2, 1, 1, 0, 0]
    assert mixed.extra_inputs["image_grid_thw"].shape[0] == 6
    assert mixed.extra_inputs["mm_token_type_ids"].shape == mixed.input_ids.shape
    one = sample(qwen, [prompt(1, "Name the modality of this study, briefly please.")], [[images[1]]],
                 max_new_tokens=7, seed=1)
    batched = logprobs(model, mixed)
    for row in range(6):  # each row alone: its own patches, grids and token types (none for a text row)
        alone = select_rows(mixed, [row])
        mask = alone.completion_mask.bool()
        assert torch.allclose(logprobs(model, alone)[mask], batched[row:row + 1][mask], atol=1e-4)
    kept = [2, 3, 4, 5, 0, 1]  # DAPO: the kept groups of one try, in another order, then a refill
    merged = concat_rollouts([select_rows(mixed, kept), one], pad_token_id=tokenizer.pad_token_id)
    assert merged.image_counts == [1, 1, 0, 0, 2, 2, 1, 1]
    joined = logprobs(model, merged)
    T = mixed.completion_mask.shape[1]
    mask = mixed.completion_mask[kept].bool()
    assert torch.allclose(joined[:6, :T][mask], batched[kept][mask], atol=1e-4)
    own = logprobs(model, one)
    assert torch.allclose(joined[6:, :own.shape[1]][one.completion_mask.bool()], own[one.completion_mask.bool()],
                          atol=1e-4)
    chunk = select_rows(merged, [7, 2, 4])  # a mini-batch across the join
    assert chunk.image_counts == [1, 0, 2]
    assert torch.allclose(logprobs(model, chunk)[chunk.completion_mask.bool()],
                          joined[[7, 2, 4]][chunk.completion_mask.bool()], atol=1e-4)
