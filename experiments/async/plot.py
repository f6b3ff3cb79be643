"""The async runs side by side (`run.sh`): the training reward per GRPO step of max_staleness 0 and 1 for each seed,
the per-step difference, and the step timings. Writes async.png and prints a markdown table.
Usage (repository root): python -m experiments.async.plot [--db experiments/async/mlflow.db]"""

import argparse
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from medix.tracking.curves import load_runs, metric_history  # noqa: E402

HERE = Path(__file__).parent
KEYS = ["reward/overall/mean", "val/reward/overall/mean", "time/step_s", "time/rollout_s", "time/wait_for_rollout_s",
        "time/engine_idle_s", "rollout/staleness/max", "rollout/logprob_diff/mean"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", default=str(HERE / "mlflow.db"))
    args = parser.parse_args()
    uri = f"sqlite:///{args.db}"
    runs = load_runs(uri, ["async"])
    curves = {}
    for _, run in runs.iterrows():
        key = (int(run["params.seed"]), int(run["params.rollout.max_staleness"]))
        curves[key] = {k: metric_history(uri, run.run_id, k) for k in KEYS}  # the latest run of each setting wins
    fig, ax = plt.subplots(figsize=(7, 4))
    for (seed, k), metrics in sorted(curves.items()):
        steps, values = metrics["reward/overall/mean"]
        ax.plot(steps, values, marker="o", linestyle="-" if k == 0 else "--", label=f"seed {seed}, max_staleness {k}")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("reward/overall/mean (training rollouts)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "async.png", dpi=120)
    print("| seed | max_staleness | reward mean over steps | last val reward | median step (s) | median rollout (s) "
          "| median wait for rollout (s) | staleness max |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (seed, k), m in sorted(curves.items()):
        def med(key):
            return f"{statistics.median(m[key][1]):.2f}" if m[key][1] else "-"

        reward = m["reward/overall/mean"][1]
        val = m["val/reward/overall/mean"][1]
        stale = m["rollout/staleness/max"][1]
        print(f"| {seed} | {k} | {statistics.mean(reward):.3f} | {val[-1] if val else float('nan'):.3f} | "
              f"{med('time/step_s')} | {med('time/rollout_s')} | {med('time/wait_for_rollout_s')} | "
              f"{max(stale) if stale else 0:.0f} |")
    for seed in sorted({s for s, _ in curves}):
        if (seed, 0) in curves and (seed, 1) in curves:
            a, b = curves[(seed, 0)]["reward/overall/mean"][1], curves[(seed, 1)]["reward/overall/mean"][1]
            diffs = [y - x for x, y in zip(a, b)]
            print(f"seed {seed}: reward(max_staleness 1) - reward(max_staleness 0) per step: "
                  + ", ".join(f"{d:+.3f}" for d in diffs) + f"; mean {statistics.mean(diffs):+.3f}")


if __name__ == "__main__":
    main()
