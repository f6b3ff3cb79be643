"""One GRPO step (a rollout of B×G completions + one optimizer step) timed in medix and in TRL's GRPOTrainer: same
model and weights, prompts, settings. On the CPU preset each side runs in a process of its own, one after the other
(`--processes separate`): in one process the two loops slowed each other 2.2-2.5x (README, "one process or two").
The CUDA preset keeps them in one process taking turns step by step (`--processes shared`), so one lent GPU call
times both.

    python experiments/perf/grpo_vs_trl.py --device cpu      # SmolLM2-135M + LoRA, 4×4 completions of 32 tokens
    python experiments/perf/grpo_vs_trl.py --device cpu --rollout vllm   # medix samples from an fp32 vLLM server
    python experiments/perf/grpo_vs_trl.py --device cuda     # random 0.4B Qwen2, bf16, 16×8 completions of 256 tokens
    python experiments/perf/grpo_vs_trl.py --device cpu --tiny --steps 2   # the cuda code path on a tiny Qwen2

medix runs the real `GRPOModule` under `medix.grpo.trainer.grpo_trainer`, with the rollout engine `--rollout` names:
`hf` (medix.rollout.hf.HFEngine, generate in this process) or `vllm` (medix.rollout.vllm.VLLMEngine: a vLLM server
started from .venv-vllm, the LoRA adapter synced in place after every step). TRL samples with transformers' generate
(TRL's vLLM paths: see trl_vllm_probe.py and README.md). The last line printed is
`medix/trl step-time ratio: <x>` (median medix step / median TRL step).
With `--rollout hf` it imports only torch, transformers, peft, trl (+ datasets, which TRL needs), lightning and medix
modules; `--check-imports` names any of hydra, omegaconf, mlflow or openai that gets imported, and the line that
imported it (the GPU image has none of them).
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
                warmup=2, steps=5, processes="separate"),
    # A randomly initialised ~0.4B Qwen2 (hidden 1024, 24 layers, vocab 151936), fp32 weights under bf16 autocast
    # (medix's trainer=gpu: precision bf16-mixed; TRL: bf16=True), synthetic 64-token prompts.
    "cuda": dict(prompts=16, group=8, completion=256, prompt_tokens=64, tuning="full", dtype="float32",
                 mixed="bf16", warmup=2, steps=6, processes="shared"),
}
QWEN2_04B = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                 intermediate_size=2816, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True)
QWEN2_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=128, vocab_size=4096, max_position_embeddings=1024, tie_word_embeddings=True)
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
FORBIDDEN_AT_IMPORT = ("hydra", "omegaconf", "mlflow", "openai")


class Config(dict):
    """A dict read by attribute (`cfg.lr`, `cfg.dynamic_sampling.enabled`), standing in for an OmegaConf node."""

    def __getattr__(self, key):
        try:
            value = self[key]
        except KeyError as err:
            raise AttributeError(key) from err
        return Config(value) if isinstance(value, dict) else value


# ---- rewards (the same python function scores both sides) -------------------------------------------------------
def char_mix_reward(completions: list[str], solutions: list[str]) -> list[float]:
    """Cheap and deterministic: the share of characters among `aeiou01234` (varies within a group, also for the
    synthetic `w123` tokens)."""
    return [sum(ch in "aeiou01234" for ch in c) / max(1, len(c)) for c in completions]


def composite_rules_reward():
    """The medix format + modality rule components (no judge, no embedder), weights renormalised over the two."""
    import functools

    from medix.rewards.components import format_rewards, modality_rewards
    from medix.rewards.composite import CompositeReward

    rules = CompositeReward({"modality": 0.045 / 0.145, "format": 0.1 / 0.145},
                            {"modality": functools.partial(modality_rewards, reasoning_tag="thinking"),
                             "format": functools.partial(format_rewards, reasoning_tag="thinking")})
    return lambda completions, solutions: [float(v) for v in rules(completions, solutions).overall]


class BenchReward:
    """The reward contract GRPOModule reads (`names`, `(completions, solutions, **columns) -> RewardBatch`) over
    a plain function of (completions, solutions)."""

    names = ["bench"]

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, completions, solutions, **columns):
        from medix.rewards.composite import RewardBatch

        values = [float(v) for v in self.fn(completions, solutions)]
        return RewardBatch({"bench": values}, list(values))

    def close(self) -> None:
        pass


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
    side: str = ""
    path: Path | None = None  # each step is also appended here as a JSON line (kept when a time limit ends the run)

    def add(self, rec: dict) -> None:
        self.steps.append(rec)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps({"side": self.side, "step": len(self.steps), **rec}) + "\n")

    def line(self) -> str:
        rec = self.steps[-1]
        gpu = f"; GPU peak {rec['peak_gib']:.2f} GiB" if "peak_gib" in rec else ""
        return (f"  {self.side:<5} step {len(self.steps)}: {rec['step_s']:.2f}s (rollout {rec['rollout_s']:.2f}, "
                f"sync {rec['sync_s']:.2f}; process max RSS {rec['max_rss_gib']:.2f} GiB{gpu}")

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
    rec = {"step_s": step, "rollout_s": phase.get("rollout", 0.0), "reward_s": phase.get("reward", 0.0),
           "sync_s": phase.get("sync", 0.0)}  # sync: the policy pushed into a rollout server (0 when none)
    # everything else: logprobs, loss, backward, optimizer (and the loops' own bookkeeping)
    rec["update_s"] = step - rec["rollout_s"] - rec["reward_s"] - rec["sync_s"]
    import resource

    rec["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process-wide, monotone
    if device == "cuda":
        rec["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rec["step_extra_gib"] = (torch.cuda.max_memory_allocated() - mark["mem0"]) / 2**30
    return rec


# ---- models, tokenizers, prompts ---------------------------------------------------------------------------------
def synthetic_tokenizer(vocab_size: int, legacy: bool = False):
    """A word-level tokenizer over `w0 … w{V-1}` (w0 = UNK, w1 = EOS, w2 = PAD): exact prompt lengths, no files.

    The special tokens match whole words only. legacy=True rebuilds the set-up of the 2026-11-26 GPU runs, whose
    plain special tokens also matched inside words: `w123` became [w1 (EOS), w0 (UNK)] and `w2999` [w2 (PAD), w0], so
    the "64-token" prompts held EOS, PAD and UNK ids, had different lengths (left padding) and were not the prompts
    the script meant to send."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()

    def special(word):
        return word if legacy else AddedToken(word, single_word=True, special=True)

    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token=special("w0"), eos_token=special("w1"),
                                  pad_token=special("w2"))
    tok.padding_side = "left"
    return tok


