"""Agreement of judges with hand labels on pairs.jsonl, and their latency.

python -m experiments.judge_agreement.measure rule local local+parser=strict local+scoring=logprob
A judge spec is a conf/judge/<name>.yaml name, optionally followed by +key=value overrides (dot keys allowed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import defaultdict
from pathlib import Path

from omegaconf import OmegaConf

from medix.judges import JudgeItem, build_judge

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def agreement(labels: list[int], scores: list[float | None], threshold: float = 0.5) -> dict:
    """Accuracy, Cohen's kappa and the confusion counts of thresholded scores against 0/1 labels (None = miss)."""
    pairs = [(y, 1 if s >= threshold else 0) for y, s in zip(labels, scores) if s is not None]
    n = len(pairs)
    tp = sum(1 for y, p in pairs if y == 1 and p == 1)
    tn = sum(1 for y, p in pairs if y == 0 and p == 0)
    fp = sum(1 for y, p in pairs if y == 0 and p == 1)
    fn = sum(1 for y, p in pairs if y == 1 and p == 0)
    acc = (tp + tn) / n if n else 0.0
    p_yes = ((tp + fn) / n) * ((tp + fp) / n) if n else 0.0
    p_no = ((tn + fp) / n) * ((tn + fn) / n) if n else 0.0
    chance = p_yes + p_no
    kappa = (acc - chance) / (1 - chance) if n and chance < 1 else 0.0
    return {"n": n, "failed": len(scores) - n, "accuracy": acc, "kappa": kappa, "tp": tp, "tn": tn, "fp": fp, "fn": fn}


def auc(labels: list[int], scores: list[float | None]) -> float | None:
    """Probability that a YES pair scores above a NO pair (ties count half); meaningful for scoring=logprob."""
    yes = [s for y, s in zip(labels, scores) if y == 1 and s is not None]
    no = [s for y, s in zip(labels, scores) if y == 0 and s is not None]
    if not yes or not no:
        return None
    return sum((a > b) + 0.5 * (a == b) for a in yes for b in no) / (len(yes) * len(no))


def judge_cfg(spec: str, cache_dir: Path):
    name, *overrides = spec.split("+")
    root = OmegaConf.create({"paths": {"cache_dir": str(cache_dir)},
                             "judge": OmegaConf.load(REPO / "conf" / "judge" / f"{name}.yaml")})
    judge = root.judge
    if "cache" in judge:
        judge.cache.enabled = False  # measure real latency
    for override in overrides:
        key, value = override.split("=", 1)
        OmegaConf.update(judge, key, OmegaConf.from_dotlist([f"v={value}"]).v, merge=True)
    return judge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("judges", nargs="+")
    parser.add_argument("--pairs", default=str(HERE / "pairs.jsonl"))
    parser.add_argument("--cache-dir", default=os.environ.get("MEDIX_CACHE_DIR", str(Path.home() / ".cache" / "medix")))
    parser.add_argument("--out", default=str(HERE / "results.json"))
    args = parser.parse_args()
    rows = [json.loads(line) for line in Path(args.pairs).read_text().splitlines() if line.strip()]
    labels = [1 if r["label"] == "YES" else 0 for r in rows]
    items = [JudgeItem(r["question"], r["prediction"], r["reference"]) for r in rows]
    results = {}
    for spec in args.judges:
        started = time.perf_counter()
        with build_judge(judge_cfg(spec, Path(args.cache_dir)), args.cache_dir) as judge:
            ready = time.perf_counter()
            scores = judge.score(items)
            scored = time.perf_counter()
            stats = judge.stats()
        by_kind = defaultdict(lambda: ([], []))
        for row, y, s in zip(rows, labels, scores):
            by_kind[row["kind"]][0].append(y)
            by_kind[row["kind"]][1].append(s)
        results[spec] = {
            **agreement(labels, scores),
            "auc": auc(labels, scores),
            "startup_s": ready - started,
            "score_s_per_item": (scored - ready) / len(items),
            "judge_latency_s": stats.get("judge/latency_s"),
            "accuracy_by_kind": {k: agreement(ys, ss)["accuracy"] for k, (ys, ss) in sorted(by_kind.items())},
            "scores": scores,
        }
        r = results[spec]
        print(f"{spec:32s} acc={r['accuracy']:.3f} kappa={r['kappa']:.3f} failed={r['failed']} "
              f"auc={r['auc'] if r['auc'] is None else round(r['auc'], 3)} tp={r['tp']} tn={r['tn']} fp={r['fp']} fn={r['fn']} startup={r['startup_s']:.1f}s "
              f"per_item={r['score_s_per_item'] * 1000:.1f}ms by_kind={r['accuracy_by_kind']}", flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cpu {platform.processor()}",
            "pairs": len(rows)}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
