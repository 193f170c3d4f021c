"""Capability metrics: perplexity of a model directory and of a unigram baseline, and sampling."""
from __future__ import annotations

import math
import numbers
import os

import torch

from ..errors import WeightlockError
from ..train.loop import evaluate_loss


def default_block_size(model_dir: str | os.PathLike, fallback: int = 128) -> int:
    """The block size the model was trained with, when it was trained by weightlock."""
    from ..train.pretrain import run_config

    return int(run_config(model_dir).get("block_size", fallback))


def perplexity(model, blocks: torch.Tensor, batch_size: int = 16) -> float:
    """Token-weighted perplexity of a causal LM on packed blocks."""
    return math.exp(evaluate_loss(model, blocks, batch_size))


def model_perplexity(model_dir: str | os.PathLike, data: str = "builtin:prose", split: str = "test",
                     block_size: int | None = None, max_tokens: int | None = None, batch_size: int = 16,
                     device: str = "cpu", trust_remote_code: bool = False, verify: bool = True,
                     progress: bool = False) -> dict:
    """Perplexity of the model in ``model_dir`` on ``data``/``split``, tokenized with the model's tokenizer;
    ``progress``: status lines and a progress bar on stderr."""
    import sys

    from ..data import load_blocks, load_tokenizer
    from ..models.hub import load

    def say(msg: str) -> None:
        if progress:
            print(f"weightlock eval ppl: {msg}", file=sys.stderr, flush=True)

    say(f"loading {model_dir}")
    model = load(model_dir, device=device, trust_remote_code=trust_remote_code, verify=verify)
    tok = load_tokenizer(model_dir)
    block_size = block_size or default_block_size(model_dir)
    say(f"tokenizing {data} ({split}) into {block_size}-token blocks")
    blocks = load_blocks(data, split, tok, block_size, max_tokens)
    loss = evaluate_loss(model, blocks, batch_size, progress="perplexity" if progress else None)
    return {"model": str(model_dir), "data": data, "split": split, "block_size": block_size,
            "tokens": int(blocks[:, 1:].numel()), "loss": loss, "perplexity": math.exp(loss)}


def unigram_perplexity(train_blocks: torch.Tensor, eval_blocks: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fit on ``train_blocks`` (same targets as the LM)."""
    if vocab_size < 1:
        raise WeightlockError("vocab size must be positive")
    counts = torch.bincount(train_blocks.reshape(-1), minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    targets = eval_blocks[:, 1:].reshape(-1)
    return math.exp(-logp[targets].mean().item())


def generate_text(model_dir: str | os.PathLike, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8,
                  top_k: int = 50, seed: int = 0, trust_remote_code: bool = False, verify: bool = True,
                  top_p: float = 1.0) -> str:
    """Sample a continuation of ``prompt`` from the model in ``model_dir`` (greedy at ``temperature`` 0;
    otherwise from the ``top_k`` most likely tokens within the nucleus ``top_p``); returns the decoded prompt
    and continuation. Invalid sampling settings are refused before the model is loaded."""
    from ..data import load_tokenizer
    from ..models.hub import load

    check_sampling(max_new_tokens, temperature, top_k, top_p)
    model = load(model_dir, trust_remote_code=trust_remote_code, verify=verify)
    if not model.can_generate():
        raise WeightlockError(f"{model_dir}: {type(model).__name__} is not a generative (causal) language model")
    tok = load_tokenizer(model_dir)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.shape[1] == 0:
        ids = torch.tensor([[tok.eos_token_id]])
    torch.manual_seed(seed)
    sample = temperature > 0
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=sample, temperature=temperature if sample else None,
                             top_k=top_k if sample else None, top_p=top_p if sample else None,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0], skip_special_tokens=True)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int = 50, top_p: float = 1.0) -> None:
    """Refuse sampling settings that mean nothing (a :class:`WeightlockError` naming the setting): at least one
    new token, a finite temperature ≥ 0 (0: greedy), ``top_k`` ≥ 1 and ``top_p`` in (0, 1]."""
    if not _whole(max_new_tokens) or max_new_tokens < 1:
        raise WeightlockError(f"max new tokens must be a whole number ≥ 1, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise WeightlockError(f"temperature must be a finite number ≥ 0 (0: greedy), got {temperature}")
    if not _whole(top_k) or top_k < 1:
        raise WeightlockError(f"top-k must be a whole number ≥ 1, got {top_k}")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise WeightlockError(f"top-p must be in (0, 1], got {top_p}")


def _whole(n) -> bool:
    return isinstance(n, numbers.Integral) and not isinstance(n, bool)