def synthetic_prompts(n: int, length: int, vocab_size: int, seed: int = 0, min_length: int | None = None) -> list:
    """medix Samples whose `problem` is already the prompt, as `w<id>` words (the synthetic backbone does not apply
    a chat template): `length` ordinary tokens each, or a length drawn from [min_length, length] (left padding)."""
    from medix.data.samples import Sample

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (n, length), generator=gen)
    lengths = torch.randint(min_length, length + 1, (n,), generator=gen).tolist() if min_length else [length] * n
    return [Sample(f"syn-{i}", " ".join(f"w{t}" for t in row[:k].tolist()), "<OTHER> w3", "<OTHER>", "w3")
            for i, (row, k) in enumerate(zip(ids, lengths))]


def medix_mini_prompts(n: int) -> list:
    from medix.data.samples import Sample
    from medix.data.tags import split_solution

    rows = [json.loads(line) for line in (REPO / "medix/data/medix_mini.jsonl").read_text().splitlines() if line]
    return [Sample(r["id"], r["problem"], r["solution"], *split_solution(r["solution"])) for r in rows[:n]]


def smollm2_backbone(args):
    """The offline default backbone (conf/backbone/smollm2_135m.yaml) through medix's own loader, LoRA per LORA."""
    import yaml

    from medix.models.causal_lm import load_causal_lm

    cfg = yaml.safe_load((REPO / "conf/backbone/smollm2_135m.yaml").read_text())
    cfg.pop("defaults", None)
    from peft import LoraConfig

    cfg.update(dtype=args.dtype, lora=LoraConfig(**LORA) if args.tuning == "lora" else None, gguf=Config(cfg["gguf"]),
               cache_dir=os.environ.get("MEDIX_CACHE_DIR", str(Path.home() / ".cache/medix")))
    return load_causal_lm(**cfg)


