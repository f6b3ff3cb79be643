"""Policy backbones: loading, GGUF conversion, LoRA."""

from medix.models.backbone import Backbone, load_adapter, load_backbone

__all__ = ["Backbone", "load_backbone", "load_adapter"]
