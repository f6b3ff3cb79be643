"""Collect the completions of training runs' sample tables (MLflow `samples/step_*.json`) as candidates for the
labelled degenerate set.

    python -m experiments.judge_degenerate.harvest --tracking-uri sqlite:////work/harvest/mlflow.db \
        --dataset medix_mini=medix/data/medix_mini.jsonl --dataset mcq=/work/harvest/mcq.jsonl --out candidates.jsonl

Each candidate keeps the run, step, prompt id, completion, solution and whether sampling hit the token cap, plus the
judge's verdict in that run (the guard was off while harvesting, so every completion was judged). A table written
before the sample tables recorded `truncated` gets it estimated with `--tokenizer`: the completion re-encoded is at
least `--max-new-tokens` tokens long (`truncated_from: estimate`, else `rollout`). The question is
kept for the project's own prompts (medix_mini); a prompt taken from ../shared/benchmarks is kept by its id only
(`question_ref`), because benchmark items are not copied into the project; `score_set.py` joins them back.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlflow


def prompts(spec: str) -> tuple[str, dict[str, str]]:
    """`name=path.jsonl` -> (name, {id: problem})."""
    name, _, path = spec.partition("=")
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return name, {r["id"]: r["problem"] for r in rows}


def harvest(tracking_uri: str, datasets: dict[str, dict[str, str]], count_tokens=None,
            max_new_tokens: int = 64) -> list[dict]:
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    out = []
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            tables = sorted(a.path for a in client.list_artifacts(run.info.run_id, "samples"))
            for path in tables:
                table = json.loads(Path(client.download_artifacts(run.info.run_id, path)).read_text())
                for index, values in enumerate(table["data"]):
                    row = dict(zip(table["columns"], values))
                    source = next((name for name, ids in datasets.items() if row["id"] in ids), None)
                    truncated, truncated_from = row.get("truncated"), "rollout"
                    if truncated is None and count_tokens is not None:
                        truncated, truncated_from = count_tokens(row["completion"]) >= max_new_tokens, "estimate"
                    out.append({"id": f"{run.info.run_id[:8]}/{row['step']}/{index}", "run": run.info.run_name,
                                "experiment": experiment.name, "step": row["step"], "prompt_id": row["id"],
                                "source": source, "completion": row["completion"], "solution": row["solution"],
                                "truncated": truncated, "truncated_from": truncated_from,
                                "judge_in_run": row.get("llm_judge")})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--dataset", action="append", default=[], help="name=path.jsonl of the runs' prompts")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizer", help="the policy's tokenizer folder, to estimate a missing truncated flag")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    datasets = dict(prompts(spec) for spec in args.dataset)
    count_tokens = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)

        def count_tokens(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    rows = harvest(args.tracking_uri, datasets, count_tokens, args.max_new_tokens)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{len(rows)} completions from {len({r['id'].split('/')[0] for r in rows})} runs -> {args.out}")


if __name__ == "__main__":
    main()
