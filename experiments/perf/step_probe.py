"""Where does a GRPO step go non-finite? One medix step (the real GRPOModule under Lightning) on the perf script's
synthetic Qwen2, checked at every stage: the sampled token ids, the rollout masks, the trainer's log-probs of the
sampled tokens, the advantages, each micro-batch's loss, every gradient right after backward (before clipping), the
gradient norm, then the weights after the optimizer step.

    python experiments/perf/step_probe.py --device cuda                       # the CUDA preset's model, 16x8x64x16
    python experiments/perf/step_probe.py --device cpu --model qwen2_tiny --prompts 2 --group 4   # the script itself

Each check prints one line `probe <stage>: ...`; the first stage with a non-finite value is named at the end.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments" / "perf"))

import grpo_vs_trl as bench  # noqa: E402


def describe(name: str, t: torch.Tensor) -> str:
    t = t.detach().float()
    finite = torch.isfinite(t)
    ok = t[finite]
    span = f"min {ok.min().item():.4g} max {ok.max().item():.4g}" if ok.numel() else "no finite values"
    return f"{name}: {int((~finite).sum())} non-finite of {t.numel()}, {span}"


def main(argv=None) -> int:
    import lightning as L

    from medix.data.datamodule import PromptDataModule
    from medix.grpo.module import GRPOModule
    from medix.grpo.trainer import grpo_trainer

    import argparse

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--anomaly", action="store_true", help="autograd anomaly detection: names the backward op")
    ours, rest = extra.parse_known_args(argv if argv is not None else sys.argv[1:])
    args = bench.parse_args(["--sides", "medix", *rest])
    device = args.device
    if args.no_cudnn_sdp:
        torch.backends.cuda.enable_cudnn_sdp(False)
    backbone, _, tokenizer, _ = bench.build_models(args, device)
    samples = bench.synthetic_prompts(args.prompts, args.prompt_tokens, backbone.model.config.vocab_size,
                                      min_length=args.prompt_tokens_min)
    datamodule = PromptDataModule.from_samples(samples, [], batch_size=args.prompts, seed=0)
    first_bad: list[str] = []

    def report(stage: str, line: str, bad: bool) -> None:
        print(f"probe {stage}: {line}", flush=True)
        if bad and not first_bad:
            first_bad.append(stage)

    class Probed(GRPOModule):
        def update(self, trained):
            rollout = trained.rollout
            ids = rollout.completion_ids
            vocab = len(tokenizer)
            specials = (("unk", tokenizer.unk_token_id), ("eos", tokenizer.eos_token_id), ("pad", tokenizer.pad_token_id))
            special = {name: int((ids == i).sum()) for name, i in specials}
            prompt, prompt_mask = rollout.input_ids[:, :rollout.prompt_length], rollout.attention_mask[:, :rollout.prompt_length]
            in_prompt = {name: int(((prompt == i) & (prompt_mask == 1)).sum()) for name, i in specials}
            pads = (prompt_mask == 0).sum(1)
            report("prompts", f"{rollout.prompt_length} positions, left padding per row {int(pads.min())}-{int(pads.max())}"
                   f" ({int((pads > 0).sum())} of {len(pads)} rows padded), special ids inside the prompts {in_prompt}",
                   False)
            report("rollout", f"{tuple(rollout.input_ids.shape)} rows x tokens, completion ids in "
                   f"[{int(ids.min())}, {int(ids.max())}] (tokenizer vocab {vocab}, model vocab "
                   f"{self.model.config.vocab_size}), special ids sampled {special}, completion tokens "
                   f"{int(rollout.completion_mask.sum())}, attention zeros {int((rollout.attention_mask == 0).sum())}",
                   bool(int(ids.max()) >= self.model.config.vocab_size))
            rewards = trained.overall
            report("rewards", describe("overall", rewards) + f", mean {rewards.mean():.4f} std {rewards.std():.4f}",
                   not bool(torch.isfinite(rewards).all()))
            return super().update(trained)

        def micro_batch_loss(self, rollout, rows, counted, mask, advantages, old_logp, ref_logp, *rest):
            report("advantages", describe("A", advantages[rows]), not bool(torch.isfinite(advantages).all()))
            loss, m = super().micro_batch_loss(rollout, rows, counted, mask, advantages, old_logp, ref_logp, *rest)
            report("loss", f"{float(loss):.6g} over rows {rows[0]}..{rows[-1]}; entropy {m.get('entropy', float('nan')):.4g}",
                   not bool(torch.isfinite(loss)))
            return loss, m

        def manual_backward(self, loss, *a, **kw):
            super().manual_backward(loss, *a, **kw)
            bad = [n for n, p in self.model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
            norms = torch.stack([p.grad.detach().float().norm() for p in self.model.parameters() if p.grad is not None])
            report("grad after backward", f"norm {norms.norm().item():.4g}, {len(bad)} non-finite tensors "
                   f"{bad[:3]}", bool(bad))

        def clip_gradients(self, optimizer, *a, **kw):
            super().clip_gradients(optimizer, *a, **kw)
            norms = torch.stack([p.grad.detach().float().norm() for p in self.model.parameters() if p.grad is not None])
            report("grad after clip", f"norm {norms.norm().item():.4g}", not bool(torch.isfinite(norms).all()))

    class AfterStep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            bad = [n for n, p in pl_module.model.named_parameters() if not torch.isfinite(p).all()]
            report(f"weights after step {pl_module.grpo_step}", f"{len(bad)} non-finite tensors {bad[:3]}", bool(bad))

    module = Probed(backbone, bench.build_engine(args, Path("/tmp")), bench.BenchReward(bench.char_mix_reward),
                    bench.algorithm_config(args), reasoning_tag="thinking", seed=0)
    precision = "bf16-mixed" if args.mixed == "bf16" else "bf16-true" if args.dtype == "bfloat16" else "32-true"
    trainer = grpo_trainer(max_steps=args.steps, accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                           precision=precision, callbacks=[AfterStep()], enable_progress_bar=False,
                           detect_anomaly=ours.anomaly)  # Lightning sets autograd's anomaly mode around fit itself
    trainer.fit(module, datamodule=datamodule)
    print(f"probe verdict: first non-finite stage: {first_bad[0] if first_bad else 'none'}", flush=True)
    return 1 if first_bad else 0


if __name__ == "__main__":
    sys.exit(main())
