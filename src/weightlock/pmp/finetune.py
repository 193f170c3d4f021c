"""Authorized fine-tuning with the private mask (the attacks' fine-tuning, plus the mask hook)."""
from __future__ import annotations

from ..io import check_out_dir, staged_out_dir


def finetune_model(model_dir, data: str, out, mask=None, steps: int = 100, lr: float = 1e-3, batch_size: int = 8,
                   block_size: int | None = None, overwrite: bool = False, seed: int = 0,
                   allow_uncommitted: bool = False) -> dict:
    """Fine-tune ``model_dir`` on ``data``; with ``mask`` only masked entries of the pooled parameters move.

    The mask must match the release's commitment (a mask from another run is refused before anything is
    loaded or trained); a model without one is refused unless ``allow_uncommitted``.

    Under ``torchrun`` / ``accelerate launch`` (P processes) ``batch_size`` is per process: the run equals
    one process with ``P × batch_size``. Only the main process writes ``out``; the others return ``{}``.
    ``out`` is written only once training has succeeded (into a temporary sibling renamed onto it): a run that
    fails leaves nothing behind, and a replaced ``out`` (``overwrite``) keeps its old content until then.
    """
    from ..data import load_blocks, load_tokenizer
    from ..eval.perplexity import default_block_size
    from ..models.hub import load, save_model_dir
    from ..train.finetune import FinetuneConfig, barrier, finetune, is_main_process, process_count
    from .release import mask_for_release
    from .train import MaskHook

    check_out_dir(out, (model_dir, mask, data), non_empty_ok=overwrite)  # before any work
    m = mask_for_release(model_dir, mask, allow_uncommitted) if mask is not None else None
    model = load(model_dir)
    tok = load_tokenizer(model_dir)
    hooks = []
    if m is not None:
        params = {n: p for n, p in model.named_parameters() if n in m}
        hooks.append(MaskHook(params, m))
    main = is_main_process()
    barrier()  # the processes start together
    bs = block_size or default_block_size(model_dir)
    blocks = load_blocks(data, "train", tok, bs, 400_000)
    procs = process_count()
    cfg = FinetuneConfig.from_options(steps=steps, lr=lr, seed=seed,
                                      batch_size=max(1, min(batch_size, blocks.shape[0] // procs)))
    history, _ = finetune(model, blocks, cfg, hooks=hooks, measure=False)
    if not main:
        return {}
    with staged_out_dir(out, overwrite=overwrite, inputs=(model_dir, mask, data)) as tmp:
        save_model_dir(model, tok, tmp)
    return {"loss_first": history[0]["loss"], "loss_last": history[-1]["loss"], "authorized": mask is not None,
            "loss_curve": [h["loss"] for h in history], "processes": procs, "batch_size": cfg.batch_size,
            "global_batch": cfg.batch_size * procs}
