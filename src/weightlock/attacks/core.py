"""The red team: a registry of fine-tuning attacks, each a dataclass config plus a small class.

Every attack fine-tunes a copy of a model on a task with the one training loop and records what the
attacker gains (task score before/after, and relative to the same attack on the unlocked reference)
and what it pays (saved-activation bytes, peak RSS, CUDA peak, time split forward/backward/optimizer,
FLOPs, tokens).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import check_types
from ..errors import WeightlockError
from ..eval.cost import PeakMemory, analytic_train_flops
from ..io import read_json, write_json
from ..schema import ATTACK_RUN, SCHEMA_VERSION
from ..train.loop import TrainConfig, Trainer

ATTACKS: dict[str, type["Attack"]] = {}


def register(name: str):
    def deco(cls):
        cls.name = name
        ATTACKS[name] = cls
        return cls

    return deco


@dataclass
class AttackConfig:
    """Fine-tuning budget and memory-saving counter-measures shared by every attack."""

    lr: float = 1e-3
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    block_size: int = 128
    schedule: str = "cosine"
    optimizer: str = "adamw"  # adamw | sgd | adafactor (low-memory)
    warmup_steps: int = 10
    seed: int = 0
    checkpointing: str = "none"  # none | layer | dlr | group:K (K DLR blocks per checkpoint)
    offload: bool = False  # torch.autograd.graph.save_on_cpu
    train_tokens: int = 200_000
    score_every: int = 0  # also score the task every N steps (a fine-tuning curve); 0: before/after only
    progress: bool = False

    def __post_init__(self) -> None:
        check_types(self, "attack config")
        if min(self.steps, self.batch_size, self.grad_accum, self.train_tokens) < 1 or self.block_size < 2:
            raise WeightlockError("steps, batch_size, grad_accum and train_tokens must be ≥ 1, block_size ≥ 2")
        if not self.lr > 0:
            raise WeightlockError(f"learning rate must be positive, got {self.lr}")
        if self.warmup_steps < 0 or self.score_every < 0:
            raise WeightlockError("warmup_steps and score_every must be ≥ 0")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise WeightlockError(f"unknown schedule {self.schedule!r} (cosine, linear, constant)")
        if self.optimizer not in ("adamw", "sgd", "adafactor"):
            raise WeightlockError(f"unknown optimizer {self.optimizer!r} (adamw, sgd, adafactor)")
        c = self.checkpointing
        if c not in ("none", "layer", "dlr") and not (c.startswith("group:") and c[6:].isdigit() and int(c[6:]) > 0):
            raise WeightlockError(f"unknown checkpointing {c!r} (none, layer, dlr, group:K)")


@dataclass
class LoraAttackConfig(AttackConfig):
    lr: float = 3e-3
    targets: str = "attention"  # attention | all-linear | dlr
    r: int = 8
    alpha: int = 16


@dataclass
class FreezeAttackConfig(AttackConfig):
    train: str = "non-mlp"  # non-mlp (attention, norms, embeddings, head) | attention | norms-head


@dataclass
class ReverseDistillConfig(AttackConfig):
    init: str = "random"  # random | readback (plain MLPs: start from the stacked V_l, s·U_l of each DLR-Net)
    distill_steps: int = 600  # 0 with init=readback: no distillation at all
    distill_tokens: int = 65_536
    distill_lr: float = 3e-3


class Attack:
    name = "attack"
    Config: type[AttackConfig] = AttackConfig
    reference_attack: str | None = None  # what runs on the unlocked reference (default: the same attack)

    def __init__(self, cfg: AttackConfig | None = None) -> None:
        self.cfg = cfg or self.Config()

    def prepare(self, model: nn.Module, tokenizer, ctx: dict) -> nn.Module:
        """Return the model to fine-tune (may wrap or convert ``model``); record extra costs in ``ctx``."""
        return model


@register("full")
class FullFinetune(Attack):
    """Full fine-tuning: every parameter trains."""


@register("lora")
class LoraAttack(Attack):
    """peft LoRA on attention, on all linear layers, or on the DLR-Net factors."""

    Config = LoraAttackConfig

    def prepare(self, model, tokenizer, ctx):
        from peft import LoraConfig, get_peft_model

        c = self.cfg
        targets = {"attention": _attention_names(model), "all-linear": "all-linear",
                   "dlr": ["down", "up"]}.get(c.targets)
        if targets is None:
            raise WeightlockError(f"unknown LoRA targets {c.targets!r} (attention, all-linear, dlr)")
        if c.targets == "dlr" and not _is_dlr(model):
            raise WeightlockError("LoRA on DLR factors needs a DLR-locked model")
        return get_peft_model(model, LoraConfig(r=c.r, lora_alpha=c.alpha, target_modules=targets, lora_dropout=0.0))


@register("freeze")
class FreezeAttack(Attack):
    """Fine-tune only some parts: freeze the MLPs / DLR-Nets and train the rest."""

    Config = FreezeAttackConfig

    def prepare(self, model, tokenizer, ctx):
        from ..dlr.modeling_weightlock_dlr import adapter_for, find_layers, mlp_modules

        adapter = adapter_for(model)
        frozen = {id(p) for layer in find_layers(model, adapter) for m in mlp_modules(layer, adapter)
                  for p in m.parameters()}
        attn = set(_attention_names(model))
        for n, p in model.named_parameters():
            if self.cfg.train == "non-mlp":
                p.requires_grad_(id(p) not in frozen)
            elif self.cfg.train == "attention":
                p.requires_grad_(any(f".{a}." in n for a in attn))
            elif self.cfg.train == "norms-head":
                p.requires_grad_(p.ndim == 1 or "lm_head" in n)
            else:
                raise WeightlockError(f"unknown freeze mode {self.cfg.train!r} (non-mlp, attention, norms-head)")
        return model


@register("reverse-distill")
class ReverseDistill(Attack):
    """Distil each DLR-Net back into a dense MLP of the original shape (forward passes through the locked
    model only), then fully fine-tune the dense model. The distillation's time counts as attack cost.
    ``init=readback`` starts each dense MLP from the DLR-Net's own stacked factors, which for an
    ``--init mlp`` release already is the original MLP (``distill_steps=0``: no distillation at all)."""

    Config = ReverseDistillConfig
    reference_attack = "full"  # the unlocked reference has nothing to reverse: it is fine-tuned directly

    def prepare(self, model, tokenizer, ctx):
        if not _is_dlr(model):
            raise WeightlockError("reverse-distill needs a DLR-locked model (this one has no DLR-Nets)")
        t0 = time.perf_counter()
        dense, errors = reverse_distill(model, tokenizer, self.cfg)
        ctx["reverse_distill"] = {"seconds": time.perf_counter() - t0, "layer_rel_error": errors}
        return dense


def reverse_distill(model, tokenizer, cfg: ReverseDistillConfig) -> tuple[nn.Module, list[dict]]:
    """A dense model with the locked model's architecture before locking, MLPs fitted to the DLR-Nets."""
    import transformers

    from ..data import load_blocks
    from ..dlr.distill import capture, dlr_readback, fit_module, relative_error, set_plain_mlp_weights
    from ..dlr.modeling_weightlock_dlr import DLR_CONFIG_KEY, adapter_for, find_layers, get_path

    info = getattr(model.config, DLR_CONFIG_KEY)
    config = model.config.__class__.from_dict({k: v for k, v in model.config.to_dict().items()
                                               if k not in (DLR_CONFIG_KEY, "auto_map")})
    torch.manual_seed(cfg.seed)
    dense = getattr(transformers, info["base_class"])(config).eval()  # no dropout while fitting the MLPs
    adapter = adapter_for(model)
    locked_layers, dense_layers = find_layers(model, adapter), find_layers(dense, adapter)
    # every non-MLP weight is public: copy it
    own = dict(dense.named_parameters())
    for n, p in model.named_parameters():
        if n in own and own[n].shape == p.shape:
            own[n].data.copy_(p.data)
    if cfg.init not in ("random", "readback"):
        raise WeightlockError(f"unknown reverse-distill init {cfg.init!r} (random, readback)")
    if cfg.init == "readback":
        for locked, layer in zip(locked_layers, dense_layers):
            set_plain_mlp_weights(layer, adapter, dlr_readback(get_path(locked, adapter.mlp)))
    blocks = load_blocks("builtin:code+prose", "train", tokenizer, cfg.block_size, cfg.distill_tokens)
    caps = capture(model, blocks, list(range(len(locked_layers))))
    errors = []
    for k, layer in enumerate(dense_layers):
        x, y = caps[k]
        student = get_path(layer, adapter.mlp)
        if adapter.mlp_out:  # BERT: the feed-forward is split over `intermediate` and `output.dense`
            student = nn.Sequential(student, get_path(layer, adapter.mlp_out))
        if cfg.distill_steps == 0:
            errors.append({"rel_error": relative_error(student, x, y), "steps": 0})
            continue
        _, st = fit_module(lambda s=student: s, x, y, steps=cfg.distill_steps, lr=cfg.distill_lr,
                           batch_tokens=1024, seed=cfg.seed, progress=cfg.progress, desc=f"reverse {k}")
        errors.append(st)
    return dense.train(), errors


