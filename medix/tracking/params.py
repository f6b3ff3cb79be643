"""Turn a run config into MLflow params and tags: flattened dotted keys, secrets redacted at the source."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

REDACTED = "<redacted>"
SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password|passwd|credential|authorization)", re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    return bool(SECRET_KEY.search(key.rsplit(".", 1)[-1]))


def redact(cfg: Any) -> Any:
    """A plain copy of the config with every secret-looking key's value replaced (resolves interpolations)."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, dict):
        return {k: (REDACTED if is_secret_key(str(k)) and v not in (None, "") else redact(v)) for k, v in cfg.items()}
    if isinstance(cfg, list):
        return [redact(v) for v in cfg]
    return cfg


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'reward': {'weights': {'embedding': 0.3}}} → {'reward.weights.embedding': 0.3}; lists become strings."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree if not isinstance(tree, list) else str(tree)}


def run_params(cfg) -> dict[str, Any]:
    """The params MLflow records: the whole resolved config, flattened and redacted (values cut to 500 chars)."""
    return {k: str(v)[:500] for k, v in flatten(redact(cfg)).items()}


def reward_mix_signature(weights: dict[str, float]) -> str:
    """A short, stable name for a reward mix, e.g. 'llm0.52-emb0.34-mod0.045-fmt0.1'."""
    short = {"llm_judge": "llm", "embedding": "emb", "modality": "mod", "format": "fmt"}
    return "-".join(f"{short.get(k, k)}{float(v):.3g}" for k, v in weights.items())


def run_name(cfg) -> str:
    weights = OmegaConf.to_container(cfg.reward.weights, resolve=True)
    return f"{cfg.algorithm.name}|{reward_mix_signature(weights)}|{cfg.backbone.name}"


def config_digest(cfg) -> str:
    return hashlib.sha256(OmegaConf.to_yaml(OmegaConf.create(redact(cfg))).encode()).hexdigest()[:12]