def build_models(args, device: str):
    """(medix Backbone, TRL model, TRL tokenizer, TRL peft_config or None) with identical starting weights."""
    from medix.models.base import Backbone
    from medix.models.loading import apply_lora

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    from peft import LoraConfig

    peft_config = LoraConfig(**LORA) if args.tuning == "lora" else None
    if args.model == "smollm2_135m":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(0)
        backbone = smollm2_backbone(args)  # its path: the converted HF folder, what a vLLM server serves
        backbone.model.to(device)
        trl_model = AutoModelForCausalLM.from_pretrained(backbone.path, dtype=dtype).to(device)
        trl_tok = AutoTokenizer.from_pretrained(backbone.path)
        trl_tok.padding_side = "left"
        if trl_tok.pad_token is None:
            trl_tok.pad_token = trl_tok.eos_token
        return backbone, trl_model, trl_tok, peft_config
    import copy

    from transformers import Qwen2Config, Qwen2ForCausalLM

    class SyntheticBackbone(Backbone):
        def render(self, sample, reasoning_tag: str) -> str:
            return sample.problem  # already the prompt's tokens; every other line of the step is medix's own

    arch = QWEN2_TINY if args.model == "qwen2_tiny" else QWEN2_04B
    config = Qwen2Config(**arch, bos_token_id=None, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(dtype).to(device)  # initialised on the host: every weight gets its init
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 2
    trl_model = copy.deepcopy(model)
    if args.tuning == "lora":
        torch.manual_seed(0)
        model = apply_lora(model, LoraConfig(**LORA))
    n_params = sum(p.numel() for p in trl_model.parameters())
    print(f"model: Qwen2 random init, {n_params / 1e6:.0f}M parameters, {dtype}", flush=True)
    return SyntheticBackbone(model, synthetic_tokenizer(config.vocab_size, args.legacy_tokenizer), args.model), \
        trl_model, synthetic_tokenizer(config.vocab_size, args.legacy_tokenizer), peft_config


def algorithm_config(args):
    """conf/algorithm/grpo.yaml over its schema (medix.config.AlgorithmConfig) with the step matched to TRL's (see
    README.md), built as medix.run builds it (the optimizer a partial, sampling a Sampling) but without Hydra."""
    import dataclasses
    import functools

    import yaml

    from medix.config import AlgorithmConfig
    from medix.rollout.base import Sampling

    own = yaml.safe_load((REPO / "conf/algorithm/grpo.yaml").read_text())
    own.pop("defaults", None)
    algo = dataclasses.replace(AlgorithmConfig(), **own)
    optimizer = functools.partial(torch.optim.AdamW, lr=args.lr, weight_decay=algo.optimizer.weight_decay)
    sampling = Sampling(max_new_tokens=args.completion, min_new_tokens=args.min_new_tokens, temperature=1.0, top_p=1.0)
    return dataclasses.replace(algo, group_size=args.group, prompts_per_step=args.prompts, beta=0.0,
                               num_iterations=1, mini_batch_size=args.prompts * args.group,
                               micro_batch_size=args.micro_batch_size, optimizer=optimizer, sampling=sampling)


def build_engine(args, workdir: Path):
    """The medix rollout engine `--rollout` names. vllm: an fp32 server (by default) for the backbone's folder,
    started from .venv-vllm by medix.rollout.vllm_server.VLLMServer; the engine starts it on first use."""
    if args.rollout == "hf":
        from medix.rollout.hf import HFEngine

        return HFEngine(share_prompt_cache=not args.no_share_prompt, cache_implementation=args.cache_implementation)
    if args.model != "smollm2_135m":
        raise SystemExit(f"--rollout vllm needs a model folder to serve; --model {args.model} is built in memory")
    from medix.rollout.vllm import VLLMEngine

    server = dict(dtype=args.vllm_dtype, max_lora_rank=LORA["r"], cpu_threads_bind=args.vllm_threads_bind, seed=0,
                  kv_cache_space_gib=args.vllm_kv_cache_gib, block_size=32, max_model_len=2048, startup_timeout_s=600.0,
                  log_path=str(workdir / "vllm_server.log"))
    return VLLMEngine(sync_dir=str(workdir / "rollout_sync"), server=server)


def memory_guard(min_available_gib: float, interval_s: float = 0.2) -> None:
    """A daemon thread that ends the process (exit 3) when MemAvailable drops below `min_available_gib`. A vLLM
    server started by medix gets SIGTERM with it (its parent-death signal)."""

    def available_gib() -> float:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
        return float("inf")

    def watch():
        while True:
            left = available_gib()
            if left < min_available_gib:
                print(f"\nmemory guard: MemAvailable {left:.2f} GiB < --min-available-gib {min_available_gib:g}; "
                      "stopping this run", file=sys.stderr, flush=True)
                os._exit(3)
            time.sleep(interval_s)

    if min_available_gib > 0 and Path("/proc/meminfo").exists():
        threading.Thread(target=watch, name="memory-guard", daemon=True).start()


def group_memory_gib(pgid: int) -> tuple[float, float]:
    """(sum of peak RSS, sum of current RSS) in GiB over the processes of process group `pgid` (a vLLM server:
    its API server and engine-core processes). The sum of peaks is an upper bound of the group's peak."""
    peak = now = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines() if ":" in line)
        except (OSError, ValueError, IndexError):
            continue
        peak += int(status.get("VmHWM", "0 kB").split()[0])
        now += int(status.get("VmRSS", "0 kB").split()[0])
    return peak / 2**20, now / 2**20


