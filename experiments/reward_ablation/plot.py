"""Plot and summarise the reward ablation from its MLflow DB: per-component training curves of each reward mix as the
mean over seeds with the band from the lowest to the highest seed, the final validation rewards (every mix validated
with the composite), the reward-hacking monitor's alerts, the share of completions the reward's degenerate guard
stopped, and how many sampled completions look degenerate by this script's own rule (independent of the guard),
early and late, with the last step's completions.
Usage (repository root): python -m experiments.reward_ablation.plot [--db experiments/reward_ablation/mlflow.db]
    [--experiment reward_ablation_seeds] [--figures reward_ablation] (figures <prefix>_curves.png, <prefix>_final.png)"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from medix.rewards.parsing import extract_answer  # noqa: E402
from medix.tracking.curves import (final_values, load_runs, metric_history, plot_final_bars,  # noqa: E402
                                   plot_seed_bands, reward_keys)

HERE = Path(__file__).parent
EXPERIMENT = "reward_ablation_seeds"
WINDOW = 6  # steps averaged at the start and the end of a run
MIXES = ("composite", "llm_only", "embed_only", "llm_embed")  # the table's and the legend's order


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


def mix_name(run) -> str:
    """The conf/reward choice a run's logged weights (`params.reward.weights.*`) stand for in this study: the mix that
    zeroes the judge, the embedding or the modality tag, else the composite."""
    zero = tuple(c for c in ("llm_judge", "embedding", "modality") if float(run[f"params.reward.weights.{c}"]) == 0)
    return {("llm_judge",): "embed_only", ("embedding",): "llm_only", ("modality",): "llm_embed"}.get(zero, "composite")


def sample_tables(client, run_id: str) -> list[dict]:
    """The run's `samples/step_*.json` tables (MLflow log_table), oldest first, as dicts of columns."""
    tables = []
    for item in sorted(client.list_artifacts(run_id, "samples"), key=lambda a: a.path):
        local = client.download_artifacts(run_id, item.path)
        raw = json.loads(Path(local).read_text())
        columns, rows = raw["columns"], raw["data"]
        tables.append({c: [r[i] for r in rows] for i, c in enumerate(columns)})
    return tables


def degenerate_share(tables: list[dict]) -> float:
    completions = [c for table in tables for c in table["completion"]]
    return sum(degeneracy(c) is not None for c in completions) / len(completions) if completions else float("nan")


def reward_by_guard(tables: list[dict]) -> tuple[float, float]:
    """The mean total reward of the sampled completions the degenerate guard stopped, and of the others: what garbage
    still earns from the components the guard does not cover (NaN where there are none)."""
    paid: dict[bool, list[float]] = {True: [], False: []}
    for table in tables:
        for reason, reward in zip(table.get("guarded") or [None] * len(table["overall"]), table["overall"]):
            paid[bool(reason)].append(reward)
    return tuple(sum(v) / len(v) if v else float("nan") for v in (paid[True], paid[False]))


def start_end(uri: str, run_id: str, key: str) -> tuple[float, float]:
    """The mean of a metric over the first and over the last WINDOW steps of a run (NaN where never logged)."""
    _, values = metric_history(uri, run_id, key)
    if not values:
        return float("nan"), float("nan")
    return sum(values[:WINDOW]) / len(values[:WINDOW]), sum(values[-WINDOW:]) / len(values[-WINDOW:])


def spread(values: list[float]) -> str:
    """'mean [min, max]' over seeds."""
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    return f"{sum(values) / len(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def main() -> None:
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", default=str(HERE / "mlflow.db"))
    parser.add_argument("--experiment", default=EXPERIMENT, help="the MLflow experiment (logger.experiment_name)")
    parser.add_argument("--figures", default="reward_ablation", help="file name prefix of the two figures")
    parser.add_argument("--show", type=int, default=2, help="completions of the last step to print per run")
    args = parser.parse_args()
    uri = f"sqlite:///{args.db}"
    runs = load_runs(uri, [args.experiment])
    runs["label"] = runs.apply(mix_name, axis=1)
    runs = runs.groupby(["label", "params.seed"], sort=False).tail(1)  # the latest finished run of each mix and seed
    order = {name: i for i, name in enumerate(MIXES)}
    runs = runs.sort_values(["label", "params.seed"], key=lambda c: c.map(lambda v: order.get(v, str(v))))
    runs = runs.reset_index(drop=True)
    plot_seed_bands(uri, runs, reward_keys() + ["reward/guarded_share", "completion/mean_length"], smooth=3,
                    title="reward ablation, mean and range over seeds: training reward by component", ncols=4,
                    path=HERE / f"{args.figures}_curves.png")
    finals = final_values(uri, runs, reward_keys("val/"))  # one row per run, in the order of runs
    plot_final_bars(finals, reward_keys("val/"), title="reward ablation: validation with the composite at the last step "
                    "(mean, range over seeds)", path=HERE / f"{args.figures}_final.png")

    client = mlflow.MlflowClient(uri)
    rows = []
    for label, group in runs.groupby("label", sort=False):
        cells: dict[str, list] = {}
        for index, run in group.iterrows():
            for key, name in [("reward/llm_judge/mean", "judge"), ("reward/format/mean", "format"),
                              ("completion/mean_length", "length"), ("reward/guarded_share", "guarded")]:
                start, end = start_end(uri, run.run_id, key)
                cells.setdefault(f"{name} start", []).append(start)
                cells.setdefault(f"{name} end", []).append(end)
            tables = sample_tables(client, run.run_id)
            half = len(tables) // 2
            cells.setdefault("degenerate start", []).append(degenerate_share(tables[:half]))
            cells.setdefault("degenerate end", []).append(degenerate_share(tables[half:]))
            guarded_pay, unguarded_pay = reward_by_guard(tables[half:])
            cells.setdefault("reward of guarded, end", []).append(guarded_pay)
            cells.setdefault("reward of unguarded, end", []).append(unguarded_pay)
            alert_steps, _ = metric_history(uri, run.run_id, "reward_hacking/alert")
            cells.setdefault("alerts", []).append(alert_steps)
            val = finals.loc[index]
            cells.setdefault("val composite", []).append(val["val/reward/overall/mean"])
            cells.setdefault("val judge", []).append(val["val/reward/llm_judge/mean"])
            print(f"\n## {label}, seed {run['params.seed']} ({run.run_id}): val composite "
                  f"{val['val/reward/overall/mean']:.3f}, alert steps {alert_steps or 'none'}, last message: "
                  f"{(run.get('tags.reward_hacking') or 'none')[:200]}")
            if tables:
                last = tables[-1]
                for i in range(min(args.show, len(last["completion"]))):
                    print(f"  step {last['step'][i]} reward {last['overall'][i]:.3f} guarded "
                          f"{last.get('guarded', ['?'] * (i + 1))[i]!r} | {last['completion'][i][:240]!r}")
        row = {"mix": label, "seeds": len(group)}
        for key, values in cells.items():
            if key == "alerts":
                row["runs with an alert"] = f"{sum(bool(s) for s in values)}/{len(values)} (first at " + \
                    ", ".join(str(s[0]) if s else "-" for s in values) + ")"
            else:
                row[key] = spread(values)
        row["val composite by seed"] = ", ".join(f"{v:.3f}" for v in cells["val composite"])
        rows.append(row)
    print("\n| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
