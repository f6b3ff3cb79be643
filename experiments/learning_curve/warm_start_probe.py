"""How often does the default policy write the required form after N warm-start steps? Picks warm_start.steps for
the learning-curve run: enough that some completions of a group are formatted (GRPO then has a signal), not so many
that all are (nothing left to rise).

    python experiments/learning_curve/warm_start_probe.py --steps 0 2 4 8 --lr 1e-4

Warm-starts cumulatively on the medix_mini training split and, at each N, samples `--samples` completions for each of
`--prompts` training prompts at temperature 1 (as the rollout does), printing the format and modality reward means.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from medix.data import load_report, split_samples  # noqa: E402
from medix.grpo.rollout import generate_completions  # noqa: E402
from medix.grpo.warm_start import warm_start  # noqa: E402
from medix.data.prompts import render_prompt  # noqa: E402
from medix.models import load_backbone  # noqa: E402
from medix.rewards.components import format_reward, modality_reward  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[0, 2, 4, 8])
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args()
    cfg = OmegaConf.load(REPO / "conf/config.yaml")
    dataset = OmegaConf.merge(OmegaConf.load(REPO / "conf/dataset/medix_mini.yaml"), {"seed": 0})
    train, _ = split_samples(load_report(dataset).samples, dataset.val_size, 0)
    cache_dir = os.environ.get("MEDIX_CACHE_DIR", str(Path.home() / ".cache/medix"))
    torch.manual_seed(0)
    backbone = load_backbone(OmegaConf.load(REPO / "conf/backbone/smollm2_135m.yaml"), cache_dir)
    probe = train[-args.prompts:]  # the warm start draws from all of train; these are scored at each N
    done = 0
    for target in sorted(args.steps):
        ws = OmegaConf.merge(cfg.warm_start, {"steps": target - done, "lr": args.lr, "batch_size": args.batch_size})
        warm_start(backbone, train, ws, reasoning_tag="thinking", seed=done)
        done = target
        backbone.model.eval()
        torch.manual_seed(1)
        rollout = generate_completions(backbone.model, backbone.tokenizer,
                                       [render_prompt(s, backbone.tokenizer, "thinking") for s in probe],
                                       group_size=args.samples, max_new_tokens=args.max_new_tokens,
                                       temperature=1.0, top_p=1.0)
        tags = [s.tag for s in probe for _ in range(args.samples)]
        fmt = [format_reward(t) for t in rollout.texts]
        mod = [modality_reward(t, tag) for t, tag in zip(rollout.texts, tags)]
        print(f"warm-start steps {target}: format {sum(fmt) / len(fmt):.2f}, modality {sum(mod) / len(mod):.2f} "
              f"({len(fmt)} samples); e.g. {rollout.texts[0][:120]!r}", flush=True)


if __name__ == "__main__":
    main()
