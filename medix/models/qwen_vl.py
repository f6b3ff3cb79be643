"""Qwen2.5-VL / Qwen3-VL policies: the processor flattens every image's patches into one tensor with one grid row
per image; this backbone keeps each row's patches and grids apart so rows can be selected and joined freely."""

from __future__ import annotations

import torch

from medix.errors import ConfigError, MedixError
from medix.models.base import Backbone, Encoded
from medix.models.loading import (VISION_MODULES, apply_lora, enable_activation_checkpointing, freeze_vision_tower,
                                  model_folder, torch_dtype)

# Processor outputs aligned with input_ids ([rows, sequence]): Qwen-VL's mm_token_type_ids (M-RoPE needs them).
SEQUENCE_KEYS = ("mm_token_type_ids", "token_type_ids")


def split_images(pixel_values: torch.Tensor, grid: torch.Tensor, counts: list[int]):
    """Flattened patches + one grid row per image -> per row (patches, grid rows) or None, `counts` images per row."""
    if sum(counts) != grid.shape[0]:
        raise ValueError(f"image counts {counts} add up to {sum(counts)} but image_grid_thw holds {grid.shape[0]} images")
    patch_end = [0] + grid.prod(dim=1).cumsum(0).tolist()
    if patch_end[-1] != pixel_values.shape[0]:
        raise ValueError(f"image_grid_thw describes {patch_end[-1]} patches but pixel_values holds {pixel_values.shape[0]}")
    rows, image = [], 0
    for count in counts:
        rows.append((pixel_values[patch_end[image]:patch_end[image + count]], grid[image:image + count])
                    if count else None)
        image += count
    return rows


class QwenVL(Backbone):
    is_vlm = True

    def encode(self, prompts: list[str], images: list[list] | None = None) -> Encoded:
        counts = [len(row) for row in images] if images is not None else [0] * len(prompts)
        if len(counts) != len(prompts):
            raise ValueError(f"{len(counts)} image lists for {len(prompts)} prompts; need one (maybe empty) per prompt")
        flat = [image for row in (images or []) for image in row]
        enc = self.processor(text=prompts, images=flat or None, return_tensors="pt", padding=True)
        row_images = split_images(enc["pixel_values"], enc["image_grid_thw"], counts) if flat else None
        sequence = {k: enc[k] for k in SEQUENCE_KEYS if k in enc}
        return Encoded(enc["input_ids"], enc["attention_mask"], sequence, row_images)

    @property
    def placeholder_token_ids(self) -> list[int]:
        config = self.model.config
        return [getattr(config, key) for key in ("image_token_id", "video_token_id") if getattr(config, key, None)]

    def image_inputs(self, row_images):
        present = [r for r in (row_images or []) if r is not None]
        if not present:
            return {}
        return {"pixel_values": torch.cat([p for p, _ in present]), "image_grid_thw": torch.cat([g for _, g in present])}


def load_qwen_vl(*, name: str, source: str, model: str, gguf=None, dtype: str = "bfloat16",
                 gradient_checkpointing: bool = True, adapter: str | None = None, lora=None,
                 train_vision_tower: bool = True, cache_dir: str) -> QwenVL:
    from transformers import AutoModelForImageTextToText

    if lora is not None and train_vision_tower:
        raise ConfigError(f"backbone={name}: LoRA trains only its adapters, so backbone.train_vision_tower=true would "
                          "leave the vision tower frozen without saying so; set backbone.train_vision_tower=false with "
                          "LoRA, or backbone.lora=null for a full fine-tune (the paper's)")
    path = model_folder(name=name, source=source, model=model, gguf=gguf, cache_dir=cache_dir)
    try:
        processor = load_processor(path)
        network = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype(dtype))
    except (OSError, ImportError) as exc:
        raise MedixError(f"backbone.model={path!r} could not be loaded ({exc.__class__.__name__}: {exc})") from exc
    if not train_vision_tower:
        freeze_vision_tower(network)
    if gradient_checkpointing:
        enable_activation_checkpointing(network)
    if lora is not None:
        # The language model only: the vision tower's MLPs share the projections' names, and with LoRA it is
        # frozen (vLLM, too, puts adapters on the language model only).
        network = apply_lora(network, lora, exclude=VISION_MODULES)
    backbone = QwenVL(network, processor.tokenizer, name, processor, path=str(path))
    if adapter:
        backbone.load_trained(adapter)
    return backbone


def load_processor(path: str):
    """The model folder's processor. Without torchvision (the CPU setup: PyPI has only CUDA builds of it),
    transformers cannot build a Qwen-VL video processor, and so no Qwen-VL processor at all: then the same processor
    class is loaded without one (images only), its image processor the PIL one transformers falls back to."""
    import importlib.util

    import transformers
    from transformers import AutoConfig, AutoProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    if importlib.util.find_spec("torchvision") is not None:
        return AutoProcessor.from_pretrained(path)
    processor_class = getattr(transformers, PROCESSOR_MAPPING_NAMES[AutoConfig.from_pretrained(path).model_type])

    def get_attributes(cls):
        return [name for name in processor_class.get_attributes() if name != "video_processor"]

    images_only = type(processor_class.__name__, (processor_class,), {"get_attributes": classmethod(get_attributes)})
    return images_only.from_pretrained(path)
