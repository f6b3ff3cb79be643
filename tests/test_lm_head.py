"""The chunked LM-head log-probs equal a plain log-softmax over full logits: values, entropies and gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medix.grpo.lm_head import head_token_logprobs, split_lm_head
from tiny_lm import tiny_qwen2


def reference(hidden, head, targets):
    logp_all = F.log_softmax(head(hidden).double(), dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
def test_values_and_gradients_match_log_softmax(bias, chunk_rows):
    torch.manual_seed(0)
    head = nn.Linear(16, 37, bias=bias).double()
    hidden = (torch.randn(3, 5, 16, dtype=torch.float64) * 2).requires_grad_()
    targets = torch.randint(0, 37, (3, 5))
    weights = torch.randn(3, 5, dtype=torch.float64)  # an arbitrary upstream gradient

    logp, entropy = head_token_logprobs(hidden, head, targets, with_entropy=True, chunk_rows=chunk_rows)
    (logp * weights).sum().backward()
    got = [hidden.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if bias else [])
    hidden.grad = None
    head.zero_grad()
    ref_logp, ref_entropy = reference(hidden, head, targets)
    (ref_logp * weights).sum().backward()
    want = [hidden.grad, head.weight.grad] + ([head.bias.grad] if bias else [])

    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(entropy.double(), ref_entropy.detach(), rtol=1e-6, atol=1e-6)
    assert not entropy.requires_grad
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9)


def test_a_frozen_head_gets_no_gradient_and_the_hidden_states_do():
    head = nn.Linear(8, 11, bias=False)
    head.weight.requires_grad_(False)
    hidden = torch.randn(4, 8, requires_grad=True)
    logp, entropy = head_token_logprobs(hidden, head, torch.tensor([0, 3, 10, 5]), chunk_rows=3)
    logp.sum().backward()
    assert entropy is None and head.weight.grad is None
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all() and hidden.grad.abs().sum() > 0


def test_bf16_autocast_matches_float32_closely():
    torch.manual_seed(0)
    head = nn.Linear(32, 50)
    hidden = torch.randn(6, 32)
    targets = torch.randint(0, 50, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = head_token_logprobs(hidden, head, targets, chunk_rows=4)
    full, _ = head_token_logprobs(hidden, head, targets, chunk_rows=4)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, full, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("lora", [False, True])
def test_split_lm_head_reproduces_the_model_logits(lora):
    model = tiny_qwen2(lora=lora).eval()
    body, head = split_lm_head(model)
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(head(body(input_ids=ids).last_hidden_state), model(input_ids=ids).logits)


def test_split_lm_head_declines_a_lora_wrapped_head_and_plain_modules():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_qwen2(), LoraConfig(r=4, target_modules=["lm_head"], task_type="CAUSAL_LM"))
    assert split_lm_head(model) is None
    assert split_lm_head(nn.Linear(3, 3)) is None


@pytest.mark.parametrize("share_prompt", [False, True])
def test_completion_logprobs_take_the_chunked_head_only_for_large_logits_and_agree(monkeypatch, share_prompt):
    """Small logits go through the model's own head (no recompute in the backward), large ones through the chunked
    head: same log-probs and gradients either way."""
    import medix.grpo.lm_head as lm_head
    from medix.grpo import logprobs

    model = tiny_qwen2(lora=True)
    ids = torch.randint(3, 97, (4, 12))
    ids[1], ids[3] = ids[0], ids[2]  # two groups of two rows sharing a prompt
    ids[1, 7:], ids[3, 7:] = torch.randint(3, 97, (5,)), torch.randint(3, 97, (5,))
    mask = torch.ones_like(ids)
    calls = []
    original = lm_head._HeadTokenLogprobs.apply
    monkeypatch.setattr(lm_head._HeadTokenLogprobs, "apply", lambda *a: calls.append(1) or original(*a))
    results = []
    for threshold in (logprobs.CHUNKED_HEAD_MIN_VALUES, 0):  # as shipped (small: the model's head), then chunked
        monkeypatch.setattr(logprobs, "CHUNKED_HEAD_MIN_VALUES", threshold)
        model.zero_grad()
        logp, _ = logprobs.completion_logprobs(model, ids, mask, 7, share_prompt=share_prompt)
        logp.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logp.detach(), grads, len(calls)))
    (small, small_grads, calls_small), (large, large_grads, calls_large) = results
    assert calls_small == 0 and calls_large == 1
    torch.testing.assert_close(small, large, rtol=1e-5, atol=1e-5)
    assert small_grads.keys() == large_grads.keys() and small_grads
    for name in small_grads:
        torch.testing.assert_close(small_grads[name], large_grads[name], rtol=1e-4, atol=1e-6, msg=name)
