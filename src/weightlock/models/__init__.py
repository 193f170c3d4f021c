"""Models, after data: presets to pretrain from scratch, loading model directories, releases and GGUF files
(``models.hub``), saving them atomically (``models.save``) and GGUF conversion (``models.gguf``). The
architecture adapters that say where a family keeps its MLPs live with DLR-Lock (``weightlock.dlr``)."""
from .presets import PRESETS, ModelConfig, preset

__all__ = ["PRESETS", "ModelConfig", "preset"]
