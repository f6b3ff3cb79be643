"""Dataset loading: validation errors (row id + field), skip mode, relative/absolute/list images, parquet, medix_mini,
the hub loader (on a local folder, offline) and the seeded train/val split."""

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from medix.data import LoadReport, Sample, load_report, load_samples, split_samples
from medix.data.images import load_image
from medix.errors import ConfigError, DataError, MedixError

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = (REPO / ".." / "shared" / "benchmarks").resolve()


@pytest.fixture(scope="session")
def vqa_rad_images() -> list[Path]:
    """Three real VQA-RAD radiology JPEGs from the shared benchmark folder."""
    folder = BENCHMARKS / "vqa_rad" / "images"
    if not folder.is_dir():
        pytest.skip(f"shared VQA-RAD images not found at {folder}")
    return sorted(folder.glob("*.jpg"))[:3]


def good_row(row_id: str, **extra) -> dict:
    return {"id": row_id, "problem": "A chest radiograph shows a visceral pleural line. Diagnosis?",
            "solution": "<X_RAY> Pneumothorax", **extra}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def cfg(path, **overrides):
    return OmegaConf.create({"name": "jsonl", "path": str(path), "hub_id": None, "on_bad_row": "error", **overrides})


def load_error(tmp_path: Path, rows: list) -> str:
    with pytest.raises(DataError) as caught:
        load_samples(cfg(write_jsonl(tmp_path / "set.jsonl", rows)))
    return str(caught.value)


# ---- one test per validation error -------------------------------------------------------------------------------

def test_missing_id_names_row_and_field(tmp_path):
    row = good_row("x")
    del row["id"]
    message = load_error(tmp_path, [good_row("q1"), row])
    assert "set.jsonl row 2" in message and "field 'id' is missing" in message


def test_empty_problem_names_row_id_and_field(tmp_path):
    message = load_error(tmp_path, [good_row("q1"), good_row("q2", problem="   ")])
    assert "row 2 (id=q2)" in message and "field 'problem' is empty" in message


def test_missing_solution_names_row_id_and_field(tmp_path):
    row = good_row("q7")
    del row["solution"]
    message = load_error(tmp_path, [row])
    assert "row 1 (id=q7)" in message and "field 'solution' is missing" in message


def test_solution_without_tag_names_row_id_field_and_the_tags(tmp_path):
    message = load_error(tmp_path, [good_row("q1"), good_row("abc", solution="No tag here")])
    assert "row 2 (id=abc)" in message and "field 'solution'" in message
    assert "expected a '<TAG> ' prefix, one of <X_RAY>, <MICROSCOPY>" in message


def test_unknown_tag_names_row_id_and_field(tmp_path):
    message = load_error(tmp_path, [good_row("q9", solution="<XRAY> Pneumothorax")])
    assert "row 1 (id=q9)" in message and "field 'solution'" in message and "unknown tag '<XRAY>'" in message


def test_missing_image_names_row_id_and_field(tmp_path):
    message = load_error(tmp_path, [good_row("img1", image="images/absent.jpg")])
    assert "row 1 (id=img1)" in message and "field 'image'" in message and "absent.jpg' does not exist" in message


def test_unreadable_image_names_row_id_and_field(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"this is not a JPEG")
    message = load_error(tmp_path, [good_row("img2", image="broken.jpg")])
    assert "row 1 (id=img2)" in message and "field 'image'" in message and "not a readable image" in message


def test_image_of_wrong_type_names_row_id_and_field(tmp_path):
    message = load_error(tmp_path, [good_row("img3", image=42)])
    assert "row 1 (id=img3)" in message and "field 'image' is 42; expected a path or a list of paths" in message


def test_duplicate_id_names_both_rows_and_field(tmp_path):
    message = load_error(tmp_path, [good_row("dup"), good_row("other"), good_row("dup")])
    assert "row 3 (id=dup)" in message and "field 'id' duplicates row 1" in message


def test_invalid_json_line_names_the_row(tmp_path):
    message = load_error(tmp_path, [good_row("q1"), "{not json"])
    assert "set.jsonl row 2" in message and "not valid JSON" in message


def test_empty_dataset_is_an_error(tmp_path):
    message = load_error(tmp_path, [])
    assert "set.jsonl has no usable rows" in message


