"""DLR-Net, architecture adapters and model surgery — self-contained (torch + transformers only).

This one file is both part of the weightlock library and the modeling code shipped inside every locked
release (``auto_map`` in ``config.json``), so ``AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)`` works without weightlock installed and the two can never drift apart.

A DLR-Net replaces an MLP whose output is added to the residual stream::

    z_0 = u
    z_{l+1} = z_l + U_l · σ(V_l · n_l(z_l))                    form "plain": V_l: r×d, U_l: d×r, n_l optional RMSNorm
    z_{l+1} = z_l + U_l · (σ(G_l · n_l(z_l)) ⊙ V_l · n_l(z_l))   form "gated" (SwiGLU/GeGLU): G_l: r×d as well
    DLR(u)  = s · (z_L − z_0)  [+ sink(u)]                        s: a fixed read-out scale (default 1)

The residual state z is kept in fp32 when the input is bf16/fp16 (the matmuls stay in the input's dtype):
with a large read-out s every block adds ~1/s of the output, which a 16-bit state would round away.

Laid side by side, the blocks of a net are one wide block of rank r·L (:func:`readback_net`): the dense MLP
an attacker reads off a release. Started from the MLP's own hidden units (weightlock's ``init="mlp"``), a net
at large s *is* that MLP up to the drift of z — faithful, and readable.

Real LLMs have a few "massive activation" tokens (the attention sink at position 0): some MLPs write a
vector of norm ~10⁴ there, always in one direction, against ~30 for ordinary tokens. A deep net never
produces it; the optional ``sink`` component does, at 3d + 3 parameters that reveal nothing of the MLP::

    sink(u) = c · (a·u + a₀) · σ(g·û + g₀)            û = u/‖u‖, c ∈ ℝᵈ, a, g ∈ ℝᵈ
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, fields

import torch
from torch import nn

DLR_CONFIG_KEY = "weightlock_dlr"
BLOCK_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh,
                "gelu_tanh": lambda: nn.GELU(approximate="tanh")}
_INPLACE = {"gelu": torch._C._nn.gelu_, "relu": torch.relu_,
            "silu": lambda h: torch.nn.functional.silu(h, inplace=True), "tanh": torch.tanh_,
            "gelu_tanh": lambda h: torch._C._nn.gelu_(h, approximate="tanh")}
FORMS = ("plain", "gated")
_LOW = (torch.float16, torch.bfloat16)


@dataclass
class DLRSpec:
    """Shape and options of one DLR-Net."""

    width: int
    rank: int
    depth: int
    activation: str = "gelu"
    norm: bool = False  # per-block RMSNorm before the down-projection
    bias: bool = False
    init_scale: float = 0.0  # std of U at init relative to 1/sqrt(r·L); 0 = U starts at zero
    readout: float = 1.0  # DLR(u) = readout · (z_L − z_0): a fixed scale, not a parameter
    sink: bool = False  # an explicit gated component for massive-activation tokens (see the module docstring)
    form: str = "plain"  # "plain": U·σ(V·z); "gated": U·(σ(G·z) ⊙ V·z), the SwiGLU/GeGLU MLP's own form

    def __post_init__(self) -> None:
        if not self.readout > 0:
            raise ValueError(f"readout must be positive, got {self.readout}")
        if self.form not in FORMS:
            raise ValueError(f"unknown block form {self.form!r}; choose from {FORMS}")

    def num_parameters(self) -> int:
        """Parameters of a DLR-Net of this spec (down, up and — gated — gate projections, optional norms
        and biases)."""
        gated = self.form == "gated"
        per_block = (3 if gated else 2) * self.width * self.rank + (self.width if self.norm else 0)
        per_block += ((2 if gated else 1) * self.rank + self.width) if self.bias else 0
        return per_block * self.depth + (sink_parameters(self.width) if self.sink else 0)


def sink_parameters(width: int) -> int:
    """Parameters of a :class:`DLRSink` of this width: value c, amplitude (a, a₀), gate (g, g₀)."""
    return 3 * width + 2


class DLRSink(nn.Module):
    """``c · (a·u + a₀) · σ(g·û + g₀)``: a constant direction whose amplitude is linear in the input, switched
    on only for the inputs the gate recognises by direction (û = u/‖u‖). A fresh sink (c = 0) adds nothing."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.zeros(width))
        self.amp = nn.Linear(width, 1)
        self.gate = nn.Linear(width, 1)
        nn.init.zeros_(self.amp.weight)
        nn.init.ones_(self.amp.bias)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, -30.0)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        uf = u.float()
        unit = uf / uf.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        g = torch.sigmoid(nn.functional.linear(unit, self.gate.weight.float(), self.gate.bias.float()))
        a = nn.functional.linear(uf, self.amp.weight.float(), self.amp.bias.float())
        return ((a * g) * self.value.float()).to(u.dtype)


