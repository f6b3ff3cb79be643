"""FSDP2 (`medix.models.sharding`) through Lightning's ModelParallelStrategy on CPU: 2 gloo processes
(tests/fsdp_driver.py), a tiny random Llama, full fine-tune against a sharded frozen reference, GRPO-shaped steps
(generate, then 2 optimizer steps per training_step with clipping); a resume from `trainer.save_checkpoint`; a LoRA
run; sharding.py's helpers.

The key check replays the ranks' rollouts in this process on one unsharded model, each mini-batch joined over both
ranks and normalised by its token count, and expects the same weights.
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

import fsdp_driver as drv
from tiny_lm import one_thread, tiny_model, tiny_qwen2  # noqa: F401 (one_thread is a fixture)

pytestmark = pytest.mark.slow  # 2-process FSDP2 drivers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(repo_root, scenario: str, out, timeout: int = 300) -> None:
    """Both ranks of `tests/fsdp_driver.py <scenario>`, started here (so Lightning starts no process itself)."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1")
        env.pop("RANK", None)
        log = open(out / f"{scenario}_rank{rank}.log", "w")
        cmd = [sys.executable, str(repo_root / "tests" / "fsdp_driver.py"), scenario, str(out)]
        procs.append((subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True), log))
    try:
        for proc, _ in procs:
            proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for proc, _ in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"fsdp_driver {scenario}: the ranks did not finish in {timeout} s (stuck in a collective?): "
                    + (out / f"{scenario}_rank0.log").read_text()[-3000:])
    finally:
        for _, log in procs:
            log.close()
    for rank, (proc, _) in enumerate(procs):
        assert proc.returncode == 0, (out / f"{scenario}_rank{rank}.log").read_text()[-4000:]


@pytest.fixture(scope="module")
def runs(repo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    launch(repo_root, "fit", out)
    launch(repo_root, "resume", out)
    dumps = {f"{run}{rank}": torch.load(out / f"{run}_rank{rank}.pt", weights_only=False)
             for run in ("full", "half", "resume", "lora", "helpers") for rank in (0, 1)}
    return out, dumps


# ---- which blocks become FSDP units (no processes needed) --------------------------------------------------------
def test_decoder_layers_are_found_in_plain_peft_and_vision_models(one_thread):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from medix.models.sharding import decoder_layers

    assert [n for n, _ in decoder_layers(tiny_model())] == ["model.layers.1", "model.layers.0"]
    assert [n for n, _ in decoder_layers(tiny_qwen2(lora=True))] == ["base_model.model.model.layers.1",
                                                                     "base_model.model.model.layers.0"]
    vl = Qwen2VLForConditionalGeneration(Qwen2VLConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2)))
    names = {type(m).__name__: [] for _, m in decoder_layers(vl)}
    for name, m in decoder_layers(vl):
        names[type(m).__name__].append(name)
    assert sorted(names) == ["Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"]
    assert len(names["Qwen2VLDecoderLayer"]) == 2 and len(names["Qwen2VLVisionBlock"]) == 2


def test_tiny_vlm_vision_tower_blocks_are_found(one_thread):
    from medix.models.sharding import decoder_layers
    from medix.models.tiny_vlm import TinyVisionTower, TinyVLM

    tower = TinyVisionTower(image_size=8, patch_size=4, width=16, layers=2, heads=2, out_dim=32, out_std=0.02)
    vlm = TinyVLM(tiny_model(), tower, image_token_id=31, tokens_per_image=4)
    kinds = sorted(type(m).__name__ for _, m in decoder_layers(vlm))
    assert kinds == ["LlamaDecoderLayer"] * 2 + ["TransformerEncoderLayer"] * 2


