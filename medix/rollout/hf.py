"""Rollouts from Hugging Face `generate` inside the training process (small machines, the CPU default)."""

from __future__ import annotations

import contextlib

import torch

from medix.errors import ConfigError
from medix.memory import freed_memory_returned
from medix.models.base import can_share_prompt, left_padded_positions
from medix.models.prefix import after_prefix, common_prefix, left_padded, shared_prefix
from medix.models.sharding import gathered_for_generation, is_sharded
from medix.rollout.base import Rollout, Sampling, completion_mask_from_ids


class HFEngine:
    """Samples `group_size` completions per prompt with one batched `generate` call on the policy itself, so there
    is nothing to sync, and nothing to sample ahead with (`max_staleness` 0 only). share_prompt_cache: each distinct
    prompt is prefilled once and its KV cache copied into a static cache of the group's rows, sized for the whole
    completion (text-only decoder models, `cache_implementation` unset). merge_lora: a LoRA policy samples with each
    adapter folded into a temporary copy of its layer's weight (one matmul per layer instead of three)."""

    def __init__(self, share_prompt_cache: bool = True, cache_implementation: str | None = None,
                 max_staleness: int = 0, merge_lora: bool = True):
        if max_staleness != 0:
            raise ConfigError(f"rollout.max_staleness={max_staleness!r} with rollout=hf: HF generate samples from the "
                              "trainer's own model, so it cannot sample ahead while it trains; use rollout=vllm for "
                              "asynchronous rollouts, or rollout.max_staleness=0")
        self.share_prompt_cache = share_prompt_cache
        self.cache_implementation = cache_implementation
        self.max_staleness = max_staleness
        self.merge_lora = merge_lora

    @torch.no_grad()
    def generate(self, policy, prompts: list[str], images: list[list] | None = None, *, group_size: int,
                 sampling: Sampling, seed: int | None = None) -> Rollout:
        model = policy.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        devices = [device] if seed is not None and device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices, enabled=seed is not None):  # a seed leaves the run's RNG be
                if seed is not None:
                    torch.manual_seed(seed)
                return self._generate(policy, prompts, images, group_size, sampling)
        finally:
            model.train(was_training)  # also when generate fails (the next step trains in the right mode)

    def _generate(self, policy, prompts, images, group_size: int, sampling: Sampling) -> Rollout:
        model, tokenizer = policy.model, policy.tokenizer
        device = next(model.parameters()).device
        enc = policy.encode(prompts, images)
        ids = enc.input_ids.to(device).repeat_interleave(group_size, dim=0)
        mask = enc.attention_mask.to(device).repeat_interleave(group_size, dim=0)
        sequence = {k: v.to(device).repeat_interleave(group_size, dim=0) for k, v in enc.sequence_inputs.items()}
        row_images = None if enc.row_images is None else [r for r in enc.row_images for _ in range(group_size)]
        inputs = {**sequence, **{k: v.to(device) for k, v in policy.image_inputs(row_images).items()}}
        synced_gpus = is_sharded(model)  # FSDP: every rank runs the decoding loop until all ranks are done
        eos = policy.eos_token_ids
        gathered = gathered_for_generation(model) if synced_gpus else contextlib.nullcontext()
        merged = lora_merged(model) if self.merge_lora and not synced_gpus else contextlib.nullcontext()
        with gathered, policy_sampling(model), merged:
            extra = {}
            if (self.share_prompt_cache and group_size > 1 and self.cache_implementation is None and not inputs
                    and not synced_gpus and can_share_prompt(model) and enc.input_ids.shape[1] > 1):
                cache = prompt_cache(model, enc.input_ids[:, :-1].to(device), enc.attention_mask[:, :-1].to(device))
                rows = torch.arange(len(prompts), device=device).repeat_interleave(group_size)
                # generate feeds only the last prompt token, then samples
                extra["past_key_values"] = group_cache(model, cache, rows, ids.shape[1] + sampling.max_new_tokens)
            output = model.generate(
                input_ids=ids, attention_mask=mask, **inputs, **extra,
                do_sample=False, logits_processor=sampler(sampling),  # greedy on Gumbel-perturbed scores: a sample
                max_new_tokens=sampling.max_new_tokens, min_new_tokens=sampling.min_new_tokens,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, cache_implementation=self.cache_implementation,
                synced_gpus=synced_gpus,
            )
        completion = output[:, ids.shape[1]:]
        completion_mask, truncated = completion_mask_from_ids(completion, eos)
        completion = completion.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
        T = completion.shape[1]
        return Rollout(
            input_ids=torch.cat([ids, completion], dim=1), attention_mask=torch.cat([mask, completion_mask], dim=1),
            completion_mask=completion_mask, prompt_length=ids.shape[1], texts=texts, truncated=truncated,
            sequence_inputs={k: torch.nn.functional.pad(v, (0, T)) for k, v in sequence.items()},
            row_images=row_images,
        )

    def sync(self, policy) -> dict[str, float]:
        return {}  # generates with the policy's own weights

    def close(self) -> None:
        pass


