"""DLR-Lock's release format, registered with the generic loader (:data:`weightlock.models.formats.MODEL_FORMATS`):
how a DLR-locked release loads, compiles its nets for small steps and checkpoints inside them."""
from __future__ import annotations

from torch import nn

from ..models.formats import MODEL_FORMATS, ModelFormat
from . import modeling_weightlock_dlr as M


def _nets(model: nn.Module) -> list[M.DLRNet]:
    return [m for m in model.modules() if isinstance(m, M.DLRNet)]


def _claims(config) -> bool:
    return bool(getattr(config, M.DLR_CONFIG_KEY, None))


def _load(config, directory: str) -> nn.Module:
    return M.load_locked_state(M.build_locked_model(config, empty=True), directory)


def _compile(model: nn.Module) -> None:
    for net in _nets(model):
        net.compile_small = True


def _checkpoint(model: nn.Module, group: int) -> int:
    nets = _nets(model)
    for net in nets:  # a flag the net's own forward honours (read-out scale and all)
        net.checkpoint_blocks = group or len(net.blocks)
    return len(nets)


DLR_FORMAT = MODEL_FORMATS.register("dlr", ModelFormat(claims=_claims, load=_load, compile=_compile,
                                                       checkpoint=_checkpoint))

__all__ = ["DLR_FORMAT"]
