"""Join harvested candidates (harvest.py) with their hand labels into labels.jsonl, split into tune and check by
prompt group: every completion of one prompt at one step of one run falls in the same half (the 8 completions of a
group are often near-copies, which would leak between halves if rows were split one by one).

    python -m experiments.judge_degenerate.labelled_set --candidates c1.jsonl c2.jsonl --labels l1.jsonl l2.jsonl

A question from the project's own prompts (medix_mini) is kept; one from ../shared/benchmarks only by its id.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from experiments.judge_degenerate.score_set import LABELS, load

MEDIX_MINI = Path(__file__).resolve().parents[2] / "medix" / "data" / "medix_mini.jsonl"


def split_of(row: dict) -> str:
    group = f"{row['run']}/{row['step']}/{row['prompt_id']}"
    return "tune" if hashlib.sha256(group.encode()).digest()[0] % 2 == 0 else "check"


def read(paths: list[Path]) -> list[dict]:
    return [row for path in paths for row in load(path)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=Path, nargs="+", required=True)
    parser.add_argument("--labels", type=Path, nargs="+", required=True)
    parser.add_argument("--out", type=Path, default=LABELS)
    args = parser.parse_args()
    questions = {r["id"]: r["problem"] for r in read([MEDIX_MINI])}
    labels = {r["id"]: r for r in read(args.labels)}
    rows = []
    for c in read(args.candidates):
        hand = labels[c["id"]]  # every candidate is labelled
        where = {"question": questions[c["prompt_id"]]} if c["source"] == "medix_mini" else {
            "question_ref": c["prompt_id"]}
        rows.append({"id": c["id"], "split": split_of(c), "label": hand["label"], "correct": hand["correct"],
                     "note": hand.get("note", ""), **where, "completion": c["completion"], "solution": c["solution"],
                     "truncated": c["truncated"], "truncated_from": c["truncated_from"],
                     "experiment": c["experiment"], "run": c["run"], "prompt_id": c["prompt_id"],
                     "step": c["step"], "judge_in_run": c["judge_in_run"]})
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{len(rows)} rows -> {args.out}: " + ", ".join(
        f"{s} {sum(r['split'] == s for r in rows)} ({sum(r['split'] == s and r['label'] != 'answer' for r in rows)} "
        "degenerate)" for s in ("tune", "check")))


if __name__ == "__main__":
    main()