# ---- the 2-rank runs ---------------------------------------------------------------------------------------------
def test_policy_and_reference_are_sharded_per_layer_and_ranks_get_their_own_data(runs):
    _, d = runs
    for rank in (0, 1):
        assert d[f"full{rank}"]["sharded"] == ["", "model.layers.0", "model.layers.1"]
        assert d[f"full{rank}"]["ref_sharded"] == ["", "model.layers.0", "model.layers.1"]
    items = [[s["item"] for s in d[f"full{rank}"]["record"]["steps"]] for rank in (0, 1)]
    assert all(a != b for a, b in zip(*items)), items  # the data-parallel mesh is both ranks, not one


def test_generate_runs_while_ranks_stop_at_different_lengths(runs):
    _, d = runs
    for s0, s1 in zip(d["full0"]["record"]["steps"], d["full1"]["record"]["steps"]):
        # rank 0 finished after EOS_STEP + 1 tokens and kept joining rank 1's forwards until NEW_TOKENS (synced_gpus)
        assert s0["input_ids"].shape[1] == drv.PROMPT_LEN + drv.EOS_STEP + 1
        assert s1["input_ids"].shape[1] == drv.PROMPT_LEN + drv.NEW_TOKENS
        assert bool((s0["input_ids"][:, drv.PROMPT_LEN:] == drv.EOS).any(1).all())  # every row of rank 0 ended
        assert not bool((s1["input_ids"] == drv.EOS).any())


def test_two_ranks_end_equal_to_one_process_on_the_global_batch(runs, one_thread):
    _, d = runs
    weights = [d[f"full{rank}"]["weights"] for rank in (0, 1)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    torch.manual_seed(0)
    policy, norms = replay(d["full0"]["record"]["steps"], d["full1"]["record"]["steps"])
    single = policy.state_dict()
    start = tiny_model(seed=0).state_dict()
    assert max(float((single[k] - start[k]).abs().max()) for k in start) > 1e-2  # the run moved the weights
    worst = max(float((weights[0][k] - single[k]).abs().max()) for k in single)
    assert worst < 2e-5, worst
    fsdp_norms = [n for s in d["full0"]["record"]["steps"] for n in s["norms"]]
    assert fsdp_norms == pytest.approx(norms, rel=1e-4)
    assert min(norms) > drv.MAX_GRAD_NORM  # clipping was active in every update
    # the check can fail: each rank normalising by its own token count (rank 0 has shorter completions) is far off
    per_rank, _ = replay(d["full0"]["record"]["steps"], d["full1"]["record"]["steps"], per_rank_mean=True)
    assert max(float((weights[0][k] - per_rank.state_dict()[k]).abs().max()) for k in single) > 50 * worst


def replay(steps0, steps1, per_rank_mean: bool = False):
    """One unsharded process over the same rollouts: mini-batch k = rank 0's k-th rows + rank 1's k-th rows, the
    loss normalised by the mini-batch's token count (per_rank_mean: the mean of each rank's own normalised loss)."""
    policy = tiny_model(seed=0)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer, schedule = drv.make_optimizer(policy.parameters())
    norms = []
    for s0, s1 in zip(steps0, steps1):
        ids, attn, cmask = join([s0, s1])
        advantages = torch.cat([s0["advantages"], s1["advantages"]])
        rows0, rows1 = drv.chunks(s0["input_ids"].shape[0]), drv.chunks(s1["input_ids"].shape[0])
        offset = s0["input_ids"].shape[0]
        with torch.no_grad():
            old = drv.token_logprobs(policy, ids, attn, drv.PROMPT_LEN)
            ref_logp = drv.token_logprobs(ref, ids, attn, drv.PROMPT_LEN)
        for a, b in zip(rows0, rows1):
            parts = [a, [offset + i for i in b]] if per_rank_mean else [a + [offset + i for i in b]]
            loss = 0.0
            for rows in parts:
                logp = drv.token_logprobs(policy, ids[rows], attn[rows], drv.PROMPT_LEN)
                loss = loss + drv.chunk_loss(logp, old[rows], ref_logp[rows], advantages[rows], cmask[rows],
                                             cmask[rows].sum(), ranks=1) / len(parts)
            optimizer.zero_grad()
            loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(policy.parameters(), drv.MAX_GRAD_NORM)))
            optimizer.step()
            schedule.step()
    return policy, norms