class DLRBlock(nn.Module):
    """One residual block of a DLR-Net, a rank-``r`` bottleneck: ``z + up(act(down(norm(z))))``, or in the
    gated form ``z + up(act(gate(norm(z))) * down(norm(z)))``. A state ``z`` in a wider dtype than the
    weights (the fp32 state of a 16-bit net) is read in the weights' dtype and the sum stays wide."""

    def __init__(self, spec: DLRSpec) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(spec.width, eps=1e-6) if spec.norm else nn.Identity()
        self.down = nn.Linear(spec.width, spec.rank, bias=spec.bias)
        if spec.form == "gated":
            self.gate = nn.Linear(spec.width, spec.rank, bias=spec.bias)
        self.act = BLOCK_ACTIVATIONS[spec.activation]()
        self.up = nn.Linear(spec.rank, spec.width, bias=spec.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        w = self.up.weight.dtype
        n = self.norm(z if z.dtype == w else z.to(w))
        h = self.act(self.gate(n)) * self.down(n) if hasattr(self, "gate") else self.act(self.down(n))
        return z + self.up(h)


class DLRNet(nn.Module):
    """A deep low-rank residual network: drop-in for an MLP whose output is added to the residual stream.

    Without autograd (inference, ``generate``) it runs :meth:`forward_fast`; set ``fast = False`` on an
    instance (or the class) to force the reference path."""

    fast: bool = True
    # gradient checkpointing inside the net: 0 = off, K = recompute K blocks at a time in the backward pass
    # (``len(blocks)``: the whole net is one checkpoint). Per instance, read by :meth:`forward_reference`.
    checkpoint_blocks: int = 0
    # opt-in (``weightlock.load(..., compile=True)``): on CPU, steps of at most COMPILE_MAX_ROWS tokens
    # (token-by-token decoding) run one torch.compile'd C++ function for the whole stack of blocks
    compile_small: bool = False
    COMPILE_MAX_ROWS = 16
    # on CUDA, inference runs weightlock's fused Triton kernel (weightlock.dlr.triton_dlr) when weightlock and
    # triton are importable and the net and input are supported; a release loaded without weightlock, or
    # ``use_triton = False``, runs the eager fast path. With ``compile_small`` on CUDA, steps of at most
    # COMPILE_MAX_ROWS tokens replay a CUDA graph of that path (one graph per net and input shape).
    use_triton: bool = True
    # on CPU, inference on at most ``weightlock.dlr.cpu_kernel.MAX_ROWS`` tokens (decoding) runs weightlock's
    # fused C kernel (one call per net instead of three PyTorch kernels per block) when weightlock is
    # importable and a C compiler built it; otherwise, or with ``use_cpu_kernel = False``, the eager fast path.
    use_cpu_kernel: bool = True

    def __init__(self, spec: DLRSpec) -> None:
        super().__init__()
        if spec.activation not in BLOCK_ACTIVATIONS:
            raise ValueError(f"unknown activation {spec.activation!r}; choose from {sorted(BLOCK_ACTIVATIONS)}")
        if not 1 <= spec.rank <= spec.width and not (spec.depth == 1 and spec.rank >= 1):
            # one block may be wider than the model: a dense MLP (a net's read-back, :func:`readback_net`)
            raise ValueError(f"rank {spec.rank} must be between 1 and the width {spec.width}")
        if spec.depth < 1:
            raise ValueError(f"depth must be at least 1, got {spec.depth}")
        if spec.form not in FORMS:
            raise ValueError(f"unknown block form {spec.form!r}; choose from {FORMS}")
        self.spec = spec
        self.blocks = nn.ModuleList(DLRBlock(spec) for _ in range(spec.depth))
        if spec.sink:
            self.sink = DLRSink(spec.width)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random init: down-projections ~ N(0, 1/width), up-projections ~ N(0, (init_scale)²/(rank·depth))
        (zero with the default ``init_scale=0``: a fresh net adds nothing), biases zero."""
        s = self.spec
        for b in self.blocks:
            for m in (b.down, b.gate) if s.form == "gated" else (b.down,):
                nn.init.normal_(m.weight, std=1.0 / math.sqrt(s.width))
                if s.bias:
                    nn.init.zeros_(m.bias)
            nn.init.normal_(b.up.weight, std=s.init_scale / math.sqrt(s.rank * s.depth))
            if s.bias:
                nn.init.zeros_(b.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inference_path(x) == "kernel":  # the C kernel adds the sink itself (fused into its last pass)
            return _cpu_kernel_module().forward(self, x, sink=True)
        out = self._forward_blocks(x)
        return out + self.sink(x) if self.spec.sink else out

    def _forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        path = self.inference_path(x)
        if path == "compiled":
            try:
                return self.forward_compiled(x)
            except Exception as e:  # no C++ compiler, unsupported platform: the eager fast path is exact too
                _disable_compile(e)
        elif path == "graph":
            try:
                return self.forward_graphed(x)
            except Exception as e:  # capture refused (e.g. another capture running): the eager paths are exact
                _disable_graphs(e)
                path = self.inference_path(x)
        if path == "triton":
            return _triton_module().forward(self, x)
        if path == "kernel":
            return _cpu_kernel_module().forward(self, x)
        return self.forward_reference(x) if path == "reference" else self.forward_fast(x)

    def inference_path(self, x: torch.Tensor) -> str:
        """The path :meth:`forward` takes for ``x``: ``"reference"`` (autograd, hooks, wrapped blocks or
        ``fast = False``); on CPU ``"compiled"`` (``compile_small``, ≤ COMPILE_MAX_ROWS tokens), ``"kernel"``
        (weightlock's fused C kernel: a compiler built it; any token count on the packed AVX-512 kernels, else
        ≤ its MAX_ROWS tokens) or ``"fast"``;
        on CUDA ``"graph"`` (``compile_small``, ≤ COMPILE_MAX_ROWS tokens: a CUDA graph replay of the next
        path), ``"triton"`` (the fused kernel: weightlock and triton importable, net and input supported) or
        ``"fast"``. CPU tensors never take a CUDA path."""
        if not (self.fast and self._fast_ok(x)):
            return "reference"
        small = x.numel() <= self.COMPILE_MAX_ROWS * self.spec.width
        if x.device.type == "cpu":
            if self.compile_small and small and self.spec.form == "plain" and _compiled_stack() is not None:
                return "compiled"
            return "kernel" if self._cpu_kernel_ok(x) else "fast"
        if x.device.type != "cuda":
            return "fast"
        if (self.compile_small and small and self.spec.form == "plain" and not _GRAPHS_OFF
                and not torch.cuda.is_current_stream_capturing()):
            return "graph"
        return "triton" if self._triton_ok(x) else "fast"

    def _cpu_kernel_ok(self, x: torch.Tensor) -> bool:
        if not self.use_cpu_kernel:
            return False
        mod = _cpu_kernel_module()
        return mod is not None and mod.supported(self, x)

    def _triton_ok(self, x: torch.Tensor) -> bool:
        if not (self.use_triton and x.device.type == "cuda"):
            return False
        mod = _triton_module()
        return mod is not None and mod.supported(self, x)

    def forward_graphed(self, x: torch.Tensor) -> torch.Tensor:
        """The CUDA inference path (fused kernel or eager fast path) as a replay of a CUDA graph captured
        once per input shape: a decode step costs one graph launch instead of a launch per kernel. The
        graph reads the weights where they were at capture; it is dropped when they move (``to``,
        ``load_state_dict``, a replaced first weight) and the kernel's stacked copy is refreshed in place."""
        graphs = self.__dict__.get("_cuda_graphs")
        w0 = self.blocks[0].down.weight
        if graphs is None or graphs.get("weight") is not w0:
            graphs = self.__dict__["_cuda_graphs"] = {"weight": w0}
        key = (tuple(x.shape), x.dtype, x.device)
        entry = graphs.get(key)
        if entry is None:
            triton = self._triton_ok(x)
            run = (lambda t: _triton_module().forward(self, t)) if triton else self.forward_fast
            static_x = x.clone()
            stream = torch.cuda.Stream(device=x.device)
            stream.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(stream):  # warm-up outside the capture: kernel compilation, cuBLAS workspaces
                for _ in range(2):
                    run(static_x)
            torch.cuda.current_stream(x.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = run(static_x)
            entry = graphs[key] = (graph, static_x, static_out, triton)
        graph, static_x, static_out, triton = entry
        if triton:
            _triton_module().stacked(self)  # copies parameters changed in place into the captured buffers
        static_x.copy_(x)
        graph.replay()
        return static_out.clone()

    def _read_out(self, out: torch.Tensor) -> torch.Tensor:
        """Apply the read-out scale (in place when autograd does not need ``out``)."""
        r = self.spec.readout
        if r == 1.0:
            return out
        return out * r if out.requires_grad else out.mul_(r)

    def forward_compiled(self, x: torch.Tensor) -> torch.Tensor:
        """The fast path's maths as one compiled function (weights are its inputs, so every net of the
        same shape shares one compilation; a new number of tokens compiles once more)."""
        w = self._weights()
        args = self.__dict__.get("_compile_args")
        if args is None or args[1][0] is not w[0][1]:
            args = ([None if n is None else n.weight for n, *_ in w], *([t[i] for t in w] for i in range(1, 5)))
            self.__dict__["_compile_args"] = args
        out = _compiled_stack()(x.reshape(-1, self.spec.width), *args, self.spec.activation).view(x.shape)
        return self._read_out(out)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The plain PyTorch path: one module call per block. Training always runs this path, so the
        backward pass stores every block's activations (the lock's memory cost). A 16-bit input runs
        with an fp32 state (see :class:`DLRBlock`)."""
        k = self.checkpoint_blocks
        z0 = x.float() if x.dtype in _LOW else x
        if k and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            z = z0
            for i in range(0, len(self.blocks), k):
                z = checkpoint(self._run_blocks, z, i, i + k, use_reentrant=False)
        else:
            z = self._run_blocks(z0, 0, len(self.blocks))
        return self._read_out(z - z0).to(x.dtype)

    def _run_blocks(self, z: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for block in self.blocks[start:stop]:
            z = block(z)
        return z

    def _fast_ok(self, x: torch.Tensor) -> bool:
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False  # autograd needs the reference path
        if self._forward_hooks or self._forward_pre_hooks:
            return False
        b = self.blocks[0]  # blocks wrapped by e.g. peft LoRA or carrying hooks keep the reference path
        maps = (b.down, b.up, b.gate) if self.spec.form == "gated" else (b.down, b.up)
        return (all(type(m) is nn.Linear and not m._forward_hooks for m in maps) and not b._forward_hooks
                and not b._forward_pre_hooks)

    def _weights(self) -> list[tuple]:
        """(norm, V, b, U, c, G, g) per block (G, g: the gated form's gate weight and bias, else None),
        collected once: reading them through the module tree costs more
        than a decode step's matmuls. Dropped whenever parameters may have been swapped (``to``, ``cuda``,
        ``half``, ``load_state_dict``) and checked against the first block's current weight."""
        cache = self.__dict__.get("_fast_weights")
        if cache is None or cache[0][1] is not self.blocks[0].down.weight:
            gated = self.spec.form == "gated"
            cache = [(b.norm if self.spec.norm else None, b.down.weight, b.down.bias, b.up.weight, b.up.bias,
                      b.gate.weight if gated else None, b.gate.bias if gated else None) for b in self.blocks]
            self.__dict__["_fast_weights"] = cache
        return cache

    _CACHES = ("_fast_weights", "_compile_args", "_triton_stack", "_cuda_graphs", "_cpu_kernel_args",
               "_cpu_kernel_packed")

    def _apply(self, fn, *args, **kwargs):
        for k in self._CACHES:
            self.__dict__.pop(k, None)
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        # copy.deepcopy and pickle leave the caches out: they are rebuilt on use, and the CPU kernel's pointer
        # tables (ctypes) cannot be copied
        return {k: v for k, v in super().__getstate__().items() if k not in self._CACHES}

    def _load_from_state_dict(self, *args, **kwargs):
        for k in self._CACHES:
            self.__dict__.pop(k, None)
        return super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """Inference path with the same maths as :meth:`forward_reference`: the residual state lives in
        one preallocated buffer that every block updates in place (``z += σ(n(z)·Vᵀ + b)·Uᵀ + c`` as an
        ``addmm`` into ``z``) and the activation is applied in place, so a block costs three kernels and
        no allocation instead of five module calls and four temporaries.

        For 16-bit inputs the residual state is kept in fp32 (matmuls stay 16-bit): the output z_L − z_0
        is a difference of two large vectors, which in bf16 loses 1–3% to cancellation on the reference
        path; here it stays within bf16 matmul rounding of the exact value."""
        width = self.spec.width
        shape = x.shape
        x2 = x.reshape(-1, width)
        low = x.dtype in (torch.float16, torch.bfloat16)
        z = x2.float() if low else x2.clone()
        zl = x2.clone() if low else z  # the state as the matmuls see it
        upd = torch.empty_like(x2) if low else None
        h = x2.new_empty(x2.shape[0], self.spec.rank)
        hg = x2.new_empty(x2.shape[0], self.spec.rank) if self.spec.form == "gated" else None
        act = _INPLACE[self.spec.activation]
        mm, addmm = torch.mm, torch.addmm
        kernel = _cpu_kernel_module() if x.dtype == torch.bfloat16 and x.device.type == "cpu" else None
        step = kernel.add_round if kernel is not None and kernel.available() else None  # one pass, not three
        for norm, v, b, u, c, g, gb in self._weights():
            n = zl if norm is None else norm(zl)
            for w, bias, out in ((v, b, h), (g, gb, hg)) if g is not None else ((v, b, h),):
                if bias is None:
                    mm(n, w.t(), out=out)
                else:
                    addmm(bias, n, w.t(), out=out)
            if g is None:
                act(h)
            else:
                h.mul_(act(hg))
            if low:
                mm(h, u.t(), out=upd)
                if step is not None and c is None:
                    step(z, upd, zl)
                    continue
                z.add_(upd)
                if c is not None:
                    z.add_(c)
                zl.copy_(z)
            else:
                z.addmm_(h, u.t())
                if c is not None:
                    z.add_(c)
        z = self._read_out(z.sub_(x2))
        return (z.to(x.dtype) if low else z).view(shape)

    def extra_repr(self) -> str:
        s = self.spec
        out = f"width={s.width}, rank={s.rank}, depth={s.depth}, activation={s.activation}, norm={s.norm}"
        out += f", form={s.form}" if s.form != "plain" else ""
        return out + (f", readout={s.readout:g}" if s.readout != 1.0 else "")


def readback_weights(net: DLRNet) -> dict:
    """The weights of ``net``'s read-back (:func:`readback_net`) as tensors built from its parameters (autograd
    follows them: a loss on the read-back trains the net): ``down``, ``gate`` (gated form) and ``up`` with
    their biases (None without), per-block norm gains folded into the rows of ``down`` and ``gate``."""
    s, bl = net.spec, net.blocks
    gain = (lambda b: b.norm.weight) if s.norm else (lambda b: 1.0)  # V·n(z) = (V·diag(g))·(z/rms(z))
    out = {}
    for name in ("down", "gate") if s.form == "gated" else ("down",):
        out[name] = torch.cat([getattr(b, name).weight * gain(b) for b in bl])
        out[name + "_b"] = torch.cat([getattr(b, name).bias for b in bl]) if s.bias else None
    out["up"] = s.readout * torch.cat([b.up.weight for b in bl], 1)
    out["up_b"] = s.readout * sum(b.up.bias for b in bl) if s.bias else None
    return out


def readback_forward(net: DLRNet, x: torch.Tensor, weights: dict | None = None) -> torch.Tensor:
    """``readback_net(net)(x)`` computed from ``net``'s parameters directly (differentiable, no copy)."""
    s, f = net.spec, nn.functional
    w = weights or readback_weights(net)
    n = f.rms_norm(x, (x.shape[-1],), None, 1e-6) if s.norm else x
    act = BLOCK_ACTIVATIONS[s.activation]()
    h = f.linear(n, w["down"], w["down_b"])
    h = act(f.linear(n, w["gate"], w["gate_b"])) * h if s.form == "gated" else act(h)
    out = f.linear(h, w["up"], w["up_b"])
    return out + net.sink(x) if s.sink else out


@torch.no_grad()
def readback_net(net: DLRNet) -> DLRNet:
    """The dense MLP an attacker reads off ``net`` by laying its blocks side by side: one block of rank r·L
    (the stacked V_l, G_l and s·U_l, per-block norm gains folded into V_l and G_l, biases summed), read-out
    1, the same sink. It equals ``net`` exactly when the residual state does not drift (s → ∞); for a net
    started from an MLP's hidden units (``init="mlp"``) and not trained, it *is* that MLP."""
    s = net.spec
    spec = DLRSpec(s.width, s.rank * s.depth, 1, s.activation, s.norm, s.bias, 0.0, 1.0, s.sink, s.form)
    w = net.blocks[0].up.weight
    out = DLRNet(spec).to(device=w.device, dtype=w.dtype)
    wide = out.blocks[0]
    for name, t in readback_weights(net).items():
        if t is not None:
            getattr(wide, name.removesuffix("_b")).get_parameter("bias" if name.endswith("_b") else "weight").copy_(t)
    if s.norm:
        wide.norm.weight.fill_(1.0)
    if s.sink:
        out.sink.load_state_dict(net.sink.state_dict())
    return out


def _stack(x, norms, vs, bs, us, cs, activation: str):
    """z ← z + U·σ(V·n(z)) over all blocks, the state in fp32, matmuls in the input dtype; returns z_L − z_0."""
    act = {"gelu": nn.functional.gelu, "relu": torch.relu, "silu": nn.functional.silu, "tanh": torch.tanh,
           "gelu_tanh": lambda h: nn.functional.gelu(h, approximate="tanh")}[activation]
    z = x.float()
    for n, v, b, u, c in zip(norms, vs, bs, us, cs):
        zl = z.to(x.dtype)
        if n is not None:
            zl = nn.functional.rms_norm(zl, (zl.shape[-1],), n, 1e-6)
        z = z + nn.functional.linear(act(nn.functional.linear(zl, v, b)), u, c).float()
    return (z - x.float()).to(x.dtype)


_COMPILED: list = []  # [compiled function] once built, [None] once disabled


def _compiled_stack():
    if not _COMPILED:
        _COMPILED.append(torch.compile(_stack, dynamic=False, options={"cpp_wrapper": True}))
    return _COMPILED[0]


def _disable_compile(err: Exception) -> None:
    import warnings

    warnings.warn(f"DLR-Net compiled path unavailable ({type(err).__name__}: {err}); using the eager fast path",
                  stacklevel=2)
    _COMPILED[:] = [None]


_TRITON: list = []  # [weightlock.dlr.triton_dlr, or None when weightlock or triton cannot be imported]
_GRAPHS_OFF: list = []  # [the error] once CUDA-graph capture failed


def _optional_module(cache: list, name: str):
    """weightlock's kernel module ``name``, imported on first use (``cache`` keeps it, or None when it cannot be
    imported). By name, not by an import statement: this file is shipped in releases that must load without
    weightlock (and without triton), which then use the eager fast path."""
    if not cache:
        import importlib

        try:
            cache.append(importlib.import_module(name))
        except ImportError:
            cache.append(None)
    return cache[0]


def _triton_module():
    """weightlock's fused CUDA kernel module (:func:`_optional_module`)."""
    return _optional_module(_TRITON, "weightlock.dlr.triton_dlr")


_CPU_KERNEL: list = []  # [weightlock.dlr.cpu_kernel, or None when weightlock cannot be imported]


def _cpu_kernel_module():
    """weightlock's fused CPU kernel module (:func:`_optional_module`)."""
    return _optional_module(_CPU_KERNEL, "weightlock.dlr.cpu_kernel")


def _disable_graphs(err: Exception) -> None:
    import warnings

    warnings.warn(f"DLR-Net CUDA-graph decoding unavailable ({type(err).__name__}: {err}); running eagerly",
                  stacklevel=2)
    _GRAPHS_OFF[:] = [err]


# ---- architecture adapters ----------------------------------------------------------------------

class UnsupportedArchitecture(ValueError):
    """A model (or a release's recorded adapter) that DLR-Lock cannot wire: unknown family, unexpected config."""


@dataclass
class ArchAdapter:
    """Where a model family keeps its feed-forward blocks and how to swap them for DLR-Nets.

    ``layers``: candidate dotted paths (from the loaded model) to the list of transformer layers.
    ``mlp``: path inside a layer of the module whose *input* is the feed-forward input and which is
    replaced by the DLR-Net. ``mlp_out``: path of the module whose *output* is the feed-forward output
    (the same module for most families). ``identity``: modules replaced by ``nn.Identity`` once the
    DLR-Net computes the whole feed-forward (BERT's ``output.dense``; OPT's activation and ``fc2``, which
    sit directly on the decoder layer). Replacing the *first* map of an MLP and turning the rest into
    identities keeps whatever the family's own code does around them (Bloom's MLP adds the residual
    and applies dropout inside its forward). ``requires``: (config attribute, value) pairs the wiring
    depends on (a config that differs is refused instead of computing something else).

    Every field is plain data: a release records its adapter in ``config.json``, so a family registered
    at lock time loads without being registered again (and without weightlock, via ``trust_remote_code``).
    """

    family: str
    model_types: tuple[str, ...]
    layers: tuple[str, ...]
    mlp: str = "mlp"
    mlp_out: str | None = None
    identity: tuple[str, ...] = ()
    gated: bool = True
    requires: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:  # JSON gives lists; keep the tuples the defaults have
        for f in ("model_types", "layers", "identity"):
            setattr(self, f, tuple(getattr(self, f)))
        self.requires = tuple(tuple(r) for r in self.requires)

    def out_path(self) -> str:
        """Path of the module whose output is the feed-forward output (``mlp_out``, or ``mlp``)."""
        return self.mlp_out or self.mlp

    def to_dict(self) -> dict:
        """The adapter as plain data (what a release records in ``config.json``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "ArchAdapter":
        """The adapter a release recorded; fields this code does not know are an :class:`UnsupportedArchitecture`."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise UnsupportedArchitecture(f"the release's adapter has fields {unknown} this modeling code does not "
                                          "know (written by a newer weightlock)")
        return cls(**d)

    def check(self, config) -> None:
        """Raise :class:`UnsupportedArchitecture` if ``config`` differs from what the wiring ``requires``."""
        for attr, value in self.requires:
            if getattr(config, attr, value) != value:
                raise UnsupportedArchitecture(f"{self.family}: DLR-Lock needs {attr}={value!r} in the config, "
                                              f"got {getattr(config, attr)!r}")


