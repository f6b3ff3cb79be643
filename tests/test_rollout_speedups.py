"""The rollout and scoring speed-ups change no numbers, and the HF engine samples from the policy: shared-prompt
log-probs and their gradients equal one plain forward (the prompt running once per distinct prompt), chunked
logsumexp equals log_softmax, the shared prompt cache samples what a plain prefill samples, and what generate
sampled from is what the training forward scores, whatever the checkpoint's generation_config asks for."""

import copy
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import StaticCache

from medix.errors import ConfigError
from medix.grpo.logprobs import completion_logprobs, prompt_owners, token_logprobs
from medix.models.base import Backbone
from medix.models.base import left_padded_positions, native_gqa_attention
from medix.models.prefix import after_prefix, common_prefix, left_padded, shared_prefix
from medix.rollout.base import Sampling
from medix.rollout.hf import HFEngine, lora_merged, prompt_cache, sampler
from tiny_lm import one_thread, record_generate, tiny_qwen2, word_tokenizer  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["w5 w6 w7 w8", "w9 w10", "w11 w12 w13"]


def group_batch(prompts_per_step=3, group=4, prompt_len=7, completion_len=5, seed=1):
    """Left-padded prompts (row i has i pad tokens), each repeated `group` times, then random completions."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (prompts_per_step, prompt_len), generator=gen)
    mask = torch.ones_like(ids)
    for i in range(prompts_per_step):
        ids[i, :i], mask[i, :i] = 2, 0
    ids, mask = ids.repeat_interleave(group, 0), mask.repeat_interleave(group, 0)
    comp = torch.randint(3, 97, (ids.shape[0], completion_len), generator=gen)
    comp_mask = torch.ones_like(comp)
    comp_mask[0, -2:] = 0  # a completion that ended early (right padding)
    return torch.cat([ids, comp], 1), torch.cat([mask, comp_mask], 1), prompt_len


def body_batches(model) -> list[tuple[int, int]]:
    """Records the [rows, tokens] of every batch the model's token embedding sees (one per forward of the body)."""
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    return seen


def qwen_backbone(lora: bool = False) -> Backbone:
    return Backbone(tiny_qwen2(lora=lora), word_tokenizer(97), "tiny_qwen2")


def test_prompt_owners_marks_runs_of_identical_prompts():
    prompts = torch.tensor([[1, 2], [1, 2], [3, 4], [3, 4], [1, 2]])
    assert prompt_owners(prompts).tolist() == [0, 0, 1, 1, 2]


