"""conf/dataset/*.yaml compose with the root config and every key is the one the loaders read."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from medix.data import load_samples, split_samples

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_dataset(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_default_dataset_is_medix_mini_and_splits():
    cfg = compose_dataset()
    assert cfg.dataset.name == "medix_mini"
    samples = load_samples(cfg.dataset)
    train, val = split_samples(samples, cfg.dataset.val_size, cfg.dataset.seed)
    assert len(val) == cfg.dataset.val_size and len(train) + len(val) == len(samples)
    assert (cfg.dataset.min_pixels, cfg.dataset.max_pixels) == (262144, 4194304)


def test_jsonl_dataset_reads_the_given_path(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"id": "a", "problem": "Q?", "solution": "<ENDOSCOPY> Barrett esophagus"}) + "\n"
                    + json.dumps({"id": "b", "problem": "Q?", "solution": "bad"}) + "\n")
    cfg = compose_dataset("dataset=jsonl", f"dataset.path={path}", "dataset.on_bad_row=skip")
    assert [s.answer for s in load_samples(cfg.dataset)] == ["Barrett esophagus"]


def test_medix_rl_points_at_the_paper_set_and_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDIX_CACHE_DIR", str(tmp_path))
    cfg = compose_dataset("dataset=medix_rl")
    resolved = OmegaConf.to_container(cfg.dataset, resolve=True)
    assert resolved["hub_id"] == "MBZUAI/medix-rl-data" and resolved["split"] == "train"
    assert resolved["image_dir"] == f"{tmp_path}/images/medix_rl"


@pytest.mark.parametrize("name", ["medix_mini", "jsonl", "medix_rl"])
def test_dataset_files_share_the_keys_the_code_reads(name):
    keys = set(OmegaConf.load(CONF / "dataset" / f"{name}.yaml"))
    common = {"name", "path", "hub_id", "val_size", "seed", "on_bad_row", "min_pixels", "max_pixels"}
    assert keys == (common | {"split", "image_dir"} if name == "medix_rl" else common)