def test_missing_path_and_bad_files_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="dataset.path is required for dataset=jsonl"):
        load_samples(OmegaConf.create({"name": "jsonl", "path": None, "hub_id": None}))
    with pytest.raises(DataError, match="does not exist"):
        load_samples(cfg(tmp_path / "absent.jsonl"))
    (tmp_path / "set.csv").write_text("id,problem\n")
    with pytest.raises(DataError, match=r"unknown suffix '.csv'; expected .jsonl or .parquet"):
        load_samples(cfg(tmp_path / "set.csv"))
    with pytest.raises(ConfigError, match="dataset.on_bad_row='ignore'"):
        load_samples(cfg(write_jsonl(tmp_path / "set.jsonl", [good_row("q1")]), on_bad_row="ignore"))


# ---- skip mode ---------------------------------------------------------------------------------------------------

def test_skip_mode_keeps_good_rows_and_counts_bad_ones(tmp_path):
    rows = [good_row("q1"), good_row("q2", solution="Pneumothorax"), "{oops", good_row("q1"),
            good_row("q4", image="missing.png"), good_row("q5")]
    report = load_report(cfg(write_jsonl(tmp_path / "set.jsonl", rows), on_bad_row="skip"))
    assert isinstance(report, LoadReport)
    assert [s.id for s in report.samples] == ["q1", "q5"]
    assert [row_id for row_id, _ in report.skipped] == ["q2", "row 3", "q1", "q4"]
    assert "field 'solution'" in report.skipped[0][1] and "duplicates row 1" in report.skipped[2][1]


def test_skip_mode_with_nothing_left_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"all 2 rows were skipped, first: a: field 'solution'"):
        load_samples(cfg(write_jsonl(tmp_path / "set.jsonl", [good_row("a", solution="x"), good_row("b", solution="y")]),
                         on_bad_row="skip"))


# ---- images: relative, absolute, list; parquet ------------------------------------------------------------------

def test_jsonl_with_relative_absolute_and_list_images(tmp_path, vqa_rad_images):
    (tmp_path / "images").mkdir()
    for image in vqa_rad_images[:2]:
        shutil.copy(image, tmp_path / "images" / image.name)
    first, second, third = vqa_rad_images
    rows = [good_row("rel", image=f"images/{first.name}", source="vqa_rad"),
            good_row("abs", image=str(third)),
            good_row("list", image=[f"images/{first.name}", f"images/{second.name}"]),
            good_row("none", image=None), good_row("empty-list", image=[])]
    samples = {s.id: s for s in load_samples(cfg(write_jsonl(tmp_path / "set.jsonl", rows)))}
    assert samples["rel"].images == [str((tmp_path / "images" / first.name).resolve())]
    assert samples["abs"].images == [str(third)]
    assert samples["list"].images == [str((tmp_path / "images" / n).resolve()) for n in (first.name, second.name)]
    assert samples["none"].images == [] and samples["empty-list"].images == []
    assert samples["rel"].source == "vqa_rad" and samples["abs"].source == "jsonl"
    assert samples["rel"] == Sample("rel", rows[0]["problem"], "<X_RAY> Pneumothorax", "<X_RAY>", "Pneumothorax",
                                    samples["rel"].images, "vqa_rad")
    picture = load_image(samples["list"].images[1], min_pixels=64 * 64, max_pixels=256 * 256)
    assert picture.mode == "RGB" and picture.width * picture.height <= 256 * 256


def test_parquet_rows_with_image_lists(tmp_path, vqa_rad_images):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "id": ["p1", "p2", "p3"],
        "problem": ["Axial CT of the head shows a lentiform collection. Diagnosis?", "What organ is shown?",
                    "Which modality?"],
        "solution": ["<CT_SCAN> Epidural hematoma", "<X_RAY> Lungs.", "<MRI_SCAN> MRI"],
        "image": [[str(vqa_rad_images[0])], None, [str(p) for p in vqa_rad_images[1:]]],
        "source": ["a", None, "c"],
    })
    pq.write_table(table, tmp_path / "set.parquet")
    samples = load_samples(cfg(tmp_path / "set.parquet", name="mine"))
    assert [(s.id, s.tag, s.answer, len(s.images), s.source) for s in samples] == [
        ("p1", "<CT_SCAN>", "Epidural hematoma", 1, "a"), ("p2", "<X_RAY>", "Lungs", 0, "mine"),
        ("p3", "<MRI_SCAN>", "MRI", 2, "c")]


def test_parquet_bad_row_names_row_id_and_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["p1", "p2"], "problem": ["Q?", None], "solution": ["<X_RAY> A", "<X_RAY> B"]}),
                   tmp_path / "set.parquet")
    with pytest.raises(DataError, match=r"set.parquet row 2 \(id=p2\): field 'problem' is missing"):
        load_samples(cfg(tmp_path / "set.parquet"))


# ---- the bundled set -------------------------------------------------------------------------------------------