ADAPTERS: dict[str, ArchAdapter] = {}


def register_adapter(adapter: ArchAdapter) -> ArchAdapter:
    """Teach weightlock a new family, e.g.
    ``register_adapter(ArchAdapter("olmo", ("olmo",), layers=("model.layers",)))``."""
    for mt in adapter.model_types:
        ADAPTERS[mt] = adapter
    return adapter


_DECODER = ("model.layers",)
for _fam, _types in [("llama", ("llama",)), ("mistral", ("mistral",)), ("qwen2", ("qwen2",)),
                     ("qwen3", ("qwen3",)), ("gemma", ("gemma", "gemma2")), ("phi3", ("phi3",)),
                     ("stablelm", ("stablelm",)), ("olmo", ("olmo",)), ("olmo2", ("olmo2",)),
                     ("gemma3", ("gemma3_text",))]:
    register_adapter(ArchAdapter(_fam, _types, layers=_DECODER))
register_adapter(ArchAdapter("gpt2", ("gpt2",), layers=("transformer.h", "h"), gated=False))
register_adapter(ArchAdapter("gpt_neox", ("gpt_neox",), layers=("gpt_neox.layers", "layers"), gated=False))
register_adapter(ArchAdapter("bert", ("bert",), layers=("bert.encoder.layer", "encoder.layer"),
                             mlp="intermediate", mlp_out="output.dense", identity=("output.dense",),
                             gated=False))
