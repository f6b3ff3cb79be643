"""backbone=tiny_vlm trained end to end on real VQA-RAD radiology images (`python -m medix.run ... dataset=jsonl`):
a FINISHED MLflow run with the reward metrics, bad rows skipped and counted in MLflow, and the trained adapter loaded
by `medix.evaluate`'s loader with exactly the weights the run ended with. Plus the one-line error for an unreadable
image at `medix.run`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from medix_cli import offline_env

pytestmark = pytest.mark.slow  # a real training run of the VLM backbone

REWARD_METRICS = [f"reward/{c}/{s}" for c in ("overall", "llm_judge", "embedding", "modality", "format")
                  for s in ("mean", "std")]
N_GOOD = 6  # 4 train + 2 validation (experiment=smoke: dataset.val_size=2, 2 prompts per step, 2 steps)


@pytest.fixture(scope="module")
def vqa_rad(shared_benchmarks) -> Path:
    folder = shared_benchmarks / "vqa_rad"
    if not (folder / "test.jsonl").is_file():
        pytest.skip(f"VQA-RAD benchmark files not found at {folder}")
    return folder


def vqa_rad_training_rows(folder: Path, target: Path, n: int) -> list[dict]:
    """The first `n` VQA-RAD test items with a known modality, in the training schema (id, image relative to the
    JSONL file, problem, solution = '<TAG> answer', source); the last one carries two images (a multi-image item)."""
    (target / "images").mkdir(parents=True, exist_ok=True)
    items = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines() if line.strip()]
    items = [i for i in items if i.get("modality") and i.get("image") and i.get("answer")][:n]
    assert len(items) == n, "VQA-RAD has fewer items with a modality than the test needs"
    rows = []
    for item in items:
        image = Path(item["image"])
        shutil.copy(folder / image, target / "images" / image.name)
        rows.append({"id": item["id"], "image": f"images/{image.name}", "problem": item["question"],
                     "solution": f"<{item['modality']}> {item['answer']}", "source": "vqa_rad"})
    rows[-1]["image"] = [rows[-1]["image"], rows[0]["image"]]
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run_medix(args: list[str], repo_root: Path, env: dict, tmp: Path, timeout: int = 900):
    cmd = [sys.executable, "-m", "medix.run", *args, f"hydra.run.dir={tmp}/hydra", f"paths.output_dir={tmp}/out",
           f"logger.tracking_uri=sqlite:///{tmp}/mlflow.db"]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def vlm_run(vqa_rad, repo_root, tmp_path_factory):
    """One tiny_vlm smoke run on real radiology images, plus two broken rows skipped by dataset.on_bad_row=skip."""
    import os

    tmp = tmp_path_factory.mktemp("vlm_run")
    rows = vqa_rad_training_rows(vqa_rad, tmp / "data", N_GOOD)
    (tmp / "data" / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    rows.insert(2, {"id": "bad-image", "image": "images/broken.jpg", "problem": "Which organ is shown?",
                    "solution": "<CT_SCAN> liver"})
    rows.insert(4, {"id": "bad-tag", "image": rows[0]["image"], "problem": "Is the study normal?", "solution": "yes"})
    path = write_jsonl(tmp / "data" / "vqa_rad_train.jsonl", rows)
    env = offline_env()
    out = run_medix(["experiment=smoke", "backbone=tiny_vlm", "dataset=jsonl", f"dataset.path={path}",
                     "dataset.on_bad_row=skip", "judge=rule"], repo_root, env, tmp)
    return out, tmp


def the_run(tmp: Path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1
    return runs.iloc[0]


def test_tiny_vlm_on_radiology_images_finishes_with_the_reward_metrics(vlm_run):
    out, tmp = vlm_run
    assert out.returncode == 0, out.stderr[-3000:]
    run = the_run(tmp)
    assert run.status == "FINISHED"
    client = mlflow.MlflowClient()
    for name in REWARD_METRICS:
        assert [m.step for m in client.get_metric_history(run.run_id, name)] == [1, 2], name
    overall = client.get_metric_history(run.run_id, "reward/overall/mean")
    assert all(0.0 <= m.value <= 1.0 for m in overall)
    assert client.get_metric_history(run.run_id, "val/reward/overall/mean")  # the held-out images, scored
    params = client.get_run(run.run_id).data.params
    assert params["backbone.name"] == "tiny_vlm" and params["dataset.name"] == "jsonl"
    adapter = tmp / "out" / "adapter"
    assert {"adapter_config.json", "vision_tower.safetensors", "tiny_vlm.json"} <= {p.name for p in adapter.iterdir()}


def test_skipped_rows_are_counted_logged_to_mlflow_and_named_in_the_log(vlm_run):
    out, tmp = vlm_run
    assert out.returncode == 0, out.stderr[-3000:]
    client = mlflow.MlflowClient()
    run_id = the_run(tmp).run_id
    value = {name: client.get_metric_history(run_id, name)[-1].value
             for name in ("data/skipped_rows", "data/train_rows", "data/val_rows")}
    assert value == {"data/skipped_rows": 2.0, "data/train_rows": N_GOOD - 2.0, "data/val_rows": 2.0}
    log = out.stdout + out.stderr
    assert "skipped 2 bad rows (first: bad-image: field 'image'" in log and "not a readable image" in log


def test_evaluate_loads_the_trained_tiny_vlm_with_identical_weights(vlm_run, repo_root, tmp_path):
    """`python -m medix.evaluate backbone=tiny_vlm model.adapter=<run>/adapter` builds its model with
    medix.eval.runner.build_generator: every trained weight (LoRA and vision tower) equals the run's last checkpoint."""
    from hydra import compose, initialize_config_dir
    from safetensors.torch import load_file

    from hydra.utils import instantiate

    from medix.config import register_configs
    from medix.eval.runner import build_generator
    from medix.models.tiny_vlm import TinyVLM, build_vision_tower

    out, tmp = vlm_run
    assert out.returncode == 0, out.stderr[-3000:]
    state = torch.load(tmp / "out" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    trained = {name.removeprefix("model."): value for name, value in state.items()}
    assert any(".lora_B." in name for name in trained) and any(n.startswith("vision_tower.") for n in trained)
    register_configs()
    with initialize_config_dir(config_dir=str(repo_root / "conf"), version_base="1.3"):
        cfg = compose("eval", overrides=["backbone=tiny_vlm", f"model.adapter={tmp / 'out' / 'adapter'}",
                                         f"paths.output_dir={tmp_path}", "logger=none", "judge=rule"])
    model = build_generator(cfg).backbone.model
    assert isinstance(model, TinyVLM) and not model.training
    params = dict(model.named_parameters())
    assert set(trained) <= set(params)
    for name, value in trained.items():
        assert torch.equal(params[name].detach(), value), name
    # The weights are the trained ones, not the seeded initial tower or a zero LoRA update.
    fresh = build_vision_tower(cfg.backbone.vision, model.config.hidden_size, 1.0).state_dict()
    assert not torch.equal(fresh["patch_embed.weight"], params["vision_tower.patch_embed.weight"].detach())
    assert any(value.abs().sum() > 0 for name, value in trained.items() if ".lora_B." in name)
    saved_tower = load_file(str(tmp / "out" / "adapter" / "vision_tower.safetensors"))
    assert all(torch.equal(saved_tower[k], v) for k, v in model.vision_tower.state_dict().items())
    # A fresh tiny_vlm backbone loading the folder itself (load_trained): the same weights again.
    plain = instantiate(cfg.backbone)
    assert not torch.equal(dict(plain.model.named_parameters())["vision_tower.patch_embed.weight"], trained[
        "vision_tower.patch_embed.weight"])
    plain.load_trained(tmp / "out" / "adapter")
    assert isinstance(plain.model, TinyVLM)
    again = dict(plain.model.named_parameters())
    assert all(torch.equal(again[name].detach(), value) for name, value in trained.items())


def test_an_unreadable_training_image_stops_medix_run_with_one_line(vqa_rad, repo_root, medix_env, tmp_path):
    rows = vqa_rad_training_rows(vqa_rad, tmp_path, 3)
    (tmp_path / "images" / "truncated.jpg").write_bytes((vqa_rad / rows[0]["image"]).read_bytes()[:200])
    rows[1] = {**rows[1], "id": "bad-image-2", "image": "images/truncated.jpg"}
    path = write_jsonl(tmp_path / "set.jsonl", rows)
    out = run_medix(["experiment=smoke", "backbone=tiny_vlm", "dataset=jsonl", f"dataset.path={path}"], repo_root,
                    medix_env, tmp_path)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr + out.stdout
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr[-3000:]
    assert "set.jsonl row 2 (id=bad-image-2)" in errors[0] and "field 'image'" in errors[0]
    assert "truncated.jpg" in errors[0] and "dataset.on_bad_row=skip" in errors[0]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    assert len(mlflow.search_runs(search_all_experiments=True)) == 0  # it stopped before any run was created
