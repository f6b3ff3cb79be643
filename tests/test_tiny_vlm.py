"""backbone=tiny_vlm: processor markers, image-dependent logits, rollout + log-probs, LoRA reference, gradients, saving."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from medix.data.images import load_image
from medix.data.prompts import render_prompt
from medix.data.samples import Sample
from medix.errors import ConfigError, MedixError
from medix.grpo.rollout import (completion_logprobs, completion_mask_from_ids, concat_rollouts, generate_completions,
                                select_rows)
from medix.models import load_backbone
from medix.models.tiny_vlm import IMAGE_TOKEN, build_vision_tower

REPO = Path(__file__).resolve().parents[1]
CACHE_DIR = os.environ.get("MEDIX_CACHE_DIR", str(Path.home() / ".cache" / "medix"))
IMAGE_NAMES = ("synpic42202.jpg", "synpic29265.jpg", "synpic100176.jpg")


def tiny_cfg(**overrides):
    cfg = OmegaConf.load(REPO / "conf" / "backbone" / "tiny_vlm.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(tiny_cfg(), CACHE_DIR)


@pytest.fixture(scope="module")
def images(shared_benchmarks):
    folder = shared_benchmarks / "vqa_rad" / "images"
    return [load_image(folder / name, min_pixels=64 * 64, max_pixels=512 * 512) for name in IMAGE_NAMES]


def chat(processor, n_images: int, text: str = "What does the image show?") -> str:
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def full_logprobs(model, enc, rows=None) -> torch.Tensor:
    """Log-softmax of every position from one plain forward (no logits_to_keep), positions from the mask."""
    position_ids = (enc["attention_mask"].cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], position_ids=position_ids,
                       pixel_values=enc.get("pixel_values")).logits
    return torch.log_softmax(logits.float(), dim=-1)


def test_processor_expands_each_marker_to_the_image_tokens(backbone, images):
    processor = backbone.processor
    per_image = (64 // 16) ** 2
    prompts = [chat(processor, 0), chat(processor, 1), chat(processor, 2)]
    assert [p.count(IMAGE_TOKEN) for p in prompts] == [0, 1, 2]
    assert prompts[1].startswith("<|im_start|>system") and prompts[1].endswith("<|im_start|>assistant\n")
    enc = processor(text=prompts, images=[[], [images[0]], images[1:3]], return_tensors="pt", padding=True)
    counts = (enc["input_ids"] == processor.image_token_id).sum(1)
    assert counts.tolist() == [0, per_image, 2 * per_image]
    assert enc["pixel_values"].shape == (3, 2, 3, 64, 64)
    assert enc["pixel_values"][0].abs().sum() == 0 and enc["pixel_values"][1, 1].abs().sum() == 0  # padding slots
    assert enc["pixel_values"][1, 0].abs().sum() > 0
    assert enc["attention_mask"][0, 0] == 0 and enc["attention_mask"][:, -1].all()  # left padding
    assert backbone.tokenizer.pad_token_id is not None
    with pytest.raises(MedixError, match="row 0: 1 <\\|image\\|> marker"):
        processor(text=[prompts[1]], images=[[]], return_tensors="pt")


def test_render_prompt_uses_one_marker_per_sample_image(backbone, shared_benchmarks):
    sample = Sample(id="vqarad-11", problem="Is there evidence of an aortic aneurysm?", solution="<X_RAY> yes",
                    tag="<X_RAY>", answer="yes", images=["a.jpg", "b.jpg"], source="test")
    prompt = render_prompt(sample, backbone.processor, "thinking")
    assert prompt.count(IMAGE_TOKEN) == 2
    assert "aortic aneurysm" in prompt and prompt.endswith("<|im_start|>assistant\n")


def test_logits_depend_on_the_image(backbone, images):
    processor, model = backbone.processor, backbone.model.eval()
    prompt = chat(processor, 1)
    enc = processor(text=[prompt] * 3, images=[[images[0]], [images[1]], [images[0]]], return_tensors="pt")
    logp = full_logprobs(model, enc)
    assert torch.isfinite(logp).all()
    assert torch.allclose(logp[0], logp[2], atol=1e-5)  # same image, same logits
    assert (logp[0, -1] - logp[1, -1]).abs().max() > 1e-3  # another image changes the next-token distribution
    assert (logp[..., processor.image_token_id] < -1e30).all()  # the image token is never predicted


def test_vision_tower_init_is_seeded_and_leaves_the_global_rng_alone():
    vision = tiny_cfg().vision
    state = torch.random.get_rng_state()
    a, b = build_vision_tower(vision, 576, 0.05), build_vision_tower(vision, 576, 0.05)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    other = build_vision_tower(OmegaConf.merge(vision, {"seed": 1}), 576, 0.05)
    assert not torch.equal(a.patch_embed.weight, other.patch_embed.weight)
    with pytest.raises(ConfigError, match="image_size"):
        build_vision_tower(OmegaConf.merge(vision, {"image_size": 60}), 576, 0.05)


def test_rollout_and_completion_logprobs_match_a_direct_forward(backbone, images):
    processor, tokenizer, model = backbone.processor, backbone.tokenizer, backbone.model
    prompts = [chat(processor, 1), chat(processor, 1, "Which organ is this? Answer in one word please.")]
    torch.manual_seed(0)
    rollout = generate_completions(model, tokenizer, prompts, group_size=2, max_new_tokens=6, temperature=1.0,
                                   top_p=1.0, processor=processor, images=[[images[0]], [images[1]]])
    assert rollout.input_ids.shape[0] == 4 and len(rollout.texts) == 4
    assert rollout.extra_inputs["pixel_values"].shape == (4, 1, 3, 64, 64)
    assert not (rollout.completion_ids == processor.image_token_id).any()
    logp, entropy = completion_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_length,
                                        rollout.extra_inputs, with_entropy=True)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    enc = {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask, **rollout.extra_inputs}
    direct = full_logprobs(model, enc)[:, rollout.prompt_length - 1:-1]
    direct = direct.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
    mask = rollout.completion_mask.bool()
    assert torch.allclose(logp[mask], direct[mask], atol=1e-4)
    part = select_rows(rollout, [3, 0])  # row slicing carries each row's pixels
    sub, _ = completion_logprobs(model, part.input_ids, part.attention_mask, part.prompt_length, part.extra_inputs)
    assert torch.allclose(sub, logp[[3, 0]], atol=1e-4)


def test_rollouts_with_different_image_counts_join_and_score_like_their_parts(backbone, images):
    """DAPO joins the kept groups of several rollouts and the update splits them into mini-batches: rows with two
    images, one image and none (other prompt and completion lengths) keep their own log-probabilities."""
    processor, tokenizer, model = backbone.processor, backbone.tokenizer, backbone.model
    sample = dict(group_size=2, temperature=1.0, top_p=1.0, processor=processor)
    torch.manual_seed(1)
    mixed = generate_completions(model, tokenizer, [chat(processor, 2), chat(processor, 1, "Which organ is this?")],
                                 max_new_tokens=5, images=[images[:2], [images[2]]], **sample)
    single = generate_completions(model, tokenizer, [chat(processor, 1, "Name the modality of this study, briefly.")],
                                  max_new_tokens=8, images=[[images[1]]], **sample)
    text = generate_completions(model, tokenizer, [chat(processor, 0, "What is the normal resting heart rate?")],
                                max_new_tokens=3, images=None, **sample)
    assert mixed.image_counts == [2, 2, 1, 1] and single.image_counts == [1, 1] and text.image_counts is None
    assert single.extra_inputs["pixel_values"].shape[1] == 1 and text.extra_inputs == {}
    parts = [select_rows(mixed, [0, 1, 2, 3]), single, text]
    merged = concat_rollouts(parts, pad_token_id=tokenizer.pad_token_id)
    assert merged.image_counts == [2, 2, 1, 1, 1, 1, 0, 0]
    assert merged.extra_inputs["pixel_values"].shape == (8, 2, 3, 64, 64)
    own = [completion_logprobs(model, p.input_ids, p.attention_mask, p.prompt_length, p.extra_inputs)[0] for p in parts]
    logp, _ = completion_logprobs(model, merged.input_ids, merged.attention_mask, merged.prompt_length,
                                  merged.extra_inputs)
    start = 0
    for part, part_logp in zip(parts, own):
        rows, length = part.input_ids.shape[0], part.completion_mask.shape[1]
        mask = part.completion_mask.bool()
        assert torch.allclose(logp[start:start + rows, :length][mask], part_logp[mask], atol=1e-4)
        assert merged.completion_mask[start:start + rows, length:].sum() == 0
        start += rows
    for rows in ([0, 4], [6, 2, 5]):  # mini-batches mixing image counts
        chunk = select_rows(merged, rows)
        chunk_logp, _ = completion_logprobs(model, chunk.input_ids, chunk.attention_mask, chunk.prompt_length,
                                            chunk.extra_inputs)
        mask = chunk.completion_mask.bool()
        assert torch.allclose(chunk_logp[mask], logp[rows][mask], atol=1e-4)


def test_greedy_generate_agrees_with_forward(backbone, images):
    processor, tokenizer, model = backbone.processor, backbone.tokenizer, backbone.model.eval()
    enc = processor(text=[chat(processor, 1), chat(processor, 1, "Name the modality.")],
                    images=[[images[2]], [images[0]]], return_tensors="pt")
    out = model.generate(**enc, do_sample=False, max_new_tokens=6, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    prompt_length = enc["input_ids"].shape[1]
    assert torch.equal(out[:, :prompt_length], enc["input_ids"])  # prompt + completion, like a decoder-only model
    attention = torch.ones_like(out)
    attention[:, :prompt_length] = enc["attention_mask"]
    logp = full_logprobs(model, {"input_ids": out, "attention_mask": attention, "pixel_values": enc["pixel_values"]})
    mask, _ = completion_mask_from_ids(out[:, prompt_length:], [tokenizer.eos_token_id])  # up to the first EOS
    greedy = logp[:, prompt_length - 1:-1].argmax(-1)
    assert torch.equal(greedy[mask.bool()], out[:, prompt_length:][mask.bool()])


def train_step(model, processor, images) -> None:
    """One plain SGD step on the mean log-prob of a fixed answer (moves LoRA and the vision tower)."""
    enc = processor(text=[chat(processor, 1) + "It is a chest X-ray."], images=[[images[0]]], return_tensors="pt")
    logits = model(**enc).logits
    loss = -torch.log_softmax(logits[:, -8:-1], -1).gather(-1, enc["input_ids"][:, -7:, None]).mean()
    loss.backward()
    with torch.no_grad():
        for param in model.parameters():
            if param.grad is not None:
                param -= 1.0 * param.grad.sign() * 1e-2
                param.grad = None


def test_lora_reference_gradients_and_saved_adapter(images, tmp_path):
    backbone = load_backbone(tiny_cfg(), CACHE_DIR)
    processor, model = backbone.processor, backbone.model.train()
    assert hasattr(model, "peft_config") and hasattr(model, "disable_adapter")
    enc = processor(text=[chat(processor, 1)], images=[[images[1]]], return_tensors="pt")
    with torch.no_grad():
        before = model(**enc).logits
    # Gradients reach the vision tower and LoRA; base weights and the reference tower stay frozen.
    enc_answer = processor(text=[chat(processor, 1) + "A chest X-ray."], images=[[images[0]]], return_tensors="pt")
    model(**enc_answer).logits[:, -4:].logsumexp(-1).mean().backward()
    named = dict(model.named_parameters())
    assert named["vision_tower.patch_embed.weight"].grad.abs().sum() > 0
    assert named["vision_tower.projector.weight"].grad.abs().sum() > 0
    assert any("lora_B" in n and p.grad is not None and p.grad.abs().sum() > 0 for n, p in named.items())
    assert all(not p.requires_grad for n, p in named.items() if "lora" not in n and "vision_tower" not in n)
    model.zero_grad(set_to_none=True)

    train_step(model, processor, images)
    with torch.no_grad():
        after = model(**enc).logits
        with model.disable_adapter():
            reference = model(**enc).logits
        again = model(**enc).logits
    assert (after - before).abs().max() > 0.05
    assert torch.allclose(reference, before, atol=1e-5)  # base LM + the initial vision tower
    assert torch.equal(again, after)  # the context restores the trained policy

    model.save_pretrained(tmp_path / "adapter")
    saved = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "vision_tower.safetensors", "tiny_vlm.json"} <= saved
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size < 30_000_000  # no embedding matrix
    del backbone, model
    reloaded = load_backbone(tiny_cfg(adapter=str(tmp_path / "adapter")), CACHE_DIR).model.eval()
    with torch.no_grad():  # another instance: float noise up to ~1e-4, far below the training change
        assert torch.allclose(reloaded(**enc).logits, after, atol=1e-3)
        with reloaded.disable_adapter():
            assert torch.allclose(reloaded(**enc).logits, before, atol=1e-3)
    with pytest.raises(ConfigError, match="vision tower shaped"):
        load_backbone(tiny_cfg(adapter=str(tmp_path / "adapter"), **{"vision.layers": 1}), CACHE_DIR)


def test_frozen_tower_without_lora_with_checkpointing(images):
    backbone = load_backbone(tiny_cfg(**{"lora.enabled": False, "train_vision_tower": False,
                                         "gradient_checkpointing": True}), CACHE_DIR)
    model, processor = backbone.model.train(), backbone.processor
    assert not hasattr(model, "peft_config") and not hasattr(model, "disable_adapter")  # GRPO deep-copies a reference
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    assert model.language_model.is_activation_checkpointing and not model.language_model.config.use_cache
    enc = processor(text=[chat(processor, 1)], images=[[images[2]]], return_tensors="pt")
    model(**enc).logits[:, -1].logsumexp(-1).sum().backward()
    assert model.language_model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.vision_tower.patch_embed.weight.grad is None
