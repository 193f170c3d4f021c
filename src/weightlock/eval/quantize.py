"""Round-to-nearest weight quantization: the fidelity users already accept, to put a lock's beside.

Group-wise asymmetric min–max RTN (each group of ``group_size`` consecutive input weights of a row gets its
own scale and zero point, as in llama.cpp's Q4_1/Q8_1 and the RTN baselines of the GPTQ/AWQ papers), applied
in place to the linear maps of the transformer layers (attention and MLP); embeddings and the LM head stay.
The weights are de-quantized back to their dtype: what is measured is the quantization error, not a kernel.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import WeightlockError


@torch.no_grad()
def rtn(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``weight`` [out, in] quantized to ``bits`` per entry with one (scale, min) per ``group_size`` inputs of a
    row, and de-quantized (same shape and dtype)."""
    if not 2 <= bits <= 16:
        raise WeightlockError(f"bits must be between 2 and 16, got {bits}")
    out_f, in_f = weight.shape
    if group_size < 1 or in_f % group_size:
        raise WeightlockError(f"group size {group_size} must divide the input width {in_f}")
    w = weight.float().reshape(out_f, in_f // group_size, group_size)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    levels = 2 ** bits - 1
    scale = ((hi - lo) / levels).clamp_min(1e-12)
    q = ((w - lo) / scale).round_().clamp_(0, levels)
    return (q * scale + lo).reshape(out_f, in_f).to(weight.dtype)


@torch.no_grad()
def quantize_linear_layers_(model: nn.Module, bits: int, group_size: int) -> int:
    """Quantize (RTN, see :func:`rtn`) every ``nn.Linear`` inside the model's transformer layers in place;
    returns how many weights were quantized."""
    from ..dlr.modeling_weightlock_dlr import adapter_for, find_layers

    count = 0
    for layer in find_layers(model, adapter_for(model)):
        for m in layer.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(rtn(m.weight, bits, group_size))
                count += m.weight.numel()
    return count
