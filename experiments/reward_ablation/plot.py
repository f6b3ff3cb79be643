"""Plot the reward ablation from its MLflow DB: per-component curves of each reward mix and final validation rewards.
Usage (repository root): python -m experiments.reward_ablation.plot [--db experiments/reward_ablation/mlflow.db]"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from medix.tracking.curves import final_values, load_runs, plot_curves, plot_final_bars, reward_keys  # noqa: E402

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", default=str(HERE / "mlflow.db"))
    args = parser.parse_args()
    uri = f"sqlite:///{args.db}"
    runs = load_runs(uri, ["reward_ablation"])
    runs = runs[runs["tags.sweep_id"] == runs["tags.sweep_id"].iloc[-1]]  # the latest sweep only
    runs["label"] = runs["tags.reward_mix"]
    plot_curves(uri, runs, reward_keys(), title="reward ablation: training reward by component",
                path=HERE / "reward_ablation_curves.png")
    table = final_values(uri, runs, reward_keys() + reward_keys("val/"))
    plot_final_bars(table, reward_keys("val/"), title="reward ablation: final validation reward",
                    path=HERE / "reward_ablation_final.png")
    print(table.round(3).to_string(index=False))


if __name__ == "__main__":
    main()
