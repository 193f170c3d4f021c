"""Model presets, architecture adapters, saving and loading."""
from .presets import PRESETS, ModelConfig, preset

__all__ = ["PRESETS", "ModelConfig", "preset"]
