"""model.kind=backbone: greedy answers from the offline SmolLM2 backbone (batched = one by one), the raw question vs
the training prompt, and a trained adapter loaded for evaluation."""

import json
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from fake_openai import FakeOpenAIServer
from medix.config import register_configs
from medix.eval.generation import BackboneGenerator
from medix.eval.items import BenchmarkItem
from medix.eval.runner import build_generator, run_evaluation

pytestmark = pytest.mark.slow  # loads SmolLM2 and generates

register_configs()  # the schemas conf/'s groups start with, as the entry points register them

CACHE_DIR = os.environ.get("MEDIX_CACHE_DIR", str(Path.home() / ".cache" / "medix"))
ITEMS = [BenchmarkItem("b1", "t", "Which organ makes insulin?", "pancreas"),
         BenchmarkItem("b2", "t", "What is the normal adult resting heart rate range in beats per minute?", "60-100"),
         BenchmarkItem("b3", "t", "Name the thigh bone.", "femur")]


def cfg_with(repo_root, tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(repo_root / "conf"), version_base="1.3"):
        return compose("eval", overrides=[f"paths.cache_dir={CACHE_DIR}", f"paths.output_dir={tmp_path}",
                                          "logger=none", "generation.max_new_tokens=12", *overrides])


@pytest.fixture(scope="module")
def generator(repo_root, tmp_path_factory):
    return build_generator(cfg_with(repo_root, tmp_path_factory.mktemp("gen")))


def test_batched_greedy_answers_equal_one_by_one_answers(generator):
    batched = generator.generate(ITEMS)
    single = [generator.generate([item])[0] for item in ITEMS]
    assert batched == single
    assert all(isinstance(text, str) and text for text in batched)
    assert generator.generate(ITEMS[:1]) == batched[:1]  # greedy: the same again


def test_the_raw_question_by_default_and_the_training_template_on_request(generator):
    raw = generator.prompt(ITEMS[0], with_image=False)
    assert ITEMS[0].question in raw and "<thinking>" not in raw
    assert raw == generator.backbone.tokenizer.apply_chat_template(
        [{"role": "user", "content": ITEMS[0].question}], tokenize=False, add_generation_prompt=True)
    trained = BackboneGenerator(generator.backbone, max_new_tokens=4, reasoning_tag="thinking", use_training_prompt=True)
    prompt = trained.prompt(ITEMS[0], with_image=False)
    assert ITEMS[0].question in prompt and "<thinking>" in prompt and prompt != raw


def test_backbone_evaluation_end_to_end_with_an_adapter(repo_root, tmp_path, generator):
    from peft import LoraConfig, get_peft_model

    import torch

    base_answers = generator.generate(ITEMS[:2])
    adapter_dir = tmp_path / "adapter"
    base = generator.backbone.model
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    for name, weight in model.named_parameters():
        if "lora_B" in name:  # non-zero: an adapter that is ignored would show
            torch.nn.init.normal_(weight, std=0.2)
    model.save_pretrained(str(adapter_dir))
    generator.backbone.model = model
    adapted_answers = generator.generate(ITEMS[:2])
    generator.backbone.model = model.unload()  # leave the shared base model as it was
    assert adapted_answers != base_answers  # the adapter changes what the model says
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"id": i.id, "question": i.question, "answer": i.reference}) + "\n"
                             for i in ITEMS[:2]))
    with FakeOpenAIServer(lambda body: '{"score": 1}') as judge:
        outcome = run_evaluation(cfg_with(repo_root, tmp_path, f"benchmark.path={bench}", "judge=openai",
                                          f"judge.base_url={judge.base_url}", "judge.model=fake-judge",
                                          f"judge.cache.path={tmp_path / 'cache.sqlite'}", f"model.adapter={adapter_dir}",
                                          "generation.batch_size=2"))
        prompts = [r["messages"][0]["content"] for r in judge.chat_requests]
    assert outcome.metrics["eval/bench/accuracy"] == 1.0 and len(prompts) == 4
    rows = [json.loads(l) for l in (tmp_path / "eval" / "bench" / "items.jsonl").read_text().splitlines()]
    assert {r["id"]: r["prediction"] for r in rows} == dict(zip(["b1", "b2"], adapted_answers))  # the adapter's