# ---- the two sides -----------------------------------------------------------------------------------------------
def run_medix(args, backbone, engine, datamodule, reward_fn, turns: Turns, log: StepLog, device: str) -> None:
    import lightning as L

    import medix.grpo.module as module_lib
    from medix.grpo.module import GRPOModule
    from medix.grpo.trainer import grpo_trainer

    algo = algorithm_config(args)
    total = args.warmup + args.steps
    if args.no_share_prompt:  # the update as it was before prompt sharing (the HF engine's flag covers the rollout)
        import functools

        module_lib.completion_logprobs = functools.partial(module_lib.completion_logprobs, share_prompt=False)
        GRPOModule.step_prefix = lambda self, rollout, rows: None  # nor the template's prefix, once per step
    engine_sync = engine.sync

    def timed_sync(policy, *a, **kw):  # the step's policy push into the rollout server
        t0 = time.perf_counter()
        out = engine_sync(policy, *a, **kw)
        log.phase["sync"] = log.phase.get("sync", 0.0) + time.perf_counter() - t0
        return out

    engine.sync = timed_sync

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            turns.take("medix")
            log.phase = {}
            self.mark = step_begin(device)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            times = pl_module.timings  # the module's own rollout / reward seconds of this step
            rec = step_end(device, self.mark, {"rollout": times.get("rollout", 0.0),
                                               "reward": times.get("reward", 0.0), **log.phase})
            metrics = trainer.callback_metrics
            for key in ("rollout/logprob_diff/mean", "rollout/logprob_diff/max", "rollout/policy_version"):
                if key in metrics:
                    rec[key] = float(metrics[key])
            log.add(rec)
            diff = f", logprob_diff {rec['rollout/logprob_diff/mean']:.2e}" if "rollout/logprob_diff/mean" in rec else ""
            print(f"{log.line()}{diff})", flush=True)
            if args.check_finite and (bad := nonfinite(pl_module.model)):
                print(f"  medix non-finite after step {len(log.steps)}: {len(bad)} tensors, e.g. {bad[:4]}", flush=True)
            turns.give("medix")

    module = GRPOModule(backbone, engine, BenchReward(reward_fn), algorithm=algo, reasoning_tag="thinking", seed=0)
    precision = "bf16-mixed" if args.mixed == "bf16" else "bf16-true" if args.dtype == "bfloat16" else "32-true"
    strategy = "auto"
    if args.medix_strategy == "fsdp":  # trainer=fsdp on one device: FSDP2 units (bf16 compute on a GPU, fp32 masters)
        from medix.models.sharding import fsdp_strategy

        strategy = fsdp_strategy(devices=1, param_dtype="bfloat16" if args.mixed == "bf16" else "float32")
        precision = "32-true"  # the FSDP2 policy casts (conf/trainer/fsdp.yaml)
    trainer = grpo_trainer(max_steps=total, max_epochs=1000, val_check_interval=None,
                           accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                           strategy=strategy, precision=precision, callbacks=[Clock()], enable_progress_bar=False,
                           default_root_dir=tempfile.mkdtemp(prefix="medix-perf-"))
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        turns.retire("medix")


