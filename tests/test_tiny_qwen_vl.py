"""backbone=tiny_qwen_vl: the offline Qwen2.5-VL is built to the pinned bytes (so the same model on every machine),
its language model computes SmolLM2-135M-Instruct's logits, its vision tower reaches them, and it loads through
`medix.models.qwen_vl` (the paper's models' code path) without torchvision, its trained folder included."""

from __future__ import annotations

import json

import pytest
import torch

from medix.errors import MedixError
from medix.models import tiny_qwen_vl
from tiny_lm import CACHE_DIR, build_backbone, one_thread  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backbone():
    return build_backbone("tiny_qwen_vl")


def test_the_built_weights_are_the_pinned_ones_and_other_bytes_are_refused(tmp_path):
    folder = tiny_qwen_vl.tiny_qwen_vl_folder(CACHE_DIR)  # built (or found) and checked against the pin
    stamp = json.loads((folder / "medix_build.json").read_text())
    assert stamp["sha256"] == tiny_qwen_vl.WEIGHTS_SHA256
    (tmp_path / "model.safetensors").write_bytes(b"not the model")
    with pytest.raises(MedixError, match="pinned"):
        tiny_qwen_vl.check(tmp_path)


def test_its_language_model_is_smollm2_and_its_images_reach_the_logits(backbone, shared_benchmarks):
    from transformers import AutoModelForCausalLM

    from medix.data.images import load_image
    from medix.models.gguf import smollm2_folder

    assert backbone.is_vlm and type(backbone.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    text = backbone.model.config.get_text_config()
    assert text.hidden_size // text.num_attention_heads == 64  # a head size vLLM's CPU attention takes
    smol = AutoModelForCausalLM.from_pretrained(smollm2_folder(CACHE_DIR)).eval()
    ids = backbone.tokenizer("<|im_start|>user\nName the thigh bone.<|im_end|>\n<|im_start|>assistant\n",
                             return_tensors="pt").input_ids
    with torch.no_grad():
        logits = backbone.model(input_ids=ids).logits[0]
        assert torch.allclose(logits[:, :smol.config.vocab_size], smol(input_ids=ids).logits[0], atol=1e-4)
    folder = shared_benchmarks / "vqa_rad" / "images"
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    prompt = backbone.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    last = []
    for name in ("synpic42202.jpg", "synpic29265.jpg"):
        image = load_image(folder / name, min_pixels=64 * 64, max_pixels=256 * 256)
        enc = backbone.encode([prompt], [[image]])
        assert "mm_token_type_ids" in enc.sequence_inputs  # M-RoPE positions come from them
        with torch.no_grad():
            last.append(backbone.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                       **enc.sequence_inputs, **backbone.image_inputs(enc.row_images)).logits[0, -1])
    assert (last[0] - last[1]).abs().max() > 1e-3  # another image, other logits


def test_the_trained_folder_loads_back_without_torchvision(backbone, tmp_path):
    from medix.models.qwen_vl import load_qwen_vl

    assert importlib_spec("torchvision") is None  # the CPU setup this test is about
    with torch.no_grad():
        next(backbone.model.parameters()).add_(0.5)
    try:
        folder = backbone.save_trained(tmp_path / "model")
        loaded = load_qwen_vl(name="trained", source="local", model=str(folder), dtype="float32",
                              gradient_checkpointing=False, train_vision_tower=True, cache_dir=CACHE_DIR)
    finally:
        with torch.no_grad():
            next(backbone.model.parameters()).sub_(0.5)
    assert loaded.processor.image_processor.size == backbone.processor.image_processor.size
    name, param = next(iter(loaded.model.named_parameters()))
    assert torch.allclose(param, dict(backbone.model.named_parameters())[name] + 0.5)


def importlib_spec(name: str):
    import importlib.util

    return importlib.util.find_spec(name)
