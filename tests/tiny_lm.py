"""Tiny models and helpers for fast GRPO tests: a randomly initialised causal LM on a word-level tokenizer (no
files, no network), a tiny Qwen2, and backbones built from the composed config as `medix.run` builds them.

Words are `w0 … w{V-1}`: w0 = unknown (every word of the English prompt template), w1 = EOS, w2 = PAD. Completions
decode to words again, so a reward can count exactly which tokens the policy emitted.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from peft import LoraConfig

from medix.data.samples import Sample
from medix.models.base import Backbone
from medix.models.loading import apply_lora
from medix.rewards.composite import RewardBatch

REPO = Path(__file__).resolve().parents[1]
CACHE_DIR = os.environ.get("MEDIX_CACHE_DIR", str(Path.home() / ".cache" / "medix"))
VOCAB = 32
EOS, PAD = 1, 2
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def composed(*overrides: str):
    """The training config `medix.run` composes from conf/ with these overrides (outputs to a throwaway folder)."""
    from hydra import compose, initialize_config_dir

    from medix.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=["paths.output_dir=/tmp/medix-tests-unused", *overrides])


def build_backbone(choice: str, **keys):
    """`backbone=<choice>` with `backbone.<key>=<value>` overrides, built by its `_target_` loader like medix.run does
    (a MedixError raised inside the loader comes out as itself)."""
    from medix.instantiate import build

    def value(v):
        return str(v).lower() if isinstance(v, bool) else ("null" if v is None else str(v))

    cfg = composed(f"backbone={choice}", *[f"backbone.{k}={value(v)}" for k, v in keys.items()])
    return build(cfg.backbone)


def word_tokenizer(vocab_size: int = VOCAB):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces

    def special(word):  # whole words only: a plain special token "w1" would also split "w12" into w1 + unknown
        return AddedToken(word, single_word=True, special=True)

    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token=special("w0"), eos_token=special("w1"),
                                  pad_token=special("w2"))
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def tiny_model(vocab_size: int = VOCAB, seed: int = 0):
    """A 2-layer Llama (hidden 32), random weights from `seed`, fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    return model