def join(steps):
    """Rows of several ranks in one batch: shorter completions right-padded (masked, after every scored token)."""
    length = max(s["input_ids"].shape[1] for s in steps)
    pad = lambda t, width, value: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)  # noqa: E731
    ids = torch.cat([pad(s["input_ids"], length, drv.PAD) for s in steps])
    attn = torch.cat([pad(s["attention_mask"], length, 0) for s in steps])
    cmask = torch.cat([pad(s["completion_mask"], length - drv.PROMPT_LEN, 0.0) for s in steps])
    return ids, attn, cmask


def test_resume_from_a_sharded_checkpoint_continues_with_identical_weights(runs):
    out, d = runs
    assert sorted(p.name for p in (out / "half.ckpt").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp",
                                                                     "meta.pt"]
    assert [s["step"] for s in d["resume0"]["record"]["steps"]] == [2, 3]
    full, resumed = d["full0"]["weights"], d["resume0"]["weights"]
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert d["resume0"]["record"]["steps"][-1]["lr"] == d["full0"]["record"]["steps"][-1]["lr"]


def test_the_full_hf_folder_loads_finite_trained_and_as_the_sharded_model_computed(runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, d = runs
    loaded = AutoModelForCausalLM.from_pretrained(out / "full_hf")
    AutoTokenizer.from_pretrained(out / "full_hf")
    start = tiny_model(seed=0).state_dict()
    state = loaded.state_dict()
    assert all(bool(v.isfinite().all()) for v in state.values())
    assert all(not torch.equal(state[k], start[k]) for k in start if k.endswith("proj.weight"))
    torch.testing.assert_close(drv.probe_logits(loaded), d["full0"]["probe"], atol=1e-5, rtol=1e-5)


def test_lora_under_fsdp_saves_a_merged_folder_and_its_reference_is_the_base_model(runs):
    from transformers import AutoModelForCausalLM

    out, d = runs
    assert d["lora0"]["sharded"] == ["", "base_model.model.model.layers.0", "base_model.model.model.layers.1"]
    weights, start = d["lora0"]["weights"], tiny_qwen2(seed=0, lora=True).state_dict()
    lora = [k for k in start if "lora_" in k]
    assert lora and all(not torch.equal(weights[k], start[k]) for k in lora)
    assert all(torch.equal(weights[k], start[k]) for k in start if "lora_" not in k)  # the base stays frozen
    torch.testing.assert_close(d["lora0"]["base_probe"], drv.probe_logits(tiny_qwen2(seed=0)), atol=1e-5, rtol=1e-5)
    assert not (out / "lora_hf" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out / "lora_hf")
    assert type(merged).__name__ == "Qwen2ForCausalLM"
    torch.testing.assert_close(drv.probe_logits(merged), d["lora0"]["probe"], atol=1e-5, rtol=1e-5)


def test_chunked_head_generation_gather_and_bf16_policy_under_fsdp(runs):
    _, d = runs
    for rank in (0, 1):
        h = d[f"helpers{rank}"]
        torch.testing.assert_close(h["split"], h["own"])
        for name, grad in h["own_grads"].items():
            torch.testing.assert_close(h["split_grads"][name], grad, atol=1e-6, rtol=1e-5)
        plain, gathered = h["generated"]
        assert torch.equal(plain, gathered) and h["sharded_after_generation"]
        assert h["bf16_logits_dtype"] == torch.bfloat16 and h["bf16_shard_dtypes"] == {torch.float32}
        assert h["bf16_finite"]
    assert d["helpers0"]["generated"][0].shape != d["helpers1"]["generated"][0].shape
