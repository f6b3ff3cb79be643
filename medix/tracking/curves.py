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


def seed_band(histories: list[tuple[list[int], list[float]]], window: int = 1):
    """Mean and spread over seeds of one metric: `histories` holds each seed's (steps, values); returns (steps, mean,
    low, high) over the steps every history logged, each history first smoothed by a running mean of `window`."""
    smoothed = [dict(zip(steps, running_mean(values, window))) for steps, values in histories if steps]
    if not smoothed:
        return [], [], [], []
    steps = sorted(set.intersection(*(set(h) for h in smoothed)))
    columns = [[h[s] for h in smoothed] for s in steps]
    return (steps, [sum(c) / len(c) for c in columns], [min(c) for c in columns], [max(c) for c in columns])


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


def _panels(count: int, ncols: int):
    """A figure with `count` panels on a grid of `ncols` columns."""
    import matplotlib.pyplot as plt

    nrows = -(-count // ncols)
    return plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)


def _finish_panels(fig, axes, used: int, title: str | None, path: str | Path | None):
    """Step axes and grids on the used panels, the rest hidden, one legend below (from the first panel), saved."""
    for ax in list(axes.flat)[:used]:
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[used:]:
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


def plot_curves(tracking_uri: str, runs, keys: list[str], *, smooth: int = 1, title: str | None = None,
                path: str | Path | None = None, ncols: int = 3):
    """One panel per metric key, one line per run (running mean over `smooth` steps; validation keys `val/...`, logged
    every few steps, are not smoothed); saved to `path` if given."""
    fig, axes = _panels(len(keys), ncols)
    for ax, key in zip(axes.flat, keys):
        window = 1 if key.startswith("val/") else smooth
        for index, (_, run) in enumerate(runs.iterrows()):
            steps, values = metric_history(tracking_uri, run.run_id, key)
            if steps:  # one colour per run in every panel, also where an earlier run never logged the key
                ax.plot(steps, running_mean(values, window), marker="." if len(steps) < 30 else None, label=run.label,
                        color=f"C{index % 10}")
        ax.set_title(key if window == 1 else f"{key} (mean of {window})", fontsize=9)
    return _finish_panels(fig, axes, len(keys), title, path)


def plot_seed_bands(tracking_uri: str, runs, keys: list[str], *, by: str = "label", smooth: int = 1,
                    title: str | None = None, path: str | Path | None = None, ncols: int = 3):
    """One panel per metric key, one line per group of runs (`by`, e.g. the reward mix): the mean over the group's
    runs (seeds) with the band from their lowest to their highest value (see seed_band); saved to `path` if given."""
    fig, axes = _panels(len(keys), ncols)
    groups = list(runs.groupby(by, sort=False))
    for ax, key in zip(axes.flat, keys):
        window = 1 if key.startswith("val/") else smooth
        for index, (name, group) in enumerate(groups):
            histories = [metric_history(tracking_uri, run_id, key) for run_id in group.run_id]
            steps, mean, low, high = seed_band(histories, window)
            if steps:
                colour = f"C{index % 10}"
                ax.plot(steps, mean, color=colour, marker="." if len(steps) < 4 else None,
                        label=f"{name} (n={sum(bool(h[0]) for h in histories)})")
                ax.fill_between(steps, low, high, color=colour, alpha=0.2)
        ax.set_title(key if window == 1 else f"{key} (mean of {window})", fontsize=9)
    return _finish_panels(fig, axes, len(keys), title, path)


def plot_final_bars(table, keys: list[str], *, by: str = "label", title: str | None = None,
                    path: str | Path | None = None):
    """Grouped bars: for each key, the mean final value of the rows of `table` (see final_values) in each group of
    `by`, with a bar from the group's lowest to its highest value where it has more than one row (seeds)."""
    import matplotlib.pyplot as plt

    grouped = table.groupby(by, sort=False)[keys].mean()
    low, high = table.groupby(by, sort=False)[keys].min(), table.groupby(by, sort=False)[keys].max()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(keys) * max(len(grouped), 1) / 2), 3.8))
    width = 0.8 / max(len(grouped), 1)
    for i, (name, row) in enumerate(grouped.iterrows()):
        spread = [row.values - low.loc[name].values, high.loc[name].values - row.values]
        ax.bar([k + i * width for k in range(len(keys))], row.values, width, label=str(name), yerr=spread, capsize=2)
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
