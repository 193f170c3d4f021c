"""The default tokenizer: a byte-level BPE trained on the built-in corpus, cached on disk.

Training is deterministic (fixed documents in a fixed order, a single thread), so two machines with
the same Python build get the same vocabulary. The result is a ``PreTrainedTokenizerFast`` saved with
every model, so ``AutoTokenizer.from_pretrained(model_dir)`` works without weightlock.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..errors import WeightlockError
from ..io import cache_dir
from .corpus import documents

EOS = "<|endoftext|>"
PAD = "<|pad|>"
DEFAULT_VOCAB = 4096
_TRAIN_CHARS = {"code": 6_000_000, "prose": 400_000}  # of the train split, in corpus order
_VERSION = 1


def _training_texts() -> list[str]:
    texts = []
    for domain, budget in _TRAIN_CHARS.items():
        used = 0
        for d in documents(domain, "train"):
            if used >= budget:
                break
            texts.append(d.text)
            used += len(d.text)
    return texts


def builtin_tokenizer(vocab_size: int = DEFAULT_VOCAB):
    """The built-in BPE tokenizer of ``vocab_size`` entries, trained once and cached."""
    from transformers import PreTrainedTokenizerFast

    if not 256 + 2 <= vocab_size <= 1_000_000:
        raise WeightlockError(f"vocab size {vocab_size} out of range (258 .. 1,000,000)")
    key = hashlib.sha256(f"v{_VERSION}|{sys.version}|{vocab_size}".encode()).hexdigest()[:16]
    target = cache_dir() / "tokenizers" / f"bpe{vocab_size}-{key}"
    if not (target / "tokenizer.json").exists():
        _train(vocab_size, target)
    return PreTrainedTokenizerFast.from_pretrained(str(target))


def _train(vocab_size: int, target: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    old = os.environ.get("RAYON_NUM_THREADS")
    os.environ["RAYON_NUM_THREADS"] = "1"  # the BPE trainer is deterministic single-threaded
    try:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS, PAD],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_training_texts(), trainer=trainer)
    finally:
        if old is None:
            os.environ.pop("RAYON_NUM_THREADS", None)
        else:
            os.environ["RAYON_NUM_THREADS"] = old
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=None, pad_token=PAD,
        model_max_length=1_000_000,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=target.parent))
    fast.save_pretrained(str(tmp))
    try:
        os.replace(tmp, target)  # atomic: concurrent trainers race harmlessly
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(model_dir: str | os.PathLike | None = None, vocab_size: int = DEFAULT_VOCAB):
    """The tokenizer saved in ``model_dir`` if it has one, else the built-in one."""
    from transformers import AutoTokenizer

    if model_dir is not None:
        from ..models.gguf import resolve_model_path

        d = resolve_model_path(model_dir)  # a .gguf file: its cached conversion, tokenizer included
        if (d / "tokenizer.json").exists() or (d / "tokenizer_config.json").exists():
            tok = AutoTokenizer.from_pretrained(str(d))
            if tok.eos_token is None and tok.sep_token is None:
                raise WeightlockError(f"{d}: tokenizer has neither an EOS nor a SEP token, which packing needs")
            return tok
    return builtin_tokenizer(vocab_size)
