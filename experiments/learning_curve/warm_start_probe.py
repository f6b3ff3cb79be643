"""How often does the default policy write the required form after N warm-start steps? Picks warm_start.steps for
the learning-curve run: enough that some completions of a group are formatted (GRPO then has a signal), not so many
that all are (nothing left to rise).

    python experiments/learning_curve/warm_start_probe.py --steps 0 2 4 8 --lr 1e-4

Composes the training config (`conf/config.yaml`, the defaults plus any `--override`s) and builds its dataset,
backbone and rollout engine as `medix.run` does. Warm-starts cumulatively on the training split and, at each N,
samples `--samples` completions for each of the last `--prompts` training prompts at temperature 1 (as the rollout
does), printing the format and modality reward means.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from medix.config import register_configs  # noqa: E402
from medix.instantiate import build  # noqa: E402
from medix.grpo.warm_start import warm_start  # noqa: E402
from medix.rewards.components import format_reward, modality_reward  # noqa: E402
from medix.rollout.base import Sampling  # noqa: E402


def compose_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=["paths.output_dir=/tmp/warm_start_probe", *overrides])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[0, 2, 4, 8])
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--override", nargs="*", default=[], help="config overrides, e.g. backbone.lora.r=8")
    args = p.parse_args()
    cfg = compose_config(args.override)
    datamodule = build(cfg.dataset)
    datamodule.setup("fit")  # the seeded train/val split medix.run trains on
    train = datamodule.train
    torch.manual_seed(0)
    backbone = build(cfg.backbone)
    engine = build(cfg.rollout)
    tag, thinking = cfg.reasoning_tag, cfg.callbacks.warm_start.thinking
    probe = train[-args.prompts:]  # the warm start draws from all of train; these are scored at each N
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0)
    done = 0
    try:
        for target in sorted(args.steps):
            warm_start(backbone, train, steps=target - done, lr=args.lr, batch_size=args.batch_size,
                       thinking=thinking, reasoning_tag=tag, seed=done)
            if target > done:
                engine.sync(backbone)  # rollout=vllm: the server samples from the warmed weights (hf: nothing to do)
            done = target
            torch.manual_seed(1)
            rollout = engine.generate(backbone, [backbone.render(s, tag) for s in probe], None,
                                      group_size=args.samples, sampling=sampling)
            tags = [s.tag for s in probe for _ in range(args.samples)]
            fmt = [format_reward(t, tag) for t in rollout.texts]
            mod = [modality_reward(t, solution_tag, tag) for t, solution_tag in zip(rollout.texts, tags)]
            print(f"warm-start steps {target}: format {sum(fmt) / len(fmt):.2f}, modality {sum(mod) / len(mod):.2f} "
                  f"({len(fmt)} samples); e.g. {rollout.texts[0][:120]!r}", flush=True)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
