"""Models, after data: presets to pretrain from scratch, loading model directories, releases and GGUF files
(``models.hub``; the formats of locked releases it loads are plug-ins, ``models.formats``, that the locks
register: DLR-Lock's from ``weightlock.dlr``), saving them atomically (``models.save``), GGUF conversion
(``models.gguf``) and where a model keeps its parts (``models.layout``; the DLR-Lock adapters that say where
a family keeps its MLPs live with DLR-Lock, ``weightlock.dlr``)."""
from .presets import PRESETS, ModelConfig, preset

__all__ = ["PRESETS", "ModelConfig", "preset"]
