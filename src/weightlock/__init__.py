"""weightlock: release open-weight language models that resist unauthorized fine-tuning, and measure it."""
from .errors import WeightlockError

__version__ = "0.1.0"

__all__ = ["WeightlockError", "__version__", "load", "lock"]


def load(model_dir, device="cpu", dtype=None):
    """Load a local model directory (DLR-locked release or plain Hugging Face model)."""
    from .dlr.lock import load as _load

    return _load(model_dir, device=device, dtype=dtype)


def lock(model_dir, out, cfg=None, overwrite=False):
    """Lock ``model_dir`` with DLR-Lock into ``out`` (see :class:`weightlock.dlr.LockConfig`)."""
    from .dlr.lock import lock as _lock

    return _lock(model_dir, out, cfg, overwrite=overwrite)
