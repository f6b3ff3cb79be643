"""A judge-free cross-check of an evaluation's multiple-choice items: does the prediction commit to exactly one option
letter, and is it the reference's? Set beside the judge's verdicts, it shows how lenient the judge is. The
`option echoes` column counts the predictions that `medix.evaluate` scored 0 without a judge call because they name
several options (`option_echo` in the item's row).

    python experiments/eval_offline/letter_check.py outputs/eval_offline

Reads every `<task>/items.jsonl` under the folder. An item is multiple choice when its reference starts with an
option letter (`B. text`). A prediction commits to a letter when exactly one distinct letter opens a line
(`B.`, `B)`, `(B)`, `Answer: B`); a prediction that lists several options, or none, commits to nothing.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

OPTION_LINE = re.compile(r"^\s*(?:answer\s*[:：]\s*)?\(?([A-E])[.):](?:\s|$)", re.IGNORECASE | re.MULTILINE)
REFERENCE_LETTER = re.compile(r"^([A-E])\.\s")


def committed_letter(prediction: str) -> str | None:
    """The one option letter the prediction commits to, or None (none, or several different ones)."""
    letters = {m.upper() for m in OPTION_LINE.findall(prediction)}
    return letters.pop() if len(letters) == 1 else None


def check(folder: Path) -> list[dict]:
    rows = []
    for items in sorted(folder.glob("*/items.jsonl")):
        mcq = committed = letter_right = judged_right = agree = echoes = 0
        for line in items.read_text().splitlines():
            item = json.loads(line)
            ref = REFERENCE_LETTER.match(item.get("reference") or "")
            if not ref:
                continue
            mcq += 1
            letter = committed_letter(item.get("prediction") or "")
            committed += letter is not None
            right = letter == ref.group(1)
            letter_right += right
            judged = (item.get("score") or 0) >= 0.5
            judged_right += judged
            echoes += bool(item.get("option_echo"))
            agree += judged == right
        if mcq:
            rows.append(dict(task=items.parent.name, mcq_items=mcq, committed=committed, letter_correct=letter_right,
                             judge_correct=judged_right, option_echoes=echoes,
                             agreement=round(agree / mcq, 3)))
    return rows


def main() -> None:
    rows = check(Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/eval_offline"))
    print("| task | MCQ items | commits to one letter | letter correct | judge says correct | option echoes "
          "| judge/letter agreement |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['task']} | {r['mcq_items']} | {r['committed']} | {r['letter_correct']} | {r['judge_correct']} | "
              f"{r['option_echoes']} | {r['agreement']:.2f} |")
    total = {k: sum(r[k] for r in rows) for k in ("mcq_items", "committed", "letter_correct", "judge_correct",
                                                  "option_echoes")}
    if total["mcq_items"]:
        print(f"| all | {total['mcq_items']} | {total['committed']} | {total['letter_correct']} | "
              f"{total['judge_correct']} | {total['option_echoes']} | |")


if __name__ == "__main__":
    main()
