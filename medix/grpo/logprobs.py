"""Scoring tokens under a policy: the log-probability (and entropy) of each completion token, given its prompt."""

from __future__ import annotations

import torch

from medix.grpo.lm_head import head_token_logprobs, split_lm_head
from medix.models.base import can_share_prompt, left_padded_positions
from medix.models.prefix import SharedPrefix, after_prefix

# The chunked head (lm_head.py) is used once the [rows, completion tokens, vocab] logits would hold more values than
# this (1 GiB in float32): below it, keeping the logits for the backward is cheaper than recomputing them there (on
# the CPU preset of experiments/perf, 16 x 32 tokens x 49,152: the recompute cost ~1.7 s of a 21 s step).
CHUNKED_HEAD_MIN_VALUES = 1 << 28


def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
                        extra_inputs: dict | None = None, with_entropy: bool = False, share_prompt: bool = True,
                        prefix: SharedPrefix | None = None):
    """Log-probability of each completion token under `model` ([B, T]); with_entropy also gives the entropy of each
    position's distribution ([B, T], without gradient: it is a metric).

    Only completion positions are scored. When the model splits into a body and a plain LM head (`split_lm_head`)
    and the logits would be large (CHUNKED_HEAD_MIN_VALUES), the body gives hidden states and `head_token_logprobs`
    scores them in row chunks, so the [B, T, vocab] logits never exist; otherwise the model's own logits are used
    (gather minus logsumexp, in row chunks). share_prompt:
    rows that repeat the previous row's prompt (a GRPO group) reuse its prompt forward: the prompt runs once per
    distinct prompt (with gradient) and its KV cache is copied to the rows. prefix: the KV cache of the first
    `prefix.length` prompt tokens of every row (`shared_prefix`), so only the rest of each prompt runs here."""
    completion_length = input_ids.shape[1] - prompt_length
    targets = input_ids[:, prompt_length:]
    split = split_lm_head(model)
    if split is not None and input_ids.shape[0] * completion_length * split[1].out_features < CHUNKED_HEAD_MIN_VALUES:
        split = None
    forward, output = (split[0], "last_hidden_state") if split else (model, "logits")
    head_kwargs = {} if split else {"logits_to_keep": 1}
    if prefix is not None:  # the prompts after the prefix, each left-padded to the longest: [prefix | pads, rest]
        if extra_inputs:
            raise ValueError(f"completion_logprobs: a shared prefix with model inputs beside the ids "
                             f"({sorted(extra_inputs)}): images are not cached")
        input_ids, attention_mask, prompt_length = after_prefix(input_ids, attention_mask, prompt_length,
                                                                prefix.length)
    position_ids = left_padded_positions(attention_mask)
    # M-RoPE models (Qwen-VL: image grids) compute their 3-D positions from the mask and mm_token_type_ids.
    model_position_ids = None if extra_inputs and "image_grid_thw" in extra_inputs else position_ids
    owners = prompt_owners(input_ids[:, :prompt_length]) if share_prompt and prompt_length > 0 else None
    if prefix is not None or (owners is not None and int(owners.max()) + 1 < input_ids.shape[0] and not extra_inputs
                              and can_share_prompt(model)):
        if owners is None:
            owners = torch.arange(input_ids.shape[0], device=input_ids.device)
        first = torch.cat([owners.new_ones(1, dtype=torch.bool), owners[1:] != owners[:-1]])
        done, cache = (0, None) if prefix is None else (prefix.length, prefix.cache(model, int(first.sum())))
        prompt_out = forward(input_ids=input_ids[first, done:prompt_length],
                             attention_mask=attention_mask[first, :prompt_length],
                             position_ids=position_ids[first, done:prompt_length], past_key_values=cache,
                             use_cache=True, **head_kwargs)
        cache = prompt_out.past_key_values
        cache.reorder_cache(owners)  # index_select: gradients from every row flow back to the shared prompt
        rest = forward(input_ids=targets, attention_mask=attention_mask, position_ids=position_ids[:, prompt_length:],
                       past_key_values=cache, use_cache=True)
        last_prompt = getattr(prompt_out, output)[:, -1:]
        scores = torch.cat([last_prompt[owners], getattr(rest, output)[:, :-1]], dim=1)  # position t predicts t+1
    elif split:
        outputs = forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=model_position_ids,
                          use_cache=False, **(extra_inputs or {}))
        scores = outputs.last_hidden_state[:, prompt_length - 1:-1]
    else:
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=model_position_ids,
                        logits_to_keep=completion_length + 1, use_cache=False, **(extra_inputs or {}))
        scores = outputs.logits[:, :-1, :]  # position t predicts token t+1
    if split:
        return head_token_logprobs(scores, split[1], targets, with_entropy=with_entropy)
    return token_logprobs(scores, targets, with_entropy=with_entropy)


def prompt_owners(prompt_ids: torch.Tensor) -> torch.Tensor:
    """For each row, the index of the run of consecutive identical prompts it belongs to ([B] long)."""
    new_run = torch.ones(prompt_ids.shape[0], dtype=torch.long, device=prompt_ids.device)
    new_run[1:] = (prompt_ids[1:] != prompt_ids[:-1]).any(dim=1).long()
    return new_run.cumsum(0) - 1


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, with_entropy: bool = False,
                   chunk_rows: int = 4) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) = logit[target] - logsumexp(logits), in float32, `chunk_rows` rows at a time (so a float32
    copy of half-precision logits never exists for the whole batch); entropy (no gradient) if asked."""
    logps, entropies = [], []
    for rows, row_targets in zip(logits.split(chunk_rows), targets.split(chunk_rows)):
        rows = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
        lse = torch.logsumexp(rows, dim=-1)
        logps.append(rows.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1) - lse)
        if with_entropy:
            with torch.no_grad():
                probs = torch.softmax(rows, dim=-1)
                entropies.append(lse - (probs * rows).sum(-1))
    return torch.cat(logps), (torch.cat(entropies) if with_entropy else None)
