"""Running one attack: fine-tune a model on a task, against the unlocked reference when given, and record
the attacker's gain and what it paid (saved-activation bytes, the training memory counted from them and the
parameters — the memory budget — the run's own measured peak memory, time split forward/backward/optimizer,
FLOPs, tokens)."""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightlockError
from ..eval.cost import PeakMemory, analytic_train_flops, training_memory
from ..io import check_out_dir, read_json, write_json
from ..schema import ATTACK_RUN, schema_version
from ..train.finetune import finetune, is_main_process
from .base import Attack
from .registry import attack_options, make_attack


def run_attack(model_dir: str | Path, task: str, attack: str, out: str | Path | None = None,
               reference: str | Path | None = None, eval_data: str | None = None, **options) -> dict:
    """Attack the model in ``model_dir`` on ``task`` with the registered ``attack`` configured by flat
    ``options`` (see :func:`~weightlock.attacks.registry.make_attack`); with ``reference`` the same attack
    (or the attack's ``reference_attack``) runs on the unlocked reference and the gain ratio is reported.
    Writes ``result.json`` + ``config.json`` in ``out`` (a finished run there is returned as is)."""
    from ..eval.tasks import get_task

    atk = make_attack(attack, **options)
    task_obj = get_task(task)
    out = check_out_dir(out, attack_inputs(model_dir, reference, task)) if out else None  # before any work
    if out and (out / "result.json").exists():
        return with_target(read_json(out / "result.json"))
    if reference is not None and not Path(reference).is_dir():
        raise WeightlockError(f"{reference}: reference model directory not found")
    config = {"model": str(model_dir), "reference": str(reference) if reference else None, "task": task,
              "attack": attack, "options": atk.cfg.options()}
    # "target": the attacked model's run, locked or not (before attack_run schema 2: "locked"; see
    # weightlock.schema.target_run, which reads both)
    result = {"kind": ATTACK_RUN, "schema_version": schema_version(ATTACK_RUN), **config,
              "target": attack_one(model_dir, task_obj, atk, eval_data)}
    if reference is not None:
        ref_name = atk.reference_attack or attack
        ref_options = attack_options(ref_name)
        result["reference_attack"] = ref_name
        result["reference_run"] = attack_one(reference, task_obj, make_attack(
            ref_name, **{k: v for k, v in options.items() if k in ref_options}), eval_data)
        ref_gain = result["reference_run"]["gain"]
        result["gain_ratio"] = result["target"]["gain"] / ref_gain if abs(ref_gain) > 1e-12 else None
    if out and is_main_process():  # a data-parallel run (torchrun): every process has the same result
        write_json(out / "config.json", config)
        write_json(out / "result.json", result)
    return result


def with_target(result: dict) -> dict:
    """An attack result as this weightlock writes it: a record from before schema 2 (the attacked model's run
    under ``"locked"``) gets it under ``"target"`` too (the file is not changed)."""
    if "target" not in result and isinstance(result.get("locked"), dict):
        result = {**result, "target": result["locked"]}
    return result


def attack_inputs(model_dir, reference, task: str) -> tuple:
    """What an attack reads (the models, a task file): its output directory must not be, contain or lie inside
    any of them."""
    return (model_dir, reference, task if str(task).endswith(".jsonl") else None)


