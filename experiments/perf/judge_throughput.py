"""Judge calls per second through medix's OpenAI-compatible judge client, at concurrency 1 and N, cache cold and warm,
against the fake server (tests/fake_openai.py, fixed delay) and/or the real `judge=local` llama.cpp server.

    python experiments/perf/judge_throughput.py --server fake --delay 0.05 --items 64 --concurrency 1 8
    python experiments/perf/judge_throughput.py --server local --items 16 --concurrency 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from medix.judges.client import JudgeItem, OpenAIJudge  # noqa: E402


def judge_items(n: int) -> list[JudgeItem]:
    """n real (question, prediction, reference) pairs from experiments/judge_agreement; repeats get a suffix so
    every item is a distinct cache key."""
    rows = [json.loads(line) for line in (REPO / "experiments/judge_agreement/pairs.jsonl").read_text().splitlines()
            if line.strip()]
    items = []
    for i in range(n):
        r = rows[i % len(rows)]
        suffix = f" (case {i // len(rows)})" if i >= len(rows) else ""
        items.append(JudgeItem(r["question"], r["prediction"] + suffix, r["reference"]))
    return items


def measure(settings: dict, items: list[JudgeItem], concurrency: int, cache_dir: Path) -> dict:
    """Cold (empty cache) then warm (same items again) throughput at this concurrency: one OpenAIJudge (the client
    training and evaluation use) with `settings` (its constructor's keywords) and a fresh SQLite cache."""
    cache = {"enabled": True, "path": str(cache_dir / f"cache_c{concurrency}.sqlite")}
    out = {"concurrency": concurrency, "items": len(items)}
    with OpenAIJudge(**settings, max_concurrency=concurrency, cache=cache) as judge:
        for phase in ("cold", "warm"):
            t0 = time.perf_counter()
            scores = judge.score(items)
            dt = time.perf_counter() - t0
            out[f"{phase}_s"] = round(dt, 3)
            out[f"{phase}_calls_per_s"] = round(len(items) / dt, 2)
            out[f"{phase}_failed"] = sum(s is None for s in scores)
        out["stats"] = judge.stats()
    return out


def run_fake(args, items, cache_dir) -> list[dict]:
    sys.path.insert(0, str(REPO / "tests"))
    from fake_openai import FakeOpenAIServer, always

    with FakeOpenAIServer(always("YES"), delay_s=args.delay) as server:
        settings = dict(model="fake-judge", base_url=server.base_url, timeout_s=30)
        return [measure(settings, items, c, cache_dir) | {"server": f"fake delay={args.delay}s"}
                for c in args.concurrency]


def local_judge_settings(cache_dir: Path) -> tuple[dict, dict]:
    """conf/judge/local.yaml as (OpenAIJudge keywords, judge.server), the server's log under `cache_dir`."""
    import yaml

    cfg = yaml.safe_load((REPO / "conf/judge/local.yaml").read_text())
    for key in ("defaults", "cache"):
        cfg.pop(key, None)
    server = dict(cfg.pop("server"), log_file=str(cache_dir / "judge_server.log"))
    return cfg, server


def run_local(args, items, cache_dir) -> list[dict]:
    """The real judge=local llama.cpp server: one LocalJudge holds it (started, or joined if this node already runs
    one with the same settings) while an OpenAIJudge per concurrency measures against its URL."""
    from medix.judges.local import LocalJudge

    medix_cache = Path(os.environ.get("MEDIX_CACHE_DIR", Path.home() / ".cache/medix"))
    cache_dir.mkdir(parents=True, exist_ok=True)
    settings, server = local_judge_settings(cache_dir)
    results = []
    with LocalJudge(**settings, server=server, cache={"enabled": False}, cache_dir=str(medix_cache)) as local:
        print(f"llama.cpp server up (or joined) in {local.startup_s:.1f}s at {local.base_url}", flush=True)
        client = {k: v for k, v in settings.items() if k != "max_concurrency"} | {"base_url": local.base_url}
        for c in args.concurrency:
            results.append(measure(client, items, c, cache_dir) | {"server": "local llama.cpp " + settings["model"]})
    return results


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", choices=("fake", "local", "both"), default="fake")
    p.add_argument("--delay", type=float, default=0.05, help="fake server: seconds per reply")
    p.add_argument("--items", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    items = judge_items(args.items)
    load = os.getloadavg()
    print(f"load_avg {load[0]:.2f},{load[1]:.2f},{load[2]:.2f}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="judge-perf-") as tmp:
        if args.server in ("fake", "both"):
            results += run_fake(args, items, Path(tmp) / "fake")
        if args.server in ("local", "both"):
            results += run_local(args, items, Path(tmp) / "local")
    for r in results:
        print(f"{r['server']:<48} c={r['concurrency']:<3} n={r['items']:<4} cold {r['cold_calls_per_s']:>8.2f}/s "
              f"({r['cold_s']:.2f}s)  warm {r['warm_calls_per_s']:>9.2f}/s ({r['warm_s']:.3f}s)  "
              f"failed {r['cold_failed']}/{r['warm_failed']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