def tiny_qwen2(seed: int = 0, lora: bool = False):
    """A 2-layer Qwen2 (hidden 32, vocab 97, grouped KV heads), random weights from `seed`, fp32; with `lora`, a peft
    LoRA on q/v/up projections whose B matrices start non-zero (so the adapter changes the outputs)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=97, max_position_embeddings=128, eos_token_id=1,
                         pad_token_id=2, bos_token_id=None)
    model = Qwen2ForCausalLM(config).float()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                                 task_type="CAUSAL_LM", init_lora_weights=False))
    return model


def tiny_backbone(*, lora: bool, seed: int = 0, model=None) -> Backbone:
    """The tiny Llama (or `model`) as a text backbone on the word tokenizer; with `lora`, wrapped by LORA."""
    model = model if model is not None else tiny_model(seed=seed)
    if lora:
        torch.manual_seed(seed)
        model = apply_lora(model, LoraConfig(**LORA))
    return Backbone(model, word_tokenizer(), "tiny_llama")


def record_generate(model) -> list[dict]:
    """From now on `model.generate` (as a rollout engine calls it) also keeps, per call, its keyword arguments and
    what it sampled from: `scores`, the processed next-token logits of every new position ([rows, new tokens,
    vocab]; with the HF engine's sampler, the scores its Gumbel noise is added to). Returns the list the calls are
    appended to."""
    from transformers import LogitsProcessorList

    from medix.rollout.hf import GumbelNoise

    calls: list[dict] = []
    original = model.generate

    def generate(**kwargs):
        noised: list[torch.Tensor] = []

        def recorded(noise):
            def add_noise(input_ids, scores):
                noised.append(scores.clone())
                return noise(input_ids, scores)
            return add_noise

        processors = [recorded(p) if isinstance(p, GumbelNoise) else p for p in kwargs.get("logits_processor", [])]
        out = original(**{**kwargs, "logits_processor": LogitsProcessorList(processors)}, output_scores=True,
                       return_dict_in_generate=True)
        calls.append({**kwargs, "scores": torch.stack(noised or out.scores, 1)})
        return out.sequences

    model.generate = generate
    return calls


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    """The tiny model and its tokenizer as a local HF folder (`backbone.source=local backbone.model=<folder>`)."""
    tiny_model(seed=seed).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def algorithm(name: str = "grpo", **overrides):
    """conf/algorithm/<name>.yaml over its schema's defaults, with `key=value` overrides (dotted keys allowed; `lr`
    and `max_new_tokens` are short for `optimizer.lr` and `sampling.max_new_tokens`), built as medix.run builds it:
    an AlgorithmConfig whose `optimizer` and `sampling` are objects."""
    from hydra.utils import instantiate

    from medix.config import AlgorithmConfig

    own = OmegaConf.load(REPO / "conf" / "algorithm" / f"{name}.yaml")
    own.pop("defaults", None)
    cfg = OmegaConf.merge(OmegaConf.structured(AlgorithmConfig), own)
    short = {"lr": "optimizer.lr", "weight_decay": "optimizer.weight_decay", "max_new_tokens": "sampling.max_new_tokens"}
    for key, value in overrides.items():
        OmegaConf.update(cfg, short.get(key, key), value)
    return instantiate(cfg, _convert_="object")


def word_samples(n: int, prefix: str = "s") -> list[Sample]:
    """n distinct prompts (their questions are different token words); the solution is never scored here."""
    return [Sample(id=f"{prefix}{i}", problem=f"w{4 + i % (VOCAB - 4)} w{4 + (3 * i) % (VOCAB - 4)}",
                   solution="<OTHER> w5", tag="<OTHER>", answer="w5") for i in range(n)]


class TargetWordReward:
    """reward = (number of completion words in `targets`) / max_new_tokens: learnable from any start, and it
    differs within a group as soon as completions differ. Keeps the mean overall reward of every call. The reward
    contract of CompositeReward: `names`, and `(completions, solutions, **columns) -> RewardBatch`."""

    names = ["target"]

    def __init__(self, targets=("w3", "w4", "w5", "w6"), max_new_tokens: int = 8):
        self.targets = set(targets)
        self.max_new_tokens = max_new_tokens
        self.history: list[float] = []

    def __call__(self, completions, solutions, **columns) -> RewardBatch:
        scores = [sum(word in self.targets for word in text.split()) / self.max_new_tokens for text in completions]
        if scores:
            self.history.append(sum(scores) / len(scores))
        return RewardBatch(components={"target": list(scores)}, overall=list(scores))


def trainer(max_steps: int | None = 1, **overrides):
    """The GRPO trainer (`trainer=cpu`'s target) for `max_steps` GRPO steps on one CPU process, no progress bar."""
    from medix.grpo.trainer import grpo_trainer

    kwargs = dict(accelerator="cpu", devices=1, enable_progress_bar=False, max_epochs=1000, val_check_interval=None)
    kwargs.update(overrides)
    return grpo_trainer(max_steps=max_steps, **kwargs)


def memory_logger():
    """A Lightning logger that keeps every logged metric in `.steps` ({step: {name: value}})."""
    from lightning.pytorch.loggers import Logger

    class MemoryLogger(Logger):
        def __init__(self):
            super().__init__()
            self.steps: dict[int, dict[str, float]] = {}

        @property
        def name(self):
            return "memory"

        @property
        def version(self):
            return 0

        def log_hyperparams(self, params, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.steps.setdefault(step, {}).update(metrics)

    return MemoryLogger()


@pytest.fixture
def one_thread():
    """A tiny model gains nothing from intra-op threads, and on a shared CPU they cost more than they give."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