def attack_one(model_dir, task, atk: Attack, eval_data: str | None = None) -> dict:
    """One attack on one model: task score and capability perplexity before and after, and the costs.
    The run's own peak memory (preparation + fine-tuning, not the process's all-time high) is measured
    here, around the whole run; the per-step figures come from the trainer's cost probe."""
    from ..data import load_blocks, load_tokenizer
    from ..models.hub import load
    from ..train.loop import PatienceHook, evaluate_loss

    c, tc = atk.cfg, atk.cfg.training
    torch.manual_seed(tc.seed)
    model = load(model_dir)
    tok = load_tokenizer(model_dir)
    cap_spec = eval_data or pretraining_domain(model_dir)
    cap_blocks = load_blocks(cap_spec, "validation", tok, c.block_size, min(8192, c.eval_tokens))
    ctx: dict[str, Any] = {"model_dir": str(model_dir)}  # what prepare may need to know; not part of the result
    before = task.evaluate(model, tok, c.block_size, max_tokens=c.eval_tokens)
    cap_before = math.exp(evaluate_loss(model, cap_blocks))
    blocks = task.train_blocks(tok, c.block_size, c.train_tokens)
    curve_hook = None
    with PeakMemory() as peak:
        t0 = time.perf_counter()
        model = atk.prepare(model, tok, ctx)
        prepare_s = time.perf_counter() - t0
        ctx.pop("model_dir")
        hooks = ctx.pop("hooks", [])
        if c.score_every > 0:  # scored outside the timed steps; the final model is scored below
            curve_hook = PatienceHook(lambda t: task.evaluate(model, tok, c.block_size, c.eval_tokens)["score"],
                                      c.score_every,
                                      patience=c.patience, min_delta=c.min_delta, skip_final=True,
                                      initial_score=None if atk.changes_model else before["score"])
            hooks = [*hooks, curve_hook]
        history, trainer = finetune(model, blocks, c, hooks=hooks)
    # counted as the model trained (before eval mode): the one memory budget (eval.cost.TRAINING_MEMORY)
    memory = training_memory(model, tc.optimizer, trainer.saved_activation_bytes)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    recovered = ctx.pop("recovered_mask", None)
    if recovered is not None:
        ctx["recovered_mask_density"] = sum(int(m.sum()) for m in recovered.values()) / sum(
            m.numel() for m in recovered.values())
    model.eval()
    after = task.evaluate(model, tok, c.block_size, max_tokens=c.eval_tokens)
    cost_curve = _cost_curve(before["score"], after["score"], curve_hook, trainer, prepare_s,
                             ctx.get("reverse_distill", {}).get("flops", 0.0),
                             atk.changes_model)
    cap_after = math.exp(evaluate_loss(model, cap_blocks))
    steps = history[1:] or history  # the first step pays one-off costs
    med = lambda k: statistics.median(h[k] for h in steps)  # noqa: E731
    micro_batches = len(history) * tc.grad_accum * trainer.acc.num_processes  # every process's, data-parallel
    return {
        "model": str(model_dir), "before": before, "after": after, "gain": after["score"] - before["score"],
        "capability_ppl_before": cap_before, "capability_ppl_after": cap_after, "capability_data": cap_spec,
        "parameters": n_params, "trainable_parameters": n_train, "tokens": trainer.tokens_seen,
        "loss_curve": [h["loss"] for h in history],
        "score_curve": [[p["step"], p["score"]] for p in cost_curve if p["step"] or p is cost_curve[0]],
        "cost_curve": cost_curve, "stopped_early": trainer.step < tc.max_steps,
        "cost": {
            "saved_activation_bytes_per_step": trainer.saved_activation_bytes,
            # the memory the attack needs, counted exactly: parameters + gradients + optimizer state + saved
            # activations of a step (its parts beside it) — what "fits within the original's memory" compares
            "training_memory_bytes": memory.pop("training_memory_bytes"), "training_memory": memory,
            # measurements of this run (allocator-dependent, they vary run to run): reported, never the budget
            **peak.as_dict(),
            "step_time_s": med("step_time"), "forward_time_s": med("forward_time"),
            "backward_time_s": med("backward_time"), "optimizer_time_s": med("optimizer_time"),
            "train_seconds": sum(h["step_time"] for h in history), "prepare_seconds": prepare_s,
            # analytic FLOPs of full training (linear maps + attention), every micro-batch run
            "flops_estimate": analytic_train_flops(model, tc.batch_size, c.block_size) * micro_batches,
            # torch's FLOP counter (matmuls; forward + backward of one micro-batch) × micro-batches run
            "flops_counted": (trainer.flops_per_micro_batch * micro_batches
                              if trainer.flops_per_micro_batch is not None else None),
        },
        **ctx,
    }


def _cost_curve(before: float, after: float, hook, trainer, prepare_s: float, prepare_flops: float,
                changes_model: bool) -> list[dict]:
    """The attack's score against its cumulative cost: the model as released at cost 0, (for an attack whose
    preparation changes the model, e.g. reverse distillation, whose time and FLOPs count, and when the curve
    was scored) the prepared model, every scored step and the final model. ``seconds`` is preparation +
    training-step time (scoring excluded)."""
    from ..train.loop import cost_point

    def shifted(p):
        return {**p, "seconds": p["seconds"] + prepare_s,
                "flops": None if p["flops"] is None else p["flops"] + prepare_flops}

    # the hook's first point is the model before training: the release itself unless prepare changed it
    scored = [] if hook is None else hook.curve if changes_model else hook.curve[1:]
    points = [shifted(p) for p in scored]
    if points and points[-1]["step"] == trainer.step:
        points[-1]["score"] = after  # the same model, scored once more in eval mode
    else:
        final = (hook.point(trainer, after) if hook is not None
                 else cost_point(trainer, sum(h["step_time"] for h in trainer.history), after))
        points.append(shifted(final))
    return [{"step": 0, "tokens": 0, "seconds": 0.0, "flops": 0.0, "score": before}] + points


def pretraining_domain(model_dir) -> str:
    """The data ``model_dir`` was pretrained on (through a lock report to its base model), else builtin:code."""
    from ..train.pretrain import run_config

    data = run_config(model_dir).get("data")
    if data:
        return data
    rep = Path(model_dir) / "lock_report.json"
    if rep.exists():
        return pretraining_domain(read_json(rep)["base_model"])
    return "builtin:code"
