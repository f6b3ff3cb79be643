"""The labelled degenerate set of experiments/judge_degenerate: real harvested outputs, hand labels, and tune/check
halves split by prompt group (no group of near-copies on both sides), reproducible from the rows themselves."""

from experiments.judge_degenerate.labelled_set import split_of
from experiments.judge_degenerate.score_set import ANSWER, compare, load

LABELS = {ANSWER, "truncated", "question_echo", "option_echo", "non_answer", "tag_soup", "repetition", "empty",
          "other_garbage"}


def test_every_row_has_a_known_label_and_its_groups_split_once():
    rows = load()
    assert len({r["id"] for r in rows}) == len(rows)
    assert {r["label"] for r in rows} <= LABELS
    assert all((r["correct"] is None) == (r["label"] != ANSWER) for r in rows)
    assert all(r["split"] == split_of(r) for r in rows)
    halves = {}
    for r in rows:
        halves.setdefault((r["run"], r["step"], r["prompt_id"]), set()).add(r["split"])
    assert all(len(s) == 1 for s in halves.values())
    degenerate = [r for r in rows if r["label"] != ANSWER]
    assert len(degenerate) >= 150 and {r["split"] for r in degenerate} == {"tune", "check"}


def test_compare_counts_judge_credit_on_degenerate_rows_only(tmp_path):
    inputs, outputs = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inputs.write_text('{"id": "a", "label": "tag_soup"}\n{"id": "b", "label": "answer"}\n'
                      '{"id": "c", "label": "repetition"}\n{"id": "d", "label": "repetition"}\n')
    outputs.write_text('{"id": "a", "llm_judge": 1.0}\n{"id": "b", "llm_judge": 1.0}\n'
                       '{"id": "c", "llm_judge": 0.0, "guarded": "repetition"}\n{"id": "d", "llm_judge": null}\n')
    result = compare(inputs, outputs)
    assert result["degenerate"] == 3 and result["credited_ids"] == ["a"]
    assert result["judge_failures"] == 1 and result["answers"] == {"rows": 1, "guarded": 0, "judge_yes": 1}
