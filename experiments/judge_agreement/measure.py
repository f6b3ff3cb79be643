"""Agreement of judges with hand labels on pairs.jsonl (one split), and their latency.

python -m experiments.judge_agreement.measure --split check local local_small rule
python -m experiments.judge_agreement.measure --split tune local+template=@experiments/judge_agreement/templates/fewshot.txt
A judge spec is a conf/judge/<name>.yaml name, optionally followed by +key=value overrides of judge.* (dot keys
allowed; a value `@path` is the text of that file). The judge cache starts empty, so the latency is real. The verdicts
are `judge.score(items)` as training and medix.score get them; with scoring=logprob the P(YES) behind them
(`judge.probabilities`, asked first; `score` then reads the same replies from the cache) gives the AUC, and
`best_threshold` is the threshold with the highest accuracy on this split (choose on tune, report on check).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate

from medix.judges import JudgeItem
from medix.judges.config import register

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def agreement(labels: list[int], verdicts: list[float | None]) -> dict:
    """Accuracy, Cohen's kappa and the confusion counts of 1/0 verdicts against 0/1 labels (None = a failure)."""
    pairs = [(y, int(v)) for y, v in zip(labels, verdicts) if v is not None]
    n = len(pairs)
    tp = sum(1 for y, p in pairs if y == 1 and p == 1)
    tn = sum(1 for y, p in pairs if y == 0 and p == 0)
    fp = sum(1 for y, p in pairs if y == 0 and p == 1)
    fn = sum(1 for y, p in pairs if y == 1 and p == 0)
    acc = (tp + tn) / n if n else 0.0
    chance = (((tp + fn) / n) * ((tp + fp) / n) + ((tn + fp) / n) * ((tn + fn) / n)) if n else 0.0
    kappa = (acc - chance) / (1 - chance) if n and chance < 1 else 0.0
    return {"n": n, "failed": len(verdicts) - n, "accuracy": acc, "kappa": kappa, "tp": tp, "tn": tn, "fp": fp, "fn": fn}


def auc(labels: list[int], scores: list[float | None]) -> float | None:
    """Probability that a YES pair scores above a NO pair (ties count half)."""
    yes = [s for y, s in zip(labels, scores) if y == 1 and s is not None]
    no = [s for y, s in zip(labels, scores) if y == 0 and s is not None]
    if not yes or not no:
        return None
    return sum((a > b) + 0.5 * (a == b) for a in yes for b in no) / (len(yes) * len(no))


def thresholded(scores: list[float | None], threshold: float) -> list[float | None]:
    return [None if s is None else float(s >= threshold) for s in scores]


def best_threshold(labels: list[int], scores: list[float | None]) -> tuple[float, float]:
    """(threshold, accuracy) with the highest accuracy over a grid of 0.01 steps; ties go to the one nearest 0.5."""
    grid = [i / 100 for i in range(1, 100)]
    accuracy = {t: agreement(labels, thresholded(scores, t))["accuracy"] for t in grid}
    best = max(grid, key=lambda t: (round(accuracy[t], 9), -abs(t - 0.5)))
    return best, accuracy[best]


def judge_cfg(spec: str, cache_dir: Path, judge_cache: Path | None = None):
    name, *overrides = spec.split("+")
    args = [f"+judge={name}", f"+paths.cache_dir={cache_dir}"]
    for override in overrides:
        key, value = override.split("=", 1)
        if value.startswith("@"):
            value = json.dumps(Path(value[1:]).read_text())  # a quoted string for Hydra's override grammar
        args.append(f"judge.{key}={value}")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name=None, overrides=args)
    if "cache" in cfg.judge:  # a fresh cache (or none): every reply is asked once, so the latency is real
        cfg.judge.cache.enabled = judge_cache is not None
        cfg.judge.cache.path = str(judge_cache) if judge_cache else None
    return cfg.judge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("judges", nargs="+")
    parser.add_argument("--split", choices=["tune", "check", "all"], default="check")
    parser.add_argument("--pairs", default=str(HERE / "pairs.jsonl"))
    parser.add_argument("--cache-dir", default=os.environ.get("MEDIX_CACHE_DIR", str(Path.home() / ".cache" / "medix")))
    parser.add_argument("--out", default=None, help="default: results_<split>.json here")
    args = parser.parse_args()
    register(ConfigStore.instance())
    rows = [json.loads(line) for line in Path(args.pairs).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if args.split == "all" or r["split"] == args.split]
    labels = [1 if r["label"] == "YES" else 0 for r in rows]
    items = [JudgeItem(r["question"], r["prediction"], r["reference"]) for r in rows]
    out = Path(args.out or HERE / f"results_{args.split}.json")
    results = json.loads(out.read_text())["results"] if out.is_file() else {}
    for spec in args.judges:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = judge_cfg(spec, Path(args.cache_dir), Path(tmp) / "judge_cache.sqlite")
            started = time.perf_counter()
            with instantiate(cfg) as judge:
                ready = time.perf_counter()
                logprob = getattr(judge, "scoring", "text") == "logprob"
                scores = judge.probabilities(items) if logprob else judge.score(items)
                scored = time.perf_counter()
                stats = judge.stats()
                verdicts = judge.score(items) if logprob else scores  # from the cache: no new request
                assert judge.stats()["judge/requests"] == stats["judge/requests"]
        threshold = float(cfg.yes_threshold) if logprob else None
        by_kind = defaultdict(lambda: ([], []))
        for row, y, v in zip(rows, labels, verdicts):
            kind = row["kind"] + (f"/{row['miss']}" if row.get("miss") else "")
            by_kind[kind][0].append(y)
            by_kind[kind][1].append(v)
        r = results[spec] = {
            **agreement(labels, verdicts),
            "auc": auc(labels, scores),
            "threshold": threshold,
            "requests": stats.get("judge/requests"),
            "best_threshold": best_threshold(labels, scores) if logprob else None,
            "startup_s": ready - started,
            "score_s_per_item": (scored - ready) / len(items),
            "judge_latency_s": stats.get("judge/latency_s"),
            "accuracy_by_kind": {k: round(agreement(ys, vs)["accuracy"], 3) for k, (ys, vs) in sorted(by_kind.items())},
            "scores": dict(zip((row["id"] for row in rows), scores)),
        }
        print(f"{spec[:60]:60s} split={args.split} n={r['n']} acc={r['accuracy']:.3f} kappa={r['kappa']:.3f} "
              f"auc={r['auc'] if r['auc'] is None else round(r['auc'], 3)} failed={r['failed']} "
              f"threshold={threshold} best={r['best_threshold']} tp={r['tp']} tn={r['tn']} fp={r['fp']} fn={r['fn']} "
              f"startup={r['startup_s']:.1f}s latency={r['judge_latency_s']:.2f}s by_kind={r['accuracy_by_kind']}",
              flush=True)
    load = os.getloadavg()[0]
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cpu, load {load:.1f}",
            "split": args.split, "pairs": len(rows)}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
