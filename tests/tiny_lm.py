"""A tiny randomly initialised causal LM on a word-level tokenizer, for fast GRPO tests (no files, no network).

Words are `w0 … w{V-1}`: w0 = unknown (every word of the English prompt template), w1 = EOS, w2 = PAD. Completions
decode to words again, so a reward can count exactly which tokens the policy emitted.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from medix.data.samples import Sample
from medix.models.backbone import Backbone, apply_lora
from medix.rewards.composite import RewardBatch

REPO = Path(__file__).resolve().parents[1]
VOCAB = 32
EOS, PAD = 1, 2
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
LORA = OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.0,
                         "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"]})


def word_tokenizer(vocab_size: int = VOCAB):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="w0", eos_token="w1", pad_token="w2")
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
    model = model if model is not None else tiny_model(seed=seed)
    if lora:
        torch.manual_seed(seed)
        model = apply_lora(model, LORA)
    return Backbone(model=model, tokenizer=word_tokenizer(), processor=None, is_vlm=False, name="tiny_llama")


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    """The tiny model and its tokenizer as a local HF folder (`backbone.source=local backbone.model=<folder>`)."""
    tiny_model(seed=seed).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def algorithm(name: str = "grpo", **overrides):
    cfg = OmegaConf.load(REPO / "conf" / "algorithm" / f"{name}.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def word_samples(n: int, prefix: str = "s") -> list[Sample]:
    """n distinct prompts (their questions are different token words); the solution is never scored here."""
    return [Sample(id=f"{prefix}{i}", problem=f"w{4 + i % (VOCAB - 4)} w{4 + (3 * i) % (VOCAB - 4)}",
                   solution="<OTHER> w5", tag="<OTHER>", answer="w5") for i in range(n)]


class TargetWordReward:
    """reward = (number of completion words in `targets`) / max_new_tokens: learnable from any start, and it
    differs within a group as soon as completions differ. Keeps the mean overall reward of every call."""

    def __init__(self, targets=("w3", "w4", "w5", "w6"), max_new_tokens: int = 8):
        self.targets = set(targets)
        self.max_new_tokens = max_new_tokens
        self.history: list[float] = []

    def __call__(self, completions, solutions, questions=None) -> RewardBatch:
        scores = [sum(word in self.targets for word in text.split()) / self.max_new_tokens for text in completions]
        if scores:
            self.history.append(sum(scores) / len(scores))
        return RewardBatch(components={"target": list(scores)}, overall=list(scores))


def trainer(**overrides):
    import lightning as L

    kwargs = dict(accelerator="cpu", devices=1, max_epochs=1000, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


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
