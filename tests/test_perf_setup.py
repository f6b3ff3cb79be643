"""The GPU benchmark's synthetic set-up (experiments/perf/grpo_vs_trl.py) sends the prompts it means to send.

Its 2026-11-26 tokenizer had plain special tokens (w0 UNK, w1 EOS, w2 PAD) that also matched inside ordinary words, so
"64-token" prompts were mangled into EOS/PAD/UNK ids of different lengths; on an H200 that set-up gave NaN gradients
in the first step for medix and TRL alike, while the corrected prompts stayed finite (experiments/perf/README.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "perf"))

import grpo_vs_trl as bench  # noqa: E402

VOCAB = 151_936  # the CUDA preset's: most ids begin with 1 or 2, which the old special tokens matched


def encode(tokenizer, prompts):
    return tokenizer([s.problem for s in prompts], padding=True, add_special_tokens=False, return_tensors="pt")


def test_synthetic_prompts_are_exactly_their_ordinary_tokens():
    tokenizer = bench.synthetic_tokenizer(VOCAB)
    prompts = bench.synthetic_prompts(16, 64, VOCAB)
    enc = encode(tokenizer, prompts)
    assert enc.input_ids.shape == (16, 64)
    assert bool(enc.attention_mask.all())  # no padding: every prompt is 64 tokens
    special = {tokenizer.unk_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert not any(int(i) in special for i in enc.input_ids.flatten())
    words = [s.problem.split() for s in prompts]
    assert enc.input_ids.tolist() == [[int(w[1:]) for w in row] for row in words]  # "w<id>" is token <id>


def test_the_legacy_tokenizer_mangled_the_prompts():
    """What the old set-up did (kept behind --legacy-tokenizer to reproduce the 2026-11-26 runs)."""
    legacy = bench.synthetic_tokenizer(VOCAB, legacy=True)
    enc = encode(legacy, bench.synthetic_prompts(16, 64, VOCAB))
    assert enc.input_ids.shape[1] > 64
    assert int((enc.attention_mask == 0).sum()) > 0  # left padding
    assert int((enc.input_ids == legacy.eos_token_id).sum()) > 0


@pytest.mark.parametrize("min_length", [32, 60])
def test_prompt_lengths_in_range_give_left_padding_only(min_length):
    tokenizer = bench.synthetic_tokenizer(VOCAB)
    prompts = bench.synthetic_prompts(16, 64, VOCAB, min_length=min_length)
    lengths = [len(s.problem.split()) for s in prompts]
    assert min(lengths) >= min_length and max(lengths) <= 64
    enc = encode(tokenizer, prompts)
    assert enc.attention_mask.sum(1).tolist() == lengths
    assert enc.attention_mask[:, -1].all()  # left-padded: every prompt ends at the last position


def test_the_gpu_scripts_import_nothing_the_gpu_image_lacks(repo_root, medix_env):
    """The GPU image has torch/transformers/peft/lightning but not hydra, omegaconf, mlflow or openai: a top-level
    import of one of them anywhere under the step (as medix/rewards/composite.py had) costs a lent GPU's call."""
    import subprocess

    out = subprocess.run([sys.executable, "experiments/perf/grpo_vs_trl.py", "--check-imports"], cwd=repo_root,
                         env=medix_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "forbidden modules imported: none" in out.stdout