def run_trl(args, trl_model, tokenizer, peft_config, prompts: list[str], solutions: list[str], reward_fn,
            turns: Turns, log: StepLog, device: str, errors: list) -> None:
    """TRL's GRPOTrainer over `prompts` (already rendered, in the order medix's steps take them)."""
    try:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer

        total = args.warmup + args.steps
        rows = [{"prompt": p, "solution": s} for p, s in zip(prompts, solutions)]
        config = GRPOConfig(
            output_dir=tempfile.mkdtemp(prefix="trl-perf-"), per_device_train_batch_size=args.prompts * args.group,
            num_generations=args.group, gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
            max_completion_length=args.completion, generation_kwargs={"min_new_tokens": args.min_new_tokens},
            cache_implementation=args.cache_implementation, temperature=1.0, top_p=1.0, top_k=0, beta=0.0,
            epsilon=0.2, epsilon_high=0.3, loss_type="dapo", scale_rewards="group", learning_rate=args.lr,
            weight_decay=0.01, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, optim="adamw_torch",
            max_steps=total, gradient_checkpointing=False, bf16=args.mixed == "bf16" or args.dtype == "bfloat16",
            use_cpu=device == "cpu", logging_steps=10**6, save_strategy="no", report_to="none",
            shuffle_dataset=False, seed=0, dataloader_num_workers=0, disable_tqdm=True,
        )

        class Clock(TrainerCallback):
            def on_step_begin(self, a, state, control, **kw):
                turns.take("trl")
                log.phase = {}
                self.mark = step_begin(device)

            def on_step_end(self, a, state, control, **kw):
                log.add(step_end(device, self.mark, log.phase))
                print(f"{log.line()})", flush=True)
                if args.check_finite and (bad := nonfinite(kw["model"])):
                    print(f"  trl non-finite after step {len(log.steps)}: {len(bad)} tensors, e.g. {bad[:4]}",
                          flush=True)
                turns.give("trl")

        if args.trl_logprob_chunk:  # rows per LM-head tile in TRL's fused log-prob head (its default: 32768)
            import trl.trainer.utils as trl_utils

            trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = args.trl_logprob_chunk
        trainer = GRPOTrainer(model=trl_model, reward_funcs=trl_reward(reward_fn), args=config,
                              train_dataset=Dataset.from_list(rows[:total * args.prompts]),
                              processing_class=tokenizer, peft_config=peft_config, callbacks=[Clock()])
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
    p.add_argument("--processes", choices=("separate", "shared"), default=None,
                   help="separate: each side in a process of its own, one after the other (the CPU preset); shared: "
                        "both in this process, taking turns step by step (the CUDA preset)")
    for name in ("prompts", "group", "completion", "prompt_tokens", "warmup", "steps"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    p.add_argument("--prompt-tokens-min", type=int, default=None,
                   help="synthetic prompts of random lengths in [this, --prompt-tokens] (left padding); default: all "
                        "exactly --prompt-tokens")
    p.add_argument("--legacy-tokenizer", action="store_true",
                   help="the synthetic tokenizer of the 2026-11-26 GPU runs, whose special tokens split ordinary "
                        "words (prompts full of EOS/PAD/UNK ids, left-padded): to reproduce those runs")
    p.add_argument("--min-new-tokens", type=int, default=None,
                   help="both sides (default: --completion, so every completion has exactly that many tokens)")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="medix rows per forward/backward (algorithm.micro_batch_size); default: 4 on cpu (medix's "
                        "default), the whole mini-batch on cuda (as TRL's one forward/backward over B*G rows)")
    p.add_argument("--tuning", choices=("lora", "full"), default=None)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="weights")
    p.add_argument("--mixed", choices=("no", "bf16"), default=None, help="bf16 autocast on both sides")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--cache-implementation", default=None, help="e.g. static; used by both sides")
    p.add_argument("--no-share-prompt", action="store_true",
                   help="medix without the shared prompt forward/KV cache, per group and the template's across "
                        "micro-batches (the earlier step)")
    p.add_argument("--trl-logprob-chunk", type=int, default=None,
                   help="rows per tile of TRL's fused LM head; on CPU it scores every position (prompt included) "
                        "and one 32768-row tile of full-vocab fp32 logits exhausts a 24 GB machine (default: 1024 "
                        "on cpu, TRL's own on cuda)")
    p.add_argument("--check-finite", action="store_true", help="after each step, name NaN/inf weights or grads")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (cpu)")
    p.add_argument("--no-cudnn-sdp", action="store_true",
                   help="turn off PyTorch's cuDNN attention backend (both sides; see README, CUDA)")
    p.add_argument("--medix-strategy", choices=("single", "fsdp"), default="single",
                   help="medix's trainer: one device (trainer=cpu|gpu) or FSDP2 on one device (trainer=fsdp, "
                        "devices=1: the sharded code path, bf16 units under --mixed bf16)")
    p.add_argument("--rollout", choices=("hf", "vllm"), default="hf",
                   help="medix's rollout engine: hf (generate in this process) or vllm (a vLLM server from "
                        ".venv-vllm, the adapter synced in place every step; smollm2_135m only)")
    p.add_argument("--vllm-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="--rollout vllm: the server's dtype (float32: its log-probs equal the trainer's to ~1e-5)")
    p.add_argument("--vllm-threads-bind", default="auto",
                   help="--rollout vllm: VLLM_CPU_OMP_THREADS_BIND (auto = every core of this process)")
    p.add_argument("--vllm-kv-cache-gib", type=int, default=1,
                   help="--rollout vllm: VLLM_CPU_KVCACHE_SPACE, whole GiB (vllm-cpu 0.32 refuses '0.5'); 1 GiB holds "
                        "the 16 sequences of ~320 tokens of SmolLM2-135M many times over")
    p.add_argument("--min-available-gib", type=float, default=1.5,
                   help="stop this run (exit 3, its vLLM server with it) when the machine's MemAvailable falls "
                        "below this: the box is shared, and the kernel's OOM killer may pick someone else's process")
    p.add_argument("--json", default=None, help="also write the summary here")
    p.add_argument("--check-imports", action="store_true",
                   help="import what this script needs (for --rollout) and exit; status 1 if hydra, omegaconf, "
                        "mlflow or openai got imported")
    args = p.parse_args(argv)
    preset = PRESETS["cuda" if args.device == "cuda" or args.tiny else "cpu"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.tiny:
        args.mixed = "no" if args.device == "cpu" else args.mixed
        args.prompts, args.group, args.completion, args.prompt_tokens = (
            min(args.prompts, 2), min(args.group, 4), min(args.completion, 16), min(args.prompt_tokens, 16))
    if args.min_new_tokens is None:
        args.min_new_tokens = args.completion
    if args.micro_batch_size is None and args.device == "cpu":
        args.micro_batch_size = 4
    if args.trl_logprob_chunk is None and args.device == "cpu":
        args.trl_logprob_chunk = 1024
    if args.model is None:
        args.model = "qwen2_tiny" if args.tiny else ("qwen2_04b" if args.device == "cuda" else "smollm2_135m")
    args.synthetic = args.model != "smollm2_135m"
    return args


def check_imports(rollout: str = "hf") -> dict[str, str]:
    """Import every module the run needs; for each of FORBIDDEN_AT_IMPORT that got imported, the first line of the
    repository that imported it (a GPU image without hydra/omegaconf/mlflow/openai could not run the script)."""
    import importlib
    import importlib.abc
    import traceback

    found: dict[str, str] = {}

    class Watch(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname not in FORBIDDEN_AT_IMPORT or fullname in found:
                return None
            stack = [f for f in traceback.extract_stack()[:-1] if not f.filename.startswith("<frozen")]
            if stack and (stack[-1].filename.endswith("importlib/util.py") or "find_spec" in (stack[-1].line or "")):
                return None  # an availability probe (importlib.util.find_spec), not an import
            frames = [f for f in stack if not f.filename.endswith("grpo_vs_trl.py")]
            where = frames[-1] if frames else None
            found[fullname] = f"{where.filename.replace(str(REPO) + '/', '')}:{where.lineno}: {where.line}" \
                if where else "?"
            return None

    already = sorted({m.split(".")[0] for m in sys.modules} & set(FORBIDDEN_AT_IMPORT))
    for name in already:
        found[name] = "imported before the check"
    sys.meta_path.insert(0, Watch())
    needed = ["lightning", "peft", "trl", "datasets", "medix.data.datamodule", "medix.data.prompts",
              "medix.grpo.module", "medix.grpo.trainer", "medix.models.causal_lm", "medix.models.loading",
              "medix.rewards.components", "medix.rollout.hf" if rollout == "hf" else "medix.rollout.vllm"]
    for name in needed:
        importlib.import_module(name)
    return {name: where for name, where in found.items() if name in sys.modules}


def run_apart(args, argv: list[str]) -> float:
    """Each side in a process of its own (this script with `--sides <side> --processes shared`), one after the other;
    the two medians and their ratio printed (and written to --json) as a shared run prints them."""
    import subprocess

    sides = args.sides.split(",")
    out = Path(args.json).with_suffix("") if args.json else Path(tempfile.mkdtemp(prefix="medix-perf-"))
    paths = {side: Path(f"{out}.{side}.json") for side in sides}
    results = {}
    for side, path in paths.items():
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--sides", side, "--processes", "shared",
               "--json", str(path)]
        print(f"== {side} in its own process: {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, check=True)
        results[side] = json.loads(path.read_text())
    print(f"\nmedian over {args.steps} steps after {args.warmup} warm-up, each side in its own process (seconds)")
    for side in sides:
        s, rss = results[side]["summary"][side], results[side]["process_peak_rss_gib"]
        print(f"{side:>6}: step {s['step_s']:.3f}  rollout {s['rollout_s']:.3f}  update {s['update_s']:.3f}  "
              f"process peak RSS {rss:.2f} GiB")
    ratio = (results["medix"]["summary"]["medix"]["step_s"] / results["trl"]["summary"]["trl"]["step_s"]
             if set(sides) >= {"medix", "trl"} else float("nan"))
    if args.json:
        Path(args.json).write_text(json.dumps({"processes": "separate", "ratio": ratio,
                                               "sides": {side: str(path) for side, path in paths.items()},
                                               "summary": {side: results[side]["summary"][side] for side in sides},
                                               "process_peak_rss_gib": {side: results[side]["process_peak_rss_gib"]
                                                                        for side in sides}}, indent=1))
    print(f"medix/trl step-time ratio: {ratio:.3f}")
    return ratio


def main(argv=None) -> float:
    args = parse_args(argv)
    if args.processes == "separate" and "," in args.sides and not args.check_imports:
        return run_apart(args, list(sys.argv[1:] if argv is None else argv))
    if args.no_cudnn_sdp:
        torch.backends.cuda.enable_cudnn_sdp(False)
    if args.check_imports:
        found = check_imports(args.rollout)
        print("forbidden modules imported:", "none" if not found else "")
        for name, where in found.items():
            print(f"  {name}  <- {where}")
        if found:
            sys.exit(1)
        return 0.0
    if args.threads:
        torch.set_num_threads(args.threads)
    memory_guard(args.min_available_gib)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    device = args.device
    load = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{started} device={device} model={args.model} tuning={args.tuning} dtype={args.dtype} mixed={args.mixed} "
          f"rollout={args.rollout} medix_strategy={args.medix_strategy} micro_batch_size={args.micro_batch_size} "
          f"prompts={args.prompts} group={args.group} completion={args.completion} "
          f"min_new_tokens={args.min_new_tokens} "
          f"reward={args.reward} warmup={args.warmup} steps={args.steps} share_prompt={not args.no_share_prompt} "
          f"threads={torch.get_num_threads()} cache_implementation={args.cache_implementation} "
          f"cudnn_sdp={torch.backends.cuda.cudnn_sdp_enabled()} "
          f"load_avg={load[0]:.2f},{load[1]:.2f},{load[2]:.2f}", flush=True)
    from medix.data.datamodule import PromptDataModule

    backbone, trl_model, trl_tok, peft_config = build_models(args, device)
    total = args.warmup + args.steps
    n = total * args.prompts  # one epoch: every step gets fresh prompts, the same ones on both sides
    if args.synthetic:
        samples = synthetic_prompts(n, args.prompt_tokens, trl_model.config.vocab_size,
                                    min_length=args.prompt_tokens_min)
    else:
        samples = medix_mini_prompts(n)
    datamodule = PromptDataModule.from_samples(samples, [], batch_size=args.prompts, seed=0)
    order = [s for batch in datamodule.train_dataloader() for s in batch.samples]  # medix's step order
    trl_prompts = [backbone.render(s, "thinking") for s in order]
    reward_fn = composite_rules_reward() if args.reward == "composite" else char_mix_reward
    sides = args.sides.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="medix-perf-engine-"))
    engine = build_engine(args, workdir)
    server_memory = None
    try:
        if args.rollout == "vllm" and "medix" in sides:  # start the server (and load the adapter) before any step
            t0 = time.perf_counter()
            engine.start(backbone)
            print(f"vLLM server up and synced in {time.perf_counter() - t0:.1f}s at {engine.client.base_url} "
                  f"(dtype {args.vllm_dtype}, log {workdir / 'vllm_server.log'})", flush=True)
        turns = Turns(sides)
        steps_path = Path(args.json).with_suffix(".steps.jsonl") if args.json else None
        logs = {s: StepLog(side=s, path=steps_path) for s in sides}
        errors: list = []
        worker = None
        if "trl" in sides:
            worker = threading.Thread(target=run_trl, args=(args, trl_model, trl_tok, peft_config, trl_prompts,
                                                            [s.solution for s in order], reward_fn, turns,
                                                            logs["trl"], device, errors), daemon=True)
            worker.start()
        if "medix" in sides:
            run_medix(args, backbone, engine, datamodule, reward_fn, turns, logs["medix"], device)
        if worker is not None:
            worker.join()
        if getattr(engine, "server", None) is not None and engine.server.process is not None:
            server_memory = group_memory_gib(engine.server.process.pid)
    finally:
        engine.close()
    if errors:
        raise errors[0]
    summary = {s: logs[s].summary(args.warmup) for s in sides}
    print(f"\nmedian over {args.steps} steps after {args.warmup} warm-up (seconds; update = step - rollout - reward"
          " - sync)")
    for side in sides:
        s = summary[side]
        mem = f"  peak {s['peak_gib']:.2f} GiB (step adds {s['step_extra_gib']:.2f})" if "peak_gib" in s else ""
        diff = f"  logprob_diff {s['rollout/logprob_diff/mean']:.2e}" if "rollout/logprob_diff/mean" in s else ""
        print(f"{side:>6}: step {s['step_s']:.3f}  rollout {s['rollout_s']:.3f}  reward {s['reward_s']:.4f}  "
              f"sync {s['sync_s']:.3f}  update {s['update_s']:.3f}{mem}{diff}")
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    load_end = os.getloadavg()
    served = (f"; vLLM server processes: peak RSS {server_memory[0]:.2f} GiB (sum of per-process peaks), "
              f"{server_memory[1]:.2f} GiB at the end" if server_memory else "")
    print(f"process peak RSS {rss:.2f} GiB{served}; load_avg at end {load_end[0]:.2f},{load_end[1]:.2f},"
          f"{load_end[2]:.2f}")
    ratio = summary["medix"]["step_s"] / summary["trl"]["step_s"] if set(sides) >= {"medix", "trl"} else float("nan")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "started": started, "ended": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
            "load_avg_start": load, "load_avg_end": load_end, "args": vars(args), "summary": summary, "ratio": ratio,
            "process_peak_rss_gib": rss, "vllm_server_rss_gib": server_memory,
            "steps": {s: logs[s].steps for s in sides}}, indent=1))
    print(f"medix/trl step-time ratio: {ratio:.3f}")
    return ratio


def machine() -> dict:
    import platform

    out = {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "platform": platform.platform(),
           "torch": torch.__version__}
    for name in ("transformers", "trl", "peft", "lightning"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


if __name__ == "__main__":
    main()