def sampler(sampling: Sampling):
    """Logits processors that turn generate's greedy selection into a sample from the policy's full distribution
    (no top-k) at `sampling`'s temperature and top-p: after the warpers, `GumbelNoise` perturbs the scores, and their
    argmax is then a draw from their softmax."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    warpers = [TemperatureLogitsWarper(sampling.temperature)] if sampling.temperature != 1.0 else []
    warpers += [TopPLogitsWarper(sampling.top_p)] if sampling.top_p < 1.0 else []
    return LogitsProcessorList([*warpers, GumbelNoise()])


class GumbelNoise:
    """scores + Gumbel(0, 1) noise, drawn per entry as -log(-log U): the argmax of the result is distributed as
    softmax(scores) (the Gumbel-max trick). The same distribution as generate's own sampling,
    `torch.multinomial(softmax(scores))`, which on the CPU draws a double-precision exponential per vocabulary entry:
    16 x 49,152 scores take 3.5 ms here against 16.7 ms there. Float32 uniforms keep the noise within [-2.8, 16.6],
    so a token less likely than e^-19.4 (4e-9) times the top token is never drawn: at most 49,152 x 4e-9 = 2e-4 of
    the mass, in the most spread-out tail. Entries at -inf (top-p, min_new_tokens) stay there."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores - torch.rand_like(scores).log_().neg_().log_()


@contextlib.contextmanager
def policy_sampling(model):
    """Inside: every generation_config of `model` (its own, or the wrapped transformers model's under peft or
    tiny_vlm) holds only its special token ids, so generate samples from the policy's distribution with just the
    engine's settings. A checkpoint's generation_config.json otherwise fills in whatever the call leaves unset, and
    some switch on logits processors (Qwen2.5-VL: repetition_penalty 1.05) that sample completions from another
    distribution than the one their log-probs are scored under."""
    from transformers import GenerationConfig

    owners = [m for m in model.modules() if isinstance(vars(m).get("generation_config"), GenerationConfig)]
    saved = [m.generation_config for m in owners]
    for m, config in zip(owners, saved):
        m.generation_config = GenerationConfig(**{k: getattr(config, k, None) for k in SPECIAL_TOKENS})
    try:
        yield
    finally:
        for m, config in zip(owners, saved):
            m.generation_config = config


SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def prompt_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The KV cache of `input_ids` (one row per distinct prompt, left-padded; logits only for the last position).
    Where the prompts share a start (the system prompt and template), it runs once and each prompt's rest runs on
    its cache; the cache is then laid out as the ids are. Not for sliding-window layers (plain prefill there)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    start = common_prefix(input_ids, attention_mask, input_ids.shape[1])
    plain_layers = all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)
    if len(input_ids) == 1 or not len(start) or not plain_layers:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1,
                    position_ids=left_padded_positions(attention_mask))
        return out.past_key_values
    length = len(start)
    prefix = shared_prefix(model, start)
    ids, mask, _ = after_prefix(input_ids, attention_mask, input_ids.shape[1], length)
    out = model(input_ids=ids[:, length:], attention_mask=mask, position_ids=left_padded_positions(mask)[:, length:],
                past_key_values=prefix.cache(model, len(ids)), use_cache=True, logits_to_keep=1)
    return left_padded(out.past_key_values, mask, length)


def group_cache(model, cache, rows: torch.Tensor, max_length: int):
    """`cache`'s rows `rows` (a prompt's KV repeated for its group) in a static cache of `max_length` positions, so
    decoding writes each new token in place instead of growing every layer's tensors by one position per token (a
    copy of the whole cache each time). Falls back to the dynamic cache, reordered, where a layer is not a plain
    full-attention one (sliding windows)."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    static = StaticCache(config=model.config, max_cache_len=max_length)
    if len(static.layers) != len(cache.layers) or any(type(layer) is not StaticLayer for layer in static.layers):
        cache.reorder_cache(rows)
        return cache
    with freed_memory_returned():  # mapped blocks of their own: unmapped when freed, not left in the heap
        for target, source in zip(static.layers, cache.layers):
            target.update(source.keys.index_select(0, rows), source.values.index_select(0, rows))
    return static


@contextlib.contextmanager
def lora_merged(model):
    """Inside: every LoRA linear layer of a peft `model` runs its base layer alone, whose weight is a new tensor
    W + scaling * B @ A; after, the layers hold their original weight tensors again (nothing is subtracted, so no
    rounding drift). The outputs equal the unmerged forward's up to float rounding; the extra memory is one copy of
    the adapted weights while inside. Other models, and LoRA variants (DoRA), a bias on B (`lora_bias`) or non-linear
    LoRA layers: unchanged."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if (not layers or not hasattr(model, "disable_adapter")
            or any(type(m) is not LoraLinear or m.lora_variant or m.merged or any(m.lora_bias.values())
                   for m in layers)):
        yield
        return
    saved = []
    try:
        with freed_memory_returned():  # each copy a mapping of its own: unmapped when freed, not left in the heap
            for layer in layers:
                base = layer.get_base_layer()
                saved.append((base, base.weight))
                base.weight = torch.nn.Parameter(merged_weight(layer, base.weight), requires_grad=False)
        with model.disable_adapter():
            yield
    finally:
        for base, weight in saved:
            base.weight = weight


def merged_weight(layer, weight: torch.Tensor) -> torch.Tensor:
    """A new tensor W + scaling * B @ A over `layer`'s active adapters (transposed for fan_in_fan_out layers), in
    one allocation."""
    merged = weight.clone()
    for name in layer.active_adapters:
        if name in layer.lora_A:
            a, b = layer.lora_A[name].weight.to(weight.dtype), layer.lora_B[name].weight.to(weight.dtype)
            a, b = (b.T, a.T) if layer.fan_in_fan_out else (a, b)
            merged.addmm_(b, a, alpha=layer.scaling[name])
    return merged
