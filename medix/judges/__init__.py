"""LLM judges (does a prediction match the reference?): OpenAI-compatible client, managed local server, rule judge."""

from __future__ import annotations

import atexit
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from medix.errors import ConfigError
from medix.judges.assets import judge_gguf
from medix.judges.cache import JudgeCache
from medix.judges.client import ClientSettings, JudgeItem, OpenAIJudge
from medix.judges.local_server import LocalLlamaServer, require_llama_server
from medix.judges.rule import RuleJudge

__all__ = ["Judge", "JudgeItem", "LocalJudge", "OpenAIJudge", "RuleJudge", "build_judge"]

CLIENT_KEYS = {f.name for f in dataclasses.fields(ClientSettings)} - {"start_hint"}
SERVER_KEYS = {"gguf", "host", "port", "n_ctx", "n_threads", "logits_all", "startup_timeout_s", "log_file"}
KEYS = {
    "openai": CLIENT_KEYS | {"kind", "cache"},
    "local": (CLIENT_KEYS - {"base_url"}) | {"kind", "cache", "server"},  # base_url: the started server
    "rule": {"kind"},
}


class Judge(Protocol):
    """What the reward and the evaluation code need from any judge."""

    def score(self, items: list[JudgeItem]) -> list[float | None]: ...
    def stats(self) -> dict[str, float]: ...
    def close(self) -> None: ...
    def __enter__(self) -> "Judge": ...
    def __exit__(self, *exc) -> None: ...


class LocalJudge:
    """Starts a llama.cpp server for a pinned GGUF on first use (or on enter) and judges through OpenAIJudge."""

    def __init__(self, settings: ClientSettings, cache: JudgeCache | None, server_cfg: Mapping, cache_dir: Path):
        self.settings = settings
        self.cache = cache
        self.server_cfg = dict(server_cfg)
        self.cache_dir = Path(cache_dir)
        self.server: LocalLlamaServer | None = None
        self.client: OpenAIJudge | None = None

    def start(self) -> "LocalJudge":
        if self.client is not None:
            return self
        cfg = self.server_cfg
        unknown = set(cfg) - SERVER_KEYS
        if unknown:
            raise ConfigError(f"judge.server: unknown keys {sorted(unknown)}; expected some of {sorted(SERVER_KEYS)}")
        require_llama_server()  # fail before assembling a 491 MB file
        model_path = judge_gguf(str(cfg.get("gguf", "qwen2.5-coder-0.5b-instruct-q4_k_m")), self.cache_dir)
        log_file = cfg.get("log_file") or self.cache_dir / "logs" / "judge_server.log"
        self.server = LocalLlamaServer(
            model_path, self.settings.model, host=cfg.get("host", "127.0.0.1"), port=cfg.get("port"),
            n_ctx=int(cfg.get("n_ctx", 2048)), n_threads=int(cfg.get("n_threads", 2)),
            logits_all=bool(cfg.get("logits_all", True)), startup_timeout_s=float(cfg.get("startup_timeout_s", 120)),
            log_path=Path(log_file),
        ).start()
        atexit.register(self.close)
        settings = dataclasses.replace(self.settings, base_url=self.server.base_url,
                                       start_hint=f"the local judge server died; see its log {self.server.log_path}")
        self.client = OpenAIJudge(settings, self.cache)
        return self

    def score(self, items: list[JudgeItem]) -> list[float | None]:
        return self.start().client.score(items)

    def stats(self) -> dict[str, float]:
        stats = self.client.stats() if self.client is not None else {
            "judge/calls": 0.0, "judge/cache_hit_rate": 0.0, "judge/failures": 0.0, "judge/latency_s": 0.0}
        if self.server is not None and self.server.startup_s is not None:
            stats["judge/server_startup_s"] = self.server.startup_s
        return stats

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.server is not None:
            self.server.stop()
            self.server = None
        atexit.unregister(self.close)

    def __enter__(self) -> "LocalJudge":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def _plain(cfg) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:
        pass
    return dict(cfg)


def _settings(cfg: dict) -> ClientSettings:
    fields = {k: v for k, v in cfg.items() if k in CLIENT_KEYS}
    if not fields.get("model"):
        raise ConfigError("judge.model: missing; name the model the judge server serves")
    fields.setdefault("base_url", "")
    return ClientSettings(**fields)


def _cache(cfg: dict, cache_dir: Path) -> JudgeCache | None:
    cache_cfg = cfg.get("cache") or {}
    if not cache_cfg.get("enabled", True):
        return None
    return JudgeCache(cache_cfg.get("path") or cache_dir / "judge_cache.sqlite")


def build_judge(judge_cfg, cache_dir: str | Path) -> Judge:
    """The judge that `conf/judge/<name>.yaml` describes: kind openai | local | rule."""
    cfg = _plain(judge_cfg)
    kind = cfg.get("kind")
    if kind not in KEYS:
        raise ConfigError(f"judge.kind: {kind!r} is not one of {sorted(KEYS)}")
    unknown = set(cfg) - KEYS[kind]
    if unknown:
        raise ConfigError(f"judge: unknown keys {sorted(unknown)} for kind={kind}; expected some of {sorted(KEYS[kind])}")
    cache_dir = Path(cache_dir)
    if kind == "rule":
        return RuleJudge()
    if kind == "openai":
        if not cfg.get("base_url"):
            raise ConfigError("judge.base_url: missing; e.g. http://127.0.0.1:8085/v1 for a local vLLM server")
        return OpenAIJudge(_settings(cfg), _cache(cfg, cache_dir))
    return LocalJudge(_settings(cfg), _cache(cfg, cache_dir), cfg.get("server") or {}, cache_dir)
