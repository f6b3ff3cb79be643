"""One GRPO step (a rollout of B×G completions + one optimizer step) timed in medix and in TRL's GRPOTrainer: same
model and weights, prompts, settings; the two real training loops take turns step by step in one process.

    python experiments/perf/grpo_vs_trl.py --device cpu      # SmolLM2-135M + LoRA, 4×4 completions of 32 tokens
    python experiments/perf/grpo_vs_trl.py --device cuda     # random 0.4B Qwen2, bf16, 16×8 completions of 256 tokens
    python experiments/perf/grpo_vs_trl.py --device cpu --tiny --steps 2   # the cuda code path on a tiny Qwen2

The last line printed is `medix/trl step-time ratio: <x>` (median medix step / median TRL step).
Imports only torch, transformers, peft, trl (+ datasets, which TRL needs), lightning and medix modules that do not
import hydra, omegaconf, mlflow or openai (checked by `--check-imports`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

PRESETS = {
    # SmolLM2-135M-Instruct (converted GGUF) + LoRA r16 on all linear layers, fp32, real medix_mini prompts.
    "cpu": dict(prompts=4, group=4, completion=32, prompt_tokens=None, tuning="lora", dtype="float32", mixed="no",
                warmup=2, steps=5),
    # A randomly initialised ~0.4B Qwen2 (hidden 1024, 24 layers, vocab 151936), fp32 weights under bf16 autocast
    # (medix's trainer=gpu: precision bf16-mixed; TRL: bf16=True), synthetic 64-token prompts.
    "cuda": dict(prompts=16, group=8, completion=256, prompt_tokens=64, tuning="full", dtype="float32",
                 mixed="bf16", warmup=2, steps=6),
}
QWEN2_04B = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                 intermediate_size=2816, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True)
QWEN2_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=128, vocab_size=4096, max_position_embeddings=1024, tie_word_embeddings=True)
LORA = dict(r=16, alpha=32, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"])
FORBIDDEN_AT_IMPORT = ("hydra", "omegaconf", "mlflow", "openai")


class Config(dict):
    """A dict read by attribute (`cfg.lr`) with `.get`, standing in for an OmegaConf node."""

    def __getattr__(self, key):
        try:
            value = self[key]
        except KeyError as err:
            raise AttributeError(key) from err
        return Config(value) if isinstance(value, dict) else value


@dataclass
class BenchSample:
    """What GRPOModule reads from a Sample; `problem` holds an already rendered prompt in synthetic mode.
    Not frozen: Lightning's bf16-true plugin rebuilds dataclasses in a batch (it fails on medix's frozen Sample)."""

    id: str
    problem: str
    solution: str
    images: list = field(default_factory=list)


# ---- rewards (the same python function scores both sides) -------------------------------------------------------
def char_mix_reward(completions: list[str], solutions: list[str]) -> list[float]:
    """Cheap and deterministic: the share of characters among `aeiou01234` (varies within a group, also for the
    synthetic `w123` tokens)."""
    return [sum(ch in "aeiou01234" for ch in c) / max(1, len(c)) for c in completions]


def composite_rules_reward():
    """The medix format + modality rules (no judge, no embedder), weights renormalised over the two."""
    from medix.rewards.composite import CompositeReward

    rules = CompositeReward({"llm_judge": 0.0, "embedding": 0.0, "modality": 0.045 / 0.145, "format": 0.1 / 0.145},
                            reasoning_tag="thinking")
    return lambda completions, solutions: [float(v) for v in rules(completions, solutions).overall]


class TimedReward:
    """The medix reward object (`__call__(completions, solutions, questions) -> RewardBatch`) over a function."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, completions, solutions, questions=None):
        from medix.rewards.composite import RewardBatch

        values = self.fn(completions, solutions)
        return RewardBatch({"bench": list(values)}, list(values))


def trl_reward(fn):
    def bench_reward(prompts, completions, solution, **kwargs):
        return fn(completions, solution)

    return bench_reward


