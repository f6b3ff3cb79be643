"""Rollout: sample G completions per prompt, and score tokens under a policy (log-probabilities, entropy)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Rollout:
    input_ids: torch.Tensor  # [B*G, P+T] prompt (left-padded) + completion
    attention_mask: torch.Tensor  # [B*G, P+T]
    completion_mask: torch.Tensor  # [B*G, T] 1 up to and including the first EOS
    prompt_length: int  # P
    texts: list[str]  # decoded completions, B*G
    truncated: torch.Tensor  # [B*G] bool: no EOS within max_new_tokens
    extra_inputs: dict  # processor outputs the forward pass needs again (pixel values, image grids)

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_length :]


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask tokens after the first EOS (the EOS itself counts); also say which rows never reached an EOS."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))
    seen_before = is_eos.cumsum(dim=1) - is_eos.long()  # number of EOS strictly before each position
    mask = (seen_before == 0).long()
    truncated = ~is_eos.any(dim=1)
    return mask, truncated


def eos_ids(tokenizer, model) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = ids if ids is not None else tokenizer.eos_token_id
    return list(ids) if isinstance(ids, (list, tuple)) else [ids]


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: list[str], *, group_size: int, max_new_tokens: int,
                         temperature: float, top_p: float, processor=None, images=None,
                         cache_implementation: str | None = None, min_new_tokens: int = 0,
                         share_prompt_cache: bool = True, top_k: int | None = 0) -> Rollout:
    """Sample `group_size` completions for each prompt, in one batched `generate` call, in eval mode.

    share_prompt_cache: run each distinct prompt through the model once and copy its KV cache to the group's rows
    (text-only models with the default dynamic cache), instead of prefilling group_size identical copies.
    top_k: 0 samples from the full distribution (what the policy-gradient log-probs assume), whatever the model's
    generation_config says; None keeps the generation_config's value."""
    was_training = model.training
    model.eval()
    encoder = processor if processor is not None else tokenizer
    kwargs = {"images": images} if images else {}
    enc = encoder(text=prompts, return_tensors="pt", padding=True, **kwargs)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    # Every prompt repeated group_size times in a row, so groups are consecutive.
    batch = {k: v.repeat_interleave(group_size, dim=0) if k in ("input_ids", "attention_mask") else v
             for k, v in enc.items()}
    if "pixel_values" in batch and "image_grid_thw" not in batch:
        batch["pixel_values"] = batch["pixel_values"].repeat_interleave(group_size, dim=0)
    elif "image_grid_thw" in batch:  # Qwen-VL style: patches flattened; repeat each prompt's patches
        batch = repeat_qwen_vl_images(batch, enc, group_size)
    gen_eos = eos_ids(tokenizer, model)
    extra_generate = {} if top_k is None else {"top_k": top_k}
    if (share_prompt_cache and group_size > 1 and cache_implementation is None and set(enc) == {"input_ids", "attention_mask"}
            and can_share_prompt(model) and enc["input_ids"].shape[1] > 1):
        cache = prompt_cache(model, enc["input_ids"][:, :-1], enc["attention_mask"][:, :-1])
        cache.reorder_cache(torch.arange(len(prompts), device=device).repeat_interleave(group_size))
        extra_generate["past_key_values"] = cache  # generate feeds only the last prompt token, then samples
    output = model.generate(
        **batch,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=gen_eos,
        cache_implementation=cache_implementation,
        **extra_generate,
    )
    if was_training:
        model.train()
    prompt_length = batch["input_ids"].shape[1]
    completion_ids = output[:, prompt_length:]
    completion_mask, truncated = completion_mask_from_ids(completion_ids, gen_eos)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
    input_ids = torch.cat([batch["input_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([batch["attention_mask"], completion_mask], dim=1)
    texts = tokenizer.batch_decode(completion_ids * completion_mask + tokenizer.pad_token_id * (1 - completion_mask),
                                   skip_special_tokens=True)
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    return Rollout(input_ids, attention_mask, completion_mask, prompt_length, texts, truncated, extra)


def can_share_prompt(model) -> bool:
    """Prompt KV caches can be computed once and copied: a decoder-only text model, without activation
    checkpointing (which turns the cache off in training)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False) or getattr(config, "vision_config", None):
        return False
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    return not getattr(model, flag, False)


def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for left-padded rows: 0 at each row's first real token."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def prompt_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The KV cache of `input_ids` (one row per distinct prompt); logits only for the last position."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=left_padded_positions(attention_mask),
                use_cache=True, logits_to_keep=1)
    return out.past_key_values


def repeat_qwen_vl_images(batch: dict, enc: dict, group_size: int) -> dict:
    """Repeat each prompt's flattened image patches group_size times (Qwen2/3-VL layout)."""
    grid = enc["image_grid_thw"]
    patches_per_image = grid.prod(dim=1)
    chunks = torch.split(enc["pixel_values"], patches_per_image.tolist())
    # One image per prompt is the common case; several images per prompt keep their order.
    images_per_prompt = len(chunks) // enc["input_ids"].shape[0]
    per_prompt = [torch.cat(chunks[i * images_per_prompt:(i + 1) * images_per_prompt]) for i in range(enc["input_ids"].shape[0])]
    grids = [grid[i * images_per_prompt:(i + 1) * images_per_prompt] for i in range(enc["input_ids"].shape[0])]
    batch = dict(batch)
    batch["pixel_values"] = torch.cat([p for p in per_prompt for _ in range(group_size)])
    batch["image_grid_thw"] = torch.cat([g for g in grids for _ in range(group_size)])
    return batch


def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
                        extra_inputs: dict | None = None, with_entropy: bool = False, share_prompt: bool = True):
    """Log-probability of each completion token under `model` ([B, T]); with_entropy also gives the entropy of each
    position's distribution ([B, T], without gradient: it is a metric).

    Logits exist only for completion positions, and log-softmax is never materialised over the vocabulary (gather
    minus logsumexp, in row chunks). share_prompt: rows that repeat the previous row's prompt (a GRPO group) reuse its
    prompt forward: the prompt runs once per distinct prompt (with gradient) and its KV cache is copied to the rows."""
    completion_length = input_ids.shape[1] - prompt_length
    position_ids = left_padded_positions(attention_mask)
    targets = input_ids[:, prompt_length:]
    owners = prompt_owners(input_ids[:, :prompt_length]) if share_prompt and prompt_length > 0 else None
    if (owners is not None and int(owners.max()) + 1 < input_ids.shape[0] and not extra_inputs
            and can_share_prompt(model)):
        first = torch.cat([owners.new_ones(1, dtype=torch.bool), owners[1:] != owners[:-1]])
        prompt_out = model(input_ids=input_ids[first, :prompt_length], attention_mask=attention_mask[first, :prompt_length],
                           position_ids=position_ids[first, :prompt_length], use_cache=True, logits_to_keep=1)
        cache = prompt_out.past_key_values
        cache.reorder_cache(owners)  # index_select: gradients from every row flow back to the shared prompt
        rest = model(input_ids=targets, attention_mask=attention_mask, position_ids=position_ids[:, prompt_length:],
                     past_key_values=cache, use_cache=True)
        logits = torch.cat([prompt_out.logits[owners], rest.logits[:, :-1]], dim=1)  # position t predicts t+1
    else:
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        logits_to_keep=completion_length + 1, use_cache=False, **(extra_inputs or {}))
        logits = outputs.logits[:, :-1, :]  # position t predicts token t+1
    return token_logprobs(logits, targets, with_entropy=with_entropy)


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


def select_rows(rollout: Rollout, rows: list[int]) -> Rollout:
    """The sub-rollout of the given rows (per-row image tensors follow their rows)."""
    index = torch.tensor(rows, dtype=torch.long, device=rollout.input_ids.device)
    return Rollout(
        input_ids=rollout.input_ids[index],
        attention_mask=rollout.attention_mask[index],
        completion_mask=rollout.completion_mask[index],
        prompt_length=rollout.prompt_length,
        texts=[rollout.texts[i] for i in rows],
        truncated=rollout.truncated[index.cpu()] if rollout.truncated.device.type == "cpu" else rollout.truncated[index],
        extra_inputs=select_extra(rollout.extra_inputs, rows, rollout.input_ids.shape[0]),
    )


def select_extra(extra: dict, rows: list[int], n_rows: int) -> dict:
    if not extra:
        return {}
    if "image_grid_thw" in extra:  # flattened patches: slice each row's patch range
        grid = extra["image_grid_thw"]
        per_row = len(grid) // n_rows
        patches = grid.prod(dim=1).view(n_rows, per_row).sum(1)
        starts = torch.cat([patches.new_zeros(1), patches.cumsum(0)[:-1]])
        pix = torch.cat([extra["pixel_values"][starts[r]:starts[r] + patches[r]] for r in rows])
        grids = torch.cat([grid[r * per_row:(r + 1) * per_row] for r in rows])
        return {**extra, "pixel_values": pix, "image_grid_thw": grids}
    return {k: v[rows] if torch.is_tensor(v) and v.shape[0] == n_rows else v for k, v in extra.items()}


def concat_rollouts(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
    """Join rollouts of different prompt/completion lengths: prompts left-padded, completions right-padded."""
    if len(rollouts) == 1:
        return rollouts[0]
    P = max(r.prompt_length for r in rollouts)
    T = max(r.completion_mask.shape[1] for r in rollouts)
    ids, attn, cmask = [], [], []
    for r in rollouts:
        left, right = P - r.prompt_length, T - r.completion_mask.shape[1]
        prompt_ids, comp_ids = r.input_ids[:, :r.prompt_length], r.input_ids[:, r.prompt_length:]
        prompt_attn, comp_attn = r.attention_mask[:, :r.prompt_length], r.attention_mask[:, r.prompt_length:]
        ids.append(torch.cat([F.pad(prompt_ids, (left, 0), value=pad_token_id),
                              F.pad(comp_ids, (0, right), value=pad_token_id)], 1))
        attn.append(torch.cat([F.pad(prompt_attn, (left, 0)), F.pad(comp_attn, (0, right))], 1))
        cmask.append(F.pad(r.completion_mask, (0, right)))
    extra = {}
    if rollouts[0].extra_inputs:
        extra = {k: torch.cat([r.extra_inputs[k] for r in rollouts]) for k in rollouts[0].extra_inputs}
    return Rollout(torch.cat(ids), torch.cat(attn), torch.cat(cmask), P, [t for r in rollouts for t in r.texts],
                   torch.cat([r.truncated for r in rollouts]), extra)
