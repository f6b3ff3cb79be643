"""The start that every prompt of a batch shares (the system prompt and the instruction template: 224 of the
260-289 tokens of medix_mini's prompts on SmolLM2), run through the model once: its KV cache is what each prompt's
own tokens then attend to. Used by the GRPO update (once per optimizer step, with gradient) and by the HF engine's
prefill."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SharedPrefix:
    """The KV cache of the first `length` tokens that every prompt starts with, computed once (`shared_prefix`;
    in the GRPO update, once per optimizer step with gradient). Forwards read detached copies (`leaves`): each
    micro-batch's backward adds its gradients there, and `backward()` then sends their sum through the prefix's
    forward, once."""

    length: int
    states: list[torch.Tensor]  # per layer, keys then values ([1, kv heads, length, head dim]), with their graph
    leaves: list[torch.Tensor]

    def cache(self, model, rows: int):
        """A cache of `rows` rows that each hold the prefix (gradients flow back to `leaves`)."""
        from transformers import DynamicCache

        rows_of = [t.expand(rows, *t.shape[1:]) for t in self.leaves]
        return DynamicCache(ddp_cache_data=list(zip(rows_of[0::2], rows_of[1::2])), config=model.config)

    def backward(self) -> None:
        grads = [(state, leaf.grad) for state, leaf in zip(self.states, self.leaves) if leaf.grad is not None]
        if grads:
            torch.autograd.backward([s for s, _ in grads], [g for _, g in grads])


def shared_prefix(model, ids: torch.Tensor) -> SharedPrefix:
    """The prefix `ids` ([length]) through the model once (with gradient, when enabled), as a SharedPrefix."""
    ids = ids.unsqueeze(0)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1,
                position_ids=torch.arange(ids.shape[1], device=ids.device).unsqueeze(0))
    states = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
    return SharedPrefix(ids.shape[1], states, [t.detach().requires_grad_(t.requires_grad) for t in states])


def common_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """The leading prompt tokens that all rows share (left-padded prompts; empty if none), leaving each row at least
    its last prompt token."""
    prompts = [ids[mask.bool()] for ids, mask in zip(input_ids[:, :prompt_length], attention_mask[:, :prompt_length])]
    length = min(len(p) for p in prompts) - 1
    for other in prompts[1:]:
        differs = (other[:length] != prompts[0][:length]).nonzero()
        length = int(differs[0]) if len(differs) else length
    return prompts[0][:max(length, 0)]


def after_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int, length: int):
    """Left-padded rows whose prompts all start with the same `length` tokens, laid out as [those tokens | each
    prompt's rest, left-padded | the completion]: the prefix's columns come first in every row. Returns the ids (the
    prefix's columns hold whatever; they are in the cache), the mask and the new prompt length."""
    rest = attention_mask[:, :prompt_length].sum(1) - length  # each row's prompt tokens after the prefix
    width = int(rest.max())
    columns = torch.arange(width, device=input_ids.device)
    rest_mask = (columns >= width - rest.unsqueeze(1)).to(attention_mask.dtype)
    start = prompt_length - width
    ids = torch.cat([input_ids[:, :1].expand(-1, length), input_ids[:, start:]], dim=1)
    mask = torch.cat([attention_mask.new_ones(len(rest), length), rest_mask, attention_mask[:, prompt_length:]], 1)
    return ids, mask, length + width


def left_padded(cache, mask: torch.Tensor, length: int):
    """`cache` ([rows, heads, columns, dim] per layer) of rows laid out as after_prefix lays them ([prefix | pads |
    rest], `mask` over those columns) moved in place to the left-padded layout of the ids they came from ([pads |
    prefix | rest]); what the pad columns hold is never attended to."""
    pads = (mask == 0).sum(1, keepdim=True)
    column = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    index = torch.where(column < pads, column + length, torch.where(column < pads + length, column - pads, column))
    for layer in cache.layers:
        select = index[:, None, :, None].expand_as(layer.keys)
        layer.keys, layer.values = layer.keys.gather(2, select), layer.values.gather(2, select)
    return cache
