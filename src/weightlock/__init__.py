"""weightlock: release open-weight language models that resist unauthorized fine-tuning, and measure it.

The packages, in the order the data flows through them (``errors``, ``io``, ``config`` and ``schema`` are
helpers shared by all):

1. ``weightlock.data``: the corpus (built in: the running Python's standard library) → tokenizer → token
   blocks.
2. ``weightlock.models``: model presets, loading (:func:`load`), saving and GGUF conversion of model
   directories.
3. ``weightlock.train``: the one training loop (pretraining, fine-tuning) every later step trains with.
4. ``weightlock.defenses``: the defense registry over the two locks, ``weightlock.dlr`` (DLR-Lock,
   :func:`lock`) and ``weightlock.pmp`` (private-mask pretraining).
5. release: what a defense writes, a model directory with a ``manifest.json`` that :func:`load` verifies.
6. ``weightlock.attacks``: the red team, fine-tuning attacks on a release against the unlocked original.
7. ``weightlock.eval``: capability, fidelity, attacker cost and cost to target of models and attack runs.
8. ``weightlock.report``: the HTML and Markdown report from the recorded JSON results.

``weightlock.demo`` runs the whole chain on the built-in corpus; ``weightlock.cli`` is the command line.
"""
from .dlr.lock import lock
from .errors import WeightlockError
from .models.hub import load
from .version import __version__

__all__ = ["WeightlockError", "__version__", "load", "lock"]
