"""conf/dataset/*.yaml compose with the root config and build the DataModule that loads them."""

import json
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from medix.config import register_configs

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_train(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=["paths.output_dir=/tmp/x", *overrides])


def test_default_dataset_is_medix_mini_and_splits():
    cfg = compose_train()
    data = instantiate(cfg.dataset)
    data.setup("fit")
    assert len(data.val) == cfg.dataset.val_size == 16
    assert len(data.train) + len(data.val) == len(data.report.samples) == 106
    assert data.batch_size == cfg.algorithm.prompts_per_step  # one batch = one GRPO step's prompts
    assert (data.min_pixels, data.max_pixels) == (262144, 4194304)


def test_jsonl_dataset_reads_the_given_path(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"id": str(i), "problem": "Q?", "solution": "<ENDOSCOPY> Barrett esophagus"} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + json.dumps({"id": "b", "problem": "Q?",
                                                                              "solution": "bad"}) + "\n")
    data = instantiate(compose_train("dataset=jsonl", f"dataset.path={path}", "dataset.on_bad_row=skip",
                                     "dataset.val_size=1").dataset)
    data.setup("fit")
    assert [s.answer for s in data.train + data.val] == ["Barrett esophagus"] * 4
    assert [row for row, _ in data.report.skipped] == ["b"]


def test_medix_rl_points_at_the_paper_set_and_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDIX_CACHE_DIR", str(tmp_path))
    resolved = OmegaConf.to_container(compose_train("dataset=medix_rl").dataset, resolve=True)
    assert resolved["hub_id"] == "MBZUAI/medix-rl-data" and resolved["split"] == "train"
    assert resolved["image_dir"] == f"{tmp_path}/images/medix_rl"
