"""`python -m medix.score input=<jsonl> output=<jsonl>`: score a JSONL of completions with the configured reward."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from medix.data.tags import split_solution
from medix.errors import ConfigError, DataError, MedixError
from medix.rewards import COMPONENTS, build_reward
from medix.rewards.composite import validate_weights

USAGE = "python -m medix.score input=<completions.jsonl> output=<scores.jsonl> [judge=... reward=... ...]"


def _text_field(row: dict, field: str, line_no: int, *, required: bool) -> str | None:
    value = row.get(field)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        shown = "missing" if field not in row else f"of type {type(value).__name__}"
        raise DataError(f"input line {line_no}: field {field!r} is {shown}; expected a string")
    return value


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSONL file: completion, solution ("<TAG> answer"), id (default: line number), question."""
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
        rows.append({
            "id": str(row["id"]) if row.get("id") is not None else str(line_no),
            "completion": _text_field(row, "completion", line_no, required=True),
            "solution": solution,
            "question": _text_field(row, "question", line_no, required=False),
        })
    return rows


def score_rows(rows: list[dict], reward) -> list[dict]:
    """One output record per row, in order: id, the four components and overall (None where not scored)."""
    batch = reward([r["completion"] for r in rows], [r["solution"] for r in rows], [r["question"] for r in rows])
    return [{"id": row["id"], **{c: batch.components[c][i] for c in COMPONENTS}, "overall": batch.overall[i]}
            for i, row in enumerate(rows)]


def run(cfg: DictConfig) -> dict[str, float]:
    """Read cfg.input, score it, write cfg.output; returns the reward metrics and the judge stats."""
    if not cfg.get("input") or not cfg.get("output"):
        missing = "input" if not cfg.get("input") else "output"
        raise ConfigError(f"{missing}= is required; usage: {USAGE}")
    weights = validate_weights(cfg.reward.weights)
    rows = read_rows(Path(cfg.input))
    if not rows:
        raise DataError(f"input={cfg.input} has no rows; expected one JSON object per line with completion and solution")
    embedder = None
    if weights["embedding"] > 0:
        from medix.rewards.embedding import build_embedder

        embedder = build_embedder(cfg.embedder)
    judge_context = contextlib.nullcontext(None)
    if weights["llm_judge"] > 0:
        from medix.judges import build_judge

        judge_context = build_judge(cfg.judge, cfg.paths.cache_dir)
    with judge_context as judge:
        reward = build_reward(cfg.reward, judge, embedder)
        records = score_rows(rows, reward) if rows else []
        stats = judge.stats() if judge is not None else {}
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    summary = {"rows": float(len(records))}
    for c in ("overall", *COMPONENTS):
        scored = [r[c] for r in records if r[c] is not None]
        if scored:
            summary[f"reward/{c}/mean"] = sum(scored) / len(scored)
    return {**summary, **stats}


@hydra.main(version_base="1.3", config_path="../conf", config_name="score")
def main(cfg: DictConfig) -> None:
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
