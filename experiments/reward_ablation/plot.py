"""Plot and summarise the reward ablation from its MLflow DB: per-component training curves of each reward mix, the
completion length, the final validation rewards (every mix validated with the composite), the reward-hacking
monitor's alerts, and how many sampled completions are degenerate (the paper's collapse: short or symbol answers,
tag-only answers, repeated tokens), early and late, with the last step's completions.
Usage (repository root): python -m experiments.reward_ablation.plot [--db experiments/reward_ablation/mlflow.db]"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from medix.rewards.parsing import extract_answer  # noqa: E402
from medix.tracking.curves import final_values, load_runs, plot_curves, plot_final_bars, reward_keys  # noqa: E402

HERE = Path(__file__).parent


FORM_TAGS = re.compile(r"</?(thinking|answer)>|<[A-Z_]+>")  # the required form's own tags (and modality tags)


def degeneracy(completion: str) -> str | None:
    """Why a completion looks like reward hacking or collapse, or None: `repeated` (a word 4 times in a row, or fewer
    than a third of its words distinct), `tag soup` (6 or more angle-bracket tags besides the form's own, or over a
    quarter of its characters symbols), `tag-only` (the form with an empty or one-word answer), `short/symbol` (an
    answer without a 3-letter word)."""
    answer = extract_answer(completion)
    words = re.findall(r"\w+", completion.lower())
    if any(len(set(words[i:i + 4])) == 1 for i in range(len(words) - 3)) or \
            (len(words) >= 12 and len(set(words)) < len(words) / 3):
        return "repeated"
    other_tags = [t for t in re.findall(r"<[^<>]{0,40}>", completion) if not FORM_TAGS.fullmatch(t)]
    symbols = sum(1 for ch in completion if not (ch.isalnum() or ch.isspace()))
    if len(other_tags) >= 6 or symbols > 0.25 * max(len(completion), 1):
        return "tag soup"
    if "<answer>" in completion and len(re.findall(r"\w+", answer or "")) <= 1:
        return "tag-only"
    if not re.search(r"[A-Za-z]{3,}", answer or ""):
        return "short/symbol"
    return None


def sample_tables(client, run_id: str) -> list[dict]:
    """The run's `samples/step_*.json` tables (MLflow log_table), oldest first, as dicts of columns."""
    tables = []
    for item in sorted(client.list_artifacts(run_id, "samples"), key=lambda a: a.path):
        local = client.download_artifacts(run_id, item.path)
        raw = json.loads(Path(local).read_text())
        columns, rows = raw["columns"], raw["data"]
        tables.append({c: [r[i] for r in rows] for i, c in enumerate(columns)})
    return tables


def degenerate_share(tables: list[dict]) -> tuple[float, dict[str, int]]:
    kinds: dict[str, int] = {}
    total = 0
    for table in tables:
        for completion in table["completion"]:
            total += 1
            kind = degeneracy(completion)
            if kind:
                kinds[kind] = kinds.get(kind, 0) + 1
    return (sum(kinds.values()) / total if total else float("nan")), kinds


def main() -> None:
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", default=str(HERE / "mlflow.db"))
    parser.add_argument("--show", type=int, default=3, help="completions of the last step to print per run")
    args = parser.parse_args()
    uri = f"sqlite:///{args.db}"
    runs = load_runs(uri, ["reward_ablation"])
    runs = runs.groupby("tags.reward_mix", sort=False).tail(1).copy()  # the latest finished run of each mix
    runs["label"] = runs["tags.reward_mix"]
    plot_curves(uri, runs, reward_keys() + ["completion/mean_length"], smooth=3,
                title="reward ablation: training reward by component", path=HERE / "reward_ablation_curves.png")
    table = final_values(uri, runs, reward_keys() + reward_keys("val/") + ["completion/mean_length"])
    plot_final_bars(table, reward_keys("val/"), title="reward ablation: final validation reward (composite)",
                    path=HERE / "reward_ablation_final.png")
    print(table.round(3).to_string(index=False))
    client = mlflow.MlflowClient(uri)
    for _, run in runs.iterrows():
        tables = sample_tables(client, run.run_id)
        half = len(tables) // 2
        early, late = degenerate_share(tables[:half]), degenerate_share(tables[half:])
        print(f"\n## {run.label} ({run.run_id})")
        print(f"reward_hacking alert: {run.get('tags.reward_hacking') or 'none'}")
        print(f"degenerate completions: first half of the steps {early[0]:.2f} {early[1]}, "
              f"second half {late[0]:.2f} {late[1]}")
        if tables:
            last = tables[-1]
            for i in range(min(args.show, len(last["completion"]))):
                print(f"  step {last['step'][i]} reward {last['overall'][i]:.3f} | {last['solution'][i]!r}\n"
                      f"    {last['completion'][i][:300]!r}")


if __name__ == "__main__":
    main()
