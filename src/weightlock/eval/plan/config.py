"""The planner's model config and skeletons: shipped configs, shape fields, the attacks' scenarios, a
model built on the meta device (and its DLR lock) and what each scenario trains."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...errors import WeightlockError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
LORA_R = 8
SCENARIOS = {
    "full": "full fine-tuning",
    "lora-attn": f"LoRA r={LORA_R} on attention",
    "lora-all": f"LoRA r={LORA_R} on every linear layer",
    "freeze-ffn": "MLPs / DLR-Nets frozen, the rest trained",
    "ckpt-layer": "full fine-tuning, gradient checkpointing per layer",
    "ckpt-dlr": "full fine-tuning, gradient checkpointing per DLR-Net",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")


# ---- the model's config ---------------------------------------------------------------------------

def shipped_configs() -> list[str]:
    """The names of the configs weightlock ships (``weightlock/configs/NAME.json``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(spec: str | Path):
    """A transformers config from a shipped name (``smollm2-135m``), a ``config.json`` path or a model
    directory holding one."""
    from transformers import AutoConfig

    p = Path(spec)
    if p.is_dir():
        p = p / "config.json"
    elif not p.exists() and (CONFIG_DIR / f"{spec}.json").exists():
        p = CONFIG_DIR / f"{spec}.json"
    if not p.exists():
        raise WeightlockError(f"no config at {spec!r}: give a config.json, a model directory or one of "
                              f"{', '.join(shipped_configs())}")
    try:
        d = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WeightlockError(f"{p}: not a readable config.json ({e})") from None
    mt = d.get("model_type")
    try:
        cfg = AutoConfig.for_model(mt, **{k: v for k, v in d.items() if k != "model_type"})
    except (ValueError, KeyError, TypeError) as e:
        raise WeightlockError(f"{p}: model type {mt!r} is not a transformers model type ({e})") from None
    check_family(cfg)
    return cfg


def check_family(cfg) -> None:
    from ...dlr.modeling_weightlock_dlr import ADAPTERS

    mt = cfg.model_type
    if mt not in ADAPTERS:
        fams = ", ".join(sorted({a.family for a in ADAPTERS.values()}))
        raise WeightlockError(f"model type {mt!r} is not supported by DLR-Lock (supported: {fams})")
    missing = [f for f in _SHAPE_FIELDS if getattr(cfg, f, None) is None]
    if missing or ADAPTERS[mt].layers != ("model.layers",):
        raise WeightlockError(f"plan covers decoder families with Llama-style configs (model.layers, "
                              f"{', '.join(_SHAPE_FIELDS)}); {mt!r} lacks {missing or 'that layout'}")


def with_shape(cfg, **shape):
    """A copy of ``cfg`` with other widths / depth (per-layer lists such as ``layer_types`` regenerated)."""
    from transformers import AutoConfig

    d = cfg.to_dict()
    for k in ("layer_types", "architectures", "auto_map", "_name_or_path", "transformers_version", "dtype",
              "torch_dtype"):
        d.pop(k, None)
    d.update(shape)
    d["max_position_embeddings"] = max(d.get("max_position_embeddings") or 0, 64)
    out = AutoConfig.for_model(d.pop("model_type"), **d)
    out._attn_implementation = "sdpa"
    return out


@dataclass
class Shape:
    """The dimensions the cost model reads (``hd``: head dim; ``L``/``r``: DLR depth and rank, 0 unlocked)."""

    d: int
    d_ff: int
    h: int
    kvh: int
    hd: int
    V: int
    layers: int
    L: int = 0
    r: int = 0

    @classmethod
    def of(cls, cfg, L: int = 0, r: int = 0) -> "Shape":
        h = cfg.num_attention_heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
        return cls(cfg.hidden_size, cfg.intermediate_size, h, getattr(cfg, "num_key_value_heads", None) or h,
                   hd, cfg.vocab_size, cfg.num_hidden_layers, L, r)


# ---- skeletons on the meta device and the attacks' trainable sets --------------------------------

def skeleton(cfg, rank: int | None = None, device: str = "meta"):
    """The model of ``cfg`` (on ``device``; meta: no memory, nothing computed) and, with ``rank``, its DLR
    lock with depths matched to the MLPs (``specs_for``, without the sink component; a rank that cannot
    match raises). Returns (model, specs or None)."""
    from transformers import AutoModelForCausalLM

    from ...dlr.config import LockConfig
    from ...dlr.distill import specs_for
    from ...dlr.modeling_weightlock_dlr import apply_dlr

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg)
        specs = None
        if rank is not None:
            # the DLR blocks only: a release's sink component (3d + 2 parameters; it saves about d + 3 values a
            # token, under 1% of a net's d + 2r per block × L blocks) is not in the planner's memory model
            _, specs, _ = specs_for(model, LockConfig(rank=rank, sink=False))
            apply_dlr(model, [s.__dict__ for s in specs])
    model.train()
    return model, specs


def prepare(model: nn.Module, scenario: str) -> nn.Module:
    """Make ``model`` what the attack / counter-measure trains (in place)."""
    from ...dlr.modeling_weightlock_dlr import DLRNet, adapter_for, find_layers, mlp_modules
    from ...models.layout import attention_names
    from ...train.finetune import apply_checkpointing

    if scenario not in SCENARIOS:
        raise WeightlockError(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
    if scenario.startswith("lora"):
        from peft import LoraConfig, inject_adapter_in_model

        targets = attention_names(model) if scenario == "lora-attn" else "all-linear"
        inject_adapter_in_model(LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, target_modules=targets,
                                           lora_dropout=0.0), model)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
    elif scenario == "freeze-ffn":
        adapter = adapter_for(model)
        for layer in find_layers(model, adapter):
            for m in mlp_modules(layer, adapter):
                m.requires_grad_(False)
    elif scenario == "ckpt-layer":
        apply_checkpointing(model, "layer")
    elif scenario == "ckpt-dlr":
        if not any(isinstance(m, DLRNet) for m in model.modules()):
            raise WeightlockError("checkpointing per DLR-Net needs a locked model")
        apply_checkpointing(model, "dlr")
    return model


def scenarios_for(locked: bool) -> list[str]:
    """The scenarios that apply to a locked or an unlocked model (``ckpt-dlr`` needs DLR-Nets)."""
    return [s for s in SCENARIOS if locked or s != "ckpt-dlr"]
