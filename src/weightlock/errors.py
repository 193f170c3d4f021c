"""The one exception type for mistakes a user can make (bad path, bad ratio, unsupported model...)."""


class WeightlockError(Exception):
    """A user-caused error with a message that says what went wrong and what to do next.

    The CLI prints these without a traceback and exits with status 2.
    """


class ManifestMismatch(WeightlockError):
    """A release file whose SHA-256 differs from its ``manifest.json`` (changed or corrupted). The message
    names no way out: a command that offers one (``--no-verify``) adds it, the Python API's is
    ``load(..., verify=False)``."""
