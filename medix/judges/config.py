"""Typed schemas of `conf/judge/*.yaml`: one dataclass per judge class, every field an argument of its constructor.

Each judge yaml starts its defaults list with `_schema_openai`, `_schema_local` or `_schema_rule`, so a misspelt or
unknown key fails when the config is composed, naming the key; `hydra.utils.instantiate(cfg.judge)` builds the judge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class JudgeCacheConfig:
    enabled: bool = True
    path: Optional[str] = None  # None = <cache_dir>/judge_cache.sqlite


@dataclass
class ClientConfig:
    """What every LLM judge reads; a conf/judge choice says only what differs."""

    _convert_: str = "all"  # the constructor gets plain dicts (extra_body is sent as JSON)
    model: str = MISSING  # also the name the server answers to
    api_key: str = "EMPTY"
    temperature: float = 0.0
    max_tokens: int = 4  # the paper asks for 4 tokens: "YES" / "NO"
    scoring: str = "text"  # text: parse the reply | logprob: P(YES)/(P(YES)+P(NO)) from the first token
    # strict: only a leading YES/NO counts, else a counted failure | contains: 1 iff the reply contains YES (the
    # paper's parser; set it to reproduce the paper). Read with scoring=text.
    parser: str = "strict"
    top_logprobs: int = 10  # scoring=logprob
    yes_threshold: float = 0.5  # scoring=logprob: the verdict is YES (1.0) iff P(YES)/(P(YES)+P(NO)) >= this
    # None = the paper's wording, the prediction delimited; else a string with {question} {prediction} {reference}
    template: Optional[str] = None
    max_prediction_chars: Optional[int] = 2000  # longer predictions are cut before the judge (training and eval)
    max_concurrency: int = 8  # requests in flight, shared by all ranks of a DDP/FSDP run
    timeout_s: float = 30.0  # per HTTP request
    max_retries: int = 3  # the openai SDK's retries (exponential backoff from 0.5 s, max 8 s, Retry-After honoured)
    on_failure: str = "exclude"  # exclude: None (left out of the group baseline) | zero: 0.0 (the paper) | raise
    max_failure_rate: float = 0.5
    failure_window: int = 50  # the rate is checked once this many recent judge calls are recorded
    extra_body: Any = None  # a JSON object merged into every request body; add keys with +judge.extra_body.<key>=...
    cache: JudgeCacheConfig = field(default_factory=JudgeCacheConfig)
    cache_dir: str = "${paths.cache_dir}"


@dataclass
class OpenAIJudgeConfig(ClientConfig):
    _target_: str = "medix.judges.client.OpenAIJudge"
    base_url: str = MISSING


@dataclass
class LocalServerConfig:
    gguf: str = "qwen2.5-coder-1.5b-instruct-q4_k_m"  # a known asset name (medix/judges/assets.py) or a .gguf path
    host: str = "127.0.0.1"
    port: Optional[int] = None  # None = a free port
    n_ctx: int = 2048
    n_threads: int = 2
    logits_all: bool = True  # needed for scoring=logprob
    startup_timeout_s: float = 120.0
    log_file: Optional[str] = None  # None = <cache_dir>/logs/judge_server.log


@dataclass
class LocalJudgeConfig(ClientConfig):
    _target_: str = "medix.judges.local.LocalJudge"
    server: LocalServerConfig = field(default_factory=LocalServerConfig)


@dataclass
class RuleJudgeConfig:
    _target_: str = "medix.judges.rule.RuleJudge"


SCHEMAS = {"openai": OpenAIJudgeConfig, "local": LocalJudgeConfig, "rule": RuleJudgeConfig}


def register(cs: ConfigStore) -> None:
    """Store the schemas as `judge/_schema_<kind>` (safe to call again)."""
    for kind, node in SCHEMAS.items():
        cs.store(group="judge", name=f"_schema_{kind}", node=node)
