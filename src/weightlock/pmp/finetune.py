"""Authorized fine-tuning with the private mask (the attack suite's loop, plus the mask hook)."""
from __future__ import annotations

from pathlib import Path

from ..io import prepare_out_dir


def finetune_model(model_dir, data: str, out, mask=None, steps: int = 100, lr: float = 1e-3, batch_size: int = 8,
                   block_size: int | None = None, overwrite: bool = False, seed: int = 0) -> dict:
    """Fine-tune ``model_dir`` on ``data``; with ``mask`` only masked entries of the pooled parameters move."""
    from ..attacks.core import AttackConfig, finetune
    from ..data import load_blocks, load_tokenizer
    from ..models.hub import load
    from ..eval.perplexity import default_block_size
    from ..models.hub import save_model_dir
    from .mask import load_mask
    from .release import check_shapes
    from .train import MaskHook

    model = load(model_dir)
    tok = load_tokenizer(model_dir)
    hooks = []
    if mask is not None:
        m, _, _ = load_mask(mask)
        check_shapes(m, Path(model_dir))
        params = {n: p for n, p in model.named_parameters() if n in m}
        hooks.append(MaskHook(params, m))
    out = prepare_out_dir(out, overwrite=overwrite)
    bs = block_size or default_block_size(model_dir)
    blocks = load_blocks(data, "train", tok, bs, 400_000)
    cfg = AttackConfig(steps=steps, lr=lr, batch_size=min(batch_size, blocks.shape[0]), block_size=bs, seed=seed)
    history, _ = finetune(model, blocks, cfg, hooks=hooks, measure=False)
    save_model_dir(model, tok, out)
    return {"loss_first": history[0]["loss"], "loss_last": history[-1]["loss"], "authorized": mask is not None}
