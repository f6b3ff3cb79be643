"""What every rollout engine returns: G sampled completions per prompt as padded token rows (`Rollout`), and the
row operations the GRPO step needs (select a subset, join rollouts of different lengths)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Sampling:
    """How completions are sampled (the `algorithm.*` sampling keys)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    min_new_tokens: int = 0


@dataclass
class Rollout:
    """Rows = prompts x G completions, each prompt's G rows consecutive. Prompts are left-padded to P tokens,
    completions right-padded to T tokens."""

    input_ids: torch.Tensor  # [N, P+T] prompt + completion
    attention_mask: torch.Tensor  # [N, P+T]
    completion_mask: torch.Tensor  # [N, T] 1 up to and including the first EOS
    prompt_length: int  # P
    texts: list[str]  # decoded completions, N
    truncated: torch.Tensor  # [N] bool: no EOS within max_new_tokens
    sequence_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # [N, P+T] per-token processor outputs
    row_images: list[Any] | None = None  # each row's images in the backbone's layout (None: no image inputs)
    engine_logprobs: torch.Tensor | None = None  # [N, T] log-probs the engine sampled with (vLLM); None for HF
    policy_version: int = 0  # the engine's policy version when it sampled these rows (syncs since it started)

    def __post_init__(self):
        n = self.input_ids.shape[0]
        sizes = {"texts": len(self.texts), "truncated": self.truncated.shape[0],
                 "row_images": None if self.row_images is None else len(self.row_images),
                 "engine_logprobs": None if self.engine_logprobs is None else self.engine_logprobs.shape[0]}
        for name, size in sizes.items():
            if size is not None and size != n:
                raise ValueError(f"rollout {name} has {size} entries for {n} rows; expected one per row")

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_length:]

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class RolloutEngine(Protocol):
    """Samples completions for the policy; `sync` makes it sample from the policy's current weights (a new
    `version`). `max_staleness` (`rollout.max_staleness`): how many versions older than the trainer's policy a sample
    it trains on may be; 0 = the synchronous step. `seed`: the sampling seed (None: drawn from the torch RNG)."""

    max_staleness: int

    def generate(self, policy, prompts: list[str], images: list[list] | None, *, group_size: int,
                 sampling: Sampling, seed: int | None = None) -> Rollout: ...

    def sync(self, policy) -> dict[str, float]: ...

    def close(self) -> None: ...


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask tokens after the first EOS (the EOS itself counts); also say which rows never reached an EOS."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))
    seen_before = is_eos.cumsum(dim=1) - is_eos.long()  # number of EOS strictly before each position
    mask = (seen_before == 0).long()
    truncated = ~is_eos.any(dim=1)
    return mask, truncated


def select_rows(rollout: Rollout, rows: list[int]) -> Rollout:
    """The sub-rollout of the given rows (their images and engine log-probs follow them)."""
    index = torch.tensor(rows, dtype=torch.long, device=rollout.input_ids.device)

    def pick(t: torch.Tensor | None):
        return None if t is None else t[index.to(t.device)]

    return replace(
        rollout,
        input_ids=pick(rollout.input_ids), attention_mask=pick(rollout.attention_mask),
        completion_mask=pick(rollout.completion_mask), texts=[rollout.texts[i] for i in rows],
        truncated=pick(rollout.truncated), sequence_inputs={k: pick(v) for k, v in rollout.sequence_inputs.items()},
        row_images=None if rollout.row_images is None else [rollout.row_images[i] for i in rows],
        engine_logprobs=pick(rollout.engine_logprobs),
    )


def concat_rollouts(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
    """Join rollouts of different prompt/completion lengths: prompts left-padded, completions right-padded; per-token
    inputs padded like the ids (0), images and engine log-probs follow their rows."""
    if len(rollouts) == 1:
        return rollouts[0]
    P = max(r.prompt_length for r in rollouts)
    T = max(r.completion_mask.shape[1] for r in rollouts)

    def join(values: list[torch.Tensor], value) -> torch.Tensor:
        return torch.cat([pad_sequence(v, r.prompt_length, P - r.prompt_length, T - r.completion_mask.shape[1], value)
                          for v, r in zip(values, rollouts)])

    keys = {k for r in rollouts for k in r.sequence_inputs}
    for key in keys:
        if not all(key in r.sequence_inputs for r in rollouts):
            raise ValueError(f"cannot join rollouts: per-token input {key!r} is missing from some of them")
    has_images = any(r.row_images is not None for r in rollouts)
    has_logprobs = [r.engine_logprobs is not None for r in rollouts]
    if any(has_logprobs) and not all(has_logprobs):
        raise ValueError("cannot join rollouts: only some carry engine log-probs")
    return Rollout(
        input_ids=join([r.input_ids for r in rollouts], pad_token_id),
        attention_mask=join([r.attention_mask for r in rollouts], 0),
        completion_mask=torch.cat([F.pad(r.completion_mask, (0, T - r.completion_mask.shape[1])) for r in rollouts]),
        prompt_length=P,
        texts=[t for r in rollouts for t in r.texts],
        truncated=torch.cat([r.truncated for r in rollouts]),
        sequence_inputs={k: join([r.sequence_inputs[k] for r in rollouts], 0) for k in sorted(keys)},
        row_images=[img for r in rollouts for img in (r.row_images or [None] * len(r))] if has_images else None,
        engine_logprobs=torch.cat([F.pad(r.engine_logprobs, (0, T - r.engine_logprobs.shape[1])) for r in rollouts])
        if all(has_logprobs) else None,
        policy_version=min(r.policy_version for r in rollouts),  # the oldest part's
    )


def pad_sequence(values: torch.Tensor, prompt_length: int, left: int, right: int, value) -> torch.Tensor:
    """[rows, P + T] -> [rows, left + P + T + right]: prompt part padded on the left, completion part on the right."""
    return torch.cat([F.pad(values[:, :prompt_length], (left, 0), value=value),
                      F.pad(values[:, prompt_length:], (0, right), value=value)], 1)
