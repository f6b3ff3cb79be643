"""Policy backbones: loading (hub, folder, GGUF package), LoRA, and each model family's input layout."""

from medix.models.base import Backbone, Encoded

__all__ = ["Backbone", "Encoded"]
