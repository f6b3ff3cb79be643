"""Resumable checkpoints of a GRPO run: trainable weights, optimizer, scheduler, RNG states, step, data position."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from medix.errors import ConfigError

CHECKPOINT_NAME = "last.ckpt"


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Only the parameters that train (the LoRA adapter, or every weight in a full fine-tune)."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict) -> Path:
    """Write atomically: a kill during the write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def resolve_checkpoint(resume: str | Path) -> Path:
    """`resume=` takes a checkpoint file or a run folder (its checkpoints/last.ckpt)."""
    path = Path(resume).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / CHECKPOINT_NAME
    if not path.is_file():
        raise ConfigError(f"resume={str(resume)!r}: no checkpoint at {path} (expected a .ckpt file or a run folder "
                          f"holding checkpoints/{CHECKPOINT_NAME})")
    return path


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def load_trainable_state(model, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [name for name in weights if name not in params]
    if missing:
        raise ConfigError(f"checkpoint does not fit this backbone: no parameter {missing[0]!r} "
                          f"(resume with the same backbone and LoRA settings)")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
