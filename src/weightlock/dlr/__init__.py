"""DLR-Lock, a defense: replace every MLP with a deep low-rank residual network distilled from it, and
write the locked release (:func:`lock`); ``modeling_weightlock_dlr`` ships inside every release."""
from . import formats  # noqa: F401  (registers the DLR release format with the generic loader, models.formats)
from .config import LockConfig
from .distill import capture, distill_model, fit_layer, match_depth, readback_model, relative_error
from .lock import load, lock
from .modeling_weightlock_dlr import (
    ADAPTERS,
    ArchAdapter,
    DLRNet,
    DLRSpec,
    adapter_for,
    apply_dlr,
    readback_net,
    register_adapter,
)

__all__ = ["LockConfig", "capture", "distill_model", "fit_layer", "match_depth", "relative_error", "load", "lock",
           "readback_model", "readback_net",
           "ADAPTERS", "ArchAdapter", "DLRNet", "DLRSpec", "adapter_for", "apply_dlr", "register_adapter"]