@dataclass
class MaskRecoverConfig(AttackConfig):
    method: str = "magnitude"  # magnitude | init-regen | row-col | spectral | early-bird
    mask_ratio: float = 0.3  # the attacker's guess of ρ (the paper's values are public)
    pool: str = "linear"
    per_tensor: bool = False


@register("mask-recover")
class MaskRecover(Attack):
    """Guess the PMP mask from the released weights, then fine-tune only the guessed entries."""

    Config = MaskRecoverConfig
    reference_attack = "full"

    def prepare(self, model, tokenizer, ctx):
        from ..pmp import recover
        from ..pmp.mask import topk_mask
        from ..pmp.train import MaskHook, PMPConfig, pooled_parameters

        c = self.cfg
        pmp = PMPConfig(mask_ratio=c.mask_ratio, pool=c.pool, per_tensor=c.per_tensor)
        params = pooled_parameters(model, c.pool)
        if c.method == "early-bird":
            from ..data import load_blocks

            blocks = load_blocks("builtin:code", "train", tokenizer, c.block_size, 50_000)
            scores = recover.early_bird_scores(model, tokenizer, pmp, blocks)
        else:
            fns = {"magnitude": lambda: recover.magnitude_scores(params),
                   "init-regen": lambda: recover.init_regen_scores(model, params),
                   "row-col": lambda: recover.row_col_scores(params),
                   "spectral": lambda: recover.spectral_scores(params)}
            if c.method not in fns:
                raise WeightlockError(f"unknown mask-recovery method {c.method!r} ({', '.join(fns)}, early-bird)")
            scores = fns[c.method]()
        guess = topk_mask(scores, c.mask_ratio, c.per_tensor)
        ctx["recovered_mask"] = guess
        ctx["hooks"] = [MaskHook(params, guess)]
        return model


