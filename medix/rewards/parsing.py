"""Pure string parsing for the reward, as in MediX-R1's released reward function: completion normalisation and
answer extraction (the ground truth is split by `medix.data.tags.split_solution`)."""

from __future__ import annotations

import re

_SPACE_AROUND_TAG_CHARS = re.compile(r"\s*([<>/])\s*")
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def normalize_completion(completion: str) -> str:
    """Remove all whitespace around every `<`, `>` and `/` (so `< answer >` reads `<answer>`); idempotent."""
    return _SPACE_AROUND_TAG_CHARS.sub(r"\1", completion)


def clean_answer(text: str) -> str:
    """Strip whitespace, then leading/trailing periods."""
    return text.strip().strip(".")


def extract_answer(completion: str) -> str:
    """The cleaned content of the first `<answer>…</answer>` of the normalised completion, else the whole of it."""
    normalized = normalize_completion(completion)
    block = _ANSWER_BLOCK.search(normalized)
    return clean_answer(block.group(1) if block else normalized)

