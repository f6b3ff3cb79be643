"""GRPOModule steps through Lightning on a tiny random Llama: LoRA and full fine-tune both update the right weights
against the right reference, DAPO's reward statistics cover every sampled group, `trainer.max_steps=null`, and
`precision=bf16-true`."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from medix.data.datamodule import PromptDataModule
from medix.data.samples import Sample
from medix.errors import ConfigError
from medix.grpo.callbacks import GRPOCheckpoint
from medix.grpo.logprobs import completion_logprobs
from medix.grpo.module import GRPOModule
from medix.rewards.composite import RewardBatch
from medix.rollout.base import Sampling
from medix.rollout.hf import HFEngine
from tiny_lm import (TargetWordReward, algorithm, memory_logger, one_thread, tiny_backbone, tiny_model,  # noqa: F401
                     trainer, word_samples)

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS, GROUP, TOKENS = 2, 4, 8


def grpo(**overrides):
    settings = dict(group_size=GROUP, prompts_per_step=PROMPTS, max_new_tokens=TOKENS, mini_batch_size=PROMPTS * GROUP,
                    lr=1e-2, beta=0.01)
    settings.update(overrides)
    return algorithm("grpo", **settings)


def fit(backbone, algo, *, max_steps=1, samples=8, logger=None, reward=None, **trainer_kwargs):
    torch.manual_seed(0)
    module = GRPOModule(backbone, HFEngine(), reward or TargetWordReward(max_new_tokens=TOKENS), algorithm=algo,
                        reasoning_tag="thinking", seed=0)
    data = PromptDataModule.from_samples(word_samples(samples), [], batch_size=algo.prompts_per_step, seed=0)
    logger = logger if logger is not None else memory_logger()
    trainer(max_steps=max_steps, logger=logger, **trainer_kwargs).fit(module, datamodule=data)
    return module, logger


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def logprobs_against(module, reference_model):
    """Log-probs of fresh completions under module's reference, its policy and `reference_model` (masked)."""
    prompts = [module.backbone.render(s, "thinking") for s in word_samples(2)]
    torch.manual_seed(1)
    rollout = HFEngine().generate(module.backbone, prompts, None, group_size=2, sampling=Sampling(TOKENS))
    mask = rollout.completion_mask.bool()
    args = (rollout.input_ids, rollout.attention_mask, rollout.prompt_length)
    ref = module.reference_logprobs(rollout, [list(range(rollout.input_ids.shape[0]))])
    with torch.no_grad():
        policy, _ = completion_logprobs(module.model, *args)
        expected, _ = completion_logprobs(reference_model, *args)
    return ref[mask], policy[mask], expected[mask]


def assert_step_had_a_gradient(logger):
    step = logger.steps[1]
    assert step["frac_reward_zero_std"] < 1.0  # some group's rewards differed: non-zero advantages
    assert torch.isfinite(torch.tensor(step["loss"]))


def steps_from_a_pristine_copy(*, lora: bool, steps: int = 1):
    """GRPO steps (beta 0.01, no weight decay) on a tiny Llama: (module, untouched copy of the base model, weights
    before). LoRA needs two: its A matrices get no gradient until B has left its zero init."""
    base = tiny_model(seed=0)
    pristine = copy.deepcopy(base).eval()
    backbone = tiny_backbone(lora=lora, model=base)
    before = snapshot(backbone.model)
    module, logger = fit(backbone, grpo(beta=0.01, weight_decay=0.0), max_steps=steps)  # changes come from gradients
    assert_step_had_a_gradient(logger)
    return module, pristine, before


def assert_reference_is_the_base_and_the_policy_moved(module, pristine):
    ref, policy, base_logp = logprobs_against(module, pristine)
    torch.testing.assert_close(ref, base_logp, rtol=1e-5, atol=1e-5)  # reference = the untouched base model
    assert (policy - base_logp).abs().max() > 1e-3  # the policy is no longer the base model