register_adapter(ArchAdapter("phi", ("phi",), layers=_DECODER, gated=False))
register_adapter(ArchAdapter("falcon", ("falcon",), layers=("transformer.h", "h"), gated=False))
# GPT-J's MLP ends in its own dropout: replace fc_in and keep the module, so the dropout stays
register_adapter(ArchAdapter("gptj", ("gptj",), layers=("transformer.h", "h"), mlp="mlp.fc_in",
                             mlp_out="mlp.fc_out", identity=("mlp.act", "mlp.fc_out"), gated=False))
# OPT: fc1 → activation → fc2 directly on the decoder layer (layer norm before, dropout + residual after)
register_adapter(ArchAdapter("opt", ("opt",), layers=("model.decoder.layers", "decoder.layers"), mlp="fc1",
                             mlp_out="fc2", identity=("activation_fn", "fc2"), gated=False))
# Bloom: BloomMLP.forward(x, residual) adds the residual (with dropout) itself; its tensor-parallel
# "slow but exact" path reads dense_4h_to_h's weight, so that mode is refused
register_adapter(ArchAdapter("bloom", ("bloom",), layers=("transformer.h", "h"), mlp="mlp.dense_h_to_4h",
                             mlp_out="mlp.dense_4h_to_h", identity=("mlp.gelu_impl", "mlp.dense_4h_to_h"),
                             gated=False, requires=(("slow_but_exact", False),)))


