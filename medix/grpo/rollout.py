"""Rollout: sample G completions per prompt, and score tokens under a policy (log-probabilities, entropy)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medix.grpo.lm_head import head_token_logprobs, split_lm_head


@dataclass
class Rollout:
    input_ids: torch.Tensor  # [B*G, P+T] prompt (left-padded) + completion
    attention_mask: torch.Tensor  # [B*G, P+T]
    completion_mask: torch.Tensor  # [B*G, T] 1 up to and including the first EOS
    prompt_length: int  # P
    texts: list[str]  # decoded completions, B*G
    truncated: torch.Tensor  # [B*G] bool: no EOS within max_new_tokens
    extra_inputs: dict  # processor outputs the forward pass needs again (pixel values, image grids)
    image_counts: list[int] | None = None  # images of each row (VLM rollouts); None: no images / text-only

    def __post_init__(self):
        if self.image_counts is not None and len(self.image_counts) != self.input_ids.shape[0]:
            raise ValueError(f"image_counts has {len(self.image_counts)} entries for {self.input_ids.shape[0]} rows")

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
    batch = {k: v.repeat_interleave(group_size, dim=0) if k in ("input_ids", "attention_mask", *SEQUENCE_KEYS) else v
             for k, v in enc.items()}
    counts = image_counts_of(images, len(prompts)) if "pixel_values" in enc else None
    if "pixel_values" in batch and "image_grid_thw" not in batch:
        batch["pixel_values"] = batch["pixel_values"].repeat_interleave(group_size, dim=0)
    elif "image_grid_thw" in batch:  # Qwen-VL style: patches flattened; repeat each prompt's patches
        batch = repeat_qwen_vl_images(batch, enc, group_size, counts)
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
    for key in SEQUENCE_KEYS:  # per-token inputs cover the completion too (completion tokens are text: 0)
        if key in extra:
            extra[key] = F.pad(extra[key], (0, completion_ids.shape[1]))
    row_counts = None if counts is None else [c for c in counts for _ in range(group_size)]
    return Rollout(input_ids, attention_mask, completion_mask, prompt_length, texts, truncated, extra, row_counts)


# Processor outputs aligned with input_ids ([rows, sequence]): Qwen-VL's mm_token_type_ids (M-RoPE needs them).
SEQUENCE_KEYS = ("mm_token_type_ids", "token_type_ids")


def image_counts_of(images, n_prompts: int) -> list[int]:
    """Images of each prompt from a processor's `images` argument (one image or a list of images per prompt)."""
    if not images:
        return [0] * n_prompts
    counts = [len(row) if isinstance(row, (list, tuple)) else 1 for row in images]
    if len(counts) != n_prompts:
        raise ValueError(f"{len(counts)} image lists for {n_prompts} prompts; need one (possibly empty) per prompt")
    return counts


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


def repeat_qwen_vl_images(batch: dict, enc: dict, group_size: int, counts: list[int] | None = None) -> dict:
    """Repeat each prompt's flattened image patches group_size times (Qwen2/3-VL layout); `counts` are the images of
    each prompt (None: the same number for every prompt)."""
    n_prompts = enc["input_ids"].shape[0]
    counts = counts if counts is not None else even_counts(len(enc["image_grid_thw"]), n_prompts)
    pixels, grids = split_qwen_vl_images(enc["pixel_values"], enc["image_grid_thw"], counts)
    batch = dict(batch)
    batch["pixel_values"] = torch.cat([p for p in pixels for _ in range(group_size)])
    batch["image_grid_thw"] = torch.cat([g for g in grids for _ in range(group_size)])
    return batch


