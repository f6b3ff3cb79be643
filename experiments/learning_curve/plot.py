"""Plot the learning-curve run from its MLflow DB: per-component training rewards (running mean) and validation.
Usage (repository root): python -m experiments.learning_curve.plot [--db experiments/learning_curve/mlflow.db]"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from medix.tracking.curves import final_values, load_runs, metric_history, plot_curves, reward_keys  # noqa: E402

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", default=str(HERE / "mlflow.db"))
    parser.add_argument("--smooth", type=int, default=4, help="running mean over this many steps")
    args = parser.parse_args()
    uri = f"sqlite:///{args.db}"
    runs = load_runs(uri, ["learning_curve"]).tail(1)  # the latest finished run
    keys = reward_keys() + ["val/reward/overall/mean", "val/reward/embedding/mean", "completion/mean_length", "loss"]
    plot_curves(uri, runs, keys, smooth=args.smooth, title="learning curve (training rollouts)",
                path=HERE / "learning_curve.png")
    run_id = runs.run_id.iloc[0]
    for key in dict.fromkeys(keys + reward_keys("val/")):
        steps, values = metric_history(uri, run_id, key)
        if steps:
            k = max(1, len(values) // 4)
            first, last = sum(values[:k]) / k, sum(values[-k:]) / k
            print(f"{key}: first {k} steps {first:.3f} -> last {k} steps {last:.3f} (steps {steps[0]}-{steps[-1]})")
    print(final_values(uri, runs, reward_keys("val/")).to_string(index=False))


if __name__ == "__main__":
    main()
