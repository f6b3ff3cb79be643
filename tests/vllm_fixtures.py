"""Helpers for the tests against a real vLLM server: the policy folder, chat prompts as token ids, random PEFT
adapters and perturbed full-weight copies, and the HF teacher-forced log-probs the server must reproduce."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from medix.models.gguf import smollm2_folder
from medix.rollout.vllm_server import DEFAULT_PYTHON, SETUP_HINT

QUESTIONS = [
    "A 64-year-old smoker has a 3 cm spiculated mass in the right upper lobe on a chest CT scan, with enlarged "
    "mediastinal lymph nodes. What is the most likely diagnosis, and which test confirms it?",
    "An ultrasound of the right upper quadrant in a febrile woman shows gallbladder wall thickening, "
    "pericholecystic fluid and a stone in the neck. Name the finding and the usual treatment.",
    "A brain MRI of a young adult shows periventricular white matter lesions perpendicular to the ventricles on "
    "FLAIR images. Which disease do these lesions suggest, and why?",
]


def require_vllm_python() -> Path:
    """The .venv-vllm interpreter; skips when it is absent, unless MEDIX_VLLM=1 asks for these tests to run."""
    if DEFAULT_PYTHON.exists():
        return DEFAULT_PYTHON
    if os.environ.get("MEDIX_VLLM") == "1":
        pytest.fail(f"MEDIX_VLLM=1 but {DEFAULT_PYTHON} is missing; run {SETUP_HINT}")
    pytest.skip(f"run {SETUP_HINT} (no {DEFAULT_PYTHON})")


def policy_folder() -> Path:
    return smollm2_folder(os.environ.get("MEDIX_CACHE_DIR", Path.home() / ".cache" / "medix"))


def chat_prompts(tokenizer, questions: list[str] = QUESTIONS) -> list[list[int]]:
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)) for q in questions]


def load_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def random_adapter(folder: Path, out_dir: Path, seed: int, rank: int = 8):
    """A PEFT LoRA adapter on every projection of the model in `folder`, with random non-zero A and B (so it
    changes the outputs), saved to `out_dir`; returns the PEFT model (the reference the server must match)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(load_model(folder), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=modules,
                                                          init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.3)  # a moderate change: the text stays readable, log-probs move by ~0.1-1
    model.save_pretrained(out_dir)
    return model.eval()


def perturbed_model(folder: Path, seed: int, scale: float = 0.02):
    """The model in `folder` with Gaussian noise (relative `scale`) on every weight, the tied embedding/LM head
    too: a stand-in for a full fine-tune step."""
    model = load_model(folder)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale * param.abs().mean())
    return model


@torch.no_grad()
def teacher_forced_logprobs(model, prompt_ids: list[int], completion_ids: list[int],
                            temperature: float = 1.0) -> list[float]:
    """log p(completion token | everything before it) under `model`, logits divided by `temperature`."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float() / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion_ids)[:, None])[:, 0].tolist()


def max_abs_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and a, (len(a), len(b))
    return max(abs(x - y) for x, y in zip(a, b))


def mean_abs_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and a, (len(a), len(b))
    return sum(abs(x - y) for x, y in zip(a, b)) / len(a)
