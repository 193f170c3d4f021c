"""Where a model keeps its parts, by module name: knowledge about architectures that attacks and the cost
model share (the DLR-specific adapters live with DLR-Lock, ``weightlock.dlr``)."""
from __future__ import annotations

from torch import nn


def attention_names(model: nn.Module) -> list[str]:
    """The names of the attention projections among ``model``'s linear layers (``q_proj``, ``c_attn``, ...)."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    known = ["q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "c_attn", "query_key_value", "query", "key",
             "value", "dense"]
    picked = [k for k in known if k in names and k != "dense"]
    return picked or [k for k in known if k in names]
