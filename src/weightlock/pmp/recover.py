"""Mask-recovery attacks on a PMP release: can an attacker guess the private mask from the dense weights?

Each attack scores every entry of the pooled parameters and guesses the top-ρ (a full-knowledge
attacker knows ρ and the pool). Reported against the chance level ρ/(2−ρ) of a random guess.

(a) ``magnitude``    |w|, thresholded per tensor and globally (the paper's L2 projection leaves the
                     complement ~100× smaller than trained entries);
(b) ``init-regen``   |w − w0| with w0 regenerated from the default seed (42) and default HF init;
(c) ``row-col``      |w − μ| / σ with row/column statistics; ``spectral``: |low-rank part of w|
                     (trained structure lives in the top singular directions, noise does not);
(d) ``early-bird``   the attacker's own Stage I on public data, from its own initialisation.
"""
from __future__ import annotations

import torch

from .mask import Mask, chance_iou, mask_iou, topk_mask
from .train import PAPER_SEED, EarlyBirdHook, PMPConfig, pooled_parameters


def _guess(scores: dict[str, torch.Tensor], ratio: float, per_tensor: bool) -> Mask:
    return topk_mask(scores, ratio, per_tensor=per_tensor)


def magnitude_scores(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Attack (a): score every entry by its magnitude |w|."""
    return {n: p.detach().abs() for n, p in params.items()}


def init_regen_scores(model, params: dict[str, torch.Tensor], seed: int = PAPER_SEED) -> dict[str, torch.Tensor]:
    """Regenerate the initialisation with ``seed`` (what the authors' script uses) and score |w − c·w0|.

    Untrained entries equal w0 up to one scalar per tensor (weight decay and the L2 rescaling shrink
    them uniformly), so c is the most frequent ratio w/w0 of the tensor (to 5 significant digits).
    """
    torch.manual_seed(seed)
    fresh = type(model)(model.config)
    ref = dict(fresh.named_parameters())
    out = {}
    for n, p in params.items():
        w, w0 = p.detach().float(), ref[n].detach().float()
        ok = w0.abs() > 1e-8
        ratios = (w[ok] / w0[ok])
        if ratios.numel():
            rounded = torch.tensor([float(f"{r:.5g}") for r in ratios[:: max(1, ratios.numel() // 20000)].tolist()])
            vals, counts = rounded.unique(return_counts=True)
            c = vals[counts.argmax()].item()
        else:
            c = 1.0
        out[n] = (w - c * w0).abs()
    return out


def row_col_scores(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Attack (c): score every entry by its larger z-score within its row or column (1-D tensors: the whole
    tensor's)."""
    out = {}
    for n, p in params.items():
        w = p.detach().float()
        if w.ndim < 2:
            out[n] = (w - w.mean()).abs() / (w.std() + 1e-12)
            continue
        zr = (w - w.mean(1, keepdim=True)) / (w.std(1, keepdim=True) + 1e-12)
        zc = (w - w.mean(0, keepdim=True)) / (w.std(0, keepdim=True) + 1e-12)
        out[n] = torch.maximum(zr.abs(), zc.abs())
    return out


def spectral_scores(params: dict[str, torch.Tensor], keep: float = 0.1) -> dict[str, torch.Tensor]:
    """Attack (c), spectral: score every entry by the magnitude of the weight's rank-``keep``·min(shape) approximation
    (1-D tensors: |w|)."""
    out = {}
    for n, p in params.items():
        w = p.detach().float()
        if w.ndim < 2:
            out[n] = w.abs()
            continue
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        k = max(1, int(keep * s.numel()))
        out[n] = (u[:, :k] * s[:k]) @ vh[:k]
        out[n] = out[n].abs()
    return out


def early_bird_scores(model, tokenizer, cfg: PMPConfig, blocks: torch.Tensor, seed: int = 12345,
                      steps: int = 20) -> dict[str, torch.Tensor]:
    """The attacker's own early-bird mask (as 0/1 scores) from a fresh init of its own on public data."""
    from ..train.loop import TrainConfig, Trainer

    torch.manual_seed(seed)
    fresh = type(model)(model.config)
    params = pooled_parameters(fresh, cfg.pool)
    hook = EarlyBirdHook(params, cfg)
    Trainer(fresh, blocks, TrainConfig(max_steps=steps, batch_size=min(8, blocks.shape[0]), lr=1e-3,
                                       schedule="constant", warmup_steps=1, progress=False, checkpoint_every=0,
                                       eval_every=10**9), hooks=[hook]).fit(resume=False)
    return {n: hook.mask[n].float() + 1e-3 * torch.rand(hook.mask[n].shape) for n in hook.mask}


def recover_all(model, true_mask: Mask, cfg: PMPConfig, tokenizer=None, public_blocks=None) -> dict:
    """Run every mask-recovery attack; IoU of each guess with the true mask, and the chance level."""
    params = {n: p for n, p in pooled_parameters(model, cfg.pool).items() if n in true_mask}
    mask = {n: true_mask[n] for n in params}
    rho = cfg.mask_ratio
    results = {"chance_iou": chance_iou(rho), "mask_ratio": rho}
    attacks = {"magnitude": lambda: magnitude_scores(params),
               "init-regen": lambda: init_regen_scores(model, params),
               "row-col": lambda: row_col_scores(params),
               "spectral": lambda: spectral_scores(params)}
    if tokenizer is not None and public_blocks is not None:
        attacks["early-bird"] = lambda: early_bird_scores(model, tokenizer, cfg, public_blocks)
    for name, fn in attacks.items():
        scores = fn()
        for scope, per_tensor in (("global", False), ("per-tensor", True)):
            results[f"{name}/{scope}"] = mask_iou(_guess(scores, rho, per_tensor), mask)
    best = max((k for k in results if "/" in k), key=lambda k: results[k])
    results["best"] = {"attack": best, "iou": results[best], "excess_over_chance": results[best] - chance_iou(rho)}
    return results
