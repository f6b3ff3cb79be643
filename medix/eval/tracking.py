"""MLflow for evaluation runs: metrics, the per-item table and results.md; side-by-side comparison of runs."""

from __future__ import annotations

import json
from pathlib import Path

from medix.errors import ConfigError
from medix.eval.results import read_jsonl_by_id


def log_eval_run(tracking_uri: str, experiment: str, run_name: str | None, params: dict, metrics: dict[str, float],
                 item_files: dict[str, Path], results_md: Path) -> str:
    """One MLflow run holding the eval metrics, params, per-task items.jsonl, a joined item table and results.md."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        mlflow.log_metrics(metrics)
        rows = []
        for task, path in item_files.items():
            mlflow.log_artifact(str(path), artifact_path=f"items/{task}")
            for row in read_jsonl_by_id(path).values():
                rows.append({"task": task, "id": row["id"], "score": row["score"],
                             "parse_failures": row.get("parse_failures", 0),
                             "question": row["question"], "reference": row["reference"],
                             "prediction": row["prediction"], "round_scores": json.dumps(row["round_scores"])})
        if rows:
            mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]}, artifact_file="eval_items.json")
        mlflow.log_artifact(str(results_md))
        return run.info.run_id


def compare_markdown(tracking_uri: str, run_ids: list[str] | None = None, experiment: str | None = None) -> str:
    """A markdown table: rows are tasks and macro averages, columns are runs (accuracy in %)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    if run_ids:
        runs = [mlflow.get_run(run_id) for run_id in run_ids]
    else:
        found = mlflow.get_experiment_by_name(experiment or "")
        if found is None:
            raise ConfigError(f"compare.experiment={experiment!r}: no such MLflow experiment at {tracking_uri}")
        runs = mlflow.search_runs(experiment_ids=[found.experiment_id], output_format="list", order_by=["start_time ASC"])
    if not runs:
        raise ConfigError("compare: no runs to compare (give run ids or an experiment with runs)")
    tasks: list[str] = []
    for run in runs:
        for key in sorted(run.data.metrics):
            if key.startswith("eval/") and key.endswith("/accuracy") and key[5:-9] not in tasks:
                tasks.append(key[5:-9])
    header = [(run.info.run_name or run.info.run_id[:8]) + f" ({run.info.run_id[:8]})" for run in runs]
    lines = ["| task | " + " | ".join(header) + " |", "|---|" + "---:|" * len(runs)]
    for label, key in [(t, f"eval/{t}/accuracy") for t in tasks] + [
            (f"**{n}** (macro)", f"eval/{n}") for n in ("text", "vision", "overall")]:
        values = [run.data.metrics.get(key) for run in runs]
        if all(v is None for v in values):
            continue
        lines.append(f"| {label} | " + " | ".join("" if v is None else f"{100 * v:.2f}" for v in values) + " |")
    return "\n".join(lines) + "\n"
