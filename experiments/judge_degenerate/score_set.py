"""The issue's acceptance check through `medix.score` itself: write one split of the labelled harvest (labels.jsonl)
as medix.score input, or read medix.score's output back and count how many degenerate outputs got judge credit.

    python -m experiments.judge_degenerate.score_set write --split check /tmp/degenerate_check.jsonl
    python -m medix.score reward=composite judge=local input=/tmp/degenerate_check.jsonl output=/tmp/scored.jsonl
    python -m experiments.judge_degenerate.score_set compare /tmp/degenerate_check.jsonl /tmp/scored.jsonl

Rows keep the completion exactly as the policy wrote it, its solution, whether sampling hit the token cap
(`truncated`, a reward column as in training) and the question (a benchmark prompt is rebuilt from its id).
"""

from __future__ import annotations

import json
from pathlib import Path

from experiments.judge_agreement.score_pairs import cli
from experiments.judge_degenerate.mcq_prompts import BENCHMARKS, items, problem

LABELS = Path(__file__).resolve().parent / "labels.jsonl"
ANSWER = "answer"  # the label of a real attempt at an answer (right or wrong), not degenerate


def load(path: Path = LABELS) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write(split: str, out: Path, benchmarks: Path = BENCHMARKS) -> int:
    rows = [r for r in load() if r["split"] == split]
    bench = items(benchmarks) if any(r.get("question_ref") for r in rows) else {}
    with out.open("w") as f:
        for r in rows:
            question = r.get("question") or problem(bench[r["question_ref"]])
            f.write(json.dumps({"id": r["id"], "question": question, "completion": r["completion"],
                                "solution": r["solution"], "truncated": r["truncated"], "label": r["label"]},
                               ensure_ascii=False) + "\n")
    return len(rows)


def compare(inputs: Path, outputs: Path) -> dict:
    labels = {r["id"]: r["label"] for r in load(inputs)}
    degenerate: dict[str, list[int]] = {}
    answers = {"rows": 0, "guarded": 0, "judge_yes": 0}
    credited, failed = [], 0
    for row in load(outputs):
        label, verdict = labels[row["id"]], row["llm_judge"]
        failed += verdict is None
        if label == ANSWER:
            answers["rows"] += 1
            answers["guarded"] += bool(row.get("guarded"))
            answers["judge_yes"] += bool(verdict)
            continue
        got_credit = bool(verdict)  # > 0 (a failed call, None, is no credit; it is counted in judge_failures)
        degenerate.setdefault(label, []).append(int(got_credit))
        if got_credit:
            credited.append(row["id"])
    n = sum(len(v) for v in degenerate.values())
    return {"degenerate": n, "judge_credit": len(credited), "judge_credit_share": len(credited) / max(n, 1),
            "credited_ids": credited, "judge_failures": failed,
            "by_kind": {k: f"{sum(v)}/{len(v)}" for k, v in sorted(degenerate.items())},
            "answers": answers}


if __name__ == "__main__":
    cli(write, compare, "rows", __doc__.splitlines()[0])