def test_lora_step_updates_the_adapter_only_and_the_reference_is_the_disabled_adapter():
    module, pristine, before = steps_from_a_pristine_copy(lora=True, steps=2)
    assert module.grpo_step == 2
    assert module.ref_model is None  # no second copy of the model
    after = snapshot(module.model)
    trainable = {name for name, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    for name, value in after.items():
        if name in trainable:
            assert not torch.equal(value, before[name]), f"adapter weight {name} did not change"
        else:
            assert torch.equal(value, before[name]), f"base weight {name} changed"
    assert all(after[n].abs().max() > 0 for n in trainable if "lora_B" in n)  # lora_B left its zero init
    assert_reference_is_the_base_and_the_policy_moved(module, pristine)


def test_full_finetune_step_updates_every_weight_against_a_frozen_reference_copy():
    module, pristine, before = steps_from_a_pristine_copy(lora=False)
    ref_model = module.ref_model
    assert ref_model is not None and ref_model is not module.model
    policy_ids = {id(p) for p in module.model.parameters()}
    assert not policy_ids & {id(p) for p in ref_model.parameters()}  # a copy, not shared tensors
    assert all(not p.requires_grad for p in ref_model.parameters())
    optimized = {id(p) for group in module.optimizers().optimizer.param_groups for p in group["params"]}
    assert optimized == policy_ids  # full fine-tune: every policy weight, and nothing of the reference
    after = snapshot(module.model)
    for name, value in after.items():
        assert not torch.equal(value, before[name]), f"weight {name} did not change"
    for (name, value), (_, original) in zip(ref_model.named_parameters(), pristine.named_parameters()):
        assert torch.equal(value, original), f"reference weight {name} changed"
    assert_reference_is_the_base_and_the_policy_moved(module, pristine)


def test_no_reference_model_without_a_kl_term():
    module = GRPOModule(tiny_backbone(lora=False), HFEngine(), TargetWordReward(), algorithm=grpo(beta=0.0),
                        reasoning_tag="thinking", seed=0)
    assert module.ref_model is None


def test_max_steps_null_trains_until_the_epochs_end(tmp_path):
    module, logger = fit(tiny_backbone(lora=True), grpo(beta=0.0), max_steps=None, samples=6, max_epochs=1,
                         callbacks=[GRPOCheckpoint(str(tmp_path))])
    assert module.grpo_step == 3  # 6 prompts, 2 per step, one epoch
    assert sorted(logger.steps) == [1, 2, 3]
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["grpo"]["step"] == 3  # the end-of-run checkpoint


def test_max_steps_null_without_an_epoch_limit_names_the_keys():
    with pytest.raises(ConfigError, match=r"trainer\.max_steps=null .* trainer\.max_epochs=-1"):
        fit(tiny_backbone(lora=True), grpo(beta=0.0), max_steps=None, max_epochs=-1)


def test_bf16_true_precision_trains_a_step():
    backbone = tiny_backbone(lora=False)
    before = snapshot(backbone.model)
    module, logger = fit(backbone, grpo(beta=0.01), precision="bf16-true")
    assert module.grpo_step == 1
    assert_step_had_a_gradient(logger)
    after = snapshot(module.model)
    assert all(value.dtype == torch.bfloat16 for value in after.values())
    assert all(torch.isfinite(value).all() for value in after.values())
    changed = [n for n in after if not torch.equal(after[n], before[n].to(torch.bfloat16))]
    assert len(changed) > len(after) // 2


class FirstGroupFlat(TargetWordReward):
    """TargetWordReward, except that the first prompt's G completions of every call all score 0 (a group DAPO's
    filter drops); keeps every call's overall rewards."""

    def __init__(self, group_size: int, **kwargs):
        super().__init__(**kwargs)
        self.group_size = group_size
        self.calls: list[list[float]] = []

    def __call__(self, completions, solutions, **columns) -> RewardBatch:
        scores = super().__call__(completions, solutions, **columns).overall
        scores = [0.0] * self.group_size + scores[self.group_size:]
        self.calls.append(scores)
        return RewardBatch(components={"target": scores}, overall=scores)


def test_dapo_reward_statistics_cover_every_sampled_group_and_the_kept_ones_apart():
    algo = algorithm("dapo", group_size=GROUP, prompts_per_step=PROMPTS, max_new_tokens=TOKENS,
                     mini_batch_size=PROMPTS * GROUP, lr=1e-2, **{"dynamic_sampling.max_tries": 1})
    reward = FirstGroupFlat(GROUP, max_new_tokens=TOKENS)
    _, logger = fit(tiny_backbone(lora=True), algo, reward=reward)
    [sampled] = reward.calls
    step = logger.steps[1]
    assert step["reward/overall/mean"] == pytest.approx(sum(sampled) / len(sampled))  # the dropped group too
    kept = sampled[GROUP:]
    assert step["kept/reward/overall/mean"] == pytest.approx(sum(kept) / len(kept))
    others_flat = len(set(kept)) == 1
    assert step["frac_reward_zero_std"] == pytest.approx((1 + others_flat) / PROMPTS)
    assert step["dapo/kept_groups"] == PROMPTS - 1 and step["dapo/tries"] == 1


class LengthReward(TargetWordReward):
    """A validation reward of another shape: the completion's word count / max_new_tokens, component `length`."""

    names = ["length"]

    def __call__(self, completions, solutions, **columns) -> RewardBatch:
        scores = [len(text.split()) / self.max_new_tokens for text in completions]
        self.history.extend(scores)  # every validation row's score
        return RewardBatch(components={"length": scores}, overall=scores)


def test_validation_scores_with_its_own_reward_when_one_is_given():
    torch.manual_seed(0)
    train_reward, val_reward = TargetWordReward(max_new_tokens=TOKENS), LengthReward(max_new_tokens=TOKENS)
    algo = grpo()
    module = GRPOModule(tiny_backbone(lora=True), HFEngine(), train_reward, algorithm=algo, reasoning_tag="thinking",
                        seed=0, val_reward=val_reward)
    data = PromptDataModule.from_samples(word_samples(8), word_samples(3), batch_size=PROMPTS, seed=0)
    logger = memory_logger()
    trainer(max_steps=1, logger=logger, val_check_interval=1).fit(module, datamodule=data)
    logged = {k: v for step in logger.steps.values() for k, v in step.items()}
    assert len(val_reward.history) == 3 and len(train_reward.history) == 1  # each reward scored its own stage
    assert "val/reward/length/mean" in logged and "val/reward/target/mean" not in logged
    assert "reward/target/mean" in logged and "reward/length/mean" not in logged
    assert logged["val/reward/overall/mean"] == pytest.approx(sum(val_reward.history) / 3)


def test_micro_batches_give_the_mini_batch_gradient():
    """One mini-batch of 8 completions through micro-batches of 3 rows (3 + 3 + 2) takes the same optimizer step as
    one forward/backward over all 8: the losses share the mini-batch's token count as denominator. Plain SGD (the
    optimizer is config), so the step is the gradient itself (Adam's first step, lr * g/|g|, would blow float noise
    on near-zero gradients up to a full step)."""
    after = {}
    for micro in (None, 3):
        backbone = tiny_backbone(lora=False, model=tiny_model(seed=0))
        module, logger = fit(backbone, grpo(micro_batch_size=micro, weight_decay=0.0, beta=0.0,
                                            **{"optimizer._target_": "torch.optim.SGD", "lr": 1.0}))
        assert_step_had_a_gradient(logger)
        after[micro] = (snapshot(module.model), logger.steps[1]["loss"])
    for name, weight in after[None][0].items():
        torch.testing.assert_close(after[3][0][name], weight, rtol=1e-5, atol=1e-6, msg=name)
    assert after[3][1] == pytest.approx(after[None][1], rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("mini_batch", [PROMPTS * GROUP, GROUP])
def test_the_prompts_shared_start_runs_once_per_optimizer_step_with_the_same_step(monkeypatch, mini_batch):
    """The prompts' common start (the template) runs once per optimizer step, and the micro-batches read its cache:
    the weights after the step are those of plain micro-batch forwards (plain SGD: the step is the gradient). With
    two optimizer steps per update, the second recomputes it under the weights the first left."""
    prefixes = []
    step_prefix = GRPOModule.step_prefix

    def recorded(self, rollout, rows):
        prefixes.append(step_prefix(self, rollout, rows))
        return prefixes[-1]

    after = {}
    for shared in (True, False):
        monkeypatch.setattr(GRPOModule, "step_prefix", recorded if shared else lambda self, rollout, rows: None)
        backbone = tiny_backbone(lora=True, model=tiny_model(seed=0))
        module, logger = fit(backbone, grpo(micro_batch_size=3, mini_batch_size=mini_batch, weight_decay=0.0,
                                            beta=0.0, **{"optimizer._target_": "torch.optim.SGD", "lr": 1.0}),
                             max_steps=2)
        assert_step_had_a_gradient(logger)
        after[shared] = snapshot(module.model)
    steps = 2 * PROMPTS * GROUP // mini_batch  # one prefix per optimizer step
    assert len(prefixes) == steps and all(p is not None and p.length > 3 for p in prefixes)
    for name, weight in after[False].items():
        torch.testing.assert_close(after[True][name], weight, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("micro", [0, -1])
def test_a_bad_micro_batch_size_names_the_key(micro):
    with pytest.raises(ConfigError, match="algorithm.micro_batch_size"):
        GRPOModule(tiny_backbone(lora=True), HFEngine(), TargetWordReward(), algorithm=grpo(micro_batch_size=micro),
                   reasoning_tag="thinking", seed=0)


def test_a_non_finite_gradient_never_reaches_the_weights():
    """The H200 divergence of 2026-11-26 at a tiny shape (experiments/perf/README.md): in a randomly initialised deep
    model the PAD id's embedding row is zero, so a prompt whose first token is PAD keeps an all-zero residual stream
    at that position, and each RMSNorm's backward at zero multiplies the gradient by rsqrt(eps): with 32 layers the
    gradient holds inf and NaN, and the optimizer step wrote NaN into every weight (as on the H200). Now the step is
    skipped, counted in grad/nonfinite_steps, and the weights stay as they were."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from medix.models.base import Backbone
    from tiny_lm import PAD, VOCAB, word_tokenizer

    config = Qwen2Config(hidden_size=64, num_hidden_layers=32, num_attention_heads=4, num_key_value_heads=4,
                         intermediate_size=64, vocab_size=VOCAB, tie_word_embeddings=True, bos_token_id=None,
                         eos_token_id=1, pad_token_id=PAD)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    assert bool((model.model.embed_tokens.weight[PAD] == 0).all())

    class RawPrompt(Backbone):  # the prompt is the sample's text, no template: it can start with the PAD word
        def render(self, sample, reasoning_tag):
            return sample.problem

    backbone = RawPrompt(model, word_tokenizer(), "deep_qwen2")
    samples = [Sample(id=f"p{i}", problem=f"w{PAD} w{5 + i} w{9 + i}", solution="<OTHER> w5", tag="<OTHER>",
                      answer="w5") for i in range(4)]
    before = snapshot(model)
    torch.manual_seed(0)
    module = GRPOModule(backbone, HFEngine(), TargetWordReward(max_new_tokens=TOKENS),
                        algorithm=grpo(beta=0.0, weight_decay=0.0), reasoning_tag="thinking", seed=0)
    logger = memory_logger()
    data = PromptDataModule.from_samples(samples, [], batch_size=PROMPTS, seed=0)
    trainer(max_steps=1, logger=logger).fit(module, datamodule=data)
    step = logger.steps[1]
    assert step["frac_reward_zero_std"] < 1.0  # the rewards differed: a gradient was due
    after = snapshot(module.model)
    assert all(torch.equal(after[name], before[name]) for name in before)  # not NaN: untouched
    assert step["grad/nonfinite_steps"] == 1.0 and not math.isfinite(step["grad/norm"])
