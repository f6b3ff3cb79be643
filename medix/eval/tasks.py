"""Which tasks a `benchmark=` choice selects and where each reads its items (local JSONL, data_dir copy, or the hub)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from medix.errors import ConfigError, DataError
from medix.eval.items import BenchmarkItem, read_jsonl_records, to_item

SCORINGS = ("binary", "rubric")
MODALITIES = ("text", "vision", "auto")


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark task as configured under `benchmark.tasks.<name>`."""

    name: str
    source: str  # local | paper
    folder: str | None
    hub: dict | None
    fields: dict | None
    filter: dict | None
    scoring: str
    modality: str


def local_task_name(path: str | Path) -> str:
    """`vqa_rad` for `.../vqa_rad/test.jsonl`, else the file stem."""
    path = Path(path)
    return path.parent.name if path.stem == "test" and path.parent.name else path.stem


def task_specs(bench: DictConfig) -> list[TaskSpec]:
    """The tasks of a benchmark config, in config order; checks scoring/modality names."""
    tasks = bench.get("tasks")
    if not tasks:
        raise ConfigError("benchmark.tasks is empty; pick benchmark=<task|text|vision|all|local>")
    specs = []
    for name, raw in tasks.items():
        raw = OmegaConf.to_container(raw, resolve=True)
        if raw["scoring"] not in SCORINGS:
            raise ConfigError(f"benchmark.tasks.{name}.scoring={raw['scoring']!r}; expected one of {SCORINGS}")
        if raw["modality"] not in MODALITIES:
            raise ConfigError(f"benchmark.tasks.{name}.modality={raw['modality']!r}; expected one of {MODALITIES}")
        if raw["source"] == "local":
            if not bench.get("path"):
                raise ConfigError("benchmark=local needs benchmark.path=<file.jsonl>: one JSON object per line with "
                                  "id, question, answer (and optional choices, answer_label, image, contexts, "
                                  "modality), as medix/eval/items.py checks")
            name = bench.get("name") or local_task_name(bench.path)
        specs.append(TaskSpec(name=str(name), source=raw["source"], folder=raw.get("folder"), hub=raw.get("hub"),
                              fields=raw.get("fields"), filter=raw.get("filter"), scoring=raw["scoring"],
                              modality=raw["modality"]))
    return specs


def local_file(spec: TaskSpec, bench: DictConfig) -> Path | None:
    """The JSONL a task reads, or None when it comes from the hub."""
    if spec.source == "local":
        return Path(bench.path)
    if bench.get("data_dir"):
        if not spec.folder:
            return Path(bench.data_dir) / f"<no local folder for {spec.name}>" / "test.jsonl"
        return Path(bench.data_dir) / spec.folder / "test.jsonl"
    return None


def task_modality(spec: TaskSpec, records: list[dict]) -> str:
    """`auto` becomes vision when any item has an image or a modality tag."""
    if spec.modality != "auto":
        return spec.modality
    return "vision" if any(r.get("image") or r.get("modality") for r in records) else "text"


def load_task(spec: TaskSpec, bench: DictConfig) -> tuple[list[BenchmarkItem], str] | None:
    """The items of a task (first benchmark.limit) and its modality; None when missing and benchmark.missing=skip."""
    limit = bench.get("limit")
    path = local_file(spec, bench)
    if path is None:
        from medix.eval.hub import load_hub_records

        records = load_hub_records(spec.name, {"hub": spec.hub, "fields": spec.fields, "filter": spec.filter}, limit)
        if not records:
            raise DataError(f"{spec.name}: hub split {spec.hub} has no items")
    else:
        if not path.is_file() and bench.get("missing", "error") == "skip" and spec.source != "local":
            return None
        records = read_jsonl_records(path, limit)
    return [to_item(r, spec.name) for r in records], task_modality(spec, records)