# ---- turn taking -------------------------------------------------------------------------------------------------
class Turns:
    """Lets two training loops run one step each in turn; a side that ends (or fails) stops taking part."""

    def __init__(self, sides: list[str]):
        self.order = list(sides)
        self.active = set(sides)
        self.holder = sides[0]
        self.cv = threading.Condition()

    def take(self, side: str) -> None:
        with self.cv:
            self.cv.wait_for(lambda: self.holder == side or len(self.active) <= 1)

    def give(self, side: str) -> None:
        with self.cv:
            others = [s for s in self.order if s != side and s in self.active]
            self.holder = others[0] if others else side
            self.cv.notify_all()

    def retire(self, side: str) -> None:
        with self.cv:
            self.active.discard(side)
            self.holder = next(iter(self.active), None)
            self.cv.notify_all()


@dataclass
class StepLog:
    steps: list[dict] = field(default_factory=list)
    phase: dict = field(default_factory=dict)  # rollout/reward seconds of the current step

    def summary(self, warmup: int) -> dict:
        kept = self.steps[warmup:]
        if not kept:
            return {}
        keys = [k for k in kept[0] if isinstance(kept[0][k], (int, float))]
        return {k: statistics.median(s[k] for s in kept) for k in keys} | {"n": len(kept)}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_begin(device: str) -> dict:
    sync(device)
    mark = {"t0": time.perf_counter()}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        mark["mem0"] = torch.cuda.memory_allocated()
    return mark


def nonfinite(model) -> list[str]:
    """Names of parameters (or their gradients) holding NaN/inf: a diverged step shows here first."""
    bad = []
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            bad.append(f"{name} (weight)")
        elif p.grad is not None and not torch.isfinite(p.grad).all():
            bad.append(f"{name} (grad)")
    return bad


def step_end(device: str, mark: dict, phase: dict) -> dict:
    sync(device)
    step = time.perf_counter() - mark["t0"]
    rec = {"step_s": step, "rollout_s": phase.get("rollout", 0.0), "reward_s": phase.get("reward", 0.0)}
    rec["update_s"] = step - rec["rollout_s"] - rec["reward_s"]  # everything else: logprobs, loss, backward, optim
    import resource

    rec["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process-wide, monotone
    if device == "cuda":
        rec["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rec["step_extra_gib"] = (torch.cuda.max_memory_allocated() - mark["mem0"]) / 2**30
    return rec


# ---- models, tokenizers, prompts ---------------------------------------------------------------------------------
def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer over `w0 … w{V-1}` (w1 = EOS, w2 = PAD): exact prompt lengths, no files needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="w0", eos_token="w1", pad_token="w2")
    tok.padding_side = "left"
    return tok


def synthetic_prompts(n: int, length: int, vocab_size: int, seed: int = 0) -> list[BenchSample]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (n, length), generator=gen)
    return [BenchSample(f"syn-{i}", " ".join(f"w{t}" for t in row.tolist()), "<OTHER> w3") for i, row in enumerate(ids)]


def medix_mini_prompts(n: int) -> list:
    from medix.data.samples import Sample
    from medix.data.tags import split_solution

    rows = [json.loads(line) for line in (REPO / "medix/data/medix_mini.jsonl").read_text().splitlines() if line]
    return [Sample(r["id"], r["problem"], r["solution"], *split_solution(r["solution"])) for r in rows[:n]]


