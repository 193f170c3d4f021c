"""DLR-Lock's settings (:class:`LockConfig`, what ``weightlock lock`` and the ``dlr`` defense take) and their
validation. Every field carries its help text (``metadata["help"]``); ``weightlock lock``'s options are
generated from them (:mod:`weightlock.cli_options`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import check_types, option
from ..errors import WeightlockError


@dataclass(frozen=True)
class LockConfig:
    """Settings of ``weightlock lock`` (the DLR-Net shape, calibration data and distillation).

    Validated at construction and frozen: derive a changed config with ``dataclasses.replace(cfg, ...)``
    (validated again). Each field's help text (``metadata["help"]``) is what ``weightlock lock --help`` shows."""

    rank: int = option(32, "Rank r of every DLR block.")
    depth: int | None = option(None, "Blocks per DLR-Net (default: match the MLP's parameter count, ±2%).")
    activation: Literal["auto", "gelu", "relu", "silu", "tanh", "gelu_tanh"] = option(
        "auto", "Block activation σ: auto (the MLP's own with --init mlp, else gelu), gelu, relu, silu, tanh or "
        "gelu_tanh.", label="activation")
    block: Literal["plain", "gated"] = option("plain", "Block form: plain U·σ(V·z), or gated U·(σ(G·z) ⊙ V·z) "
                                              "(the SwiGLU/GeGLU MLP's own form, 3·d·r parameters a block).",
                                              label="block form")
    norm: bool = option(False, "Per-block RMSNorm.")
    bias: bool = option(False, "Biases in the DLR blocks.")
    init_scale: float = option(0.0, "Scale of U's random initialization (0: U starts at zero).")
    init: Literal["zero", "mlp"] = option("zero", "zero (U starts at 0) or mlp (block l starts as the l-th slice "
                                          "of the MLP's hidden units, U divided by --readout: the structured "
                                          "start; --block gated for a gated MLP; no sink, the start carries it).",
                                          label="init")
    # s > 1 shrinks the drift of the residual state z by s (a real LLM's MLP output is 7–20× its input in norm,
    # so at s = 1 later blocks see mostly the partial output, not the input)
    readout: float = option(1.0, "Read-out scale s: DLR(u) = s·(z_L − z_0); with --init mlp, 16 reaches ~10× "
                            "lower error (see README).")
    anneal_to: float | None = option(None, "With --init mlp: lower the read-out from --readout to this value, "
                                     "halving it stage by stage (U doubled, so the function is kept up to the "
                                     "state's drift), each stage repaired by --steps distillation steps; the "
                                     "release has the last read-out. Opens the gap between the lock and its "
                                     "read-back.")
    readback_penalty: float = option(0.0, "Weight λ of a term that pushes the read-back away: λ·max(0, τ − "
                                     "read-back loss), τ = --readback-target (0: off).")
    readback_target: float = option(1.0, "τ: the read-back loss (1 = the read-back outputs nothing useful) the "
                                    "penalty pushes towards.")
    sink: bool = option(True, "Give every DLR-Net a gated sink component for massive-activation tokens (the "
                        "attention sink), fitted in closed form.")
    outlier_factor: float = option(10.0, "A token whose MLP output norm is above this × the median is an "
                                   "outlier (the sink component's tokens).")
    layers: str | None = option(None, "Lock only these MLPs: ids and ranges such as 0,3,5-9, or 'auto': the most "
                                "that keep --max-ppl-ratio (default: all); the release records which.")
    max_ppl_ratio: float = option(1.05, "With --layers auto: the held-out perplexity ratio the chosen layers "
                                  "must keep.")
    data: str | None = option(None, "Calibration data (default: the model's training data, else "
                              "builtin:code+prose).")
    calib_tokens: int = option(131_072, "Calibration tokens.")
    block_size: int = option(128, "Tokens per calibration sequence (at most the model's context).")
    steps: int = option(600, "Distillation steps per layer (0 with --init mlp: the structured start as it is).")
    batch_tokens: int = option(1024, "Tokens per distillation step.")
    lr: float = option(1e-2, "Distillation learning rate.")
    holdout: float = option(0.1, "Fraction of the captured tokens held out to measure each layer's error.")
    seed: int = option(0, "Random seed of the initialization and the batches.")
    engine: Literal["per-layer", "stacked"] = option("per-layer", "per-layer (one fit after another, with a "
                                                     "divergence guard) or stacked (every layer's net fitted together "
                                                     "by the engine, weightlock.dlr.engine: hand-written backward, the "
                                                     "layers dealt to --engine-processes processes; needs --mode "
                                                     "parallel, no sink, norm, bias, anneal or read-back penalty).",
                                                     label="engine")
    engine_processes: int = option(0, "Processes the stacked engine deals the layers to (0: one per core).")
    bf16: bool = option(False, "Distillation products in bf16 (the nets' residual stream stays fp32).")
    mode: Literal["parallel", "sequential"] = option("parallel", "parallel (every layer on the original's "
                                                     "activations) or sequential (on the locked ones).",
                                                     label="mode")
    refine_steps: int = option(0, "End-to-end refinement steps after distillation (KL to logits; hidden states "
                               "for encoders).")
    refine_lr: float = option(3e-4, "Refinement learning rate.")
    refine_batch: int = option(8, "Sequences (of block_size tokens) per refinement step.")
    refine_eval_every: int = option(25, "Refinement steps between fidelity measurements (KL, top-1, perplexity "
                                    "ratio) on held-out text.")
    refine_checkpoint_every: int = option(25, "Refinement steps between checkpoints (a killed run resumes from "
                                          "one).")
    target_kl: float | None = option(None, "Stop refining once the held-out KL to the original is at most this.")
    max_rel_error: float | None = option(0.5, "Fail the lock if a layer's held-out relative error is above this "
                                         "or not finite (1 = the net outputs nothing); 'none' accepts any.")
    loss: Literal["energy", "row"] = option("energy", "Distillation loss: energy (‖f−y‖²/‖y‖² over the batch) or "
                                            "row (per token, floored at the median; real LLMs with massive "
                                            "activations).", label="distillation loss")
    grad_clip: float = option(0.0, "Clip the distillation gradient norm (0: off); deep nets on real LLMs diverge "
                              "without.")
    eval_data: str | None = option("builtin:prose,builtin:code", "Comma-separated data specs on whose test split the "
                                   "release's fidelity (perplexity ratio, top-1 agreement, KL) and its read-back's "
                                   "are measured and recorded ('none': skip; causal LMs only).")
    eval_tokens: int = option(4096, "Held-out tokens per --eval-data spec.")
    progress: bool = option(True, "Progress bars and status lines on stderr.")

    def __post_init__(self) -> None:
        self.validate()

    @property
    def uses_sink(self) -> bool:
        """Whether the nets get the sink component: ``sink``, except with ``init="mlp"`` (the structured start
        reproduces the sink token itself)."""
        return self.sink and self.init != "mlp"

    def validate(self) -> None:
        """Check every field (types and ranges); raise :class:`WeightlockError` on the first bad one."""
        check_types(self, "lock config")
        if self.engine == "stacked":
            bad = [what for what, on in (("--mode sequential", self.mode == "sequential"),
                                         ("a sink (add --no-sink)", self.uses_sink),
                                         ("--norm", self.norm), ("--bias", self.bias),
                                         ("--anneal-to", self.anneal_to is not None),
                                         ("--readback-penalty", self.readback_penalty > 0)) if on]
            if bad:
                raise WeightlockError(f"--engine stacked fits plain nets together; it cannot with {', '.join(bad)}")
        if self.engine_processes < 0:
            raise WeightlockError(f"engine_processes must be ≥ 0 (0: one per core), got {self.engine_processes}")
        if self.rank < 1:
            raise WeightlockError(f"rank must be at least 1, got {self.rank}")
        if self.depth is not None and self.depth < 1:
            raise WeightlockError(f"depth must be at least 1, got {self.depth}")
        if not self.readout > 0:
            raise WeightlockError(f"readout must be positive, got {self.readout}")
        if not 0 < self.holdout < 0.5:
            raise WeightlockError("holdout must be in (0, 0.5)")
        least = 0 if self.init == "mlp" else 1
        if self.steps < least or self.batch_tokens < 1 or self.calib_tokens < self.block_size:
            raise WeightlockError("steps (≥ 0 with init mlp), batch_tokens must be ≥ 1 and calib_tokens ≥ block_size")
        if self.refine_batch < 1 or self.refine_eval_every < 1 or self.refine_checkpoint_every < 1:
            raise WeightlockError("refine_batch, refine_eval_every and refine_checkpoint_every must be ≥ 1")
        if self.target_kl is not None and not self.target_kl >= 0:
            raise WeightlockError(f"target_kl must be ≥ 0, got {self.target_kl}")
        if self.block_size < 2 or self.refine_steps < 0 or self.init_scale < 0:
            raise WeightlockError("block_size must be ≥ 2, refine_steps and init_scale ≥ 0")
        if self.anneal_to is not None and not (self.init == "mlp" and 0 < self.anneal_to <= self.readout):
            raise WeightlockError(f"anneal_to needs --init mlp and a value in (0, readout={self.readout:g}], "
                                  f"got {self.anneal_to}")
        if self.readback_penalty < 0 or not self.readback_target > 0:
            raise WeightlockError("readback_penalty must be ≥ 0 and readback_target positive")
        if self.eval_tokens < 2:
            raise WeightlockError(f"eval_tokens must be at least 2, got {self.eval_tokens}")
        if self.grad_clip < 0:
            raise WeightlockError(f"grad_clip must be ≥ 0, got {self.grad_clip}")
        if not self.lr > 0 or not self.refine_lr > 0:
            raise WeightlockError(f"learning rates must be positive, got lr={self.lr}, refine_lr={self.refine_lr}")
        if not self.outlier_factor > 1:
            raise WeightlockError(f"outlier_factor must be above 1, got {self.outlier_factor}")
        if self.layers is not None:
            parse_layers(self.layers, None)  # the syntax; the range is checked against the model
        if not self.max_ppl_ratio >= 1:
            raise WeightlockError(f"max_ppl_ratio must be at least 1, got {self.max_ppl_ratio}")
        if self.max_rel_error is not None and not self.max_rel_error > 0:
            raise WeightlockError(f"max_rel_error must be positive (or None to accept any error), "
                                  f"got {self.max_rel_error}")


def parse_layers(spec: str | None, n: int | None) -> list[int] | None:
    """The layer ids a ``layers`` spec names: None/"all" = every layer (None returned), "auto" = chosen by
    fidelity (returned as None here), else comma-separated ids and inclusive ranges ("0,3,5-9"), each below
    ``n`` (when given). A clear :class:`WeightlockError` on anything else."""
    if spec is None or spec.strip() in ("all", "auto"):
        return None
    ids: list[int] = []
    for part in spec.split(","):
        a, dash, b = part.strip().partition("-")
        try:
            lo, hi = int(a), int(b) if dash else int(a)
        except ValueError:
            raise WeightlockError(f"layers: {part.strip()!r} is not a layer id or a range like 5-9 "
                                  "(expected e.g. '0,3,5-9', 'all' or 'auto')") from None
        if lo < 0 or hi < lo:
            raise WeightlockError(f"layers: bad range {part.strip()!r}")
        ids.extend(range(lo, hi + 1))
    if n is not None and max(ids) >= n:
        raise WeightlockError(f"layers: the model has {n} layers (0–{n - 1}), got {max(ids)}")
    return sorted(set(ids))


__all__ = ["LockConfig", "parse_layers"]
