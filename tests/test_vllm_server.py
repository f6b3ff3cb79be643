"""The vLLM rollout server and client. Against the real vLLM (`vllm` marker, .venv-vllm): the sampled tokens' log-probs
equal HF/PEFT teacher forcing, in-place adapter swaps and full-weight reloads take effect, a stale policy shows.
Against a stand-in server: a missing interpreter, a crash and a dead parent each end the right way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from medix.rollout.vllm_server import VLLMError, VLLMServer, save_for_reload
from vllm_fixtures import (chat_prompts, load_model, max_abs_diff, mean_abs_diff, perturbed_model, policy_folder,
                           random_adapter, require_vllm_python, teacher_forced_logprobs)

EXACT = 1e-4  # fp32 server vs fp32 HF: measured max 3e-5
STALE = 1e-2  # a policy one sync behind: measured mean 0.1-0.3


@pytest.fixture(scope="module")
def policy():
    import torch
    from transformers import AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # leaves a core to the server; 2 OpenMP threads on a busy 2-core machine run 5-10x slower
    folder = policy_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    yield folder, tokenizer, chat_prompts(tokenizer), load_model(folder)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def served(policy, tmp_path_factory):
    """One real fp32 vLLM server for the module, serving the base model (untied, so full reloads are exact)."""
    python = require_vllm_python()
    folder, _, _, base = policy
    tmp = tmp_path_factory.mktemp("vllm")
    weights = save_for_reload(base, tmp / "base")
    core = str(min(os.sched_getaffinity(0)))  # one core for the server, one for the HF references
    server = VLLMServer(weights, python=python, tokenizer=folder, cpu_threads_bind=core, max_lora_rank=16,
                        log_path=tmp / "vllm.log")
    with server:
        with server.client() as client:
            yield server, client, weights


def diffs(model, prompts, groups, temperature=1.0) -> tuple[float, float]:
    """(max, mean) |engine - model| over every completion token of every group."""
    maxes, means = [], []
    for prompt, group in zip(prompts, groups):
        for completion in group:
            ref = teacher_forced_logprobs(model, prompt, completion.token_ids, temperature)
            maxes.append(max_abs_diff(completion.logprobs, ref))
            means.append(mean_abs_diff(completion.logprobs, ref))
    return max(maxes), sum(means) / len(means)


@pytest.mark.vllm
def test_group_sampling_returns_n_completions_whose_ids_decode_to_the_text(served, policy):
    _, client, _ = served
    _, tokenizer, prompts, _ = policy
    assert client.logprobs_mode() == "processed_logprobs"
    groups = client.generate(prompts, n=4, max_tokens=16, temperature=1.0, seed=7)
    assert [len(g) for g in groups] == [4, 4, 4]
    for group in groups:
        for c in group:
            assert 1 <= len(c.token_ids) <= 16 and len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 0 for lp in c.logprobs)
            assert tokenizer.decode(c.token_ids, skip_special_tokens=True) == c.text
            assert c.finish_reason == ("stop" if c.token_ids[-1] == tokenizer.eos_token_id else "length")
            assert c.finish_reason == "stop" or len(c.token_ids) == 16
        assert len({tuple(c.token_ids) for c in group}) > 1  # the n children sample independently
    again = client.generate(prompts, n=4, max_tokens=16, temperature=1.0, seed=7)
    assert [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in groups]
    short = chat_prompts(tokenizer, ["Answer with one word only, yes or no: is the heart a muscle?"])
    free = client.generate(short, n=4, max_tokens=10, temperature=1.0, seed=1)[0]
    held = client.generate(short, n=4, max_tokens=10, min_tokens=10, temperature=1.0, seed=1)[0]
    assert min(len(c.token_ids) for c in free) < 10 and [len(c.token_ids) for c in held] == [10] * 4


@pytest.mark.vllm
def test_base_logprobs_equal_hf_teacher_forcing(served, policy):
    _, client, _ = served
    _, _, prompts, base = policy
    for temperature in (1.0, 0.7):  # at 0.7 the server returns the tempered (sampling) distribution's log-probs
        groups = client.generate(prompts, n=2, max_tokens=16, temperature=temperature, seed=3)
        worst, _ = diffs(base, prompts, groups, temperature)
        assert worst < EXACT, (temperature, worst)
    fixed = groups[0][0].token_ids
    assert max_abs_diff(client.score(prompts[0], fixed), teacher_forced_logprobs(base, prompts[0], fixed)) < EXACT


@pytest.mark.vllm
def test_adapter_swapped_in_place_takes_effect_and_a_stale_one_shows(served, policy, tmp_path):
    _, client, _ = served
    folder, _, prompts, base = policy
    prompts = prompts[:2]  # CPU LoRA kernels are slow: 2 prompts x 2 completions x 12 tokens per check
    first = random_adapter(folder, tmp_path / "step1", seed=1)
    second = random_adapter(folder, tmp_path / "step2", seed=2)

    client.load_adapter("policy-lora", tmp_path / "step1")
    assert "policy-lora" in client.models()
    groups = client.generate(prompts, n=2, max_tokens=12, seed=5, lora="policy-lora")
    assert diffs(first, prompts, groups)[0] < EXACT
    assert diffs(base, prompts, groups)[1] > STALE  # the adapter changes the outputs

    seconds = client.load_adapter("policy-lora", tmp_path / "step2")  # same name, in place
    assert seconds < 5
    groups = client.generate(prompts, n=2, max_tokens=12, seed=5, lora="policy-lora")
    assert diffs(second, prompts, groups)[0] < EXACT
    assert diffs(first, prompts, groups)[1] > STALE  # what a trainer one sync ahead of the server would see
    fixed = groups[1][0].token_ids
    scored = client.score(prompts[1], fixed, lora="policy-lora")
    assert max_abs_diff(scored, teacher_forced_logprobs(second, prompts[1], fixed)) < EXACT
    assert diffs(base, prompts, client.generate(prompts, n=1, max_tokens=12, seed=5))[0] < EXACT  # base untouched


@pytest.mark.vllm
def test_full_weights_update_takes_effect_and_reports_its_version(served, policy, tmp_path):
    _, client, base_weights = served
    folder, _, prompts, base = policy
    prompts = prompts[:2]
    client.generate(prompts, n=1, max_tokens=2, seed=0)  # prompts now in the prefix cache, computed with old weights
    stepped = perturbed_model(folder, seed=3)
    seconds = client.update_weights(save_for_reload(stepped, tmp_path / "step1"), version="1")
    assert client.weight_version() == "1" and seconds < 60
    groups = client.generate(prompts, n=2, max_tokens=16, seed=9)
    assert diffs(stepped, prompts, groups)[0] < EXACT  # every weight, the tied embedding/head too; no stale KV
    assert diffs(base, prompts, groups)[1] > STALE

    client.update_weights(base_weights, version="0")
    assert client.weight_version() == "0"
    assert diffs(base, prompts, client.generate(prompts, n=2, max_tokens=16, seed=9))[0] < EXACT


# -- lifecycle, against a stand-in for vllm's API server (runs without vllm) ---------------------------------------
FAKE_SERVER = '''
import argparse, json, os, signal, subprocess, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
p = argparse.ArgumentParser(); p.add_argument("--port", type=int); p.add_argument("--served-model-name")
args, _ = p.parse_known_args()
if os.environ.get("FAKE_VLLM") == "crash":
    print("ValueError: boom, no such model folder", flush=True)
    sys.exit(3)
engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # like vLLM's engine core
print("server", os.getpid(), flush=True)
print("engine", engine.pid, flush=True)  # no SIGTERM handler: killed, the server leaves it behind
class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"data": [{"id": args.served_model_name}]}).encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
HTTPServer(("127.0.0.1", args.port), Handler).serve_forever()
'''


@pytest.fixture
def fake_vllm(tmp_path):
    api = tmp_path / "fake" / "vllm" / "entrypoints" / "openai"
    api.mkdir(parents=True)
    for folder in (api, api.parent, api.parent.parent):
        (folder / "__init__.py").write_text("")
    (api / "api_server.py").write_text(FAKE_SERVER)
    return {"PYTHONPATH": str(tmp_path / "fake")}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has exited
        return stat.read().split(") ", 1)[1][0] != "Z"


def wait_dead(pid: int, timeout_s: float = 15) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_missing_interpreter_is_one_clear_error(tmp_path):
    with pytest.raises(VLLMError, match=r"rollout\.server\.python=.*nope does not exist; run `MEDIX_VLLM=1 "
                                        r"scripts/setup.sh`"):
        VLLMServer("model", python=tmp_path / "nope", log_path=tmp_path / "log").start()
    with pytest.raises(VLLMError, match=r"rollout\.server\.python=.* cannot import vllm; run `MEDIX_VLLM=1"):
        VLLMServer("model", python=sys.executable, log_path=tmp_path / "log").start()


def test_a_server_that_dies_while_starting_shows_its_log(tmp_path, fake_vllm):
    server = VLLMServer("model", python=sys.executable, env={**fake_vllm, "FAKE_VLLM": "crash"},
                        log_path=tmp_path / "log")
    with pytest.raises(VLLMError, match=r"(?s)exited with code 3 while starting.*boom, no such model folder"):
        server.start()
    assert server.process is None


def logged_pid(log: Path, name: str) -> int:
    """The pid the fake server wrote as `<name> <pid>` in its log."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        lines = log.read_text().splitlines() if log.is_file() else []
        found = [int(line.split()[1]) for line in lines if line.startswith(f"{name} ")]
        if found:
            return found[-1]
        time.sleep(0.1)
    raise AssertionError(f"no '{name} <pid>' line in {log}")


