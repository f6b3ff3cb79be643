"""Log-probabilities of target tokens straight from hidden states and the LM head, never holding the [rows, vocab]
logits of the whole batch: the head runs over `chunk_rows` rows at a time, in the forward and again in the backward.

Why: a GRPO update needs log p(token) for B·T completion tokens. The plain path makes logits [B, T, V] (for 128
completions of 256 tokens and Qwen's 151,936-token vocabulary: 5·10⁹ values, 20 GB in float32) and keeps them for
the backward. Here the forward keeps only the hidden states, the targets and one logsumexp per row; the backward
recomputes each chunk's logits. Same numbers, O(chunk · V) memory.
"""

from __future__ import annotations

import torch
from torch import nn


class _HeadTokenLogprobs(torch.autograd.Function):
    """logp[n] = (h_n · W[target_n] + b[target_n]) − logsumexp_v(h_n · W_v + b_v), chunked over rows n."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows, compute_dtype, with_entropy):
        n, acc = hidden.shape[0], _accumulation_dtype(compute_dtype)
        logp = hidden.new_empty(n, dtype=acc)
        lse = hidden.new_empty(n, dtype=acc)
        entropy = hidden.new_empty(n if with_entropy else 0, dtype=acc)
        for start in range(0, n, chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = _chunk_logits(hidden[rows], weight, bias, compute_dtype)
            lse[rows] = torch.logsumexp(logits, dim=-1)
            logp[rows] = logits.gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1) - lse[rows]
            if with_entropy:
                probs = torch.exp(logits - lse[rows].unsqueeze(-1))
                entropy[rows] = lse[rows] - (probs * logits).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_rows, ctx.compute_dtype = chunk_rows, compute_dtype
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        dtype, acc = ctx.compute_dtype, _accumulation_dtype(ctx.compute_dtype)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.chunk_rows):
                rows = slice(start, start + ctx.chunk_rows)
                logits = _chunk_logits(hidden[rows], weight, bias, dtype)
                g = grad_logp[rows].to(acc).unsqueeze(-1)
                # d logp / d logits = onehot(target) − softmax(logits)
                grad_logits = -torch.exp(logits - lse[rows].unsqueeze(-1)) * g
                grad_logits.scatter_add_(-1, targets[rows].unsqueeze(-1), g)
                if need_hidden:
                    grad_hidden[rows] = (grad_logits.to(dtype) @ weight.to(dtype)).to(hidden.dtype)
                if need_weight:
                    grad_weight += (grad_logits.to(dtype).T @ hidden[rows].to(dtype)).to(acc)
                if need_bias:
                    grad_bias += grad_logits.sum(0)
        return (grad_hidden,
                None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype),
                None, None, None, None)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  dtype: torch.dtype) -> torch.Tensor:
    """Logits of a few rows in float32 (float64 for float64 inputs), the matmul in `dtype` (the autocast dtype under
    autocast, as the model's own head would run)."""
    with torch.autocast(hidden.device.type, enabled=False):
        logits = hidden.to(dtype) @ weight.to(dtype).T
        if bias is not None:
            logits = logits + bias.to(dtype)
    return logits.to(_accumulation_dtype(dtype))


def head_token_logprobs(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, *, with_entropy: bool = False,
                        chunk_rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(targets) ([...]) from hidden states ([..., H]) and the LM head, plus the entropy of each position's
    distribution (no gradient) if asked. Gradients reach `hidden` and, if they require it, the head's weights."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    shape = targets.shape
    logp, entropy = _HeadTokenLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias,
                                             targets.reshape(-1), chunk_rows, dtype, with_entropy)
    return logp.view(shape), (entropy.view(shape) if with_entropy else None)


def split_lm_head(model) -> tuple[nn.Module, nn.Linear] | None:
    """(body, head) of a causal LM whose logits are exactly `head(body(...).last_hidden_state)`, or None when that
    is not known to hold (custom models, a LoRA-wrapped head, scaled or soft-capped logits): callers fall back to
    the model's own forward."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    prefix = getattr(base, "base_model_prefix", "")
    body = getattr(base, prefix, None) if prefix else None
    if type(head) is not nn.Linear or not isinstance(body, nn.Module) or body is base:
        return None
    config = getattr(base, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(text_config, key, None) not in (None, 1, 1.0):
            return None
    return body, head
