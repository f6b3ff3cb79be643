"""Hugging Face hub benchmarks: map a dataset row to the normalised record schema via a task's `fields` mapping."""

from __future__ import annotations

from typing import Any

from medix.errors import ConfigError, DataError


def _column(row: dict, column: str, task: str, index: int) -> Any:
    if column not in row:
        raise DataError(f"{task} row {index}: hub column {column!r} is missing (columns: {sorted(row)})")
    return row[column]


def hub_record(row: dict, fields: dict, task: str, index: int) -> dict:
    """A normalised record (id, question, choices, answer, answer_label, image, contexts, long_answer) from a hub row.

    `fields` keys: question | question_template, contexts, choices (column list, one list/dict column, or
    literal option texts under choice_values), answer | answer_index (0-based) | answer_label, long_answer, image.
    """
    if fields.get("question_template"):
        question = fields["question_template"].format(**row)
    else:
        question = str(_column(row, fields["question"], task, index))
    contexts = None
    if fields.get("contexts"):
        contexts = _column(row, fields["contexts"], task, index)
        if isinstance(contexts, dict):  # bigbio/pubmed_qa style {"contexts": [...], "labels": [...]}
            contexts = contexts.get("contexts")
        contexts = [contexts] if isinstance(contexts, str) else [str(c) for c in contexts]
    choices = None
    if fields.get("choice_values"):
        choices = [str(c) for c in fields["choice_values"]]
    elif isinstance(fields.get("choices"), str):
        value = _column(row, fields["choices"], task, index)
        choices = [str(c) for c in (value.values() if isinstance(value, dict) else value) if c is not None]
    elif fields.get("choices"):
        choices = [str(_column(row, c, task, index)) for c in fields["choices"]]
    label = None
    if fields.get("answer_index"):
        position = int(_column(row, fields["answer_index"], task, index))
        if choices is None or not 0 <= position < len(choices):
            raise DataError(f"{task} row {index}: {fields['answer_index']}={position} is not an option index")
        answer, label = choices[position], "ABCDEFGHIJ"[position]
    elif fields.get("answer_label"):
        label = str(_column(row, fields["answer_label"], task, index)).strip()
        answer = choices["ABCDEFGHIJ".index(label)] if choices and label in "ABCDEFGHIJ"[: len(choices)] else None
        if answer is None:
            raise DataError(f"{task} row {index}: {fields['answer_label']}={label!r} is not an option letter")
    elif fields.get("answer"):
        answer = str(_column(row, fields["answer"], task, index))
        if choices and answer in choices:
            label = "ABCDEFGHIJ"[choices.index(answer)]
    else:
        raise ConfigError(f"benchmark.tasks.{task}.fields needs one of answer, answer_index, answer_label")
    return {
        "id": f"{task}-{index}",
        "question": question,
        "choices": choices,
        "answer": answer,
        "answer_label": label,
        "contexts": contexts,
        "long_answer": str(_column(row, fields["long_answer"], task, index)) if fields.get("long_answer") else None,
        "image": _column(row, fields["image"], task, index) if fields.get("image") else None,
        "modality": None,
    }


def row_selected(row: dict, keep: dict | None) -> bool:
    """Whether a hub row passes the task's `filter` (column -> required value), e.g. SLAKE's q_lang: en."""
    return all(row.get(column) == value for column, value in (keep or {}).items())


def load_hub_records(task: str, spec: dict, limit: int | None) -> list[dict]:
    """Download (or read from the HF cache) a task's split and map its rows; needs network on first use."""
    from datasets import load_dataset

    hub = spec["hub"]
    if not hub or not hub.get("path"):
        raise ConfigError(f"benchmark.tasks.{task}.hub.path is not set; use benchmark.data_dir for a local copy")
    dataset = load_dataset(hub["path"], name=hub.get("name"), split=hub.get("split", "test"))
    records = []
    for index, row in enumerate(r for r in dataset if row_selected(r, spec.get("filter"))):
        if limit is not None and len(records) >= limit:
            break
        records.append(hub_record(row, spec["fields"], task, index))
    return records