def build_models(args, device: str):
    """(medix Backbone, TRL model, TRL tokenizer, TRL peft_config or None) with identical starting weights."""
    from medix.models.backbone import Backbone, apply_lora

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    lora = Config(LORA)
    peft_config = None
    if args.tuning == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    if args.model == "smollm2_135m":
        import yaml
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from medix.models.backbone import load_backbone, resolve_model_path

        cfg = yaml.safe_load((REPO / "conf/backbone/smollm2_135m.yaml").read_text())
        cfg.update(dtype=args.dtype, lora={**cfg["lora"], "enabled": args.tuning == "lora"})
        cache_dir = os.environ.get("MEDIX_CACHE_DIR", str(Path.home() / ".cache/medix"))
        torch.manual_seed(0)
        backbone = load_backbone(Config(cfg), cache_dir)
        backbone.model.to(device)
        path = resolve_model_path(Config(cfg), cache_dir)
        trl_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        trl_tok = AutoTokenizer.from_pretrained(path)
        trl_tok.padding_side = "left"
        if trl_tok.pad_token is None:
            trl_tok.pad_token = trl_tok.eos_token
        return backbone, trl_model, trl_tok, peft_config
    import copy

    from transformers import Qwen2Config, Qwen2ForCausalLM

    arch = QWEN2_TINY if args.model == "qwen2_tiny" else QWEN2_04B
    config = Qwen2Config(**arch, bos_token_id=None, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(dtype).to(device)  # initialised on the host: every weight gets its init
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 2
    trl_model = copy.deepcopy(model)
    tokenizer = synthetic_tokenizer(config.vocab_size)
    if args.tuning == "lora":
        torch.manual_seed(0)
        model = apply_lora(model, lora)
    n_params = sum(p.numel() for p in trl_model.parameters())
    print(f"model: Qwen2 random init, {n_params / 1e6:.0f}M parameters, {dtype}", flush=True)
    return Backbone(model=model, tokenizer=tokenizer, processor=None, is_vlm=False, name=args.model), \
        trl_model, synthetic_tokenizer(config.vocab_size), peft_config


def algorithm_config(args) -> Config:
    import yaml

    algo = yaml.safe_load((REPO / "conf/algorithm/grpo.yaml").read_text())
    algo.update(group_size=args.group, prompts_per_step=args.prompts, beta=0.0, num_iterations=1,
                mini_batch_size=args.prompts * args.group, max_new_tokens=args.completion,
                min_new_tokens=args.completion, lr=args.lr, temperature=1.0, top_p=1.0,
                cache_implementation=args.cache_implementation)
    return Config(algo)


# ---- the two sides -----------------------------------------------------------------------------------------------
def run_medix(args, backbone, samples, reward_fn, turns: Turns, log: StepLog, device: str) -> None:
    import lightning as L

    import medix.grpo.module as module_lib
    from medix.grpo.module import GRPOModule

    algo = algorithm_config(args)
    total = args.warmup + args.steps
    if args.no_share_prompt:  # the step as it was before prompt sharing (for before/after numbers)
        import functools

        module_lib.completion_logprobs = functools.partial(module_lib.completion_logprobs, share_prompt=False)
        module_lib.generate_completions = functools.partial(module_lib.generate_completions, share_prompt_cache=False)
    if args.synthetic:  # prompts are already token strings: skip the chat template, keep every other line of the step
        module_lib.render_prompt = lambda sample, tokenizer, reasoning_tag: sample.problem
    reward = TimedReward(reward_fn)

    class TimedModule(GRPOModule):
        def rollout(self, batch):
            t0 = time.perf_counter()
            out = super().rollout(batch)
            log.phase["rollout"] = time.perf_counter() - t0
            return out

    class TimedRewardCall:
        def __call__(self, completions, solutions, questions=None):
            t0 = time.perf_counter()
            out = reward(completions, solutions, questions)
            log.phase["reward"] = time.perf_counter() - t0
            return out

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            turns.take("medix")
            log.phase = {}
            self.mark = step_begin(device)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            log.steps.append(step_end(device, self.mark, log.phase))
            print(f"  medix step {len(log.steps)}: {log.steps[-1]['step_s']:.2f}s "
                  f"(process max RSS {log.steps[-1]['max_rss_gib']:.2f} GiB)", flush=True)
            if args.check_finite and (bad := nonfinite(pl_module.model)):
                print(f"  medix non-finite after step {len(log.steps)}: {len(bad)} tensors, e.g. {bad[:4]}", flush=True)
            turns.give("medix")

    module = TimedModule(backbone, TimedRewardCall(), algo, reasoning_tag="thinking", max_steps=total, seed=0)
    batches = [samples[(i * args.prompts) % len(samples):][:args.prompts] for i in range(total)]
    batches = [b if len(b) == args.prompts else samples[:args.prompts] for b in batches]
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
    precision = "bf16-mixed" if args.mixed == "bf16" else "bf16-true" if args.dtype == "bfloat16" else "32-true"
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=precision,
                        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Clock()],
                        default_root_dir=tempfile.mkdtemp(prefix="medix-perf-"))
    try:
        trainer.fit(module, train_dataloaders=loader)
    finally:
        turns.retire("medix")


