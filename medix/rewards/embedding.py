"""Sentence-embedding similarity between predicted and reference answers (sentence-transformers, offline)."""

from __future__ import annotations

import importlib
from functools import lru_cache
from pathlib import Path

from medix.errors import ConfigError


@lru_cache(maxsize=4)
def load_sentence_model(model_path: str, device: str):
    """The SentenceTransformer at `model_path` (a folder or a hub id already in the local cache), once per process."""
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(model_path, device=device, local_files_only=True)
    except OSError as err:
        raise ConfigError(
            f"embedder model {model_path!r} is not available offline ({err.__class__.__name__}); download it into "
            "the Hugging Face cache first, or use embedder=minilm (bundled)"
        ) from err


class Embedder:
    """Cosine similarity of text pairs; every call encodes all its texts in one batched `encode`."""

    def __init__(self, model_path: str, *, name: str = "", device: str = "cpu", batch_size: int = 64):
        self.name = name or model_path
        self.model_path = model_path
        self.device = device
        self.batch_size = batch_size
        self.encode_calls = 0

    @property
    def model(self):
        return load_sentence_model(self.model_path, self.device)

    def similarity(self, a: list[str], b: list[str]) -> list[float]:
        """cos(a[i], b[i]) for every i, from one encode call over the distinct texts of both lists."""
        if len(a) != len(b):
            raise ValueError(f"similarity needs lists of equal length, got {len(a)} and {len(b)}")
        if not a:
            return []
        texts = list(dict.fromkeys([*a, *b]))
        row = {text: i for i, text in enumerate(texts)}
        self.encode_calls += 1
        vectors = self.model.encode(
            texts, batch_size=self.batch_size, convert_to_tensor=True, normalize_embeddings=True,
            show_progress_bar=False,
        )
        left = vectors[[row[t] for t in a]]
        right = vectors[[row[t] for t in b]]
        return (left * right).sum(dim=-1).tolist()


def resolve_model_path(embedder_cfg) -> str:
    """The model folder from `embedder.package` (a module with get_model_path()) or else the `embedder.model` id."""
    package = embedder_cfg.get("package")
    if package:
        try:
            module = importlib.import_module(package)
        except ImportError as err:
            raise ConfigError(
                f"embedder.package={package!r} cannot be imported ({err}); install it or set embedder.package=null "
                "and embedder.model=<hub id or folder>"
            ) from err
        return str(Path(module.get_model_path()))
    model = embedder_cfg.get("model")
    if not model:
        raise ConfigError("embedder.model and embedder.package are both empty; set one (e.g. embedder=minilm)")
    return str(model)


def build_embedder(embedder_cfg) -> Embedder:
    """An Embedder from an `embedder/*.yaml` config (keys name, model, package, device, batch_size)."""
    batch_size = int(embedder_cfg.get("batch_size", 64))
    if batch_size < 1:
        raise ConfigError(f"embedder.batch_size={batch_size} must be >= 1")
    return Embedder(
        resolve_model_path(embedder_cfg),
        name=str(embedder_cfg.get("name") or ""),
        device=str(embedder_cfg.get("device", "cpu")),
        batch_size=batch_size,
    )
