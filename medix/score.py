"""`python -m medix.score input=<jsonl> output=<jsonl>`: score a JSONL of completions with the configured reward."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from medix.config import register_configs
from medix.console import quiet_third_party_logs
from medix.data.tags import split_solution
from medix.errors import ConfigError, DataError, MedixError
from medix.instantiate import build

USAGE = "python -m medix.score input=<completions.jsonl> output=<scores.jsonl> [judge=... reward=... ...]"
register_configs()


def _text_field(row: dict, field: str, line_no: int, *, required: bool) -> str | None:
    value = row.get(field)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        shown = "missing" if field not in row else f"of type {type(value).__name__}"
        raise DataError(f"input line {line_no}: field {field!r} is {shown}; expected a string")
    return value


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSONL file: completion, solution ("<TAG> answer"), id (default: the line number), question,
    and any other field (given to the reward components as a column of that name)."""
    if not path.is_file():
        raise ConfigError(f"input={path} does not exist; expected a JSONL file of completions")
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"input line {line_no}: not valid JSON ({err.msg}); expected one JSON object") from None
        if not isinstance(row, dict):
            raise DataError(f"input line {line_no}: a JSON {type(row).__name__}, not an object")
        solution = _text_field(row, "solution", line_no, required=True)
        try:
            split_solution(solution)
        except ValueError as err:
            raise DataError(f"input line {line_no}: field 'solution': {err}") from None
        if row.get("id") is not None and not isinstance(row["id"], (str, int)):
            kind = type(row["id"]).__name__
            raise DataError(f"input line {line_no}: field 'id' is of type {kind}; expected a string")
        rows.append({**row, "id": str(row["id"]) if row.get("id") is not None else str(line_no),
                     "completion": _text_field(row, "completion", line_no, required=True), "solution": solution,
                     "question": _text_field(row, "question", line_no, required=False)})
    return rows


def columns_of(rows: list[dict]) -> dict[str, list]:
    """The per-row columns the reward components receive: questions, ids, and every other field by its name."""
    extra = sorted({k for row in rows for k in row} - {"completion", "solution", "question", "id"})
    columns = {"questions": [r["question"] for r in rows], "ids": [r["id"] for r in rows]}
    columns.update({key: [r.get(key) for r in rows] for key in extra})
    return columns


def score_rows(rows: list[dict], reward) -> tuple[list[dict], dict[str, float]]:
    """One output record per row, in order (id, every component and overall; None where not scored; with the
    degenerate guard, `guarded`: its reason or None), and the mean of each (and reward/guarded_share)."""
    from medix.rewards.statistics import reward_metrics

    batch = reward([r["completion"] for r in rows], [r["solution"] for r in rows], **columns_of(rows))
    records = [{"id": row["id"], **{c: batch.components[c][i] for c in batch.components}, "overall": batch.overall[i]}
               for i, row in enumerate(rows)]
    if batch.guarded is not None:
        for record, reason in zip(records, batch.guarded):
            record["guarded"] = reason
    return records, {k: v for k, v in reward_metrics(batch).items() if k.endswith("/mean") or k.endswith("_share")}


def run(cfg: DictConfig) -> dict[str, float]:
    """Read cfg.input, score it, write cfg.output; returns the reward means and the judge statistics."""
    if not cfg.get("input") or not cfg.get("output"):
        missing = "input" if not cfg.get("input") else "output"
        raise ConfigError(f"{missing}= is required; usage: {USAGE}")
    with build(cfg.reward) as reward:  # a bad reward config fails before any input is read
        rows = read_rows(Path(cfg.input))
        if not rows:
            raise DataError(f"input={cfg.input} has no rows; expected one JSON object per line with completion and "
                            "solution")
        records, means = score_rows(rows, reward)
        stats = reward.stats()
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return {"rows": float(len(records)), **means, **stats}


@hydra.main(version_base="1.3", config_path="../conf", config_name="score")
def main(cfg: DictConfig) -> None:
    quiet_third_party_logs(verbose=False)
    try:
        summary = run(cfg)
    except MedixError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {int(summary.pop('rows'))} scored lines to {cfg.output}")
    for key, value in summary.items():
        print(f"{key}: {value:.4g}")


if __name__ == "__main__":
    main()