def adapter_for(model: nn.Module) -> ArchAdapter:
    """The registered adapter of ``model``'s ``config.model_type``; :class:`UnsupportedArchitecture` if none."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in ADAPTERS:
        fams = ", ".join(sorted({a.family for a in ADAPTERS.values()}))
        raise UnsupportedArchitecture(
            f"model type {mt!r} is not supported by DLR-Lock (supported: {fams}). Register it with "
            "weightlock.dlr.register_adapter(ArchAdapter(family, (model_type,), layers=('model.layers',), "
            "mlp='mlp'))."
        )
    return ADAPTERS[mt]


def get_path(root: nn.Module, path: str):
    """The attribute at the dotted ``path`` below ``root`` (e.g. ``model.layers``)."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def set_path(root: nn.Module, path: str, value: nn.Module) -> None:
    """Replace the module at the dotted ``path`` below ``root`` with ``value``."""
    parent, _, name = path.rpartition(".")
    setattr(get_path(root, parent) if parent else root, name, value)


def find_layers(model: nn.Module, adapter: ArchAdapter) -> list[nn.Module]:
    """The transformer layers of ``model``: the first of the adapter's ``layers`` paths that exists."""
    for path in adapter.layers:
        try:
            layers = get_path(model, path)
        except AttributeError:
            continue
        return list(layers)
    raise UnsupportedArchitecture(f"{adapter.family}: none of {adapter.layers} found on {type(model).__name__}")


