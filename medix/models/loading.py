"""What every backbone loader shares: where the weights come from, the dtype, LoRA, activation checkpointing."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from medix.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SOURCES = ("gguf_package", "hub", "local", "built")


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"backbone.dtype={name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def model_folder(*, name: str, source: str, model: str, gguf, cache_dir: str | Path) -> str:
    """Where transformers loads the weights from: a hub id, a local folder, a GGUF converted once to a folder, or a
    model medix builds once offline (`source=built`, `model=tiny_qwen_vl`)."""
    if source == "gguf_package":
        from medix.models.gguf import gguf_model_folder

        if gguf is None:
            raise ConfigError("backbone.source=gguf_package needs backbone.gguf.package and backbone.gguf.file")
        return str(gguf_model_folder(gguf.package, gguf.file, name, cache_dir))
    if source == "built":
        from medix.models.tiny_qwen_vl import NAME, tiny_qwen_vl_folder

        if model != NAME:
            raise ConfigError(f"backbone.model={model!r} with backbone.source=built; medix builds {NAME!r}")
        return str(tiny_qwen_vl_folder(cache_dir))
    if source == "local" and not Path(model).exists():
        raise ConfigError(f"backbone.model={model!r}: no such folder")
    if source not in SOURCES:
        raise ConfigError(f"backbone.source={source!r}; expected one of {', '.join(SOURCES)}")
    return model


def apply_lora(model, lora, exclude: str | None = None):
    """Wrap `model` with a peft LoRA adapter: `lora` is the built `backbone.lora` (a peft.LoraConfig); `exclude`: a
    regular expression of module names left without adapters."""
    import copy

    from peft import get_peft_model

    if exclude is not None:
        lora = copy.copy(lora)
        lora.exclude_modules = exclude
    return get_peft_model(model, lora)


def enable_activation_checkpointing(model) -> None:
    # transformers 5 renamed gradient_checkpointing_enable (kept as a deprecated alias)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.config.use_cache = False


VISION_MODULES = r".*(visual|vision).*"  # the vision encoder's modules (Qwen-VL: model.visual.*)


def freeze_vision_tower(model) -> int:
    """Freeze the vision encoder's parameters (names containing 'visual' or 'vision'); returns how many."""
    frozen = 0
    for name, param in model.named_parameters():
        if "visual" in name or "vision" in name:
            param.requires_grad_(False)
            frozen += 1
    return frozen


def build_folder_once(folder: Path, write: Callable[[Path], None]) -> Path:
    """`folder`, filled by `write` in a temporary folder beside it that then takes its name atomically: a killed
    build never leaves a half folder behind, and of processes (DDP ranks) building it at once the first one wins."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        write(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "config.json").is_file():  # not another process that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
