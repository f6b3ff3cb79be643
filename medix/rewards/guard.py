"""The degenerate-answer guard: pure rules that tell a policy's garbage (tag soup, echoes of the question or of its
options, repeated tokens, empty or form-only answers, truncated text without an answer) from an answer worth judging."""

from __future__ import annotations

import re

from medix.rewards.parsing import extract_answer, normalize_completion

_ANSWER_BLOCK = re.compile(r"<answer>.*?</answer>", re.DOTALL)
_TAG = re.compile(r"<[^<>]*>")
_WORD = re.compile(r"[^\W_]+")
_TOKEN = re.compile(r"[^\W_]+|[^\w\s]")
# An option line of a multiple-choice question: "A. text", "B) text", "(C) text".
_OPTION_LINE = re.compile(r"^\s*\(?([A-J])[.)]\s+(.+?)\s*$", re.MULTILINE)
# The items of a listed answer ("A, B or C", "aspirin and heparin") and an item that names an option by its letter
# ("B", "B.", "(B)", "option B").
_LIST_SEPARATOR = re.compile(r"[,;/\n]|\s(?:or|and)\s", re.IGNORECASE)
_OPTION_LETTER = re.compile(r"^(?:[Oo]ption\s+)?\(?([A-J])(?:[.):]|$)")


def words(text: str) -> list[str]:
    """Lower-case words (letters and digits), everything else a separator."""
    return _WORD.findall(text.lower())


def multiple_choice_options(question: str | None) -> list[str]:
    """The option texts of a multiple-choice question written as `A. text` lines (at least two), else []."""
    if not question:
        return []
    options = _OPTION_LINE.findall(question)
    return [text for _, text in options] if len(options) >= 2 else []


def options_named(answer: str, options: list[str]) -> set[int]:
    """Indices of the options that `answer` names. Each list item of the answer names at most one: the option whose
    text it holds (the longest), else the option its letter names (`B. Aspirin` names one option, `A, B or C` three,
    `A pneumothorax` none)."""
    named: set[int] = set()
    option_words = [" ".join(words(option)) for option in options]
    for item in _LIST_SEPARATOR.split(answer):
        item_text = f" {' '.join(words(item))} "
        held = [i for i, text in enumerate(option_words) if text and f" {text} " in item_text]
        letter = _OPTION_LETTER.match(item.strip())
        if held:
            named.add(max(held, key=lambda i: len(option_words[i])))
        elif letter and ord(letter.group(1)) - ord("A") < len(options):
            named.add(ord(letter.group(1)) - ord("A"))
    return named


def tag_share(answer: str) -> float:
    """The share of the answer's non-space characters that are `<...>` tags or stray `<`, `>`."""
    visible = re.sub(r"\s", "", answer)
    if not visible:
        return 0.0
    tagged = sum(len(re.sub(r"\s", "", t)) for t in _TAG.findall(answer))
    rest = _TAG.sub("", answer)
    return (tagged + rest.count("<") + rest.count(">")) / len(visible)


def longest_repeat(text: str, max_n: int = 3) -> int:
    """The most times in a row any token or n-gram of up to `max_n` tokens follows itself (1 = no repeat)."""
    tokens = _TOKEN.findall(text.lower())
    best = 1 if tokens else 0
    for n in range(1, max_n + 1):
        for start in range(n):
            grams = [tuple(tokens[i:i + n]) for i in range(start, len(tokens) - n + 1, n)]
            run = 1
            for previous, current in zip(grams, grams[1:]):
                run = run + 1 if current == previous else 1
                best = max(best, run)
    return best


def echo_share(answer: str, question: str | None) -> float:
    """The share of the question's word 3-grams that the answer repeats; 0 when the answer holds a word the question
    lacks (an answer that restates the question adds its answer) or the question has under 3 words."""
    question_words = words(question or "")
    grams = {tuple(question_words[i:i + 3]) for i in range(len(question_words) - 2)}
    answer_words = words(_TAG.sub(" ", answer))
    if not grams or not set(answer_words) <= set(question_words):
        return 0.0
    answer_grams = {tuple(answer_words[i:i + 3]) for i in range(len(answer_words) - 2)}
    return len(grams & answer_grams) / len(grams)


def looks_truncated(completion: str, reasoning_tag: str) -> bool:
    """The text opens the reasoning or answer tag and never closes it (a completion cut at the token cap)."""
    text = normalize_completion(completion)
    return any(text.rfind(f"<{tag}>") > text.rfind(f"</{tag}>") for tag in (reasoning_tag, "answer"))


def degenerate_reason(completion: str, question: str | None, truncated: bool | None, settings,
                      reasoning_tag: str = "thinking") -> str | None:
    """Why the completion's answer gets no judge credit, or None when it may be judged.

    `settings` holds the thresholds (medix.config.DegenerateGuardConfig: echo_share, option_share, tag_share,
    max_repeats); `truncated` says whether sampling stopped at the token cap (None = unknown: read from the text).
    Reasons: truncated (no <answer>…</answer> and the text was cut), empty (nothing but tags and punctuation),
    tag_soup, repetition, option_echo (names two or more and at least option_share of a multiple-choice question's
    options), question_echo.
    """
    cut = looks_truncated(completion, reasoning_tag) if truncated is None else bool(truncated)
    if cut and not _ANSWER_BLOCK.search(normalize_completion(completion)):
        return "truncated"
    answer = extract_answer(completion)
    if not words(_TAG.sub(" ", answer)):
        return "empty"
    if tag_share(answer) >= settings.tag_share:
        return "tag_soup"
    if longest_repeat(answer) >= settings.max_repeats:
        return "repetition"
    options = multiple_choice_options(question)
    named = options_named(answer, options) if options else set()
    if len(named) >= 2 and len(named) >= settings.option_share * len(options):
        return "option_echo"
    if echo_share(answer, question) >= settings.echo_share:
        return "question_echo"
    return None