def mlp_modules(layer: nn.Module, adapter: ArchAdapter) -> list[nn.Module]:
    """The modules that make up one feed-forward block (their parameters are what a DLR-Net replaces)."""
    mods = [get_path(layer, adapter.mlp)]
    if adapter.mlp_out and adapter.mlp_out not in (adapter.mlp,):
        mods.append(get_path(layer, adapter.mlp_out))
    return mods


def mlp_num_parameters(layer: nn.Module, adapter: ArchAdapter) -> int:
    """Parameters of ``layer``'s feed-forward block (what a DLR-Net of equal size must match)."""
    return sum(p.numel() for m in mlp_modules(layer, adapter) for p in m.parameters())


def replace_mlp(layer: nn.Module, adapter: ArchAdapter, net: DLRNet) -> None:
    """Put ``net`` in place of ``layer``'s feed-forward block (the adapter's ``identity`` modules become
    ``nn.Identity``)."""
    for path in adapter.identity:
        set_path(layer, path, nn.Identity())
    set_path(layer, adapter.mlp, net)


def apply_dlr(model: nn.Module, specs: list[dict], adapter: ArchAdapter | None = None) -> nn.Module:
    """Swap the feed-forward blocks of ``model`` for (freshly initialised) DLR-Nets of the given specs, one per
    layer; a ``None`` spec leaves that layer's MLP as it is (a partial lock). ``adapter``: the one a release
    recorded; default: the one registered for the model type."""
    adapter = adapter or adapter_for(model)
    adapter.check(model.config)
    layers = find_layers(model, adapter)
    if len(specs) != len(layers):
        raise ValueError(f"{len(specs)} DLR specs for {len(layers)} layers")
    ref = next(model.parameters())
    for layer, spec in zip(layers, specs):
        if spec is not None:
            replace_mlp(layer, adapter, DLRNet(DLRSpec(**spec)).to(device=ref.device, dtype=ref.dtype))
    return model


