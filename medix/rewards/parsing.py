"""Pure string parsing for the reward, as in MediX-R1's released reward function (training/examples/reward_function/
medical.py): completion normalisation, answer extraction and the reference's tag and answer."""

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



def reference_parts(solution: str) -> tuple[str, str]:
    """The reference's modality tag and answer as the paper reads a `"<TAG> answer"` ground truth: the text up to the
    first `>` (leading and inner whitespace kept, so `" <X_RAY>"` and `"< X_RAY >"` match no completion) and the text
    after it, stripped, then without leading/trailing periods (`"<SPECT> ischemia ."` -> `"ischemia "`)."""
    tag, _, answer = solution.partition(">")
    return tag + ">", clean_answer(answer)