def run_trl(args, trl_model, tokenizer, peft_config, samples, reward_fn, turns: Turns, log: StepLog, device: str,
            errors: list) -> None:
    try:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer

        from medix.data.prompts import render_prompt

        total = args.warmup + args.steps
        prompts = [s.problem if args.synthetic else render_prompt(s, tokenizer, "thinking") for s in samples]
        rows = [{"prompt": p, "solution": s.solution} for p, s in zip(prompts, samples)]
        rows = [rows[i % len(rows)] for i in range(total * args.prompts)]
        config = GRPOConfig(
            output_dir=tempfile.mkdtemp(prefix="trl-perf-"), per_device_train_batch_size=args.prompts * args.group,
            num_generations=args.group, gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
            max_completion_length=args.completion, generation_kwargs={"min_new_tokens": args.completion},
            cache_implementation=args.cache_implementation, temperature=1.0, top_p=1.0, top_k=0, beta=0.0,
            epsilon=0.2, epsilon_high=0.3, loss_type="dapo", scale_rewards="group", learning_rate=args.lr,
            weight_decay=0.01, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, optim="adamw_torch",
            max_steps=total, gradient_checkpointing=False, bf16=args.mixed == "bf16" or args.dtype == "bfloat16", use_cpu=device == "cpu",
            logging_steps=10**6, save_strategy="no", report_to="none", shuffle_dataset=False, seed=0,
            dataloader_num_workers=0, disable_tqdm=True,
        )

        class Clock(TrainerCallback):
            def on_step_begin(self, a, state, control, **kw):
                turns.take("trl")
                log.phase = {}
                self.mark = step_begin(device)

            def on_step_end(self, a, state, control, **kw):
                log.steps.append(step_end(device, self.mark, log.phase))
                print(f"  trl   step {len(log.steps)}: {log.steps[-1]['step_s']:.2f}s "
                      f"(process max RSS {log.steps[-1]['max_rss_gib']:.2f} GiB)", flush=True)
                if args.check_finite and (bad := nonfinite(kw["model"])):
                    print(f"  trl non-finite after step {len(log.steps)}: {len(bad)} tensors, e.g. {bad[:4]}",
                          flush=True)
                turns.give("trl")

        if args.trl_logprob_chunk:  # rows per LM-head tile in TRL's fused log-prob head (its default: 32768)
            import trl.trainer.utils as trl_utils

            trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = args.trl_logprob_chunk
        trainer = GRPOTrainer(model=trl_model, reward_funcs=trl_reward(reward_fn), args=config,
                              train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                              peft_config=peft_config, callbacks=[Clock()])
        timed(trainer, "_generate", "rollout", log)
        timed(trainer, "_calculate_rewards", "reward", log)
        trainer.train()
    except BaseException as exc:  # reported by the main thread
        errors.append(exc)
    finally:
        turns.retire("trl")


def timed(obj, name: str, phase: str, log: StepLog) -> None:
    inner = getattr(obj, name)

    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        out = inner(*a, **kw)
        log.phase[phase] = log.phase.get(phase, 0.0) + time.perf_counter() - t0
        return out

    setattr(obj, name, wrapper)


