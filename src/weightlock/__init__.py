"""weightlock: release open-weight language models that resist unauthorized fine-tuning, and measure it."""
from .errors import WeightlockError

__version__ = "0.1.0"

__all__ = ["WeightlockError", "__version__"]
