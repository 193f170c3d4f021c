"""How closely a locked model follows its original: perplexity ratio, next-token top-1 agreement and greedy
continuation agreement, on held-out text the lock did not calibrate on."""
from __future__ import annotations

import math

import torch

from ..errors import WeightlockError

PPL_RATIO_BAR = 1.05  # the fidelity bars a lock is held to: perplexity ratio at most this ...
TOP1_BAR = 0.95  # ... and next-token top-1 agreement at least this


def meets_bars(ppl_ratio: float, top1_agreement: float) -> bool:
    """Whether a lock's perplexity ratio and top-1 agreement both meet the fidelity bars."""
    return ppl_ratio <= PPL_RATIO_BAR and top1_agreement >= TOP1_BAR


@torch.no_grad()
def next_token_agreement(original, locked, blocks: torch.Tensor, batch_size: int = 8) -> dict:
    """Token-weighted NLL of both models on ``blocks`` and the fraction of positions where their most likely
    next token is the same (top-1 agreement)."""
    if blocks.ndim != 2 or blocks.shape[0] == 0:
        raise WeightlockError(f"expected a non-empty [n, block] tensor of token ids, got {tuple(blocks.shape)}")
    nll = {"original": 0.0, "locked": 0.0}
    agree = count = 0
    for i in range(0, blocks.shape[0], batch_size):
        x = blocks[i:i + batch_size]
        targets = x[:, 1:].reshape(-1)
        top = {}
        for name, model in (("original", original), ("locked", locked)):
            logits = model(input_ids=x).logits[:, :-1].float()
            nll[name] += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets,
                                                           reduction="sum").item()
            top[name] = logits.argmax(-1)
        agree += (top["original"] == top["locked"]).sum().item()
        count += targets.numel()
    ppl = {k: math.exp(v / count) for k, v in nll.items()}
    return {"tokens": count, "ppl_original": ppl["original"], "ppl_locked": ppl["locked"],
            "ppl_ratio": ppl["locked"] / ppl["original"], "top1_agreement": agree / count}


@torch.no_grad()
def greedy_agreement(original, locked, prompts: torch.Tensor, new_tokens: int = 32, batch_size: int = 25) -> dict:
    """Greedy continuations of equal-length ``prompts`` ([n, prompt_len] token ids) by both models: the mean
    fraction of the ``new_tokens`` positions that are equal, and the mean length of the common prefix."""
    same, prefix = [], []
    for i in range(0, prompts.shape[0], batch_size):
        x = prompts[i:i + batch_size]
        outs = []
        for model in (original, locked):
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            outs.append(out[:, x.shape[1]:])
        eq = outs[0] == outs[1]
        same += eq.float().mean(1).tolist()
        first_diff = torch.where(eq.all(1), torch.full((eq.shape[0],), new_tokens),
                                 (~eq).float().argmax(1))
        prefix += first_diff.tolist()
    return {"prompts": len(same), "new_tokens": new_tokens, "token_agreement": sum(same) / len(same),
            "common_prefix_mean": sum(prefix) / len(prefix),
            "identical_continuations": sum(p == new_tokens for p in prefix) / len(prefix)}