# ---- loading a locked release with plain transformers (trust_remote_code) ------------------------

@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters registered inside the block live on the meta device: no memory and no random
    initialisation (``reset_parameters`` runs on meta tensors); buffers such as rotary frequencies stay
    real. The skeleton is then filled with ``load_state_dict(..., assign=True)`` — as transformers'
    quantizers and accelerate's ``init_empty_weights`` build models."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_locked_model(config, dtype=None, empty: bool = False):
    """Instantiate the base architecture from ``config`` and swap in DLR-Nets. ``empty=True`` builds the
    skeleton with every parameter on the meta device (nothing allocated or initialised), for
    :func:`load_locked_state` to fill; otherwise the weights are freshly initialised."""
    import transformers

    info = getattr(config, DLR_CONFIG_KEY, None)
    if not info:
        raise ValueError(f"config has no {DLR_CONFIG_KEY!r} section: not a DLR-locked checkpoint")
    cls = getattr(transformers, info["base_class"])
    # the adapter the release was made with (releases before it was recorded: the registered one)
    adapter = ArchAdapter.from_dict(info["adapter"]) if info.get("adapter") else None
    with _parameters_on_meta() if empty else contextlib.nullcontext():
        model = cls(config)
        apply_dlr(model, info["layers"], adapter)
    if dtype is not None:
        model = model.to(dtype)
    return model


