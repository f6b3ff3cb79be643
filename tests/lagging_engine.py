"""A rollout engine in the test process that behaves as a vLLM server does for asynchronous rollouts, without one: it
samples from its own copy of the policy (the weights of the last sync, as a server holds them), with the seed it is
given, after a settable delay; it counts policy versions, holds a lock over each request and each sync, and reports
its sampling log-probs. `rollout=hf rollout._target_=lagging_engine.LaggingEngine` puts it into `medix.run`."""

from __future__ import annotations

import copy
import threading
import time

import torch

from medix.models.base import left_padded_positions
from medix.rollout.base import Rollout, Sampling, completion_mask_from_ids


class LaggingEngine:
    """`delay_s`: seconds each `generate` takes on top of its sampling (the engine slower than the trainer).
    `calls`: (policy version, seed, first prompt) of every request, in order."""

    def __init__(self, delay_s: float = 0.0, max_staleness: int = 1, **unused_hf_settings):
        self.delay_s = delay_s
        self.max_staleness = max_staleness
        self.version = 0
        self.lock = threading.RLock()
        self.model = None
        self.calls: list[tuple[int, int | None, str]] = []
        self.sync_threads: set[str] = set()
        self.generate_threads: set[str] = set()

    def start(self, policy) -> None:
        with self.lock:
            if self.model is None:
                self.model = copy.deepcopy(policy.model).eval().requires_grad_(False)

    @torch.no_grad()
    def generate(self, policy, prompts: list[str], images=None, *, group_size: int, sampling: Sampling,
                 seed: int | None = None) -> Rollout:
        self.start(policy)
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)))
        with self.lock:
            self.generate_threads.add(threading.current_thread().name)
            version = self.version
            self.calls.append((version, seed, prompts[0]))
            time.sleep(self.delay_s)
            rollout = sample(self.model, policy, prompts, group_size, sampling, seed)
        rollout.policy_version = version
        return rollout

    def sync(self, policy) -> dict[str, float]:
        started = time.perf_counter()
        with self.lock:
            waited = time.perf_counter() - started
            self.sync_threads.add(threading.current_thread().name)
            self.version += 1
            if self.model is not None:
                self.model.load_state_dict(policy.model.state_dict())
        return {"rollout/sync_s": time.perf_counter() - started, "rollout/sync_wait_s": waited,
                "rollout/policy_version": float(self.version)}

    def close(self) -> None:
        pass


def sample(model, policy, prompts: list[str], group_size: int, sampling: Sampling, seed: int) -> Rollout:
    """`group_size` completions per prompt from `model` at `sampling.temperature` (full distribution), drawn with a
    generator seeded by `seed`; with the log-probs they were sampled with."""
    generator = torch.Generator().manual_seed(seed)
    tokenizer = policy.tokenizer
    enc = policy.encode(prompts, None)
    ids = enc.input_ids.repeat_interleave(group_size, dim=0)
    mask = enc.attention_mask.repeat_interleave(group_size, dim=0)
    eos = torch.tensor(policy.eos_token_ids)
    out = model(input_ids=ids, attention_mask=mask, position_ids=left_padded_positions(mask), use_cache=True)
    tokens, logps = [], []
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    full_mask = mask
    for _ in range(sampling.max_new_tokens):
        logits = out.logits[:, -1].float() / sampling.temperature
        logp = torch.log_softmax(logits, dim=-1)
        token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
        token = torch.where(done, torch.full_like(token, tokenizer.pad_token_id), token)
        tokens.append(token)
        logps.append(logp.gather(1, token[:, None]).squeeze(1))
        done = done | torch.isin(token, eos)
        if bool(done.all()):
            break
        full_mask = torch.cat([full_mask, torch.ones_like(token)[:, None]], dim=1)
        position = left_padded_positions(full_mask)[:, -1:]
        out = model(input_ids=token[:, None], attention_mask=full_mask, position_ids=position,
                    past_key_values=out.past_key_values, use_cache=True)
    completion = torch.stack(tokens, 1)
    completion_mask, truncated = completion_mask_from_ids(completion, policy.eos_token_ids)
    completion = completion.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
    return Rollout(
        input_ids=torch.cat([ids, completion], 1), attention_mask=torch.cat([mask, completion_mask], 1),
        completion_mask=completion_mask, prompt_length=ids.shape[1],
        texts=tokenizer.batch_decode(completion, skip_special_tokens=True), truncated=truncated,
        engine_logprobs=torch.stack(logps, 1) * completion_mask)