def even_counts(n_images: int, n_rows: int) -> list[int]:
    """Images per row when a rollout does not say: the same number for every row, or an error."""
    if n_rows == 0 or n_images % n_rows:
        raise ValueError(f"{n_images} images over {n_rows} rows: the images of each row are unknown; "
                         "build rollouts with generate_completions (it records image_counts)")
    return [n_images // n_rows] * n_rows


def split_qwen_vl_images(pixel_values: torch.Tensor, grid: torch.Tensor, counts: list[int]):
    """Flattened patches + one grid row per image -> (patches of each row, grid rows of each row), `counts` images
    per row, in order."""
    if sum(counts) != grid.shape[0]:
        raise ValueError(f"image_counts {counts} add up to {sum(counts)} but image_grid_thw holds {grid.shape[0]} images")
    patches = grid.prod(dim=1)
    image_end = torch.tensor(counts, device=grid.device).cumsum(0).tolist()
    image_start = [end - count for end, count in zip(image_end, counts)]
    patch_end = [0] + patches.cumsum(0).tolist()
    if patch_end[-1] != pixel_values.shape[0]:
        raise ValueError(f"image_grid_thw describes {patch_end[-1]} patches but pixel_values holds {pixel_values.shape[0]}")
    pixels = [pixel_values[patch_end[a]:patch_end[b]] for a, b in zip(image_start, image_end)]
    grids = [grid[a:b] for a, b in zip(image_start, image_end)]
    return pixels, grids


def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
                        extra_inputs: dict | None = None, with_entropy: bool = False, share_prompt: bool = True):
    """Log-probability of each completion token under `model` ([B, T]); with_entropy also gives the entropy of each
    position's distribution ([B, T], without gradient: it is a metric).

    Only completion positions are scored. When the model splits into a body and a plain LM head (`split_lm_head`),
    the body gives hidden states and `head_token_logprobs` scores them in row chunks, so the [B, T, vocab] logits
    never exist; otherwise the model's own logits are used (gather minus logsumexp, in row chunks). share_prompt:
    rows that repeat the previous row's prompt (a GRPO group) reuse its prompt forward: the prompt runs once per
    distinct prompt (with gradient) and its KV cache is copied to the rows."""
    completion_length = input_ids.shape[1] - prompt_length
    position_ids = left_padded_positions(attention_mask)
    # M-RoPE models (Qwen-VL: image grids) compute their 3-D positions from the mask and mm_token_type_ids.
    model_position_ids = None if extra_inputs and "image_grid_thw" in extra_inputs else position_ids
    targets = input_ids[:, prompt_length:]
    split = split_lm_head(model)
    forward, output = (split[0], "last_hidden_state") if split else (model, "logits")
    head_kwargs = {} if split else {"logits_to_keep": 1}
    owners = prompt_owners(input_ids[:, :prompt_length]) if share_prompt and prompt_length > 0 else None
    if (owners is not None and int(owners.max()) + 1 < input_ids.shape[0] and not extra_inputs
            and can_share_prompt(model)):
        first = torch.cat([owners.new_ones(1, dtype=torch.bool), owners[1:] != owners[:-1]])
        prompt_out = forward(input_ids=input_ids[first, :prompt_length],
                             attention_mask=attention_mask[first, :prompt_length],
                             position_ids=position_ids[first, :prompt_length], use_cache=True, **head_kwargs)
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
        extra_inputs=select_extra(rollout.extra_inputs, rows, rollout.input_ids.shape[0], rollout.image_counts),
        image_counts=None if rollout.image_counts is None else [rollout.image_counts[i] for i in rows],
    )


def select_extra(extra: dict, rows: list[int], n_rows: int, image_counts: list[int] | None = None) -> dict:
    """The extra model inputs of the given rows. Qwen-VL's flattened patches are sliced per row by `image_counts`
    (rows may hold different numbers of images); [rows, ...] tensors (tiny_vlm's [rows, images, 3, S, S] pixels,
    mm_token_type_ids) are indexed. Rows without any image get no pixel inputs at all (the model sees text only)."""
    if not extra:
        return {}
    out = dict(extra)
    flattened = "image_grid_thw" in extra
    if flattened:  # flattened patches: slice each row's patch range
        image_counts = image_counts if image_counts is not None else even_counts(len(extra["image_grid_thw"]), n_rows)
        pixels, grids = split_qwen_vl_images(extra["pixel_values"], extra["image_grid_thw"], image_counts)
        out["pixel_values"] = torch.cat([pixels[r] for r in rows])
        out["image_grid_thw"] = torch.cat([grids[r] for r in rows])
    index = torch.tensor(rows, dtype=torch.long)
    for key, value in extra.items():
        if flattened and key in ("pixel_values", "image_grid_thw"):
            continue
        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == n_rows:
            out[key] = value[index.to(value.device)]
    if image_counts is not None and not any(image_counts[r] for r in rows):
        out.pop("pixel_values", None)
        out.pop("image_grid_thw", None)
    return out