def load_locked_state(model: nn.Module, directory: str) -> nn.Module:
    """Load the safetensors weights in ``directory`` (sharded or not) into the locked ``model`` strictly (tied
    weights may be absent and are re-tied); returns ``model``."""
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(json.load(open(index))["weight_map"].values()))
    state = {}
    for f in files:
        state.update(load_file(os.path.join(directory, f)))
    # assign: a meta skeleton (build_locked_model(empty=True)) takes the loaded tensors themselves
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {k for k in missing if _is_tied(model, k)}
    if unexpected or set(missing) - tied:
        raise ValueError(f"{directory}: weights do not match the locked architecture "
                         f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"{directory}: weights missing from the checkpoint: {left[:5]}")
    return model


def _is_tied(model: nn.Module, key: str) -> bool:
    return key.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)


class DLRLockedModel:
    """Entry point named in a locked release's ``auto_map``: returns the base family's own model class
    (e.g. ``LlamaForCausalLM``) with DLR-Nets in place of its MLPs, so ``generate`` and peft work as usual."""

    @classmethod
    def register_for_auto_class(cls, auto_class=None) -> None:  # called by transformers' Auto classes
        return None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        """The locked model of a release directory: the base family's class with DLR-Nets, weights loaded."""
        import transformers

        path = str(pretrained_model_name_or_path)
        if config is None:
            config = transformers.AutoConfig.from_pretrained(path)
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        dtype = dtype if isinstance(dtype, torch.dtype) else None
        model = build_locked_model(config, empty=True)
        load_locked_state(model, path)
        if dtype is not None:
            model = model.to(dtype)
        model.eval()
        if kwargs.get("device_map") in ("cuda", "cpu"):
            model = model.to(kwargs["device_map"])
        return model
