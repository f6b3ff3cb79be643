"""Step time of `rollout.max_staleness` 0 vs 1 vs 2 on the same seed and shapes, one `python -m medix.run` after the
other in this one invocation (each starts its own vLLM server: rollout=vllm). Reads each run's per-step metrics from
its MLflow database and prints one row per setting: the median step, the phases (rollout, reward, update, sync), how
long the trainer waited for rollouts and the engine sat idle, the staleness and the drops; `--json` keeps them all.

    python experiments/perf/async_bench.py --json experiments/perf/async_cpu_<date>.json \
        experiment=smoke rollout=vllm trainer.max_steps=6

Every argument after the options is a medix.run override given to all runs (`rollout.max_staleness` is the bench's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PHASES = ["time/step_s", "time/rollout_s", "time/reward_s", "time/reward_wait_s", "time/update_s", "rollout/sync_s",
          "rollout/sync_wait_s", "time/wait_for_rollout_s", "time/engine_idle_s"]
OTHER = ["rollout/staleness/mean", "rollout/staleness/max", "rollout/stale_dropped", "rollout/queue_depth",
         "reward/overall/mean", "rollout/logprob_diff/mean"]


def run(k: int, overrides: list[str], folder: Path) -> dict:
    """One medix.run with rollout.max_staleness=k; its wall time, status and per-step metrics."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    db = folder / "mlflow.db"
    cmd = [sys.executable, "-m", "medix.run", *overrides, f"rollout.max_staleness={k}", f"paths.output_dir={folder}/out",
           f"hydra.run.dir={folder}/hydra", f"logger.tracking_uri=sqlite:///{db}"]
    print(f"[async_bench] max_staleness={k}: {' '.join(cmd[3:])}", flush=True)
    started = time.time()
    with open(folder / "run.log", "w") as log:
        proc = subprocess.run(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - started
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    if proc.returncode != 0 or not runs:
        tail = (folder / "run.log").read_text()[-3000:]
        raise SystemExit(f"max_staleness={k} failed (rc {proc.returncode}):\n{tail}")
    [record] = runs
    steps: dict[str, list[float]] = {}
    for key in PHASES + OTHER:
        if key in record.data.metrics:
            history = sorted(client.get_metric_history(record.info.run_id, key), key=lambda m: m.step)
            steps[key] = [m.value for m in history]
    return {"max_staleness": k, "status": record.info.status, "wall_s": wall, "steps": steps}


def summary(result: dict, skip: int) -> dict[str, float]:
    """Median over the steps after the first `skip` of each phase; staleness max and drops over every step."""
    steps = result["steps"]
    out = {key: statistics.median(values[skip:] or values) for key, values in steps.items() if key in PHASES}
    out["steps"] = len(steps.get("time/step_s", []))
    out["train_s"] = sum(steps.get("time/step_s", []))
    for key in ("rollout/staleness/max",):
        if key in steps:
            out[key] = max(steps[key])
    if "rollout/stale_dropped" in steps:
        out["rollout/stale_dropped"] = sum(steps["rollout/stale_dropped"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--staleness", default="0,1,2", help="the settings to run, in this order")
    parser.add_argument("--skip", type=int, default=1, help="warm-up steps left out of the medians")
    parser.add_argument("--json", type=Path, help="write every run's per-step metrics here")
    parser.add_argument("--keep", type=Path, help="run folders under this folder (default: a temporary one)")
    args, overrides = parser.parse_known_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="medix-async-bench-"))
    results = []
    for k in [int(x) for x in args.staleness.split(",")]:
        folder = root / f"staleness_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        results.append(run(k, overrides, folder))
        results[-1]["summary"] = summary(results[-1], args.skip)
        if args.json:  # after every run, so a late failure keeps the earlier ones
            args.json.write_text(json.dumps({"overrides": overrides, "skip": args.skip, "runs": results}, indent=1))
    columns = ["time/step_s", "time/rollout_s", "time/reward_s", "time/update_s", "rollout/sync_s",
               "time/wait_for_rollout_s", "time/engine_idle_s"]
    print("\n| max_staleness | status | wall (s) | train steps (s) | " + " | ".join(c.split("/")[-1] for c in columns)
          + " | staleness max | dropped |")
    print("|" + " --- |" * (len(columns) + 6))
    base = None
    for r in results:
        s = r["summary"]
        base = base or s.get("time/step_s")
        cells = [f"{s[c]:.2f}" if c in s else "-" for c in columns]
        print(f"| {r['max_staleness']} | {r['status']} | {r['wall_s']:.0f} | {s['train_s']:.1f} | " + " | ".join(cells)
              + f" | {s.get('rollout/staleness/max', 0):.0f} | {s.get('rollout/stale_dropped', 0):.0f} |")
    for r in results[1:]:
        print(f"median step, max_staleness=0 / max_staleness={r['max_staleness']}: "
              f"{base / r['summary']['time/step_s']:.2f}x")


if __name__ == "__main__":
    main()
