"""The fused LoRA linear layers (medix/models/lora.py) change no numbers: the update's log-probs and LoRA gradients
equal peft's own forward, and peft's path still runs wherever the fused one does not apply."""

import contextlib

import pytest
import torch

from medix.grpo.logprobs import completion_logprobs
from medix.models.lora import LoraLinearFunction, fused_lora
from test_rollout_speedups import group_batch
from tiny_lm import one_thread, tiny_qwen2  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def lora_b_calls(model) -> list:
    """One entry per forward of any lora_B module (peft's unfused path)."""
    calls = []
    for name, module in model.named_modules():
        if name.endswith("lora_B.default"):
            module.register_forward_hook(lambda m, args, out: calls.append(1))
    return calls


def logprobs_and_lora_grads(model, fused: bool):
    """Forward and backward inside the fused context, as GRPOModule.update runs them (under activation checkpointing
    the backward recomputes the forward)."""
    input_ids, attention_mask, prompt_length = group_batch()
    model.zero_grad()
    with fused_lora(model) if fused else contextlib.nullcontext():
        logp, _ = completion_logprobs(model, input_ids, attention_mask, prompt_length)
        (logp * torch.linspace(-1, 1, logp.numel(), dtype=logp.dtype).view_as(logp)).sum().backward()
    return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype,checkpointing", [(torch.float64, False), (torch.float32, False),
                                                 (torch.float64, True)])
def test_fused_lora_gives_peft_logprobs_and_gradients(dtype, checkpointing):
    """tiny_qwen2's q/v projections carry a bias (frozen), and its adapters start with B non-zero."""
    model = tiny_qwen2(lora=True).to(dtype).train()
    if checkpointing:
        model.activation_checkpointing_enable()
    calls = lora_b_calls(model)
    plain, plain_grads = logprobs_and_lora_grads(model, fused=False)
    assert len(calls) > 0
    calls.clear()
    fused, fused_grads = logprobs_and_lora_grads(model, fused=True)
    assert calls == []  # every adapted layer ran fused
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fused, plain, **tol)
    assert plain_grads.keys() == fused_grads.keys() and len(plain_grads) == 12  # A and B of 3 layers x 2 blocks
    for name, grad in plain_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(fused_grads[name], grad, **tol)
    assert all("forward" not in vars(m) for m in model.modules())  # peft's forward is back


def test_fused_function_gradients_by_finite_differences():
    weight, bias = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    lora_a = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: LoraLinearFunction.apply(x, weight, bias, a, b, 1.5),
                                    (x, lora_a, lora_b))


def test_peft_runs_where_fusing_does_not_apply():
    """Adapters switched off (the KL reference) give the base model; under autocast peft's own path runs."""
    model = tiny_qwen2(lora=True).eval()
    ids = torch.randint(3, 97, (2, 6))
    calls = lora_b_calls(model)
    with torch.no_grad():
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        adapted = model(input_ids=ids).logits
        calls.clear()
        with fused_lora(model):
            with model.disable_adapter():
                fused_base = model(input_ids=ids).logits
            fused_adapted = model(input_ids=ids).logits
            assert calls == []
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(input_ids=ids)
            assert len(calls) == 6  # one lora_B forward per adapted layer
    torch.testing.assert_close(fused_base, base)
    torch.testing.assert_close(fused_adapted, adapted, atol=1e-5, rtol=1e-5)
    assert (adapted - base).abs().max() > 0.1
