"""The issue's acceptance check through `medix.score` itself: write one split of pairs.jsonl as medix.score input,
or read medix.score's output back and compare `llm_judge` with the hand labels.

    python -m experiments.judge_agreement.score_pairs write --split check /tmp/check_in.jsonl
    python -m medix.score reward=llm_only judge=local input=/tmp/check_in.jsonl output=/tmp/check_out.jsonl
    python -m experiments.judge_agreement.score_pairs compare /tmp/check_in.jsonl /tmp/check_out.jsonl

Each pair becomes a completion in the required form, `<OTHER><thinking>…</thinking><answer>{prediction}</answer>`,
with the solution `<OTHER> {reference}` (the tag plays no part in reward=llm_only). The reward's own answer rules
apply as in training: an exact match scores 1 and a garbage answer 0 without asking the judge.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiments.judge_agreement.measure import agreement

PAIRS = Path(__file__).resolve().parent / "pairs.jsonl"


def write(split: str, out: Path) -> int:
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["split"] == split]
    with out.open("w") as f:
        for r in rows:
            completion = f"<OTHER><thinking>Comparing with the findings.</thinking><answer>{r['prediction']}</answer>"
            f.write(json.dumps({"id": r["id"], "question": r["question"], "completion": completion,
                                "solution": f"<OTHER> {r['reference']}", "label": r["label"], "kind": r["kind"]})
                    + "\n")
    return len(rows)


def compare(inputs: Path, outputs: Path) -> dict:
    labels = {}
    for line in inputs.read_text().splitlines():
        row = json.loads(line)
        labels[str(row["id"])] = (row["label"] == "YES", row["kind"])
    agree = failed = 0
    by_kind: dict[str, list[int]] = {}
    truth, verdicts = [], []
    for line in outputs.read_text().splitlines():
        row = json.loads(line)
        verdict = row["llm_judge"]
        label, kind = labels[str(row["id"])]
        truth.append(int(label))
        verdicts.append(None if verdict is None else float(verdict >= 0.5))
        if verdict is None:
            failed += 1
            continue
        right = int((verdict >= 0.5) == label)
        agree += right
        by_kind.setdefault(kind, []).append(right)
    n = len(labels)
    return {"pairs": n, "agree": agree, "accuracy": agree / n, "kappa": round(agreement(truth, verdicts)["kappa"], 3),
            "judge_failures": failed, "by_kind": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_kind.items())}}


def cli(write_split, compare_files, rows: str, description: str | None = None) -> None:
    """`write [--split tune|check] OUT` and `compare INPUTS OUTPUTS`, the two steps around `medix.score`."""
    p = argparse.ArgumentParser(description=description)
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write")
    w.add_argument("--split", choices=("tune", "check"), default="check")
    w.add_argument("out", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("inputs", type=Path)
    c.add_argument("outputs", type=Path)
    args = p.parse_args()
    if args.command == "write":
        print(f"wrote {write_split(args.split, args.out)} {args.split} {rows} to {args.out}")
    else:
        print(json.dumps(compare_files(args.inputs, args.outputs), indent=1))


if __name__ == "__main__":
    cli(write, compare, "pairs")