def test_token_logprobs_equal_log_softmax_and_entropy():
    logits = torch.randn(5, 6, 97, dtype=torch.float64) * 3
    targets = torch.randint(0, 97, (5, 6))
    logp, entropy = token_logprobs(logits, targets, with_entropy=True, chunk_rows=2)
    ref = F.log_softmax(logits, -1)
    torch.testing.assert_close(logp, ref.gather(-1, targets.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(entropy, -(ref.exp() * ref).sum(-1))
    assert not entropy.requires_grad


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("lora", [False, True])
def test_shared_prompt_logprobs_and_gradients_equal_a_plain_forward(lora, checkpointing):
    """Shared: each distinct prompt runs once, its rows' completions read its cache. Under activation checkpointing
    (no cache in training) the plain forward runs instead, with the same numbers."""
    model = tiny_qwen2(lora=lora).train()
    if checkpointing:
        model.activation_checkpointing_enable()
    input_ids, attention_mask, P = group_batch()
    trainable = [p for p in model.parameters() if p.requires_grad]
    batches = body_batches(model)

    def logp_and_grads(share):
        model.zero_grad()
        batches.clear()
        logp, entropy = completion_logprobs(model, input_ids, attention_mask, P, with_entropy=True, share_prompt=share)
        (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum().backward()
        return logp.detach(), entropy, [p.grad.clone() for p in trainable], list(batches)

    shared, shared_entropy, shared_grads, shared_batches = logp_and_grads(True)
    plain, plain_entropy, plain_grads, plain_batches = logp_and_grads(False)
    assert plain_batches[0] == (12, 12)
    assert shared_batches[0] == ((12, 12) if checkpointing else (3, 7))  # 3 distinct prompts of 7 tokens
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared_entropy, plain_entropy, atol=1e-5, rtol=1e-5)
    for a, b in zip(shared_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def template_batch(prefix_len=5, rest=(3, 1, 4), group=2, completion_len=4, seed=2):
    """Prompts that all start with the same `prefix_len` tokens, then rest[i] tokens of their own, left-padded to
    the longest; each repeated `group` times; random completions (row 0's ends early)."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(3, 97, (prefix_len,), generator=gen)
    P = prefix_len + max(rest)
    ids, mask = torch.full((len(rest), P), 2), torch.zeros(len(rest), P, dtype=torch.long)
    for i, n in enumerate(rest):
        ids[i, P - prefix_len - n:] = torch.cat([start, torch.randint(3, 97, (n,), generator=gen)])
        mask[i, P - prefix_len - n:] = 1
    ids, mask = ids.repeat_interleave(group, 0), mask.repeat_interleave(group, 0)
    comp = torch.randint(3, 97, (ids.shape[0], completion_len), generator=gen)
    comp_mask = torch.ones_like(comp)
    comp_mask[0, -1:] = 0
    return torch.cat([ids, comp], 1), torch.cat([mask, comp_mask], 1), P


def test_common_prefix_is_the_shared_start_of_left_padded_prompts():
    ids, mask, P = template_batch(prefix_len=5, rest=(3, 1, 4))
    assert torch.equal(common_prefix(ids, mask, P), ids[0, P - 5 - 3:P - 3])
    assert len(common_prefix(ids[:2], mask[:2], P)) == 5 + 3 - 1  # one prompt: all but its last token
    ids[4, P - 4 - 3] = 96 if ids[0, P - 5 - 3 + 2] != 96 else 95  # the third prompt differs at its third token
    assert len(common_prefix(ids, mask, P)) == 2
    ids[4, P - 4 - 5] = 96 if ids[0, P - 5 - 3] != 96 else 95
    assert len(common_prefix(ids, mask, P)) == 0


def test_after_prefix_puts_the_shared_start_in_the_first_columns_of_every_row():
    ids, mask, P = template_batch(prefix_len=5, rest=(3, 1, 4))
    new_ids, new_mask, new_P = after_prefix(ids, mask, P, 5)
    assert new_P == 5 + 4
    for row in range(ids.shape[0]):  # the same tokens, in order, as before: the prefix's come from the cache
        kept = new_mask[row].bool()
        assert kept[:5].all()
        assert torch.equal(new_ids[row, 5:][kept[5:]], ids[row][mask[row].bool()][5:])
    assert torch.equal(new_mask[:, new_P:], mask[:, P:])
    assert new_mask[2, 5:new_P].tolist() == [0, 0, 0, 1]  # one token after the prefix, left-padded to four


@pytest.mark.parametrize("split_head", [False, True])
def test_a_prefix_shared_across_micro_batches_gives_the_plain_log_probs_and_gradients(split_head, monkeypatch):
    """The prompts' common start runs once; micro-batches read its cache; its backward after theirs adds up to the
    gradients of plain forwards, micro-batch by micro-batch (float64)."""
    from medix.grpo import logprobs

    if split_head:  # the body + chunked head path, as large logits take it
        monkeypatch.setattr(logprobs, "CHUNKED_HEAD_MIN_VALUES", 1)
    model = tiny_qwen2(lora=True).double().train()
    ids, mask, P = template_batch()
    trainable = [p for p in model.parameters() if p.requires_grad]
    micro_batches = [[0, 1, 2], [3], [4, 5]]  # a group split over two micro-batches, as micro_batch_size can

    def logp_and_grads(shared):
        model.zero_grad()
        prefix = shared_prefix(model, ids[0, :P][mask[0, :P].bool()][:5]) if shared else None
        logps = []
        for rows in micro_batches:
            logp, _ = completion_logprobs(model, ids[rows], mask[rows], P, prefix=prefix)
            (logp * torch.linspace(-1, 1, logp.numel(), dtype=logp.dtype).view_as(logp)).sum().backward()
            logps.append(logp.detach())
        if prefix is not None:
            prefix.backward()
        return torch.cat(logps), [p.grad.clone() for p in trainable]

    shared, shared_grads = logp_and_grads(True)
    plain, plain_grads = logp_and_grads(False)
    torch.testing.assert_close(shared, plain, atol=1e-10, rtol=1e-10)
    assert all(g.abs().max() > 1e-3 for g in plain_grads)
    for a, b in zip(shared_grads, plain_grads):  # to 1e-7: the shared-prompt path alone differs from plain as much
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


def test_the_prompt_cache_runs_the_shared_start_once_and_lays_the_cache_out_as_the_ids():
    """The HF engine's prefill: the prompts' common start runs once ([1, 5]), then their rests ([3, 4]); each row's
    keys and values sit in the columns of its left-padded ids, equal to a plain prefill's."""
    model = tiny_qwen2(lora=True).eval()
    ids, mask, P = template_batch(prefix_len=5, rest=(3, 1, 4), group=1)
    ids, mask = ids[:, :P], mask[:, :P]
    batches = body_batches(model)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, position_ids=left_padded_positions(mask),
                      use_cache=True).past_key_values
        batches.clear()
        shared = prompt_cache(model, ids, mask)
    assert batches == [(1, 5), (3, 4)]
    real = mask.bool()
    for ours, theirs in zip(shared.layers, plain.layers):
        assert ours.keys.shape == theirs.keys.shape
        for row in range(len(ids)):
            torch.testing.assert_close(ours.keys[row][:, real[row]], theirs.keys[row][:, real[row]])
            torch.testing.assert_close(ours.values[row][:, real[row]], theirs.values[row][:, real[row]])


def test_left_padded_moves_the_prefix_behind_each_rows_padding():
    mask = torch.tensor([[1, 1, 0, 0, 1], [1, 1, 1, 1, 1]])  # [prefix 2 | pads | rest]: rests of 1 and 3
    states = torch.arange(10.0).view(2, 1, 5, 1)
    layer = SimpleNamespace(keys=states.clone(), values=states.clone())
    moved = left_padded(SimpleNamespace(layers=[layer]), mask, 2).layers[0]
    assert moved.keys[0, 0, 2:, 0].tolist() == [0.0, 1.0, 4.0]  # pads first, then the prefix, then the rest
    assert moved.keys[1, 0, :, 0].tolist() == [5.0, 6.0, 7.0, 8.0, 9.0]  # no padding: as it was


@pytest.mark.parametrize("template", ["", "w20 w21 w22 "])
def test_shared_prompt_cache_samples_what_a_plain_prefill_samples(template):
    """With a template, the prompts' common start is prefilled once ([1, 3]) before their rests."""
    backbone = qwen_backbone()
    calls = record_generate(backbone.model)
    batches = body_batches(backbone.model)
    outs = []
    for share in (True, False):
        torch.manual_seed(123)
        outs.append(HFEngine(share_prompt_cache=share).generate(backbone, [template + p for p in PROMPTS],
                                                                group_size=3, sampling=Sampling(max_new_tokens=6)))
    assert [call.get("past_key_values") is not None for call in calls] == [True, False]  # the cache was shared
    assert isinstance(calls[0]["past_key_values"], StaticCache)  # sized for the completions, written in place
    assert ((1, 3) in batches) == bool(template)
    shared, plain = outs
    assert shared.input_ids.shape == (9, len(template.split()) + 4 + 6)
    assert torch.equal(shared.input_ids, plain.input_ids)
    assert shared.texts == plain.texts
    logp_shared, _ = completion_logprobs(backbone.model, shared.input_ids, shared.attention_mask, shared.prompt_length)
    logp_plain, _ = completion_logprobs(copy.deepcopy(backbone.model), plain.input_ids, plain.attention_mask,
                                        plain.prompt_length, share_prompt=False)
    torch.testing.assert_close(logp_shared, logp_plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_the_engine_samples_from_the_distribution_the_training_forward_scores(lora):
    """A checkpoint's generation_config may switch on logits processors (Qwen2.5-VL ships repetition_penalty 1.05):
    the engine samples from the policy itself, so the log-softmax of what generate sampled from, at the chosen
    tokens, is the training forward's log-prob; the model's own generation_config is left as it was."""
    backbone = qwen_backbone(lora=lora)
    config = backbone.model.generation_config
    config.repetition_penalty, config.no_repeat_ngram_size, config.top_k = 1.5, 2, 5
    calls = record_generate(backbone.model)
    torch.manual_seed(0)
    rollout = HFEngine().generate(backbone, PROMPTS, group_size=2, sampling=Sampling(max_new_tokens=8))
    sampled = torch.log_softmax(calls[0]["scores"].float(), -1)
    sampled = sampled.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        logp, _ = completion_logprobs(backbone.model, rollout.input_ids, rollout.attention_mask,
                                      rollout.prompt_length)
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(sampled[mask], logp[mask], atol=1e-4, rtol=1e-4)
    assert backbone.model.generation_config.repetition_penalty == 1.5  # restored


def test_engine_rows_groups_masks_and_texts():
    """group_size rows per prompt, consecutive; the completion mask covers tokens up to the first EOS (included),
    later tokens are padding, truncated = no EOS; texts decode the kept tokens; the policy's train mode is kept."""
    backbone = qwen_backbone()
    backbone.model.train()
    tokenizer = backbone.tokenizer
    torch.manual_seed(3)
    rollout = HFEngine().generate(backbone, PROMPTS, group_size=3, sampling=Sampling(max_new_tokens=40))
    assert backbone.model.training
    P = rollout.prompt_length
    for g, prompt in enumerate(PROMPTS):
        for row in range(3 * g, 3 * g + 3):
            real = rollout.input_ids[row, :P][rollout.attention_mask[row, :P].bool()]
            assert tokenizer.decode(real) == prompt
    completion, mask = rollout.completion_ids, rollout.completion_mask
    ended = ~rollout.truncated
    assert ended.any() and rollout.truncated.any()  # both kinds of row in this seeded sample
    for row in range(len(rollout)):
        length = int(mask[row].sum())
        assert mask[row, :length].all() and not mask[row, length:].any()
        eos_at = (completion[row] == 1).nonzero().flatten().tolist()
        if ended[row]:
            assert eos_at == [length - 1]  # the first EOS ends the row, nothing after it is kept
        else:
            assert eos_at == [] and length == completion.shape[1]
        assert (completion[row, length:] == tokenizer.pad_token_id).all()
        assert rollout.texts[row] == tokenizer.decode(completion[row, :length], skip_special_tokens=True)
    assert torch.equal(rollout.attention_mask[:, P:], mask)


def test_a_text_only_backbone_refuses_prompts_with_images():
    backbone = qwen_backbone()
    assert backbone.encode(PROMPTS[:2], [[], []]).row_images is None
    with pytest.raises(ConfigError, match="backbone tiny_qwen2 is text-only but the prompts carry images"):
        backbone.encode(PROMPTS[:2], [[], [Image.new("RGB", (8, 8))]])


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("lora", [False, True])
def test_completion_logprobs_equal_log_softmax_of_the_model_logits(share, lora):
    """Through the split body + chunked head (lm_head.py): the same numbers as the model's own full logits."""
    model = tiny_qwen2(lora=lora).eval()
    input_ids, attention_mask, P = group_batch()
    with torch.no_grad():
        logp, _ = completion_logprobs(model, input_ids, attention_mask, P, share_prompt=share)
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=left_padded_positions(attention_mask)).logits
    ref = F.log_softmax(logits[:, P - 1:-1].double(), -1).gather(-1, input_ids[:, P:].unsqueeze(-1)).squeeze(-1)
    real = attention_mask[:, P:].bool()
    torch.testing.assert_close(logp[real].double(), ref[real], atol=1e-5, rtol=1e-5)


def test_lora_merged_runs_the_adapted_weights_and_gives_the_original_tensors_back():
    model = tiny_qwen2(lora=True).eval()
    ids = torch.randint(3, 97, (2, 6))
    weights = {name: p for name, p in model.named_parameters() if "base_layer.weight" in name}
    values = {name: p.detach().clone() for name, p in weights.items()}
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        with lora_merged(model):
            merged = model(input_ids=ids).logits
            inside = dict(model.named_parameters())
        after = model(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    assert (merged - base).abs().max() > 0.1  # the adapters took part
    assert all(inside[name] is not p for name, p in weights.items())  # a copy was run, not the weight itself
    after_weights = dict(model.named_parameters())
    assert all(after_weights[name] is p and torch.equal(p, values[name]) for name, p in weights.items())
    assert torch.equal(after, adapted)  # the adapters are on again


def test_lora_merged_keeps_the_bias_of_lora_b():
    """peft's lora_bias=True adds a bias to B's output, which W + s * B @ A cannot hold: such a model samples with
    its adapters as they are (the bias included), not with a merged weight that drops it."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_qwen2(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    lora_bias=True, init_lora_weights=False)).eval()
    biases = [b.bias for m in model.modules() if hasattr(m, "lora_B") for b in m.lora_B.values()]
    assert biases
    with torch.no_grad():
        for bias in biases:
            bias.normal_(0, 1.0)
        ids = torch.randint(3, 97, (2, 6))
        adapted = model(input_ids=ids).logits
        with lora_merged(model):
            inside = model(input_ids=ids).logits
    torch.testing.assert_close(inside, adapted, atol=1e-5, rtol=1e-5)


def test_native_gqa_attention_changes_no_numbers(monkeypatch):
    """tiny_qwen2 has 4 query heads over 2 KV heads: K/V handed to SDPA grouped give the log-probs and gradients of
    K/V copied out per head."""
    monkeypatch.delenv("TRANSFORMERS_SDPA_FORCE_GQA", raising=False)
    native_gqa_attention("cuda")
    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ  # transformers' own choice on CUDA
    native_gqa_attention("cpu")
    assert os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == "1"
    input_ids, attention_mask, prompt_length = group_batch()
    sdpa, kv_heads = F.scaled_dot_product_attention, []

    def recording_sdpa(query, key, value, *args, **kwargs):
        kv_heads.append(key.shape[1])
        return sdpa(query, key, value, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    results = []
    for switch in ("1", "0"):
        monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", switch)
        model = tiny_qwen2(lora=True).train()
        kv_heads.clear()
        logp, _ = completion_logprobs(model, input_ids, attention_mask, prompt_length)
        (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum().backward()
        results.append((logp.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
        assert set(kv_heads) == ({2} if switch == "1" else {4})  # grouped K/V, or copied out to the 4 query heads
    (gqa, gqa_grads), (copied, copied_grads) = results
    torch.testing.assert_close(gqa, copied, atol=1e-6, rtol=1e-6)
    for a, b in zip(gqa_grads, copied_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "0")
    native_gqa_attention("cpu")
    assert os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == "0"  # a user's setting stays


def test_the_sampler_draws_from_the_softmax_at_the_temperature_and_top_p():
    """generate's greedy pick over the sampler's output is a draw from the policy's distribution: the softmax of
    the scores over the temperature, cut to the top-p nucleus; an entry at -inf is never drawn."""
    torch.manual_seed(0)
    logits, rows = torch.tensor([2.0, 1.0, 0.0, -1.0, float("-inf")]), 200_000
    nucleus = torch.softmax(torch.tensor([4.0, 2.0]), -1)  # T 0.5: probs .865 .117 .016 .002, top-p 0.9 keeps two
    for sampling, expected in [(Sampling(8, temperature=1.0), torch.softmax(logits, -1)),
                               (Sampling(8, temperature=0.5, top_p=0.9), torch.cat([nucleus, torch.zeros(3)]))]:
        scores = sampler(sampling)(torch.zeros(rows, 1, dtype=torch.long), logits.repeat(rows, 1))
        drawn = torch.bincount(scores.argmax(-1), minlength=5) / rows
        torch.testing.assert_close(drawn, expected, atol=4e-3, rtol=0)
        assert drawn[4] == 0
