"""The paper presets (conf/experiment/paper_*.yaml) compose to MediX-R1's released training recipes, value by value."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from medix.config import register_configs
from medix.grpo.plan import update_plan

CONF = Path(__file__).resolve().parents[1] / "conf"

# name -> (hub model, algorithm, clip_low, clip_high, KL beta, loss aggregation, importance ratio, dynamic sampling)
# from mbzuai-oryx/MediX-R1 training/examples/medix-r1_*.sh and config.yaml (EasyR1).
RECIPES = {
    "paper_2b_dapo": ("Qwen/Qwen3-VL-2B-Instruct", "dapo", 0.2, 0.28, 0.0, "token_mean", "token", True),
    "paper_8b_dapo": ("Qwen/Qwen3-VL-8B-Instruct", "dapo", 0.2, 0.28, 0.0, "token_mean", "token", True),
    "paper_30b_dapo": ("Qwen/Qwen3-VL-30B-A3B-Thinking", "dapo", 0.2, 0.28, 0.0, "token_mean", "token", True),
    "paper_8b_grpo": ("Qwen/Qwen3-VL-8B-Instruct", "grpo", 0.2, 0.3, 0.01, "token_mean", "token", False),
    "paper_7b_gspo": ("Qwen/Qwen2.5-VL-7B-Instruct", "gspo", 3e-4, 4e-4, 0.0, "sequence_mean", "sequence", False),
}


def compose_preset(name: str, *overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={name}", "paths.output_dir=/tmp/x", *overrides])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    return cfg


def test_every_released_recipe_has_a_preset():
    assert set(RECIPES) <= {p.stem for p in (CONF / "experiment").glob("paper_*.yaml")}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_preset_matches_the_released_script(name):
    model, algorithm, clip_low, clip_high, beta, aggregation, importance, dynamic = RECIPES[name]
    cfg = compose_preset(name)
    assert cfg.backbone.model == model and cfg.backbone._target_ == "medix.models.qwen_vl.load_qwen_vl"
    assert cfg.backbone.lora is None and cfg.backbone.train_vision_tower  # full fine-tune, vision tower too
    algo = cfg.algorithm
    assert algo.name == algorithm
    assert (algo.clip_low, algo.clip_high, algo.beta) == pytest.approx((clip_low, clip_high, beta))
    assert (algo.aggregation, algo.importance, algo.dynamic_sampling.enabled) == (aggregation, importance, dynamic)
    if dynamic:  # EasyR1 filter_low / filter_high / max_try_make_batch
        assert (algo.dynamic_sampling.min_mean, algo.dynamic_sampling.max_mean) == (0.01, 0.99)
        assert algo.dynamic_sampling.max_tries == 20


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_preset_has_the_papers_batch_and_optimiser(name):
    cfg = compose_preset(name)
    algo, trainer = cfg.algorithm, cfg.trainer
    ranks = trainer.devices * trainer.num_nodes
    assert ranks == 8 and trainer.accelerator == "gpu"
    assert trainer.strategy._target_ == "medix.models.sharding.fsdp_strategy"  # FSDP2 (ModelParallelStrategy)
    # per-rank sizes (the DataLoader and the update loop run per rank): 512 prompts x 5 samples per step,
    # 128 prompts (640 completions) per policy update -> 4 updates per step
    assert algo.group_size == 5
    assert algo.prompts_per_step * ranks == 512
    assert algo.mini_batch_size * ranks == 128 * 5
    plan = update_plan(algo.prompts_per_step * algo.group_size, algo.mini_batch_size, algo.micro_batch_size)
    assert len(plan) == 4 and {len(step) for step in plan} == {algo.mini_batch_size // algo.micro_batch_size}
    assert algo.optimizer.lr == pytest.approx(1e-6) and algo.warmup_steps == 0  # constant learning rate
    assert algo.optimizer.weight_decay == pytest.approx(0.01) and algo.max_grad_norm == 1.0
    assert (algo.sampling.temperature, algo.sampling.top_p, algo.num_iterations) == (1.0, 1.0, 1)
    assert algo.sampling.max_new_tokens == 4096
    assert trainer.max_epochs == 2 and trainer.val_check_interval == 5
    assert cfg.callbacks.checkpoint.every_n_steps == 5
    assert trainer.max_steps == 200  # 2 epochs x ceil((51,335 - 512) / 512) steps


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_preset_uses_the_papers_reward_judge_and_data(name):
    cfg = compose_preset(name)
    assert dict(cfg.reward.weights) == {"llm_judge": 0.5175, "embedding": 0.3375, "modality": 0.045, "format": 0.1}
    assert cfg.judge.model == "Qwen/Qwen3-4B-Instruct-2507" and cfg.judge.base_url.endswith(":8085/v1")
    assert cfg.embedder.model == "abhinand/MedEmbed-large-v0.1"
    assert cfg.dataset.hub_id == "MBZUAI/medix-rl-data" and cfg.dataset.min_pixels == 262144
    assert cfg.logger.experiment_name == "medix-r1_" + name.removeprefix("paper_")


def test_a_preset_value_can_still_be_overridden_on_the_command_line():
    cfg = compose_preset("paper_8b_grpo", "trainer.devices=4", "algorithm.prompts_per_step=128", "judge=rule")
    assert cfg.trainer.devices == 4 and cfg.algorithm.prompts_per_step == 128 and "model" not in cfg.judge
    assert cfg.algorithm.optimizer.lr == pytest.approx(1e-6)


def test_the_thinking_model_gets_its_own_run_name():
    from medix.tracking.params import run_name

    assert "qwen3_vl_30b_a3b_thinking" in run_name(compose_preset("paper_30b_dapo"))
    assert "qwen3_vl_8b" in run_name(compose_preset("paper_8b_dapo"))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_preset_samples_through_vllm_with_room_for_the_papers_prompts_and_answers(name):
    cfg = compose_preset(name)
    assert cfg.rollout._target_ == "medix.rollout.vllm.VLLMEngine"
    assert cfg.rollout.server.max_model_len >= 4352 + cfg.algorithm.sampling.max_new_tokens  # EasyR1's prompt + response
    assert cfg.rollout.placeholder_logit_bias <= -100