def test_stop_ends_the_server_and_its_children(tmp_path, fake_vllm):
    with VLLMServer("model", python=sys.executable, env=fake_vllm, log_path=tmp_path / "log") as server:
        assert server.healthy()
        pid = server.process.pid
        engine = logged_pid(tmp_path / "log", "engine")
        assert alive(engine)
    assert wait_dead(pid) and wait_dead(engine)


def test_a_server_killed_outright_leaves_no_engine_behind(tmp_path, fake_vllm):
    """The API server SIGKILLed (or OOM-killed): it runs no shutdown, so its engine child would live on, holding a
    real engine's gigabytes, until the training process ends; the launcher reaps it at once."""
    server = VLLMServer("model", python=sys.executable, env=fake_vllm, log_path=tmp_path / "log").start()
    try:
        api, engine = logged_pid(tmp_path / "log", "server"), logged_pid(tmp_path / "log", "engine")
        os.kill(api, signal.SIGKILL)
        assert wait_dead(engine)
        assert server.process.wait(timeout=15) != 0  # the server's death shows (a restart can follow)
    finally:
        server.stop()


def test_the_server_dies_with_the_process_that_started_it(tmp_path, fake_vllm):
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from medix.rollout.vllm_server import VLLMServer
        server = VLLMServer("model", python=sys.executable, env={fake_vllm!r}, log_path={str(tmp_path / 'log')!r})
        server.start()
        print(server.process.pid, flush=True)
        time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        engine = logged_pid(tmp_path / "log", "engine")
        assert alive(pid) and alive(engine)
        parent.send_signal(signal.SIGKILL)  # no atexit, no __exit__: only the parent-death signal is left
        parent.wait(timeout=10)
        assert wait_dead(pid) and wait_dead(engine)  # the fake server ignores its engine on SIGTERM; no orphan
    finally:
        parent.kill()


def test_an_adapter_rank_vllm_does_not_list_is_served_at_the_next_one_it_does():
    from medix.errors import ConfigError
    from medix.rollout.vllm_server import server_command

    def rank_flag(rank):
        cmd = server_command(Path(sys.executable), "m", "m", "127.0.0.1", 8000, dtype="float32", max_model_len=64,
                             max_lora_rank=rank, max_loras=1, block_size=16, seed=0)
        return int(cmd[cmd.index("--max-lora-rank") + 1])

    assert [rank_flag(r) for r in (1, 4, 8, 9, 300, 320)] == [1, 8, 8, 16, 320, 320]
    with pytest.raises(ConfigError, match="1024"):
        rank_flag(1024)
