"""Pack documents into fixed-length blocks of token ids, separated by EOS."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import WeightlockError
from .loaders import load_texts


def special_wrapping(tokenizer) -> tuple[list[int], list[int]]:
    """The special-token ids the tokenizer puts before and after a single text (BERT: [CLS], [SEP])."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    raise WeightlockError(f"{type(tokenizer).__name__}: cannot tell its special tokens from the text")


def pack_texts(texts: list[str], tokenizer, block_size: int, max_tokens: int | None = None,
               batch: int = 64, specials: bool = False) -> torch.Tensor:
    """Tokenize ``texts`` in order, append EOS after each, concatenate and cut into ``block_size`` blocks.

    Stops once ``max_tokens`` tokens are collected (the token budget); the incomplete last block is dropped.
    ``specials=True`` wraps every block in the tokenizer's own special tokens (BERT: ``[CLS] … [SEP]``,
    Llama: ``<s> …``), so a model sees calibration text the way it sees text in use; tokenizers that add
    none are unaffected. Returns a ``LongTensor`` of shape ``[n_blocks, block_size]``.
    """
    prefix, suffix = special_wrapping(tokenizer) if specials else ([], [])
    n_special = len(prefix) + len(suffix)
    if block_size - n_special < 2:
        raise WeightlockError(f"block size must be at least {2 + n_special}, got {block_size}")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise WeightlockError("tokenizer has neither an EOS nor a SEP token to separate documents")
    chunks: list[np.ndarray] = []
    total = 0
    for i in range(0, len(texts), batch):
        # cut into blocks below
        enc = tokenizer(texts[i:i + batch], add_special_tokens=False, verbose=False)["input_ids"]
        for ids in enc:
            arr = np.asarray(ids + [eos], dtype=np.int64)
            chunks.append(arr)
            total += arr.size
        if max_tokens is not None and total >= max_tokens:
            break
    if not chunks:
        return torch.empty(0, block_size, dtype=torch.long)
    flat = np.concatenate(chunks)
    if max_tokens is not None:
        flat = flat[:max_tokens]
    body = block_size - n_special
    n = flat.size // body
    rows = flat[: n * body].reshape(n, body)
    if n_special:
        rows = np.concatenate([np.tile(np.asarray(prefix, dtype=np.int64), (n, 1)), rows,
                               np.tile(np.asarray(suffix, dtype=np.int64), (n, 1))], axis=1)
    return torch.from_numpy(rows.copy())


def load_blocks(spec: str, split: str | None, tokenizer, block_size: int,
                max_tokens: int | None = None, specials: bool = False) -> torch.Tensor:
    """Documents of ``spec``/``split`` packed into blocks; an error if not even one block results.

    Built-in data is tokenized once per tokenizer and cached under the cache dir (``.npy``, no pickle).
    """
    texts = load_texts(spec, split)
    cache = None
    if spec.startswith("builtin:"):
        import hashlib

        from ..io import cache_dir

        h = hashlib.sha256(f"{spec}|{split}|{block_size}|{max_tokens}|{'specials|' if specials else ''}".encode())
        h.update(tokenizer.backend_tokenizer.to_str().encode())
        for t in texts:  # the content itself: a different Python or split rule is a different cache entry
            h.update(hashlib.sha256(t.encode()).digest())
        cache = cache_dir() / "blocks" / f"{h.hexdigest()[:32]}.npy"
        if cache.exists():
            return torch.from_numpy(np.load(cache, allow_pickle=False))
    blocks = pack_texts(texts, tokenizer, block_size, max_tokens, specials=specials)
    if cache is not None and blocks.shape[0]:
        from ..io import atomic_path

        with atomic_path(cache) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, blocks.numpy(), allow_pickle=False)
    if blocks.shape[0] == 0:
        raise WeightlockError(f"{spec} ({split or 'all'}): too little text for one block of {block_size} tokens")
    return blocks