@dataclass
class MaskedConfig(AttackConfig):
    mask: str = ""  # the owner's private mask file (private/mask.safetensors)


@register("masked")
class AuthorizedMasked(Attack):
    """Authorized fine-tuning of a PMP model: only the entries of the owner's private mask move. Not an
    attack: the yardstick an attack's gain is compared with."""

    Config = MaskedConfig
    reference_attack = "full"

    def prepare(self, model, tokenizer, ctx):
        from ..pmp.mask import load_mask
        from ..pmp.train import MaskHook

        if not self.cfg.mask:
            raise WeightlockError("the masked attack needs mask=PATH (the owner's private mask file)")
        mask, _, _ = load_mask(self.cfg.mask)
        params = dict(model.named_parameters())
        missing = [n for n in mask if n not in params or params[n].shape != mask[n].shape]
        if missing:
            raise WeightlockError(f"{self.cfg.mask}: mask does not fit this model (e.g. {missing[0]})")
        ctx["hooks"] = [MaskHook({n: params[n] for n in mask}, mask)]
        return model


def make_attack(name: str, **overrides) -> Attack:
    if name not in ATTACKS:
        raise WeightlockError(f"unknown attack {name!r}; available: {', '.join(sorted(ATTACKS))}")
    cls = ATTACKS[name]
    valid = {f.name for f in fields(cls.Config)}
    bad = set(overrides) - valid
    if bad:
        raise WeightlockError(f"attack {name!r} has no option(s) {', '.join(sorted(bad))}; options: {', '.join(sorted(valid))}")
    return cls(cls.Config(**overrides))


