"""Turn a run config into MLflow params and tags: flattened dotted keys, secrets redacted at the source."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

REDACTED = "<redacted>"
# Words that make a config key secret (`judge.api_key`, `hf_token`, `X-Api-Key`, `db.password`), matched on whole
# words so that counts such as `max_tokens` / `max_new_tokens` stay visible.
SECRET_WORDS = frozenset({"apikey", "token", "secret", "password", "passwd", "credential", "credentials",
                          "authorization", "bearer", "cookie"})
SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"), ("auth", "key")})
# Values that look like credentials whatever their key is called (OpenAI/HF/GitHub/Slack/AWS keys, bearer headers).
SECRET_VALUE = re.compile(
    r"(sk-[A-Za-z0-9_\-]{16,}|hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|xox[abprs]-[A-Za-z0-9\-]{10,}"
    r"|AKIA[0-9A-Z]{16}|Bearer\s+[A-Za-z0-9._~+/=\-]+)"
)
URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.\-]*://)[^/@\s]+@", re.IGNORECASE)


def key_words(key: str) -> list[str]:
    """`judge.extra_body.X-Api-Key` → ['x', 'api', 'key'] (the last dotted part, split on non-letters and camelCase)."""
    last = key.rsplit(".", 1)[-1]
    last = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", last)
    return [w for w in re.split(r"[^A-Za-z0-9]+", last.lower()) if w]


def is_secret_key(key: str) -> bool:
    words = key_words(key)
    return bool(SECRET_WORDS.intersection(words)) or any(pair in SECRET_PAIRS for pair in zip(words, words[1:]))


def redact_value(value: Any) -> Any:
    """A string with credential-looking substrings and URL passwords replaced; other values unchanged."""
    if not isinstance(value, str):
        return value
    value = SECRET_VALUE.sub(REDACTED, value)
    return URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", value)


NODE_REFERENCE = re.compile(r"^\$\{[\w.]+\}$")


def config_tree(cfg: DictConfig) -> dict:
    """The config as plain data with every interpolation resolved, except a key whose whole value refers to another
    config node (the reward's `judge: ${judge}`), which keeps the reference: that node is recorded where it lives."""
    resolved = OmegaConf.to_container(cfg, resolve=True)

    def keep_references(raw, tree):
        items = raw.items() if isinstance(raw, dict) else enumerate(raw) if isinstance(raw, list) else ()
        for key, value in items:
            if isinstance(value, str) and NODE_REFERENCE.match(value) and isinstance(tree[key], (dict, list)):
                tree[key] = value
            else:
                keep_references(value, tree[key])

    keep_references(OmegaConf.to_container(cfg, resolve=False), resolved)
    return resolved


def redact(cfg: Any) -> Any:
    """A plain copy of the config with every secret-looking key's value replaced (resolves interpolations)."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        cfg = config_tree(cfg) if isinstance(cfg, DictConfig) else OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, dict):
        return {k: (REDACTED if is_secret_key(str(k)) and v not in (None, "") else redact(v)) for k, v in cfg.items()}
    if isinstance(cfg, list):
        return [redact(v) for v in cfg]
    return redact_value(cfg)


def secret_values(cfg: Any) -> list[str]:
    """Every non-empty string under a secret-looking key of the resolved config (to scrub free text such as tracebacks)."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    found: list[str] = []
    if isinstance(cfg, dict):
        for k, v in cfg.items():
            if is_secret_key(str(k)) and isinstance(v, str) and v and v != "EMPTY":
                found.append(v)
            else:
                found += secret_values(v)
    elif isinstance(cfg, list):
        for v in cfg:
            found += secret_values(v)
    return found


def scrub_text(text: str, cfg: Any) -> str:
    """`text` with the config's secret values and credential-looking substrings replaced by <redacted>."""
    for secret in sorted(secret_values(cfg), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return redact_value(text)


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
