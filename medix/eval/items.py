"""Benchmark items: the normalised record schema (one JSON object per line: id, question, answer; optional choices,
answer_label, image, contexts, long_answer, modality), its checks, and what model and judge see."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medix.errors import DataError

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class BenchmarkItem:
    """One evaluation item: `question` is what the model sees, `reference` what the judge compares against."""

    id: str
    task: str
    question: str
    reference: str
    image: Any = None  # a file path, a PIL image, or None
    modality: str | None = None
    choices: tuple[str, ...] | None = None  # a multiple-choice item's options, in letter order


def question_text(record: dict) -> str:
    """The question shown to the model: PubMedQA contexts first, MCQ options appended as `A. ...` lines."""
    text = record["question"].strip()
    contexts = record.get("contexts")
    if contexts:
        text = "Contexts:\n" + "\n".join(c.strip() for c in contexts) + "\n\nQuestion:\n" + text
    choices = record.get("choices")
    if choices:
        text += "\n\nChoices:" + "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return text


def reference_text(record: dict) -> str:
    """The judge's reference: `final_decision + long_answer` (PubMedQA), `X. option text` (MCQ), else the answer."""
    answer = record["answer"].strip()
    if record.get("long_answer"):
        return f"{answer}\n{record['long_answer'].strip()}"
    if record.get("answer_label"):
        return f"{record['answer_label']}. {answer}"
    return answer


def to_item(record: dict, task: str) -> BenchmarkItem:
    return BenchmarkItem(
        id=str(record["id"]),
        task=task,
        question=question_text(record),
        reference=reference_text(record),
        image=record.get("image"),
        modality=record.get("modality"),
        choices=tuple(record["choices"]) if record.get("choices") else None,
    )


def _fail(where: str, message: str):
    raise DataError(f"{where}: {message}")


def check_record(record: Any, where: str) -> dict:
    """Validate one normalised record (raising DataError naming `where` and the field); fills a missing label."""
    if not isinstance(record, dict):
        _fail(where, f"expected a JSON object, got {type(record).__name__}")
    for key in ("id", "question", "answer"):
        value = record.get(key)
        if key == "id" and isinstance(value, int):
            continue
        if not isinstance(value, str) or not value.strip():
            _fail(where, f"field {key!r} must be a non-empty string, got {value!r}")
    choices = record.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            _fail(where, f"field 'choices' must be null or a list of at least 2 strings, got {choices!r}")
        if len(choices) > len(LETTERS):
            _fail(where, f"field 'choices' has {len(choices)} options; at most {len(LETTERS)} are supported")
        label = record.get("answer_label")
        if label is None:
            if record["answer"] in choices:
                record = {**record, "answer_label": LETTERS[choices.index(record["answer"])]}
        elif not (isinstance(label, str) and len(label) == 1 and label in LETTERS[: len(choices)]):
            _fail(where, f"field 'answer_label' must be one of {list(LETTERS[: len(choices)])}, got {label!r}")
        elif choices[LETTERS.index(label)].strip() != record["answer"].strip():
            _fail(where, f"field 'answer_label'={label!r} names option {choices[LETTERS.index(label)]!r}, "
                         f"but 'answer' is {record['answer']!r}")
    contexts = record.get("contexts")
    if contexts is not None and not (isinstance(contexts, list) and all(isinstance(c, str) for c in contexts)):
        _fail(where, f"field 'contexts' must be null or a list of strings, got {type(contexts).__name__}")
    for key in ("image", "long_answer", "modality"):
        if record.get(key) is not None and not isinstance(record[key], str):
            _fail(where, f"field {key!r} must be null or a string, got {record[key]!r}")
    return record


def read_jsonl_records(path: str | Path, limit: int | None = None) -> list[dict]:
    """Checked records of a benchmark JSONL (first `limit`); images resolved against the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"benchmark file {str(path)!r} does not exist")
    records: list[dict] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if limit is not None and len(records) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
            record = check_record(record, where)
            if str(record["id"]) in seen:
                _fail(where, f"field 'id' {record['id']!r} appears twice")
            seen.add(str(record["id"]))
            if record.get("image"):
                image = path.parent / record["image"]
                if not image.is_file():
                    _fail(where, f"field 'image' {record['image']!r} not found at {image}")
                record = {**record, "image": str(image)}
            records.append(record)
    if not records:
        raise DataError(f"benchmark file {str(path)!r} has no items")
    return records
