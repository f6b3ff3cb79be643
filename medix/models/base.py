"""A policy backbone: the model, its tokenizer/processor, and how prompts (and images) become model inputs.

Text-only models need nothing but token ids; vision-language models add per-row image inputs in their own layout
(Qwen-VL: flattened patches + grids; tiny_vlm: a pixel tensor per row). Each backbone class owns that layout, so the
rollout and the GRPO update handle rows generically: `encode` turns prompts into `Encoded` rows, `model_inputs`
turns any selection of rollout rows back into the keyword arguments of a forward or `generate` call.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medix.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    """Prompts as model inputs: left-padded ids and mask [B, P], per-token processor outputs aligned with the ids
    (Qwen-VL's mm_token_type_ids), and each row's images in the backbone's layout (None: no image inputs at all)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    sequence_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    row_images: list[Any] | None = None


class Backbone:
    """A text-only causal LM (optionally LoRA-wrapped by peft)."""

    is_vlm = False

    def __init__(self, model, tokenizer, name: str, processor=None, path: str | None = None):
        self.model = model
        self.path = path  # the folder (or hub id) its weights were loaded from: what a rollout server serves
        self.tokenizer = tokenizer
        self.processor = processor
        self.name = name
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    # ---- prompts -> inputs -----------------------------------------------------------------------------------------
    @property
    def templater(self):
        """What applies the chat template (the processor of a VLM, else the tokenizer)."""
        return self.processor if self.processor is not None else self.tokenizer

    def render(self, sample, reasoning_tag: str) -> str:
        """The training prompt of a sample, chat template applied (medix/data/prompt.jinja)."""
        from medix.data.prompts import render_prompt

        return render_prompt(sample, self.templater, reasoning_tag)

    def encode(self, prompts: list[str], images: list[list] | None = None) -> Encoded:
        if images is not None and any(images):
            raise ConfigError(f"backbone {self.name} is text-only but the prompts carry images; use a "
                              "vision-language backbone or a text-only dataset")
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        return Encoded(enc["input_ids"], enc["attention_mask"])

    def image_inputs(self, row_images: list[Any] | None) -> dict[str, torch.Tensor]:
        """Batched image inputs of the given rows (in order) for a forward or generate call; {} without images."""
        return {}

    def model_inputs(self, rollout) -> dict[str, torch.Tensor]:
        """Everything besides ids and mask that the model needs to score `rollout`'s rows."""
        device = rollout.input_ids.device
        inputs = {k: v.to(device) for k, v in rollout.sequence_inputs.items()}
        inputs.update({k: v.to(device) for k, v in self.image_inputs(rollout.row_images).items()})
        return inputs

    @property
    def eos_token_ids(self) -> list[int]:
        config = getattr(self.model, "generation_config", None)
        ids = config.eos_token_id if config is not None else None
        ids = ids if ids is not None else self.tokenizer.eos_token_id
        return list(ids) if isinstance(ids, (list, tuple)) else [ids]

    @property
    def placeholder_token_ids(self) -> list[int]:
        """Tokens a sampler must never emit (a VLM's image/video placeholders); none for a text model."""
        return []

    @property
    def uses_lora(self) -> bool:
        return hasattr(self.model, "disable_adapter") and hasattr(self.model, "peft_config")

    # ---- trained weights -------------------------------------------------------------------------------------------
    def trained_folder_name(self) -> str:
        return "adapter" if self.uses_lora else "model"

    def save_trained(self, folder: str | Path, state_dict: dict | None = None) -> Path:
        """The LoRA adapter (or, for a full fine-tune, the whole model) and the tokenizer (a VLM: its processor,
        which holds the tokenizer, the image processor and the chat template), loadable with `adapter=` and, for a
        full model, as a model folder of its own. `state_dict`: the full weights gathered from a sharded model
        (FSDP), saved instead of the local ones."""
        folder = Path(folder)
        self.model.save_pretrained(str(folder), state_dict=state_dict)
        preprocessor = self.processor if hasattr(self.processor, "save_pretrained") else self.tokenizer
        preprocessor.save_pretrained(str(folder))
        return folder

    def load_trained(self, folder: str | Path) -> None:
        """Load what `save_trained` wrote into this backbone."""
        self.model = load_trained_weights(self.model, folder)


def load_trained_weights(model, folder: str | Path):
    """A medix run's LoRA adapter folder (adapter_config.json) applied to `model`, or its full-model folder's weights
    copied into `model` in place (so what the loader set up on it, activation checkpointing, device, stays)."""
    from peft import PeftModel, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    folder = Path(folder)
    if (folder / "adapter_config.json").is_file():
        if isinstance(model, PeftModel):
            try:
                result = set_peft_model_state_dict(model, load_peft_weights(str(folder)))
            except RuntimeError as exc:  # a different r
                raise ConfigError(f"adapter {str(folder)!r} does not fit backbone.lora "
                                  f"({' '.join(str(exc).split())[:300]}); set backbone.lora to the adapter's "
                                  "adapter_config.json") from None
            if result.unexpected_keys:  # peft loads non-strictly: weights with no place in this adapter are dropped
                raise ConfigError(f"adapter {str(folder)!r} holds {len(result.unexpected_keys)} LoRA tensors that "
                                  f"backbone.lora has no module for (e.g. {result.unexpected_keys[0]}); set "
                                  "backbone.lora.target_modules to the adapter's adapter_config.json")
            return model
        return PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    if (folder / "config.json").is_file():
        if isinstance(model, PeftModel):
            raise ConfigError(f"adapter {str(folder)!r} is a full fine-tuned model; load it with "
                              "backbone.lora=null")
        saved = type(model).from_pretrained(str(folder), dtype=next(model.parameters()).dtype)
        try:
            model.load_state_dict(saved.state_dict())
        except RuntimeError as exc:
            raise ConfigError(f"adapter {str(folder)!r} holds a {type(saved).__name__} whose weights do not fit the "
                              f"backbone's model ({' '.join(str(exc).split())[:300]}); load it with the backbone it "
                              "was trained from") from None
        return model
    raise ConfigError(f"adapter {str(folder)!r} holds neither adapter_config.json nor config.json (expected a medix "
                      "run's adapter/ or model/ folder)")


def can_share_prompt(model) -> bool:
    """Prompt KV caches can be computed once and copied: a decoder-only text model, without activation
    checkpointing (which turns the cache off in training). Checkpointing is read off the layers themselves
    (transformers flags each checkpointed module), so a wrapper around the model (peft, tiny_vlm) is seen through."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False) or getattr(config, "vision_config", None):
        return False
    return not any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def native_gqa_attention(device: torch.device | str) -> None:
    """On the CPU, let transformers' SDPA attention hand grouped-query K/V to torch as they are (`enable_gqa`)
    instead of copying them out to every query head first (`repeat_kv`), also when there is a mask, as every
    left-padded or cached batch has. Same outputs and gradients up to summation order; on SmolLM2-135M (9 query heads,
    3 KV heads) it saves the update ~150 MB of saved K/V copies per micro-batch of 4 rows. On CUDA transformers' own
    choice stays: there a mask with `enable_gqa` falls back to the math kernel. Sets transformers' process-wide
    switch `TRANSFORMERS_SDPA_FORCE_GQA` unless it is set already."""
    if torch.device(device).type == "cpu":
        os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")


def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for left-padded rows: 0 at each row's first real token."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