def _is_dlr(model) -> bool:
    from ..dlr.modeling_weightlock_dlr import DLR_CONFIG_KEY, DLRNet

    return bool(getattr(model.config, DLR_CONFIG_KEY, None)) or any(isinstance(m, DLRNet) for m in model.modules())


def _attention_names(model) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    known = ["q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "c_attn", "query_key_value", "query", "key",
             "value", "dense"]
    picked = [k for k in known if k in names and k != "dense"]
    return picked or [k for k in known if k in names]


# ---- counter-measures ---------------------------------------------------------------------------

def apply_checkpointing(model: nn.Module, mode: str) -> None:
    """Gradient checkpointing per transformer layer (``layer``), per DLR-Net (``dlr``) or per group of K
    DLR blocks (``group:K``)."""
    from ..dlr.modeling_weightlock_dlr import DLRNet

    if mode == "none":
        return
    if mode == "layer":
        if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5 (the old name warns)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    if mode == "dlr":
        group = None
    elif mode.startswith("group:") and mode[6:].isdigit() and int(mode[6:]) > 0:
        group = int(mode[6:])
    else:
        raise WeightlockError(f"unknown checkpointing {mode!r} (none, layer, dlr, group:K)")
    nets = [m for m in model.modules() if isinstance(m, DLRNet)]
    if not nets:
        raise WeightlockError(f"checkpointing {mode!r} needs DLR-Nets; use 'layer' on an unlocked model")
    for net in nets:  # a flag the net's own forward honours (read-out scale and all)
        net.checkpoint_blocks = group or len(net.blocks)


# ---- running an attack --------------------------------------------------------------------------

