"""Pure reward rules: normalisation, answer extraction, format, modality, answer guards."""

import pytest

from medix.rewards.components import answer_shortcut, format_reward, is_invalid_answer, modality_reward
from medix.rewards.parsing import clean_answer, extract_answer, normalize_completion

GOOD = "<X_RAY><thinking>The film shows a collapsed lung.</thinking><answer>Pneumothorax</answer>"


def test_normalize_removes_whitespace_around_angle_brackets_and_slashes():
    assert normalize_completion(" < thinking >a b</ thinking >\n<answer > 1 / 2 </answer>") == \
        "<thinking>a b</thinking><answer>1/2</answer>"
    once = normalize_completion("x < y / z >\t w")
    assert once == "x<y/z>w" and normalize_completion(once) == once


@pytest.mark.parametrize("completion, expected", [
    ("<answer>Pneumothorax.</answer>", "Pneumothorax"),
    ("<answer>\n  ..Left lower lobe.  \n</answer>", "Left lower lobe"),
    ("<answer>first</answer><answer>second</answer>", "first"),
    ("<answer>multi\nline</answer>", "multi\nline"),
    ("no tags at all.", "no tags at all"),
    ("<answer>unclosed", "<answer>unclosed"),
    ("< answer > spaced </ answer >", "spaced"),
    ("<ANSWER>upper</ANSWER>", "<ANSWER>upper</ANSWER>"),
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_clean_answer_strips_whitespace_before_periods():
    assert clean_answer("  ..a.b..  ") == "a.b"
    assert clean_answer("a . ") == "a "  # periods are stripped after whitespace, as in the paper


@pytest.mark.parametrize("completion, expected", [
    (GOOD, 1.0),
    ("<X_RAY>\n<thinking>\nline one\nline two\n</thinking>\n\n<answer>\nPneumothorax\n</answer>\n", 1.0),
    ("< thinking >r</ thinking > < answer >a</ answer >", 1.0),
    ("preamble without tag <thinking>r</thinking><answer>a</answer>", 1.0),  # only text from <thinking> on counts
    ("<thinking>r</thinking><answer>a</answer> trailing text", 0.0),
    ("<thinking>r</thinking>between<answer>a</answer>", 0.0),
    ("<thinking>r</thinking>", 0.0),
    ("<answer>a</answer>", 0.0),
    ("<THINKING>r</THINKING><answer>a</answer>", 0.0),
    ("<think>r</think><answer>a</answer>", 0.0),
    ("<thinking>r<answer>a</answer>", 0.0),
    ("", 0.0),
])
def test_format_reward(completion, expected):
    assert format_reward(completion) == expected


def test_format_reward_follows_the_configured_reasoning_tag():
    think = "<X_RAY><think>r</think><answer>a</answer>"
    assert format_reward(think, "think") == 1.0
    assert format_reward(think, "thinking") == 0.0
    assert format_reward(GOOD, "think") == 0.0


@pytest.mark.parametrize("completion, tag, expected", [
    (GOOD, "<X_RAY>", 1.0),
    (GOOD, "<x_ray>", 1.0),
    ("<x_ray><thinking>r</thinking><answer>a</answer>", "<X_RAY>", 1.0),
    ("  < X_RAY >  \n <thinking>r</thinking>", "<X_RAY>", 1.0),
    (GOOD, "<CT_SCAN>", 0.0),
    ("Modality: <X_RAY><thinking>r</thinking>", "<X_RAY>", 0.0),
    ("X_RAY<thinking>r</thinking>", "<X_RAY>", 0.0),
    ("<X_RAY><answer>a</answer>", "<X_RAY>", 0.0),  # no <thinking>: 0 even with the right tag
    ("<X_RAY><THINKING>r</THINKING>", "<X_RAY>", 0.0),
])
def test_modality_reward(completion, tag, expected):
    assert modality_reward(completion, tag) == expected


def test_modality_reward_follows_the_configured_reasoning_tag():
    assert modality_reward("<MRI_SCAN><think>r</think>", "<MRI_SCAN>", "think") == 1.0
    assert modality_reward("<MRI_SCAN><think>r</think>", "<MRI_SCAN>", "thinking") == 0.0


@pytest.mark.parametrize("answer, invalid", [
    ("", True), ("A", True), ("?", True), ("ab", False), ("Pneumothorax", False),
    ("fill in __", True), ("Answer: pneumonia", True), ("pneumonia?", True), ("a_b", False), ("1.5 cm", False),
])
def test_invalid_answer_guard(answer, invalid):
    assert is_invalid_answer(answer) is invalid


def test_answer_shortcut_checks_the_guard_before_identity():
    assert answer_shortcut("Pneumothorax", "Pneumothorax") == 1.0
    assert answer_shortcut("pneumothorax", "Pneumothorax") is None  # exact string match only
    assert answer_shortcut("B", "B") == 0.0  # one character: garbage even when identical
    assert answer_shortcut("a: b", "a: b") == 0.0
    assert answer_shortcut("Pneumonia", "Pneumothorax") is None
