"""Plot GRPO vs DAPO vs GSPO from the MLflow DB: reward components, loss, clip ratio and final validation rewards.
Usage (repository root): python -m experiments.algorithm_comparison.plot [--db experiments/algorithm_comparison/mlflow.db]"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from medix.tracking.curves import final_values, load_runs, plot_curves, reward_keys  # noqa: E402

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", default=str(HERE / "mlflow.db"))
    args = parser.parse_args()
    uri = f"sqlite:///{args.db}"
    runs = load_runs(uri, ["algorithm_comparison"])
    runs = runs[runs["tags.sweep_id"] == runs["tags.sweep_id"].iloc[-1]]  # the latest sweep only
    runs["label"] = runs["tags.algorithm"]
    keys = [k for k in reward_keys() if "llm_judge" not in k] + ["loss", "clip_ratio", "kl", "entropy", "time/update_s"]
    plot_curves(uri, runs, keys, title="GRPO vs DAPO vs GSPO", path=HERE / "algorithm_comparison.png")
    extra = ["val/reward/overall/mean", "dapo/tries", "time/rollout_s", "time/update_s"]
    print(final_values(uri, runs, reward_keys() + extra).round(3).to_string(index=False))


if __name__ == "__main__":
    main()
