"""Rollouts from a vLLM server (`rollout=vllm`): one medix starts from `.venv-vllm/` for the policy's base weights,
or one you run yourself (`rollout.base_url`, like `trl vllm-serve`). After every GRPO step `sync` puts the current
policy into it: the LoRA adapter (not a merged model) under one name, in place, or the full weights reloaded from a
saved folder. Every rollout carries the server's sampling log-probs, so the trainer can measure (and correct) how far
they are from its own."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from medix.errors import ConfigError
from medix.rollout.base import Rollout, Sampling, completion_mask_from_ids
from medix.rollout.vllm_server import VLLMClient, VLLMError, VLLMServer, save_for_reload

log = logging.getLogger(__name__)


class VLLMEngine:
    """Samples G completions per prompt in one request (`n=G`) each, with their token ids and log-probs. Under DDP
    rank 0 starts and syncs the one server of the node; every rank samples from it."""

    def __init__(self, *, base_url: str | None = None, model_name: str = "policy", adapter_name: str = "medix-policy",
                 sync_dir: str, server: dict | None = None, client: dict | None = None, max_restarts: int = 2):
        self.base_url = base_url
        self.model_name = model_name
        self.adapter_name = adapter_name
        self.sync_dir = Path(sync_dir)
        self.server_options = dict(server or {})
        self.client_options = dict(client or {})
        self.max_restarts = max_restarts
        self.server: VLLMServer | None = None
        self.client: VLLMClient | None = None
        self.lora = False
        self.version = 0  # the policy version the server holds: 0 = the weights training starts from
        self.restarts = 0

    # ---- the server ----------------------------------------------------------------------------------------------
    def start(self, policy) -> None:
        """Connect (rank 0 first starts a server for the policy) and give it the policy's current weights."""
        if self.client is not None:
            return
        if is_distributed() and torch.distributed.get_world_size() > 1 and _is_sharded(policy.model):
            raise ConfigError("rollout=vllm with trainer=fsdp is not supported yet (the weights to sync are sharded); "
                              "use rollout=hf or trainer=ddp")
        self.lora = policy.uses_lora
        url = self.base_url
        if url is None and rank() == 0:
            url = self.launch(policy).base_url
        url = broadcast(url)
        self.client = VLLMClient(url, self.model_name, **self.client_options)
        if rank() == 0:
            mode = self.client.logprobs_mode()
            if mode != "processed_logprobs":
                raise ConfigError(f"the vLLM server at {url} reports logprobs mode {mode!r}; start it with "
                                  "--logprobs-mode processed_logprobs (the log-probs the completions were sampled with)")
        self.sync(policy, step=self.version)

    def launch(self, policy) -> VLLMServer:
        path = getattr(policy, "path", None)
        if path is None:
            raise ConfigError(f"rollout=vllm needs the backbone's model folder; backbone {policy.name} has none")
        options = dict(self.server_options)
        if self.lora:
            options["max_lora_rank"] = max(options.get("max_lora_rank") or 0, policy.model.peft_config["default"].r)
        else:  # vLLM must serve an untied copy, or a full reload leaves its LM head stale
            options["max_lora_rank"] = None
            options["tokenizer"] = str(path)
            path = save_for_reload(policy.model, self.sync_dir / "weights")
        self.server = VLLMServer(str(path), served_model_name=self.model_name, **options).start()
        log.info("vLLM rollout server for %s at %s (started in %.0f s)", policy.name, self.server.base_url,
                 self.server.startup_s or 0.0)
        return self.server

    def restart(self, policy, error: Exception) -> None:
        """The server this engine started died: start it again and give it the current policy."""
        if self.server is None or self.restarts >= self.max_restarts:
            raise error
        self.restarts += 1
        log.warning("vLLM rollout server failed (%s); restarting it (%d of at most %d)", error, self.restarts,
                    self.max_restarts)
        self.server.stop()
        self.client.close()
        self.client = None
        self.server = None
        self.start(policy)

    # ---- rollouts ----------------------------------------------------------------------------------------------
    def generate(self, policy, prompts: list[str], images: list[list] | None = None, *, group_size: int,
                 sampling: Sampling) -> Rollout:
        if images is not None and any(images):
            raise ConfigError("rollout=vllm does not send images yet; use rollout=hf for image prompts")
        self.start(policy)
        enc = policy.encode(prompts)
        token_lists = [ids[mask.bool()].tolist() for ids, mask in zip(enc.input_ids, enc.attention_mask)]
        seed = int(torch.randint(0, 2**31 - 1, (1,)))  # from the torch RNG, so a resumed run samples the same
        try:
            completions = self.sample(policy, token_lists, group_size, sampling, seed)
        except VLLMError as error:
            self.restart(policy, error)
            completions = self.sample(policy, token_lists, group_size, sampling, seed)
        rows = [c for per_prompt in completions for c in per_prompt]
        pad = policy.tokenizer.pad_token_id
        T = max(1, max(len(c.token_ids) for c in rows))
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        logprobs = torch.zeros(len(rows), T)
        for i, c in enumerate(rows):
            ids[i, :len(c.token_ids)] = torch.tensor(c.token_ids, dtype=torch.long)
            logprobs[i, :len(c.logprobs)] = torch.tensor(c.logprobs)
        completion_mask, _ = completion_mask_from_ids(ids, policy.eos_token_ids)
        lengths = torch.tensor([len(c.token_ids) for c in rows])
        completion_mask = completion_mask * (torch.arange(T)[None, :] < lengths[:, None]).long()
        ids = ids.masked_fill(completion_mask == 0, pad)
        prompt_ids = enc.input_ids.repeat_interleave(group_size, dim=0)
        prompt_mask = enc.attention_mask.repeat_interleave(group_size, dim=0)
        device = next(policy.model.parameters()).device
        return Rollout(
            input_ids=torch.cat([prompt_ids, ids], dim=1).to(device),
            attention_mask=torch.cat([prompt_mask, completion_mask], dim=1).to(device),
            completion_mask=completion_mask.to(device), prompt_length=prompt_ids.shape[1],
            texts=policy.tokenizer.batch_decode(ids, skip_special_tokens=True),
            truncated=torch.tensor([c.finish_reason == "length" for c in rows], device=device),
            sequence_inputs={k: F.pad(v.repeat_interleave(group_size, dim=0), (0, T)).to(device)
                             for k, v in enc.sequence_inputs.items()},
            engine_logprobs=(logprobs * completion_mask).to(device),
        )

    def sample(self, policy, token_lists, group_size: int, sampling: Sampling, seed: int):
        served = self.client.weight_version()
        if served is not None and served != str(self.version):  # never sample from a stale policy silently
            raise VLLMError(f"vLLM server at {self.client.base_url} holds policy version {served}, the trainer is at "
                            f"{self.version}")
        return self.client.generate(token_lists, n=group_size, max_tokens=sampling.max_new_tokens,
                                    temperature=sampling.temperature, top_p=sampling.top_p,
                                    min_tokens=sampling.min_new_tokens, seed=seed,
                                    lora=self.adapter_name if self.lora else None,
                                    stop_token_ids=policy.eos_token_ids)

    # ---- policy sync -------------------------------------------------------------------------------------------
    def sync(self, policy, step: int | None = None) -> dict[str, float]:
        """Put the policy's current weights into the server (rank 0; the other ranks wait for it). `step`: the
        version the server holds already (a start or a restart); None: the policy moved, a new version."""
        if self.client is None:
            return {}
        started = time.perf_counter()
        self.version = self.version + 1 if step is None else step
        if rank() == 0:
            try:
                self.push(policy, served=step is not None)
            except VLLMError as error:  # a server this engine started died: restart it (which pushes the policy)
                self.restart(policy, error)
        barrier()
        return {"rollout/sync_s": time.perf_counter() - started, "rollout/policy_version": float(self.version),
                "rollout/server_restarts": float(self.restarts)}

    def push(self, policy, served: bool) -> None:
        if self.lora:
            folder = self.sync_dir / "adapter"
            policy.model.save_pretrained(str(folder))
            self.client.load_adapter(self.adapter_name, folder)
            # An in-place swap keeps the adapter's id, so the KV blocks cached for shared prompt prefixes (the
            # instruction every prompt starts with) would still hold the old adapter's keys and values.
            self.client.reset_prefix_cache()
        elif not served:  # a full fine-tune is served from the folder its start (or restart) wrote
            self.client.update_weights(save_for_reload(policy.model, self.sync_dir / "weights"))
        self.client.set_weight_version(str(self.version))

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.server is not None:
            self.server.stop()
            self.server = None


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def broadcast(value):
    if not is_distributed():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def _is_sharded(model) -> bool:
    from medix.models.sharding import is_sharded

    return is_sharded(model)