def concat_rollouts(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
    """Join rollouts of different prompt/completion lengths: prompts left-padded, completions right-padded.

    VLM inputs follow their rows whatever each rollout holds: tiny_vlm pixels [rows, images, 3, S, S] are zero-padded
    to the most images of any row, Qwen-VL flattened patches and grids are joined, a rollout without images (text-only
    prompts) contributes none, and per-token inputs (mm_token_type_ids) are padded like the ids."""
    if len(rollouts) == 1:
        return rollouts[0]
    P = max(r.prompt_length for r in rollouts)
    T = max(r.completion_mask.shape[1] for r in rollouts)
    ids, attn, cmask = [], [], []
    for r in rollouts:
        left, right = P - r.prompt_length, T - r.completion_mask.shape[1]
        ids.append(pad_sequence(r.input_ids, r.prompt_length, left, right, pad_token_id))
        attn.append(pad_sequence(r.attention_mask, r.prompt_length, left, right, 0))
        cmask.append(F.pad(r.completion_mask, (0, right)))
    return Rollout(torch.cat(ids), torch.cat(attn), torch.cat(cmask), P, [t for r in rollouts for t in r.texts],
                   torch.cat([r.truncated for r in rollouts]), concat_extra(rollouts, P, T), concat_counts(rollouts))


def pad_sequence(values: torch.Tensor, prompt_length: int, left: int, right: int, value: int) -> torch.Tensor:
    """[rows, P + T] -> [rows, left + P + T + right]: prompt part padded on the left, completion part on the right."""
    return torch.cat([F.pad(values[:, :prompt_length], (left, 0), value=value),
                      F.pad(values[:, prompt_length:], (0, right), value=value)], 1)


def concat_counts(rollouts: list[Rollout]) -> list[int] | None:
    """The joined rollouts' images per row; None when some rollout with images does not say (tiny_vlm does not need
    them: its model reads each row's images off the image tokens)."""
    if all(r.image_counts is None for r in rollouts):
        return None
    counts = []
    for r in rollouts:
        n_rows = r.input_ids.shape[0]
        if r.image_counts is not None:
            counts += r.image_counts
        elif "image_grid_thw" in r.extra_inputs:
            counts += even_counts(len(r.extra_inputs["image_grid_thw"]), n_rows)
        elif "pixel_values" not in r.extra_inputs:
            counts += [0] * n_rows
        else:
            return None
    return counts


def concat_extra(rollouts: list[Rollout], P: int, T: int) -> dict:
    keys = [k for r in rollouts for k in r.extra_inputs]
    keys = list(dict.fromkeys(keys))  # first-seen order
    if not keys:
        return {}
    flattened = "image_grid_thw" in keys
    extra = {}
    for key in keys:
        present = [r.extra_inputs[key] for r in rollouts if key in r.extra_inputs]
        if key in SEQUENCE_KEYS:
            extra[key] = torch.cat([
                pad_sequence(r.extra_inputs[key], r.prompt_length, P - r.prompt_length,
                             T - r.completion_mask.shape[1], 0) if key in r.extra_inputs
                else present[0].new_zeros(r.input_ids.shape[0], P + T) for r in rollouts])
        elif flattened and key in ("pixel_values", "image_grid_thw"):
            extra[key] = torch.cat(present)  # one entry per image/patch: rollouts without images add none
        elif key == "pixel_values":  # tiny_vlm: [rows, images, 3, S, S], zero slots beyond each row's images
            most = max(v.shape[1] for v in present)
            template = present[0]
            parts = []
            for r in rollouts:
                v = r.extra_inputs.get(key)
                if v is None:
                    v = template.new_zeros(r.input_ids.shape[0], most, *template.shape[2:])
                elif v.shape[1] < most:
                    v = torch.cat([v, v.new_zeros(v.shape[0], most - v.shape[1], *v.shape[2:])], 1)
                parts.append(v)
            extra[key] = torch.cat(parts)
        elif len(present) == len(rollouts) and all(torch.is_tensor(v) for v in present):
            extra[key] = torch.cat(present)
        else:
            raise ValueError(f"cannot join rollouts: extra input {key!r} is present in {len(present)} of "
                             f"{len(rollouts)} rollouts")
    return extra
