"""Rollouts from a vLLM server (`rollout=vllm`): one medix starts from `.venv-vllm/` for the policy's base weights
on each machine, or one you run yourself (`rollout.base_url`, like `trl vllm-serve`). Prompts go as token ids, with
their images (a vision-language policy), on the server's token route. After every GRPO step `sync` puts the current
policy into it: the LoRA adapter (not a merged model) under one name, in place, or the full weights reloaded from a
saved folder; under FSDP2 every rank first takes part in gathering them from the shards. Every rollout carries the
server's sampling log-probs and the policy version it sampled with, so the trainer can measure (and correct) how far
they are from its own. A lock keeps a sync from swapping the weights inside a request: with `max_staleness` >= 1 the
module's producer thread samples ahead while the trainer updates, and each sync waits for the request in flight."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from medix.errors import ConfigError, MedixError
from medix.models.sharding import full_state_dict, gathered_parameters, is_sharded
from medix.rollout.base import Rollout, Sampling, completion_mask_from_ids
from medix.rollout.vllm_server import VLLMClient, VLLMError, VLLMServer, save_for_reload

log = logging.getLogger(__name__)


class VLLMEngine:
    """Samples G completions per prompt in one request (`n=G`) each, with their token ids and log-probs. Each
    machine's first rank starts (and syncs) that machine's server, which all its ranks sample from; with
    `base_url`, global rank 0 syncs the one server every rank samples from. `placeholder_logit_bias` is added to the
    logits of a vision-language policy's image/video placeholder tokens, so the engine never samples one.
    `max_staleness`: how many policy versions a sample may lag the trainer's (0: the synchronous step; >= 1: the
    module samples and scores ahead of the trainer, `medix.grpo.producer`)."""

    def __init__(self, *, base_url: str | None = None, model_name: str = "policy", adapter_name: str = "medix-policy",
                 sync_dir: str, server: dict | None = None, client: dict | None = None, max_restarts: int = 2,
                 placeholder_logit_bias: float = -100.0, max_staleness: int = 0):
        if not isinstance(max_staleness, int) or isinstance(max_staleness, bool) or max_staleness < 0:
            raise ConfigError(f"rollout.max_staleness={max_staleness!r}; expected an integer >= 0 (0 = synchronous)")
        self.base_url = base_url
        self.model_name = model_name
        self.adapter_name = adapter_name
        self.sync_dir = Path(sync_dir)
        self.server_options = dict(server or {})
        self.client_options = dict(client or {})
        self.max_restarts = max_restarts
        self.placeholder_logit_bias = placeholder_logit_bias
        self.server: VLLMServer | None = None
        self.client: VLLMClient | None = None
        self.lora = False
        self.leader = 0  # the global rank that starts and syncs the server this rank samples from
        self.version = 0  # the policy version the server holds: 0 = the weights training starts from
        self.restarts = 0
        self.max_staleness = max_staleness
        self.lock = threading.RLock()  # one request or one sync at a time: weights never change inside a request

    @property
    def owns_server(self) -> bool:
        return rank() == self.leader

    # ---- the server ----------------------------------------------------------------------------------------------
    def start(self, policy) -> None:
        """Connect (each machine's first rank starts a server for the policy) and give it the policy's current
        weights. Every rank calls it."""
        if self.client is not None:
            return
        self.lora = policy.uses_lora
        self.leader = 0 if self.base_url is not None else machine_leader()
        url = self.base_url
        if url is None:
            weights = None if self.lora else self.write_weights(policy)  # a full fine-tune: served from its copy
            if self.owns_server:
                url = self.launch(policy, weights).base_url
            url = from_rank(url, self.leader)
        self.client = VLLMClient(url, self.model_name, **self.client_options)
        if self.owns_server:
            mode = self.client.logprobs_mode()
            if mode != "processed_logprobs":
                raise ConfigError(f"the vLLM server at {url} reports logprobs mode {mode!r}; start it with "
                                  "--logprobs-mode processed_logprobs (the log-probs the completions were sampled with)")
        self.sync(policy, step=self.version)

    def launch(self, policy, weights: Path | None, port: int | None = None) -> VLLMServer:
        """Start a server for the policy: its base folder (LoRA) or `weights` (a full fine-tune's untied copy)."""
        path = getattr(policy, "path", None)
        if path is None:
            raise ConfigError(f"rollout=vllm needs the backbone's model folder; backbone {policy.name} has none")
        options = dict(self.server_options)
        # a VLM's server takes images (only: no videos without torchvision), one per prompt unless told more
        options["images_per_prompt"] = (options.get("images_per_prompt") or 1) if policy.is_vlm else None
        if self.lora:
            options["max_lora_rank"] = max(options.get("max_lora_rank") or 0, policy.model.peft_config["default"].r)
        else:  # vLLM must serve an untied copy, or a full reload leaves its LM head stale
            options["max_lora_rank"] = None
            options["tokenizer"] = str(path)
            path = weights
        self.server = VLLMServer(str(path), served_model_name=self.model_name, port=port, **options).start()
        log.info("vLLM rollout server for %s at %s (started in %.0f s)", policy.name, self.server.base_url,
                 self.server.startup_s or 0.0)
        return self.server

    def restart(self, policy, error: Exception) -> None:
        """The server this rank started died: start it again on the same port (the other ranks of the machine keep
        their clients) with the weights of the last sync, and load the last adapter. This rank only."""
        if self.server is None or self.restarts >= self.max_restarts:
            raise error
        self.restarts += 1
        log.warning("vLLM rollout server failed (%s); restarting it (%d of at most %d)", error, self.restarts,
                    self.max_restarts)
        port = self.server.port
        self.server.stop()
        self.launch(policy, None if self.lora else self.sync_dir / "weights", port=port)
        self.load(served=True)

    # ---- rollouts ----------------------------------------------------------------------------------------------
    def generate(self, policy, prompts: list[str], images: list[list] | None = None, *, group_size: int,
                 sampling: Sampling, seed: int | None = None) -> Rollout:
        self.start(policy)
        images = images if images is not None and any(images) else None
        enc = policy.encode(prompts, images)
        token_lists = [ids[mask.bool()].tolist() for ids, mask in zip(enc.input_ids, enc.attention_mask)]
        # One placeholder per image, as the chat text has it: vLLM expands each to its image's size (it would expand
        # the processor's already expanded runs again), and the prompt it runs must be the one the trainer scores.
        sent = [one_placeholder_per_image(ids, policy.placeholder_token_ids) for ids in token_lists]
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)))  # from the torch RNG, so a resumed run samples the same
        with self.lock:  # a sync waits until this request is done: one policy version per request
            version = self.version
            try:
                completions = self.sample(policy, sent, images, group_size, sampling, seed)
            except VLLMError as error:
                if not self.owns_server:
                    raise
                self.restart(policy, error)  # the restarted server holds the last sync's weights: still `version`
                completions = self.sample(policy, sent, images, group_size, sampling, seed)
        for i, (scored, group) in enumerate(zip(token_lists, completions)):
            served = group[0].prompt_token_ids if group else None
            if served is not None and served != scored:  # the engine sampled for another prompt than is scored
                raise MedixError(f"prompt {i}: the vLLM server ran {len(served)} prompt tokens, the trainer's processor "
                                 f"wrote {len(scored)} (first difference at token {first_difference(served, scored)});"
                                 " their image processors resize the images differently")
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
            row_images=None if enc.row_images is None else [r for r in enc.row_images for _ in range(group_size)],
            engine_logprobs=(logprobs * completion_mask).to(device), policy_version=version,
        )

    def sample(self, policy, token_lists, images, group_size: int, sampling: Sampling, seed: int):
        served = self.client.weight_version()
        if served is not None and served != str(self.version):  # never sample from a stale policy silently
            raise VLLMError(f"vLLM server at {self.client.base_url} holds policy version {served}, the trainer is at "
                            f"{self.version}")
        return self.client.generate(token_lists, images=images, n=group_size, max_tokens=sampling.max_new_tokens,
                                    temperature=sampling.temperature, top_p=sampling.top_p,
                                    min_tokens=sampling.min_new_tokens, seed=seed,
                                    lora=self.adapter_name if self.lora else None,
                                    stop_token_ids=policy.eos_token_ids,
                                    logit_bias=dict.fromkeys(policy.placeholder_token_ids, self.placeholder_logit_bias))

    # ---- policy sync -------------------------------------------------------------------------------------------
    def sync(self, policy, step: int | None = None) -> dict[str, float]:
        """Put the policy's current weights into the server. Every rank calls it: under FSDP2 each takes part in
        gathering the weights, which global rank 0 writes; then each server's rank loads them. `step`: the version
        the server holds already (a start); None: the policy moved, a new version. Waits for a request in flight
        (`rollout/sync_wait_s`), so the weights change between requests, never inside one."""
        if self.client is None:
            return {}
        started = time.perf_counter()
        with self.lock:
            waited = time.perf_counter() - started
            self.version = self.version + 1 if step is None else step
            if self.lora:
                self.write_adapter(policy)
            elif step is None:  # a start wrote the weights it serves already
                self.write_weights(policy)
            if self.owns_server:
                try:
                    self.load(served=step is not None)
                except VLLMError as error:  # a server this rank started died: restart it (which loads the policy)
                    self.restart(policy, error)
            barrier()
        return {"rollout/sync_s": time.perf_counter() - started, "rollout/sync_wait_s": waited,
                "rollout/policy_version": float(self.version), "rollout/server_restarts": float(self.restarts)}

    def write_adapter(self, policy) -> Path:
        """The LoRA adapter, gathered from the shards under FSDP2 (every rank), written by global rank 0."""
        folder = self.sync_dir / "adapter"
        model = policy.model
        state = gathered_parameters(model, lambda name: "lora_" in name) if is_sharded(model) else None
        if rank() == 0:
            model.save_pretrained(str(folder), state_dict=state)
        barrier()
        return folder

    def write_weights(self, policy) -> Path:
        """The full weights as an untied folder the server reloads, gathered from the shards under FSDP2 (every
        rank takes part), written by global rank 0."""
        folder = self.sync_dir / "weights"
        state = full_state_dict(policy.model) if is_sharded(policy.model) else None
        if rank() == 0:
            save_for_reload(policy.model, folder, state_dict=state)
            if not (folder / "tokenizer_config.json").is_file():  # the server's tokenizer and image processor
                copy_preprocessing(policy, folder)
        barrier()
        return folder

    def load(self, served: bool) -> None:
        """The server takes what the last sync wrote (`served`: it holds those weights already) and its version."""
        if self.lora:
            self.client.load_adapter(self.adapter_name, self.sync_dir / "adapter")
            # An in-place swap keeps the adapter's id, so the KV blocks cached for shared prompt prefixes (the
            # instruction every prompt starts with) would still hold the old adapter's keys and values.
            self.client.reset_prefix_cache()
        elif not served:
            self.client.update_weights(self.sync_dir / "weights")
        self.client.set_weight_version(str(self.version))

    def close(self) -> None:
        with self.lock:  # after the request in flight, if any
            self._close()

    def _close(self) -> None:
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