def test_medix_mini_loads_at_least_64_valid_rows_over_8_tags():
    config = OmegaConf.load(REPO / "conf" / "dataset" / "medix_mini.yaml")
    config.seed = 0
    report = load_report(config)
    samples = report.samples
    assert report.skipped == [] and len(samples) >= 64
    assert [s.id for s in samples] == [f"mini-{i:03d}" for i in range(1, len(samples) + 1)]
    tags = Counter(s.tag for s in samples)
    assert len(tags) >= 8 and min(tags.values()) >= 2
    assert all(1 <= len(s.answer.split()) <= 6 and s.images == [] and s.source == "medix_mini" for s in samples)
    assert all(s.problem.rstrip().endswith("?") for s in samples)


# ---- the hub loader, without network ---------------------------------------------------------------------------

def hub_cell(path: Path) -> dict:
    """An image cell as hub parquet files hold it: the encoded bytes plus the original file name."""
    return {"bytes": path.read_bytes(), "path": path.name}


def test_hub_loader_saves_images_from_a_local_dataset_folder(tmp_path, vqa_rad_images, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.List(datasets.Image()),
                                  "source": datasets.Value("string"), "problem": datasets.Value("string"),
                                  "solution": datasets.Value("string")})
    table = datasets.Dataset.from_dict({
        "id": ["h/1", "h2"], "image": [[hub_cell(vqa_rad_images[0])], [hub_cell(p) for p in vqa_rad_images[1:]]],
        "source": ["rad", "rad"], "problem": ["Which modality is this?", "Is there a fracture?"],
        "solution": ["<CT_SCAN> CT", "<X_RAY> No"]}, features=features)
    (tmp_path / "hub" / "data").mkdir(parents=True)
    table.to_parquet(str(tmp_path / "hub" / "data" / "train-00000.parquet"))
    config = OmegaConf.create({"name": "medix_rl", "hub_id": str(tmp_path / "hub"), "split": "train",
                               "image_dir": str(tmp_path / "images"), "on_bad_row": "error"})
    samples = load_samples(config)
    assert [s.id for s in samples] == ["h/1", "h2"] and [len(s.images) for s in samples] == [1, 2]
    saved = Path(samples[0].images[0])
    assert saved.parent == tmp_path / "images" and saved.name.startswith("h_1-") and saved.name.endswith("_0.jpg")
    assert Path(samples[1].images[1]).name == "h2_1.jpg"
    assert saved.read_bytes() == vqa_rad_images[0].read_bytes()
    assert [s.images for s in load_samples(config)] == [s.images for s in samples]  # written once, then reused


def test_hub_loader_offline_gives_a_clear_medix_error(tmp_path):
    code = ("from omegaconf import OmegaConf\nfrom medix.data import load_samples\n"
            "load_samples(OmegaConf.create({'name': 'medix_rl', 'hub_id': 'MBZUAI/medix-rl-data', 'split': 'train', "
            f"'image_dir': {str(tmp_path / 'img')!r}}}))")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "MedixError: could not load dataset.hub_id='MBZUAI/medix-rl-data' split='train'" in result.stderr
    assert "dataset=jsonl dataset.path=" in result.stderr
    assert issubclass(DataError, MedixError)


def test_hub_loader_needs_a_split():
    with pytest.raises(ConfigError, match="dataset.split is required"):
        load_samples(OmegaConf.create({"name": "medix_rl", "hub_id": "MBZUAI/medix-rl-data", "split": None}))


# ---- train/val split -------------------------------------------------------------------------------------------

def make_samples(n: int) -> list[Sample]:
    return [Sample(f"s{i}", "Q?", "<X_RAY> A", "<X_RAY>", "A", [], "t") for i in range(n)]


def test_split_samples_is_seeded_disjoint_and_complete():
    samples = make_samples(40)
    train, val = split_samples(samples, 8, seed=3)
    assert len(train) == 32 and len(val) == 8
    assert sorted(s.id for s in train + val) == sorted(s.id for s in samples)
    assert split_samples(samples, 8, seed=3) == (train, val)
    assert split_samples(samples, 8, seed=4)[1] != val
    train_f, val_f = split_samples(samples, 0.25, seed=3)
    assert len(val_f) == 10 and len(train_f) == 30
    assert split_samples(samples, 0, seed=3)[1] == []


@pytest.mark.parametrize("val_size", [40, 1.0, 2.5, -1, True, "ten"])
def test_split_samples_rejects_bad_sizes(val_size):
    with pytest.raises(ConfigError, match="dataset.val_size"):
        split_samples(make_samples(40), val_size, seed=0)
