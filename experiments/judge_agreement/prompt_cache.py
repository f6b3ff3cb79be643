"""What llama.cpp's prompt-prefix reuse saves: the configured judge template (fixed text first, the item last) against
the same words with the item first, so nothing but the chat header is shared between two prompts.

python -m experiments.judge_agreement.prompt_cache [--judge local] [--items 12] [--rounds 2]
llama-cpp-python keeps the last prompt's KV cache in its one slot and evaluates only the tokens after the longest
common prefix ("Llama.generate: N prefix-match hit" in the server log), so no server option is needed. Blocks of
`--items` requests alternate between the two templates (`--rounds` times each) so load changes hit both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

from hydra.utils import instantiate

from experiments.judge_agreement.measure import HERE, judge_cfg
from medix.judges import JudgeItem
from medix.judges.config import register


def item_first(template: str) -> str:
    """The same words with the item's block (from the last `<predicted>` on) moved to the front."""
    at = template.rindex("<predicted>\n{prediction}")
    return template[at:].rstrip("\n") + "\n\n" + template[:at].rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judge", default="local")
    parser.add_argument("--items", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cache-dir", default=os.environ.get("MEDIX_CACHE_DIR", str(Path.home() / ".cache" / "medix")))
    parser.add_argument("--out", default=str(HERE / "results_prompt_cache.json"))
    args = parser.parse_args()
    from hydra.core.config_store import ConfigStore

    register(ConfigStore.instance())
    rows = [json.loads(line) for line in (HERE / "pairs.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["split"] == "check"]
    cfg = judge_cfg(f"{args.judge}+max_concurrency=1", Path(args.cache_dir))  # no judge cache: every request is sent
    templates = {"fixed_first": cfg.template, "item_first": item_first(cfg.template)}
    seconds: dict[str, list[float]] = {name: [] for name in templates}
    with instantiate(cfg) as judge:
        judge.score([JudgeItem("warm up", "warm", "up")])
        log = Path(judge.shared.server.log_path)
        log_start = log.stat().st_size
        offset = 0
        for _ in range(args.rounds):
            for name, template in templates.items():
                judge.template = template
                for row in rows[offset:offset + args.items]:
                    started = time.perf_counter()
                    judge.probabilities([JudgeItem(row["question"], row["prediction"], row["reference"])])
                    seconds[name].append(time.perf_counter() - started)
            offset += args.items
    reused = [int(n) for n in re.findall(r"(\d+) prefix-match hit", log.read_text()[log_start:])]
    result = {"date": time.strftime("%Y-%m-%d"), "load": os.getloadavg()[0], "judge": args.judge,
              "requests_per_template": len(seconds["fixed_first"]),
              "mean_s": {name: sum(v) / len(v) for name, v in seconds.items()},
              "median_s": {name: sorted(v)[len(v) // 2] for name, v in seconds.items()},
              "prefix_tokens_reused": {"max": max(reused, default=0), "min": min(reused, default=0)},
              "seconds": seconds}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print({k: result[k] for k in ("load", "mean_s", "median_s", "prefix_tokens_reused")})


if __name__ == "__main__":
    main()