def from_rank(value, source: int):
    """`value` as global rank `source` holds it, on every rank (each machine's ranks may ask a different one)."""
    if not is_distributed():
        return value
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values[source]


def machine_leader() -> int:
    """The lowest global rank on this machine (hostname): the one that starts and syncs this machine's server."""
    if not is_distributed():
        return 0
    hosts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(hosts, socket.gethostname())
    return hosts.index(socket.gethostname())


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def copy_preprocessing(policy, folder: Path) -> None:
    """The files beside the policy's weights that are not weights (tokenizer, chat template, image processor), copied
    into `folder`; from a hub id, what its processor (or tokenizer) saves."""
    import shutil

    source = Path(policy.path)
    if not source.is_dir():
        (policy.processor or policy.tokenizer).save_pretrained(str(folder))
        return
    for path in source.iterdir():
        if path.is_file() and path.name != "config.json" and not path.name.endswith((".safetensors", ".bin", ".index.json")):
            shutil.copy(path, folder / path.name)


def one_placeholder_per_image(ids: list[int], placeholders: list[int]) -> list[int]:
    """`ids` with each run of a placeholder token (an image's expanded <|image_pad|>s) cut to one."""
    return [t for k, t in enumerate(ids) if not (t in placeholders and k > 0 and ids[k - 1] == t)]


def first_difference(a: list[int], b: list[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
