"""The training prompt: prompt.jinja filled with a sample's question, wrapped in the backbone's chat template."""

import re
from functools import lru_cache
from importlib.resources import files

import jinja2

from medix.data.samples import Sample
from medix.data.tags import BRACKETED_TAGS
from medix.errors import ConfigError, DataError

REASONING_TAG_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


@lru_cache(maxsize=1)
def prompt_template() -> jinja2.Template:
    source = files("medix.data").joinpath("prompt.jinja").read_text(encoding="utf-8")
    return jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False).from_string(source)


def prompt_text(problem: str, reasoning_tag: str) -> str:
    """The instruction + question text of the user turn (no chat template)."""
    if not isinstance(reasoning_tag, str) or not REASONING_TAG_PATTERN.fullmatch(reasoning_tag):
        raise ConfigError(f"reasoning_tag={reasoning_tag!r}; expected a bare tag name such as 'thinking' or 'think'")
    return prompt_template().render(content=problem, reasoning_tag=reasoning_tag, modality_tags=BRACKETED_TAGS)


def is_processor(tokenizer_or_processor) -> bool:
    """A multimodal processor (has an image processor and wraps a tokenizer), as opposed to a plain tokenizer."""
    return hasattr(tokenizer_or_processor, "image_processor") and hasattr(tokenizer_or_processor, "tokenizer")


def prompt_messages(sample: Sample, tokenizer_or_processor, reasoning_tag: str) -> list[dict]:
    """One user turn: for processors a content list with one {'type': 'image'} per image first, then the text."""
    text = prompt_text(sample.problem, reasoning_tag)
    if is_processor(tokenizer_or_processor):
        content = [{"type": "image"} for _ in sample.images] + [{"type": "text", "text": text}]
        return [{"role": "user", "content": content}]
    if sample.images:
        raise DataError(
            f"sample id={sample.id} has {len(sample.images)} image(s) but the backbone is text-only (a tokenizer, no "
            "processor); use a vision-language backbone or a text-only dataset such as dataset=medix_mini")
    return [{"role": "user", "content": text}]


def render_prompt(sample: Sample, tokenizer_or_processor, reasoning_tag: str) -> str:
    """The full prompt string: chat template applied, generation prompt added, image markers where the template puts them."""
    messages = prompt_messages(sample, tokenizer_or_processor, reasoning_tag)
    return tokenizer_or_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