# ---- main --------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--reward", choices=("length", "composite"), default="length",
                   help="length: character-mix share (cheap); composite: medix format+modality rules")
    p.add_argument("--tiny", action="store_true", help="the cuda preset's code path with a tiny Qwen2 (smoke test)")
    p.add_argument("--model", choices=("smollm2_135m", "qwen2_04b", "qwen2_tiny"), default=None,
                   help="override the preset's model (e.g. the CUDA preset's random 0.4B Qwen2 on a CPU)")
    p.add_argument("--sides", default="medix,trl", help="comma list; the first starts")
    for name in ("prompts", "group", "completion", "prompt_tokens", "warmup", "steps"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    p.add_argument("--tuning", choices=("lora", "full"), default=None)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="weights")
    p.add_argument("--mixed", choices=("no", "bf16"), default=None, help="bf16 autocast on both sides")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--cache-implementation", default=None, help="e.g. static; used by both sides")
    p.add_argument("--no-share-prompt", action="store_true",
                   help="medix without the shared prompt forward/KV cache (the earlier step)")
    p.add_argument("--trl-logprob-chunk", type=int, default=None,
                   help="rows per tile of TRL's fused LM head; on CPU it scores every position (prompt included) "
                        "and one 32768-row tile of full-vocab fp32 logits exhausts a 24 GB machine (default: 1024 "
                        "on cpu, TRL's own on cuda)")
    p.add_argument("--check-finite", action="store_true", help="after each step, name NaN/inf weights or grads")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (cpu)")
    p.add_argument("--no-cudnn-sdp", action="store_true",
                   help="turn off PyTorch's cuDNN attention backend (both sides; see README, CUDA)")
    p.add_argument("--json", default=None, help="also write the summary here")
    p.add_argument("--check-imports", action="store_true", help="import what this script needs and exit")
    args = p.parse_args(argv)
    preset = PRESETS["cuda" if args.device == "cuda" or args.tiny else "cpu"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.tiny:
        args.mixed = "no" if args.device == "cpu" else args.mixed
        args.prompts, args.group, args.completion, args.prompt_tokens = (
            min(args.prompts, 2), min(args.group, 4), min(args.completion, 16), min(args.prompt_tokens, 16))
    if args.trl_logprob_chunk is None and args.device == "cpu":
        args.trl_logprob_chunk = 1024
    if args.model is None:
        args.model = "qwen2_tiny" if args.tiny else ("qwen2_04b" if args.device == "cuda" else "smollm2_135m")
    args.synthetic = args.model != "smollm2_135m"
    return args


def check_imports() -> list[str]:
    import lightning  # noqa: F401
    import peft  # noqa: F401
    import trl  # noqa: F401

    import medix.grpo.module  # noqa: F401
    import medix.models.backbone  # noqa: F401

    return sorted({m.split(".")[0] for m in sys.modules} & set(FORBIDDEN_AT_IMPORT))


def main(argv=None) -> float:
    args = parse_args(argv)
    if args.no_cudnn_sdp:
        torch.backends.cuda.enable_cudnn_sdp(False)
    if args.check_imports:
        bad = check_imports()
        print("forbidden modules imported:", bad or "none")
        return 0.0
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    device = args.device
    load = os.getloadavg()
    print(f"device={device} model={args.model} tuning={args.tuning} dtype={args.dtype} mixed={args.mixed} prompts={args.prompts} "
          f"group={args.group} completion={args.completion} reward={args.reward} warmup={args.warmup} "
          f"steps={args.steps} share_prompt={not args.no_share_prompt} threads={torch.get_num_threads()} cache_implementation={args.cache_implementation} "
          f"cudnn_sdp={torch.backends.cuda.cudnn_sdp_enabled()} "
          f"load_avg={load[0]:.2f},{load[1]:.2f},{load[2]:.2f}", flush=True)
    backbone, trl_model, trl_tok, peft_config = build_models(args, device)
    if args.synthetic:
        samples = synthetic_prompts(max(args.prompts * 4, 8), args.prompt_tokens, trl_model.config.vocab_size)
    else:
        samples = medix_mini_prompts(max(args.prompts * 4, 8))
    reward_fn = composite_rules_reward() if args.reward == "composite" else char_mix_reward
    sides = args.sides.split(",")
    turns = Turns(sides)
    logs = {s: StepLog() for s in sides}
    errors: list = []
    worker = None
    if "trl" in sides:
        worker = threading.Thread(target=run_trl, args=(args, trl_model, trl_tok, peft_config, samples, reward_fn,
                                                        turns, logs["trl"], device, errors), daemon=True)
        worker.start()
    if "medix" in sides:
        run_medix(args, backbone, samples, reward_fn, turns, logs["medix"], device)
    if worker is not None:
        worker.join()
    if errors:
        raise errors[0]
    summary = {s: logs[s].summary(args.warmup) for s in sides}
    print(f"\nmedian over {args.steps} steps after {args.warmup} warm-up (seconds; update = step - rollout - reward)")
    for side in sides:
        s = summary[side]
        mem = f"  peak {s['peak_gib']:.2f} GiB (step adds {s['step_extra_gib']:.2f})" if "peak_gib" in s else ""
        print(f"{side:>6}: step {s['step_s']:.3f}  rollout {s['rollout_s']:.3f}  reward {s['reward_s']:.4f}  "
              f"update {s['update_s']:.3f}{mem}")
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    load = os.getloadavg()
    print(f"process peak RSS {rss:.2f} GiB; load_avg at end {load[0]:.2f},{load[1]:.2f},{load[2]:.2f}")
    ratio = summary["medix"]["step_s"] / summary["trl"]["step_s"] if set(sides) >= {"medix", "trl"} else float("nan")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "summary": summary, "ratio": ratio,
                                               "steps": {s: logs[s].steps for s in sides}}, indent=1))
    print(f"medix/trl step-time ratio: {ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
