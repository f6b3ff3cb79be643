"""backbone=tiny_vlm: processor markers and the per-row pixel layout, image-dependent logits, rollouts from the HF
engine scored by the training forward, LoRA reference, a vision tower that trains, saving and loading."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from medix.data.images import load_image
from medix.data.samples import Sample
from medix.errors import ConfigError, MedixError
from medix.grpo.logprobs import completion_logprobs
from medix.models.tiny_vlm import IMAGE_TOKEN, TinyVLMBackbone, build_vision_tower
from medix.models.base import left_padded_positions
from medix.rollout.base import Sampling, completion_mask_from_ids, concat_rollouts, select_rows
from medix.rollout.hf import HFEngine
from tiny_lm import build_backbone, composed, one_thread, record_generate  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE_NAMES = ("synpic42202.jpg", "synpic29265.jpg", "synpic100176.jpg")


@pytest.fixture(scope="module")
def backbone():
    return build_backbone("tiny_vlm")


@pytest.fixture(scope="module")
def images(shared_benchmarks):
    folder = shared_benchmarks / "vqa_rad" / "images"
    return [load_image(folder / name, min_pixels=64 * 64, max_pixels=512 * 512) for name in IMAGE_NAMES]


def chat(processor, n_images: int, text: str = "What does the image show?") -> str:
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def model_inputs(backbone, prompts, images) -> dict:
    """What a forward or generate call gets for these prompts: ids, mask and the batched pixels of the rows."""
    enc = backbone.encode(prompts, images)
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, **backbone.image_inputs(enc.row_images)}


def full_logprobs(model, inputs) -> torch.Tensor:
    """Log-softmax of every position from one plain forward (no logits_to_keep), positions from the mask."""
    with torch.no_grad():
        logits = model(**inputs, position_ids=left_padded_positions(inputs["attention_mask"])).logits
    return torch.log_softmax(logits.float(), dim=-1)


def scored(backbone, rollout, **kwargs):
    return completion_logprobs(backbone.model, rollout.input_ids, rollout.attention_mask, rollout.prompt_length,
                               backbone.model_inputs(rollout), **kwargs)


def test_processor_expands_each_marker_and_rows_keep_their_own_pixels(backbone, images):
    assert isinstance(backbone, TinyVLMBackbone) and backbone.is_vlm and backbone.uses_lora
    processor = backbone.processor
    per_image = (64 // 16) ** 2
    prompts = [chat(processor, 0), chat(processor, 1), chat(processor, 2)]
    assert [p.count(IMAGE_TOKEN) for p in prompts] == [0, 1, 2]
    assert prompts[1].startswith("<|im_start|>system") and prompts[1].endswith("<|im_start|>assistant\n")
    rows = [[], [images[0]], images[1:3]]
    enc = processor(text=prompts, images=rows, return_tensors="pt", padding=True)
    counts = (enc["input_ids"] == processor.image_token_id).sum(1)
    assert counts.tolist() == [0, per_image, 2 * per_image]
    assert enc["pixel_values"].shape == (3, 2, 3, 64, 64)
    assert enc["pixel_values"][0].abs().sum() == 0 and enc["pixel_values"][1, 1].abs().sum() == 0  # padding slots
    assert enc["pixel_values"][1, 0].abs().sum() > 0
    assert enc["attention_mask"][0, 0] == 0 and enc["attention_mask"][:, -1].all()  # left padding
    encoded = backbone.encode(prompts, rows)  # each row its own [n, 3, S, S]; batched again as the processor does
    assert encoded.row_images[0] is None and [r.shape[0] for r in encoded.row_images[1:]] == [1, 2]
    assert torch.equal(encoded.input_ids, enc["input_ids"])
    assert torch.equal(backbone.image_inputs(encoded.row_images)["pixel_values"], enc["pixel_values"])
    assert backbone.image_inputs([encoded.row_images[2], None])["pixel_values"].shape == (2, 2, 3, 64, 64)
    assert backbone.encode(prompts[:1], [[]]).row_images is None and backbone.image_inputs(None) == {}
    with pytest.raises(MedixError, match="row 0: 1 <\\|image\\|> marker"):
        processor(text=[prompts[1]], images=[[]], return_tensors="pt")


def test_render_uses_one_marker_per_sample_image(backbone):
    sample = Sample(id="vqarad-11", problem="Is there evidence of an aortic aneurysm?", solution="<X_RAY> yes",
                    tag="<X_RAY>", answer="yes", images=["a.jpg", "b.jpg"], source="test")
    prompt = backbone.render(sample, "thinking")
    assert prompt.count(IMAGE_TOKEN) == 2
    assert "aortic aneurysm" in prompt and prompt.endswith("<|im_start|>assistant\n")


def test_logits_depend_on_the_image(backbone, images):
    processor, model = backbone.processor, backbone.model.eval()
    prompt = chat(processor, 1)
    logp = full_logprobs(model, model_inputs(backbone, [prompt] * 3, [[images[0]], [images[1]], [images[0]]]))
    assert torch.isfinite(logp).all()
    assert torch.allclose(logp[0], logp[2], atol=1e-5)  # same image, same logits
    assert (logp[0, -1] - logp[1, -1]).abs().max() > 1e-3  # another image changes the next-token distribution
    assert (logp[..., processor.image_token_id] < -1e30).all()  # the image token is never predicted


def test_vision_tower_init_is_seeded_and_leaves_the_global_rng_alone():
    vision = composed("backbone=tiny_vlm").backbone.vision
    state = torch.random.get_rng_state()
    a, b = build_vision_tower(vision, 576, 0.05), build_vision_tower(vision, 576, 0.05)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    other = build_vision_tower(OmegaConf.merge(vision, {"seed": 1}), 576, 0.05)
    assert not torch.equal(a.patch_embed.weight, other.patch_embed.weight)
    with pytest.raises(ConfigError, match="image_size"):
        build_vision_tower(OmegaConf.merge(vision, {"image_size": 60}), 576, 0.05)


def test_the_training_forward_scores_what_the_engine_sampled(backbone, images):
    processor, model = backbone.processor, backbone.model
    prompts = [chat(processor, 1), chat(processor, 1, "Which organ is this? Answer in one word please.")]
    calls = record_generate(model)
    try:
        torch.manual_seed(0)
        rollout = HFEngine().generate(backbone, prompts, [[images[0]], [images[1]]], group_size=2,
                                      sampling=Sampling(max_new_tokens=6))
    finally:
        del model.generate
    assert len(rollout) == 4 and len(rollout.texts) == 4
    assert [r.shape for r in rollout.row_images] == [(1, 3, 64, 64)] * 4
    assert torch.equal(rollout.row_images[1], rollout.row_images[0])  # a group shares its prompt's image
    assert not torch.equal(rollout.row_images[2], rollout.row_images[0])
    assert not (rollout.completion_ids == processor.image_token_id).any()
    logp, entropy = scored(backbone, rollout, with_entropy=True)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    mask = rollout.completion_mask.bool()
    sampled = torch.log_softmax(calls[0]["scores"].float(), -1)
    sampled = sampled.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(logp[mask], sampled[mask], atol=1e-4)  # what generate sampled from
    inputs = {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask,
              **backbone.model_inputs(rollout)}
    direct = full_logprobs(model, inputs)[:, rollout.prompt_length - 1:-1]
    direct = direct.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(logp[mask], direct[mask], atol=1e-4)
    part = select_rows(rollout, [3, 0])  # row slicing carries each row's pixels
    assert torch.allclose(scored(backbone, part)[0], logp[[3, 0]], atol=1e-4)


@pytest.mark.slow  # minutes of generation
def test_rollouts_with_different_image_counts_join_and_score_like_their_parts(backbone, images):
    """DAPO joins the kept groups of several rollouts and the update splits them into mini-batches: rows with two
    images, one image and none (other prompt and completion lengths) keep their own log-probabilities."""
    processor, pad = backbone.processor, backbone.tokenizer.pad_token_id

    def sample(prompts, rows, tokens, seed, share=True):
        torch.manual_seed(seed)
        return HFEngine(share_prompt_cache=share).generate(backbone, prompts, rows, group_size=2,
                                                           sampling=Sampling(max_new_tokens=tokens))

    mixed = sample([chat(processor, 2), chat(processor, 1, "Which organ is this?")], [images[:2], [images[2]]], 5, 1)
    single = sample([chat(processor, 1, "Name the modality of this study, briefly.")], [[images[1]]], 8, 2)
    text_prompt = [chat(processor, 0, "What is the normal resting heart rate?")]
    text = sample(text_prompt, None, 3, 3)
    assert torch.equal(text.input_ids, sample(text_prompt, None, 3, 3, share=False).input_ids)  # shared prompt cache
    assert [r.shape[0] for r in mixed.row_images] == [2, 2, 1, 1] and text.row_images is None
    assert backbone.model_inputs(single)["pixel_values"].shape == (2, 1, 3, 64, 64)
    assert backbone.model_inputs(text) == {}
    parts = [select_rows(mixed, [0, 1, 2, 3]), single, text]
    merged = concat_rollouts(parts, pad_token_id=pad)
    assert [0 if r is None else r.shape[0] for r in merged.row_images] == [2, 2, 1, 1, 1, 1, 0, 0]
    assert backbone.model_inputs(merged)["pixel_values"].shape == (8, 2, 3, 64, 64)
    own = [scored(backbone, p)[0] for p in parts]
    logp, _ = scored(backbone, merged)
    start = 0
    for part, part_logp in zip(parts, own):
        rows, length = len(part), part.completion_mask.shape[1]
        mask = part.completion_mask.bool()
        assert torch.allclose(logp[start:start + rows, :length][mask], part_logp[mask], atol=1e-4)
        assert merged.completion_mask[start:start + rows, length:].sum() == 0
        start += rows
    for rows in ([0, 4], [6, 2, 5], [7, 6]):  # mini-batches mixing image counts, and one of text rows only
        chunk = select_rows(merged, rows)
        chunk_logp, _ = scored(backbone, chunk)
        mask = chunk.completion_mask.bool()
        assert torch.allclose(chunk_logp[mask], logp[rows][mask], atol=1e-4)


def test_greedy_generate_agrees_with_forward(backbone, images):
    processor, tokenizer, model = backbone.processor, backbone.tokenizer, backbone.model.eval()
    inputs = model_inputs(backbone, [chat(processor, 1), chat(processor, 1, "Name the modality.")],
                          [[images[2]], [images[0]]])
    out = model.generate(**inputs, do_sample=False, max_new_tokens=6, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    prompt_length = inputs["input_ids"].shape[1]
    assert torch.equal(out[:, :prompt_length], inputs["input_ids"])  # prompt + completion, like a decoder-only model
    attention = torch.ones_like(out)
    attention[:, :prompt_length] = inputs["attention_mask"]
    logp = full_logprobs(model, {"input_ids": out, "attention_mask": attention,
                                 "pixel_values": inputs["pixel_values"]})
    mask, _ = completion_mask_from_ids(out[:, prompt_length:], [tokenizer.eos_token_id])  # up to the first EOS
    greedy = logp[:, prompt_length - 1:-1].argmax(-1)
    assert torch.equal(greedy[mask.bool()], out[:, prompt_length:][mask.bool()])


def train_step(backbone, images) -> None:
    """One plain sign-SGD step on the mean log-prob of a fixed answer (moves LoRA and the vision tower)."""
    inputs = model_inputs(backbone, [chat(backbone.processor, 1) + "It is a chest X-ray."], [[images[0]]])
    logits = backbone.model(**inputs).logits
    loss = -torch.log_softmax(logits[:, -8:-1], -1).gather(-1, inputs["input_ids"][:, -7:, None]).mean()
    loss.backward()
    with torch.no_grad():
        for param in backbone.model.parameters():
            if param.grad is not None:
                param -= 1.0 * param.grad.sign() * 1e-2
                param.grad = None


def test_lora_reference_a_vision_tower_that_trains_and_the_saved_adapter(images, tmp_path):
    backbone = build_backbone("tiny_vlm")
    processor, model = backbone.processor, backbone.model.train()
    assert backbone.uses_lora and backbone.trained_folder_name() == "adapter"
    probe = model_inputs(backbone, [chat(processor, 1)], [[images[1]]])
    with torch.no_grad():
        before = model(**probe).logits
    tower_before = {k: v.clone() for k, v in model.vision_tower.state_dict().items()}
    # The GRPO update's forward: gradients reach the vision tower and LoRA; base weights and the reference tower
    # stay frozen.
    torch.manual_seed(0)
    rollout = HFEngine().generate(backbone, [chat(processor, 1)], [[images[0]]], group_size=2,
                                  sampling=Sampling(max_new_tokens=4))
    logp, _ = scored(backbone, rollout)
    (logp * rollout.completion_mask).sum().backward()
    named = dict(model.named_parameters())
    assert named["vision_tower.patch_embed.weight"].grad.abs().sum() > 0
    assert named["vision_tower.projector.weight"].grad.abs().sum() > 0
    assert any("lora_B" in n and p.grad is not None and p.grad.abs().sum() > 0 for n, p in named.items())
    assert all(not p.requires_grad for n, p in named.items() if "lora" not in n and "vision_tower" not in n)
    assert all(not p.requires_grad for p in model.reference_vision.parameters())
    model.zero_grad(set_to_none=True)

    train_step(backbone, images)
    assert not torch.equal(model.vision_tower.patch_embed.weight, tower_before["patch_embed.weight"])
    with torch.no_grad():
        after = model(**probe).logits
        with model.disable_adapter():
            reference = model(**probe).logits
        again = model(**probe).logits
    assert (after - before).abs().max() > 0.05
    assert torch.allclose(reference, before, atol=1e-5)  # base LM + the initial vision tower
    assert torch.equal(again, after)  # the context restores the trained policy

    folder = backbone.save_trained(tmp_path / backbone.trained_folder_name())
    saved = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "vision_tower.safetensors", "tiny_vlm.json"} <= saved
    assert (folder / "adapter_model.safetensors").stat().st_size < 30_000_000  # no embedding matrix
    trained_tower = {k: v.clone() for k, v in model.vision_tower.state_dict().items()}
    del backbone, model
    reloaded = build_backbone("tiny_vlm", adapter=folder)
    assert all(torch.equal(v, trained_tower[k]) for k, v in reloaded.model.vision_tower.state_dict().items())
    assert all(p.requires_grad for p in reloaded.model.vision_tower.parameters())  # it trains on from there
    model = reloaded.model.eval()
    with torch.no_grad():  # another instance: float noise up to ~1e-4, far below the training change
        assert torch.allclose(model(**probe).logits, after, atol=1e-3)
        with model.disable_adapter():
            assert torch.allclose(model(**probe).logits, before, atol=1e-3)
    with pytest.raises(ConfigError, match="vision tower shaped"):
        build_backbone("tiny_vlm", adapter=folder, **{"vision.layers": 1})


def test_frozen_tower_without_lora_with_checkpointing(images):
    """No LoRA: GRPO deep-copies a reference, the trained policy is a model/ folder. Activation checkpointing drops
    the KV cache in training, so text rows are scored without the shared prompt forward (it crashed before)."""
    backbone = build_backbone("tiny_vlm", **{"lora": None, "train_vision_tower": False,
                                             "gradient_checkpointing": True})
    model, processor = backbone.model.train(), backbone.processor
    assert not backbone.uses_lora and backbone.trained_folder_name() == "model"
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    assert model.language_model.is_activation_checkpointing and not model.language_model.config.use_cache
    model(**model_inputs(backbone, [chat(processor, 1)], [[images[2]]])).logits[:, -1].logsumexp(-1).sum().backward()
    assert model.language_model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.vision_tower.patch_embed.weight.grad is None
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    text = HFEngine().generate(backbone, [chat(processor, 0, "What is the normal resting heart rate?")], None,
                               group_size=2, sampling=Sampling(max_new_tokens=3))
    assert model.training  # the engine put the policy back in training mode
    shared, _ = scored(backbone, text)
    plain, _ = scored(backbone, text, share_prompt=False)
    torch.testing.assert_close(shared, plain)
    shared.sum().backward()
    assert model.language_model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
