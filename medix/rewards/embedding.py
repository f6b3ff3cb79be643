"""The embedding component: sentence-embedding similarity of predicted and reference answers (sentence-transformers)."""

from __future__ import annotations

import importlib
import os
from functools import lru_cache
from pathlib import Path

from medix.errors import ConfigError
from medix.rewards.components import answers_to_score

MODES = ("binary", "continuous")


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


def resolve_device(device: str) -> str:
    """`auto`: this process's GPU (LOCAL_RANK under DDP) when there is one, else cpu."""
    if device != "auto":
        return device
    import torch

    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"


class Embedder:
    """Cosine similarity of text pairs; every call encodes all its texts in one batched `encode`. The model is
    loaded on first use."""

    def __init__(self, *, name: str = "", model: str | None = None, package: str | None = None, device: str = "auto",
                 batch_size: int = 64):
        if batch_size < 1:
            raise ConfigError(f"embedder.batch_size={batch_size} must be >= 1")
        self.model_path = model_path_of(model, package)
        self.name = name or self.model_path
        self.device = device
        self.batch_size = batch_size
        self.encode_calls = 0

    @property
    def model(self):
        return load_sentence_model(self.model_path, resolve_device(self.device))

    def similarity(self, a: list[str], b: list[str]) -> list[float]:
        """cos(a[i], b[i]) for every i, from one encode call over the distinct texts of both lists."""
        if len(a) != len(b):
            raise ValueError(f"similarity needs lists of equal length, got {len(a)} and {len(b)}")
        if not a:
            return []
        texts = list(dict.fromkeys([*a, *b]))
        row = {text: i for i, text in enumerate(texts)}
        self.encode_calls += 1
        vectors = self.model.encode(texts, batch_size=self.batch_size, convert_to_tensor=True,
                                    normalize_embeddings=True, show_progress_bar=False)
        left = vectors[[row[t] for t in a]]
        right = vectors[[row[t] for t in b]]
        return (left * right).sum(dim=-1).tolist()


def model_path_of(model: str | None, package: str | None) -> str:
    """The model folder from `embedder.package` (a module with get_model_path()) or else the `embedder.model` id."""
    if package:
        try:
            module = importlib.import_module(package)
        except ImportError as err:
            raise ConfigError(f"embedder.package={package!r} cannot be imported ({err}); install it or set "
                              "embedder.package=null and embedder.model=<hub id or folder>") from err
        return str(Path(module.get_model_path()))
    if not model:
        raise ConfigError("embedder.model and embedder.package are both empty; set one (e.g. embedder=minilm)")
    return str(model)


def embedding_score(cosine: float, threshold: float, mode: str) -> float:
    """binary: 1.0 iff cosine >= threshold; continuous: cosine clipped to [0, 1]."""
    if mode == "continuous":
        return min(1.0, max(0.0, cosine))
    return 1.0 if cosine >= threshold else 0.0


class EmbeddingReward:
    """Garbage answers score 0 and exact matches 1 without the model; the rest of the batch in one similarity call."""

    def __init__(self, embedder: Embedder, *, threshold: float = 0.8, mode: str = "binary"):
        if mode not in MODES:
            raise ConfigError(f"reward.components.embedding.mode={mode!r}; expected one of {', '.join(MODES)}")
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"reward.components.embedding.threshold={threshold} must lie in [0, 1]")
        self.embedder, self.threshold, self.mode = embedder, threshold, mode

    def __call__(self, completions: list[str], solutions: list[str], **columns) -> list[float | None]:
        predictions, references, scores, open_rows = answers_to_score(completions, solutions)
        if open_rows:
            cosines = self.embedder.similarity([predictions[i] for i in open_rows], [references[i] for i in open_rows])
            for i, cosine in zip(open_rows, cosines):
                scores[i] = embedding_score(cosine, self.threshold, self.mode)
        return scores
