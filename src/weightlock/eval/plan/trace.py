"""Parameters, FLOPs and the op trace of one training step, on the meta device (shapes only, nothing
computed): :func:`state_bytes`, :func:`analytic_flops`, :func:`trace_step`."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

# ---- parameters, FLOPs and the op trace on the meta device ---------------------------------------

def state_bytes(model: nn.Module, dtype: torch.dtype) -> dict:
    """Parameters (all, in ``dtype``), gradients (trainable, in ``dtype``), AdamW state (2 fp32 per trainable)."""
    size = torch.finfo(dtype).bits // 8
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return {"parameters": total, "trainable_parameters": trainable, "param_bytes": total * size,
            "grad_bytes": trainable * size, "optimizer_bytes": trainable * 8}


def _attn_modules(model):
    from ...dlr.modeling_weightlock_dlr import adapter_for, find_layers

    return [layer.self_attn for layer in find_layers(model, adapter_for(model)) if hasattr(layer, "self_attn")]


def analytic_flops(model: nn.Module, b: int, T: int, scenario: str) -> dict:
    """FLOPs of one training step, per matmul: the model runs once on the meta device with hooks that
    read each linear map's shape, whether its weight trains and whether its input needs a gradient."""
    from ...dlr.modeling_weightlock_dlr import DLRNet

    lin = {"forward": 0, "input_grad": 0, "weight_grad": 0, "recompute": 0}
    ckpt = set()
    if scenario == "ckpt-layer":
        from ...dlr.modeling_weightlock_dlr import adapter_for, find_layers

        ckpt = {id(m) for layer in find_layers(model, adapter_for(model)) for m in layer.modules()}
    elif scenario == "ckpt-dlr":
        ckpt = {id(m) for net in model.modules() if isinstance(net, DLRNet) for m in net.modules()}
    handles = []
    attn_bwd = []

    def on_linear(m, args):
        x = args[0]
        f = 2 * x.numel() // x.shape[-1] * m.in_features * m.out_features
        lin["forward"] += f
        if x.requires_grad:
            lin["input_grad"] += f
        if m.weight.requires_grad:
            lin["weight_grad"] += f
        if id(m) in ckpt and (x.requires_grad or m.weight.requires_grad):
            lin["recompute"] += f

    def on_attn(m, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        attn_bwd.append(x.requires_grad or any(p.requires_grad for p in m.parameters()))

    for m in model.modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_pre_hook(on_linear))
    for m in _attn_modules(model):
        handles.append(m.register_forward_pre_hook(on_attn, with_kwargs=True))
    dev = next(model.parameters()).device
    try:
        with _meta_safe():
            model(input_ids=torch.zeros(b, T, dtype=torch.long, device=dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    c = model.config
    h = c.num_attention_heads
    hd = getattr(c, "head_dim", None) or c.hidden_size // h
    attn_fwd = 4 * b * T * T * h * hd
    attn = {"forward": attn_fwd * len(attn_bwd), "backward": 2 * attn_fwd * sum(attn_bwd),
            "recompute": attn_fwd * len(attn_bwd) if scenario == "ckpt-layer" else 0}
    total = sum(lin.values()) + sum(attn.values())
    return {"flops": total, "linear": lin, "attention": attn}


@contextlib.contextmanager
def _attribute_set(owner, name: str, value):
    """Set ``owner.name`` to ``value`` for the ``with`` block and put the original back afterwards (also on
    an error). The attribute must exist: a renamed upstream function fails here, loudly, rather than being
    silently added. Process-wide while it lasts, like any module attribute: the planner sets it only around
    its own meta-device forward passes."""
    if not hasattr(owner, name):
        raise AttributeError(f"{getattr(owner, '__name__', owner)!r} has no attribute {name!r} to set")
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _no_packed_sequences(position_ids):
    """The planner's inputs are never packed sequences (transformers' ``find_packed_sequence_indices``
    returns None for that case)."""
    return None


def _meta_safe():
    """transformers checks training inputs for packed sequences with ``.item()``, impossible on the meta
    device: for the planner's forward passes its check answers "not packed", which the planner's inputs
    never are (one sequence per row, position ids 0..T-1)."""
    from transformers import masking_utils

    return _attribute_set(masking_utils, "find_packed_sequence_indices", _no_packed_sequences)


_VIEW_OPS = {"view", "_unsafe_view", "t", "transpose", "unsqueeze", "squeeze", "expand", "slice", "select",
             "alias", "detach", "permute", "as_strided", "split", "split_with_sizes", "unbind", "_reshape_alias",
             "lift_fresh", "lift_fresh_copy", "reshape", "chunk", "narrow", "diagonal", "unfold"}
_MM_OPS = {"mm", "addmm", "bmm", "baddbmm"}


def op_trace():
    """A dispatch mode that records every aten op: (kind, cost quantity, dims, dtype, signature). Kinds:
    ``mm`` (FLOPs, (m, k, n)), ``sdpa`` / ``sdpa_bwd`` (b·h·Tq·Tk·head_dim), ``elementwise`` (everything
    else that computes: bytes read and written), ``view`` (aliases: no kernel, only the call). The
    signature (the op and its arguments, tensors as meta tensors) is what :class:`Pricer` replays."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Trace(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = func._schema.name.split("::")[-1]
            sig = (func, args, kwargs)
            if name in _MM_OPS:
                a, bm = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
                batch = a.shape[0] if a.dim() == 3 else 1
                m, k, n = a.shape[-2], a.shape[-1], bm.shape[-1]
                self.ops.append(("mm", 2 * batch * m * k * n, (m, k, n), a.dtype, sig))
            elif "scaled_dot_product" in name:
                q = args[1] if name.endswith("backward") else args[0]
                bq, hq, tq, dq = q.shape
                tk = args[2].shape[2] if name.endswith("backward") else args[1].shape[2]
                self.ops.append(("sdpa_bwd" if name.endswith("backward") else "sdpa", bq * hq * tq * tk * dq,
                                 None, q.dtype, sig))
            else:
                rets = func._schema.returns
                if name in _VIEW_OPS or (rets and rets[0].alias_info is not None and not rets[0].alias_info.is_write):
                    self.ops.append(("view", 0, None, None, None))
                    return out
                nbytes = sum(x.numel() * x.element_size() for x in flat([args, out]) if isinstance(x, torch.Tensor))
                self.ops.append(("elementwise", nbytes, None, None, sig))
            return out

    return Trace()


def flat(x):
    if isinstance(x, (list, tuple)):
        for y in x:
            yield from flat(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from flat(y)
    else:
        yield x


def _sdpa_as_cpu_flash():
    """On the meta device torch runs attention as its math path (T² score matrices); make every
    ``scaled_dot_product_attention`` call the CPU flash kernel instead (what training on CPU runs). A
    patch of the function rather than a mode: checkpointing recomputes in the backward pass, where a
    thread-local mode may not be active."""
    def flash(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if enable_gqa and k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        causal = is_causal or (attn_mask is None and q.shape[2] > 1)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)[0]

    return _attribute_set(torch.nn.functional, "scaled_dot_product_attention", flash)


def trace_step(model: nn.Module, b: int, T: int) -> list:
    """Every aten op of one training step (forward, loss, backward) of the meta ``model``."""
    ids = torch.zeros(b, T, dtype=torch.long, device="meta")
    tr = op_trace()
    with _meta_safe(), _sdpa_as_cpu_flash(), tr:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    return tr.ops