def _offloaded_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The causal-LM loss with the activations autograd saves kept in (pinned) host memory."""
    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        return model(input_ids=x, labels=x).loss


def finetune(model: nn.Module, blocks: torch.Tensor, cfg: AttackConfig, hooks=(), measure: bool = True):
    """Fine-tune ``model`` on ``blocks`` with the one training loop; returns (history, trainer)."""
    apply_checkpointing(model, cfg.checkpointing)
    tc = TrainConfig(max_steps=cfg.steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, lr=cfg.lr,
                     warmup_steps=min(cfg.warmup_steps, cfg.steps), schedule=cfg.schedule, weight_decay=0.0,
                     eval_every=10**9, checkpoint_every=0, seed=cfg.seed, progress=cfg.progress,
                     optimizer="sgd" if cfg.optimizer == "sgd" else "adamw")
    trainer = Trainer(model, blocks, tc, hooks=hooks, loss_fn=_offloaded_loss if cfg.offload else None, measure_saved_activations=measure)
    if cfg.optimizer == "adafactor":
        trainer.optimizer = torch.optim.Adafactor([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
        trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(
            trainer.optimizer, trainer.scheduler.lr_lambdas[0])
    history = trainer.fit(resume=False)
    return history, trainer


def run_attack(model_dir: str | Path, task: str, attack: str, out: str | Path | None = None,
               reference: str | Path | None = None, eval_data: str | None = None, **options) -> dict:
    """Attack the model in ``model_dir`` on ``task``; with ``reference`` the same attack runs on the unlocked
    reference and the gain ratio is reported. Writes ``result.json`` + ``config.json`` in ``out`` (a finished
    run there is returned as is)."""
    from ..eval.tasks import get_task

    atk = make_attack(attack, **options)
    task_obj = get_task(task)
    out = Path(out) if out else None
    if out and (out / "result.json").exists():
        return read_json(out / "result.json")
    if reference is not None and not Path(reference).is_dir():
        raise WeightlockError(f"{reference}: reference model directory not found")
    config = {"model": str(model_dir), "reference": str(reference) if reference else None, "task": task,
              "attack": attack, "options": asdict(atk.cfg)}
    result = {"kind": ATTACK_RUN, "schema_version": SCHEMA_VERSION, **config, "locked": _attack_one(model_dir, task_obj, atk, eval_data)}
    if reference is not None:
        ref_name = atk.reference_attack or attack
        ref_fields = {f.name for f in fields(ATTACKS[ref_name].Config)}
        result["reference_attack"] = ref_name
        result["reference_run"] = _attack_one(reference, task_obj, make_attack(
            ref_name, **{k: v for k, v in options.items() if k in ref_fields}), eval_data)
        ref_gain = result["reference_run"]["gain"]
        result["gain_ratio"] = result["locked"]["gain"] / ref_gain if abs(ref_gain) > 1e-12 else None
    if out:
        write_json(out / "config.json", config)
        write_json(out / "result.json", result)
    return result


def _attack_one(model_dir, task, atk: Attack, eval_data: str | None) -> dict:
    from ..data import load_blocks, load_tokenizer
    from ..models.hub import load
    from ..train.loop import evaluate_loss

    torch.manual_seed(atk.cfg.seed)
    model = load(model_dir)
    tok = load_tokenizer(model_dir)
    cap_spec = eval_data or _pretraining_domain(model_dir)
    cap_blocks = load_blocks(cap_spec, "validation", tok, atk.cfg.block_size, 8192)
    ctx: dict[str, Any] = {}
    before = task.evaluate(model, tok, atk.cfg.block_size)
    cap_before = math.exp(evaluate_loss(model, cap_blocks))
    blocks = task.train_blocks(tok, atk.cfg.block_size, atk.cfg.train_tokens)
    curve = [[0, before["score"]]]
    # this run's own peak memory (preparation + fine-tuning), not the process's all-time high
    with PeakMemory() as peak:
        t0 = time.perf_counter()
        model = atk.prepare(model, tok, ctx)
        prepare_s = time.perf_counter() - t0
        hooks = ctx.pop("hooks", [])
        if atk.cfg.score_every > 0:
            from ..train.loop import LambdaHook

            def score(trainer, metrics, k=atk.cfg.score_every):
                if trainer.step % k == 0 and trainer.step < atk.cfg.steps:  # outside the timed step
                    curve.append([trainer.step, task.evaluate(model, tok, atk.cfg.block_size)["score"]])
            hooks = [*hooks, LambdaHook(on_step_end=score)]
        history, trainer = finetune(model, blocks, atk.cfg, hooks=hooks)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    recovered = ctx.pop("recovered_mask", None)
    if recovered is not None:
        ctx["recovered_mask_density"] = sum(int(m.sum()) for m in recovered.values()) / sum(
            m.numel() for m in recovered.values())
    model.eval()
    after = task.evaluate(model, tok, atk.cfg.block_size)
    curve.append([trainer.step, after["score"]])
    cap_after = math.exp(evaluate_loss(model, cap_blocks))
    steps = history[1:] or history  # the first step pays one-off costs
    med = lambda k: statistics.median(h[k] for h in steps)  # noqa: E731
    tokens = trainer.tokens_seen
    return {
        "model": str(model_dir), "before": before, "after": after, "gain": after["score"] - before["score"],
        "capability_ppl_before": cap_before, "capability_ppl_after": cap_after, "capability_data": cap_spec,
        "parameters": n_params, "trainable_parameters": n_train, "tokens": tokens,
        "loss_curve": [h["loss"] for h in history], "score_curve": curve,
        "cost": {
            "saved_activation_bytes_per_step": trainer.saved_activation_bytes,
            **peak.as_dict(),
            "step_time_s": med("step_time"), "forward_time_s": med("forward_time"),
            "backward_time_s": med("backward_time"), "optimizer_time_s": med("optimizer_time"),
            "train_seconds": sum(h["step_time"] for h in history), "prepare_seconds": prepare_s,
            # analytic FLOPs of full training (linear maps + attention), every micro-batch run
            "flops_estimate": analytic_train_flops(model, atk.cfg.batch_size, atk.cfg.block_size)
            * len(history) * atk.cfg.grad_accum,
            # torch's FLOP counter (matmuls; forward + backward of one micro-batch) × micro-batches run
            "flops_counted": (trainer.flops_per_micro_batch * len(history) * atk.cfg.grad_accum
                              if trainer.flops_per_micro_batch is not None else None),
        },
        **ctx,
    }


def _pretraining_domain(model_dir) -> str:
    from ..train.pretrain import run_config

    data = run_config(model_dir).get("data")
    if data:
        return data
    rep = Path(model_dir) / "lock_report.json"
    if rep.exists():
        return _pretraining_domain(read_json(rep)["base_model"])
    return "builtin:code"
