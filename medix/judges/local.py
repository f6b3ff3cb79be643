"""judge=local: the judge client on llama.cpp's OpenAI-compatible server for a pinned GGUF, started by medix."""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

from medix.errors import ConfigError
from medix.judges.assets import judge_gguf
from medix.judges.client import OpenAIJudge
from medix.judges.config import LocalServerConfig
from medix.judges.local_server import LocalLlamaServer, SharedServer, require_llama_server

log = logging.getLogger(__name__)


class LocalJudge(OpenAIJudge):
    """An OpenAIJudge whose server medix starts at first use (or on enter): one llama.cpp server per node for every
    process that asks for the same settings (the ranks of a DDP/FSDP run share it), stopped by the last to close.
    `server` is `judge.server` (LocalServerConfig); the other arguments are OpenAIJudge's, without base_url."""

    local = True

    def __init__(self, model: str, server: dict | None = None, **client):
        super().__init__(model, **client)
        try:
            self.server = LocalServerConfig(**(server or {}))
        except TypeError as err:
            known = [f.name for f in dataclasses.fields(LocalServerConfig)]
            raise ConfigError(f"judge.server: {err}; expected some of {known}") from None
        if self.cache_dir is None:
            raise ConfigError("judge.cache_dir: missing; the local judge keeps its model, logs and server state there")
        self.shared: SharedServer | None = None
        self.startup_s: float | None = None  # seconds this process spent starting or joining the server

    def endpoint(self) -> str:
        require_llama_server()  # fail before assembling a 1 GB file
        settings = dataclasses.asdict(self.server)
        key = hashlib.sha256(json.dumps({**settings, "log_file": None, "model": self.model},
                                        sort_keys=True).encode()).hexdigest()[:16]
        self.shared = SharedServer(self.cache_dir / "judge_servers", key, self.model, self._start_server)
        started = time.perf_counter()
        log.info("judge: starting (or joining) the llama.cpp server for %s; the first start takes a minute", self.model)
        self.base_url = self.shared.acquire()
        self.startup_s = time.perf_counter() - started
        log.info("judge: server ready at %s after %.0f s", self.base_url, self.startup_s)
        atexit.register(self.close)
        return self.base_url

    def _start_server(self) -> LocalLlamaServer:
        cfg = self.server
        log_file = Path(cfg.log_file) if cfg.log_file else self.cache_dir / "logs" / "judge_server.log"
        return LocalLlamaServer(
            judge_gguf(cfg.gguf, self.cache_dir), self.model, host=cfg.host, port=cfg.port, n_ctx=cfg.n_ctx,
            n_threads=cfg.n_threads, logits_all=cfg.logits_all, startup_timeout_s=cfg.startup_timeout_s,
            log_path=log_file,
        ).start()

    def _start_hint(self) -> str:
        server = self.shared.server if self.shared else None
        log = server.log_path if server else "judge.server.log_file"
        ended = server.ended() if server else ""
        return f"the local judge server stopped answering{': it ' + ended if ended else ''}; see its log ({log})"

    def stats(self) -> dict[str, float]:
        stats = super().stats()
        if self.startup_s is not None:
            stats["judge/server_startup_s"] = self.startup_s
        return stats

    def close(self) -> None:
        super().close()
        shared, self.shared = self.shared, None
        if shared is not None:
            shared.release()
            self.base_url = None
        atexit.unregister(self.close)
