"""Per-item results on disk (append-only JSONL, resumable) and the numbers and markdown table made from them."""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl_by_id(path: Path) -> dict[str, dict]:
    """Rows of a results JSONL keyed by id; a torn last line (killed mid-write) is ignored."""
    rows: dict[str, dict] = {}
    if not path.is_file():
        return rows
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "id" in row:
                rows[str(row["id"])] = row
    return rows


def end_on_newline(path: Path) -> None:
    """Close a torn last line left by a killed run, so the next appended row starts on its own line."""
    if path.is_file() and path.stat().st_size:
        with path.open("rb+") as handle:
            handle.seek(-1, 2)
            if handle.read(1) != b"\n":
                handle.write(b"\n")


class TaskResults:
    """`<output_dir>/<task>/items.jsonl` (judged items) and `predictions.jsonl` (generated, maybe not yet judged)."""

    def __init__(self, output_dir: str | Path, task: str):
        self.dir = Path(output_dir) / task
        self.dir.mkdir(parents=True, exist_ok=True)
        self.items_path = self.dir / "items.jsonl"
        self.predictions_path = self.dir / "predictions.jsonl"
        for path in (self.items_path, self.predictions_path):
            end_on_newline(path)
        self.items = read_jsonl_by_id(self.items_path)
        self.predictions = {k: v["prediction"] for k, v in read_jsonl_by_id(self.predictions_path).items()}

    @staticmethod
    def _append(path: Path, row: dict) -> None:
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            handle.flush()

    def add_prediction(self, item_id: str, prediction: str) -> None:
        self.predictions[item_id] = prediction
        self._append(self.predictions_path, {"id": item_id, "prediction": prediction})

    def add_item(self, row: dict) -> None:
        self.items[str(row["id"])] = row
        self._append(self.items_path, row)


def task_accuracy(scores: list[float]) -> float:
    """Mean item score (binary: fraction judged correct; rubric: mean of score/5)."""
    return sum(scores) / len(scores) if scores else 0.0


def macro_average(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summary_metrics(task_rows: dict[str, list[dict]], modalities: dict[str, str]) -> dict[str, float]:
    """`eval/<task>/accuracy|items|parse_failures|option_echoes` (multiple-choice answers naming several options,
    scored 0), and macro averages `eval/overall|text|vision` over tasks."""
    metrics: dict[str, float] = {}
    accuracy: dict[str, float] = {}
    for task, rows in task_rows.items():
        accuracy[task] = task_accuracy([float(r["score"]) for r in rows])
        metrics[f"eval/{task}/accuracy"] = accuracy[task]
        metrics[f"eval/{task}/items"] = float(len(rows))
        metrics[f"eval/{task}/parse_failures"] = float(sum(int(r.get("parse_failures", 0)) for r in rows))
        metrics[f"eval/{task}/option_echoes"] = float(sum(bool(r.get("option_echo")) for r in rows))
    for name, tasks in (("overall", list(accuracy)),
                        ("text", [t for t in accuracy if modalities[t] == "text"]),
                        ("vision", [t for t in accuracy if modalities[t] == "vision"])):
        value = macro_average([accuracy[t] for t in tasks])
        if value is not None:
            metrics[f"eval/{name}"] = value
    return metrics


def results_markdown(metrics: dict[str, float], modalities: dict[str, str], title: str = "") -> str:
    """A markdown table: one row per task (accuracy in %), then the text/vision/overall macro averages."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| task | modality | items | accuracy (%) |", "|---|---|---:|---:|"]
    for task, modality in modalities.items():
        lines.append(f"| {task} | {modality} | {int(metrics[f'eval/{task}/items'])} "
                     f"| {100 * metrics[f'eval/{task}/accuracy']:.2f} |")
    for name in ("text", "vision", "overall"):
        if f"eval/{name}" in metrics:
            lines.append(f"| **{name}** (macro) | | | **{100 * metrics[f'eval/{name}']:.2f}** |")
    return "\n".join(lines) + "\n"
