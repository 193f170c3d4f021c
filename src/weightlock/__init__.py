"""weightlock: release open-weight language models that resist unauthorized fine-tuning, and measure it."""
__version__ = "0.1.0"

from .dlr.lock import lock  # noqa: E402
from .errors import WeightlockError  # noqa: E402
from .models.hub import load  # noqa: E402

__all__ = ["WeightlockError", "__version__", "load", "lock"]
