"""Multiple-choice training prompts from ../shared/benchmarks (MMLU medical subjects and MedMCQA, short questions,
options written as `A. text` lines), for a harvest run whose policy can echo options. Written outside the project
(benchmark items are not copied into it); score_set.py rebuilds a prompt from its id with `items` and `problem`.

    python -m experiments.judge_degenerate.mcq_prompts /work/harvest/mcq.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[3] / "shared" / "benchmarks"
SOURCES = ("mmlu_anatomy", "mmlu_clinical_knowledge", "mmlu_college_medicine", "mmlu_medical_genetics", "medmcqa")


def problem(item: dict) -> str:
    return item["question"] + "\n" + "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(item["choices"]))


def items(benchmarks: Path = BENCHMARKS) -> dict[str, dict]:
    out = {}
    for name in SOURCES:
        for line in (benchmarks / name / "test.jsonl").read_text().splitlines():
            item = json.loads(line)
            out[item["id"]] = {**item, "benchmark": name}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=120)
    parser.add_argument("--benchmarks", type=Path, default=BENCHMARKS)
    args = parser.parse_args()
    rows = [{"id": i["id"], "problem": problem(i), "solution": "<OTHER> " + i["answer"], "source": i["benchmark"]}
            for i in items(args.benchmarks).values()
            if i["choices"] and len(i["question"]) <= 200 and not i.get("image")]
    random.Random(0).shuffle(rows)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows[:args.n]))
    print(f"{min(len(rows), args.n)} prompts -> {args.out}")


if __name__ == "__main__":
    main()
