"""Hydra callback that keeps secrets given on the command line (`judge.api_key=sk-…`) out of Hydra's output folder.

Before Hydra writes `.hydra/{config,hydra,overrides}.yaml` (and before a multirun launches its jobs), each override of
a secret-looking key moves its value into an environment variable and becomes `key=${oc.env:MEDIX_SECRET_<KEY>}`:
the job still resolves the real value, but only the interpolation is ever written down.
Enable with `hydra.callbacks.redact_secrets._target_: medix.tracking.hydra_redact.RedactSecrets`.
"""

from __future__ import annotations

import os
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from medix.tracking.params import REDACTED, is_secret_key

try:
    from hydra.experimental.callback import Callback
except ImportError:  # hydra is a dependency of every entry point; this keeps the module importable without it
    Callback = object  # type: ignore[misc,assignment]


def secret_env_name(key: str) -> str:
    """`judge.api_key` → `MEDIX_SECRET_JUDGE_API_KEY`."""
    return "MEDIX_SECRET_" + re.sub(r"\W+", "_", key).strip("_").upper()


def split_override(line: str) -> tuple[str, str, str] | None:
    """`+judge.api_key='x'` → ('+', 'judge.api_key', "'x'"); None for a line without `=` (e.g. `~key`)."""
    match = re.match(r"^(\+\+|\+|~)?([^=]+)=(.*)$", line, re.DOTALL)
    if match is None:
        return None
    return match.group(1) or "", match.group(2).strip(), match.group(3)


def unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def hide_secret_overrides(overrides: list[str], environ: dict[str, str] | Any = os.environ) -> tuple[list[str], dict[str, str]]:
    """(overrides with every secret value replaced by an `${oc.env:…}` interpolation, {key: env var name}).

    The values are put into `environ`. Values that already are interpolations, and sweeps (`a,b`, `choice(…)`), are
    left alone: give a secret through an environment variable instead.
    """
    out, moved = [], {}
    for line in overrides:
        parts = split_override(line)
        if parts is None or not is_secret_key(parts[1]):
            out.append(line)
            continue
        prefix, key, raw = parts
        value = unquote(raw)
        is_sweep = value == raw.strip() and ("," in value or re.match(r"^\w+\(", value) is not None)
        if not value or value.startswith("${") or is_sweep:
            out.append(line)
            continue
        env = secret_env_name(key)
        environ[env] = value
        moved[key] = env
        out.append(f"{prefix}{key}=${{oc.env:{env}}}")
    return out, moved


def redacted_dirname(overrides: list[str], exclude_keys: list[str], item_sep: str, kv_sep: str) -> str:
    """Hydra's `hydra.job.override_dirname` (sorted input lines) with every secret value written <redacted>.

    Hydra builds it from the raw lines and resolves interpolations in it, so even `key=${oc.env:VAR}` would leak.
    """
    lines = []
    for line in overrides:
        parts = split_override(line)
        key = parts[1] if parts else line.lstrip("~+")
        if key in exclude_keys:
            continue
        lines.append(f"{parts[0]}{key}={REDACTED}" if parts and is_secret_key(key) else line)
    return item_sep.join(sorted(lines)).replace("=", kv_sep)


class RedactSecrets(Callback):
    """Moves secret override values into environment variables before anything is saved (see the module docstring)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._hide(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # The sweeper saves this config as multirun.yaml and builds each job's config from hydra.overrides.task.
        self._hide(config)

    @staticmethod
    def _hide(config: DictConfig) -> None:
        original = list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
        hidden, moved = hide_secret_overrides(original)
        if not any(parts and is_secret_key(parts[1]) for parts in map(split_override, original)):
            return
        dirname_cfg = config.hydra.job.config.override_dirname
        with read_write(config), open_dict(config):
            config.hydra.overrides.task = hidden
            config.hydra.job.override_dirname = redacted_dirname(
                hidden, list(dirname_cfg.exclude_keys), dirname_cfg.item_sep, dirname_cfg.kv_sep)
            for key, env in moved.items():
                OmegaConf.update(config, key, f"${{oc.env:{env}}}", merge=False, force_add=True)
