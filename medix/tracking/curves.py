"""Read training runs back from MLflow (run table, per-step metric histories) and plot reward curves with matplotlib.
Used by notebooks/compare_runs.ipynb and the experiments/*/plot.py scripts."""

from __future__ import annotations

from pathlib import Path

COMPONENTS = ("overall", "llm_judge", "embedding", "modality", "format")


def reward_keys(prefix: str = "") -> list[str]:
    """['reward/overall/mean', 'reward/llm_judge/mean', ...], with e.g. prefix 'val/' for the validation rewards."""
    return [f"{prefix}reward/{c}/mean" for c in COMPONENTS]


def load_runs(tracking_uri: str, experiment_names: list[str] | None = None, statuses=("FINISHED",)):
    """The runs (a pandas DataFrame, oldest first) of the named experiments (None = all) with a `label` column:
    the run name, or `reward_mix|algorithm` when absent."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(experiment_names=experiment_names, search_all_experiments=experiment_names is None)
    if runs.empty:
        return runs
    if statuses:
        runs = runs[runs.status.isin(statuses)]
    runs = runs.sort_values("start_time").reset_index(drop=True)
    name = runs.get("tags.mlflow.runName")
    runs["label"] = name if name is not None else runs.run_id
    return runs


def metric_history(tracking_uri: str, run_id: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric of one run, by step; empty lists when the run never logged it."""
    import mlflow

    history = sorted(mlflow.MlflowClient(tracking_uri).get_metric_history(run_id, key), key=lambda m: m.step)
    return [m.step for m in history], [m.value for m in history]


def running_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last `window` values at each position (fewer at the start); window 1 returns the values."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def final_values(tracking_uri: str, runs, keys: list[str]):
    """One row per run: label, reward_mix, algorithm and the last logged value of each key (NaN if never logged)."""
    import pandas as pd

    rows = []
    for _, run in runs.iterrows():
        row = {"label": run.label, "reward_mix": run.get("tags.reward_mix"), "algorithm": run.get("tags.algorithm")}
        for key in keys:
            steps, values = metric_history(tracking_uri, run.run_id, key)
            row[key] = values[-1] if values else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def plot_curves(tracking_uri: str, runs, keys: list[str], *, smooth: int = 1, title: str | None = None,
                path: str | Path | None = None, ncols: int = 3):
    """One panel per metric key, one line per run (running mean over `smooth` steps; validation keys `val/...`, logged
    every few steps, are not smoothed); saved to `path` if given."""
    import matplotlib.pyplot as plt

    nrows = -(-len(keys) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        window = 1 if key.startswith("val/") else smooth
        for index, (_, run) in enumerate(runs.iterrows()):
            steps, values = metric_history(tracking_uri, run.run_id, key)
            if steps:  # one colour per run in every panel, also where an earlier run never logged the key
                ax.plot(steps, running_mean(values, window), marker="." if len(steps) < 30 else None, label=run.label,
                        color=f"C{index % 10}")
        ax.set_title(key if window == 1 else f"{key} (mean of {window})", fontsize=9)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 2), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * (len(labels) // 2), 1, 1))
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def plot_final_bars(table, keys: list[str], *, by: str = "label", title: str | None = None,
                    path: str | Path | None = None):
    """Grouped bars: for each key, the final value of each row of `table` (see final_values), grouped by `by`."""
    import matplotlib.pyplot as plt

    grouped = table.groupby(by, sort=False)[keys].mean()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(keys) * max(len(grouped), 1) / 2), 3.8))
    width = 0.8 / max(len(grouped), 1)
    for i, (name, row) in enumerate(grouped.iterrows()):
        ax.bar([k + i * width for k in range(len(keys))], row.values, width, label=str(name))
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))])
    ax.set_xticklabels([k.replace("/mean", "") for k in keys], rotation=20, fontsize=8)
    ax.set_ylabel("final value")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
