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
                         cache_implementation: str | None = None, min_new_tokens: int = 0) -> Rollout:
    """Sample `group_size` completions for each prompt, in one batched `generate` call, in eval mode."""
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
                        extra_inputs: dict | None = None, with_entropy: bool = False):
    """Log-probability of each completion token under `model` ([B, T]); logits are kept for completion positions only."""
    completion_length = input_ids.shape[1] - prompt_length
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding: positions start at the first real token
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    logits_to_keep=completion_length + 1, use_cache=False, **(extra_inputs or {}))
    logits = outputs.logits[:, :-1, :].float()  # position t predicts token t+1
    targets = input_ids[:, prompt_length:]
    log_probs = F.log_softmax(logits, dim=-1)
    token_logp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return token_logp, None
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return token_logp, entropy


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
