"""``weightlock plan``: what DLR-Lock costs an attacker on a model too large to run here.

From a ``config.json`` alone (no weights) this predicts, for the original model and its DLR lock at rank
R, per fine-tuning step and for every attack / counter-measure of :data:`SCENARIOS`:

* **activation memory** — the bytes autograd saves for the backward pass. A linear model per component
  (embedding; first decoder layer; later decoder layers; MLP or DLR-Net; the rest: final norm, LM head
  and loss), in shape features (``N·d``, ``N·d_ff``, ``N·L·d``, ``N·L·r``, ``N·V``, ``T·head_dim``, ...;
  N tokens, b sequences of T), whose coefficients are *measured*: the probe builds 2-layer models of the
  real family (the config's own code, activation, biases, attention) at tiny widths, counts what autograd
  saves in each component during one training forward (``saved_tensors_hooks``, deduplicated by storage,
  parameters excluded, each storage charged to the first component that saves it) and solves for the
  coefficients (least squares; the fit must be exact). With gradient checkpointing the hooks see what is
  kept between checkpoints (torch's checkpoint saves each unit's input through autograd); the peak adds
  one unit's activations, recomputed inside the backward pass.
* **parameters, gradients, optimizer state** — from a skeleton of the model on the meta device (the
  attack's trainable set, LoRA adapters included): parameters and gradients in the activation dtype,
  AdamW's two fp32 moments per trainable parameter.
* **FLOPs** — per matmul, from the same skeleton run on the meta device (shapes only, nothing computed):
  2·N·in·out forward per linear map, as much again for the input gradient when the input needs one and
  for the weight gradient when the weight trains; attention 4·b·T²·h·head_dim forward and twice that
  backward (as torch's FLOP counter counts it); a checkpointed unit's forward twice.
* **time** — every aten operation of one training step (forward + backward, recomputation included),
  traced at full size on the meta device, priced by replaying it on this machine (:class:`Pricer`): each
  distinct signature (op, operand shapes, strides, dtypes, arguments) runs on fresh real operands laid out
  like the traced ones (transposed weights, expanded tensors), rotated over copies so they come cold from
  memory as in a step; the smaller median of two passes; ops too large to replay run shrunk along a
  dimension their time scales with. Views cost a call; every op also pays a per-op framework cost (autograd
  and module calls) measured by :func:`calibrate` on a stack of tiny blocks. By default priced under the
  process's allocator as it is; ``plan(..., keep_freed=True)`` (``weightlock plan --keep-freed-memory``)
  first makes glibc keep the memory it frees (:func:`keep_freed_memory`, a process-wide ``mallopt``, so
  opt-in), the steady state of a GPU's caching allocator: glibc's default gives memory back and a locked
  model's many activations are then faulted in again every step, an extra cost the ops' replays do not
  separate out.
  Pricing bare calls by a few throughput tables (the first version) missed op-specific kernels (GELU,
  log-softmax), cold operands and the calibration's own noise: it predicted locked steps 33–49% short.

The package, one module per subsystem: :mod:`.config` (configs, shapes, scenarios, meta skeletons),
:mod:`.memory` (the activation probe and its linear model), :mod:`.trace` (parameters, FLOPs, the op
trace), :mod:`.pricer` (calibration and op replays), :mod:`.planner` (:func:`plan`, the orchestration).
Every name is importable from ``weightlock.eval.plan``.
"""
from __future__ import annotations

from .config import (
                     CONFIG_DIR,
                     DTYPES,
                     LORA_R,
                     SCENARIOS,
                     Shape,
                     check_family,
                     load_config,
                     prepare,
                     scenarios_for,
                     shipped_configs,
                     skeleton,
                     with_shape,
)
from .memory import COMPONENTS, MemoryModel, attributed_saved_bytes, features, fit_memory_model, predict_memory
from .planner import full_size_costs, mlp_multiplier, plan
from .pricer import (
                     COLD_BYTES,
                     ELEM_SIZES,
                     REPLAY_BYTES,
                     REPLAY_FLOPS,
                     Pricer,
                     calibrate,
                     keep_freed_memory,
                     materialize,
                     op_seconds,
                     predict_time,
                     pricer_for,
                     probe_model,
                     probe_trace,
                     replay_seconds,
                     shrunk,
                     sig_key,
)
from .trace import analytic_flops, flat, op_trace, state_bytes, trace_step

__all__ = ["CONFIG_DIR", "COLD_BYTES", "COMPONENTS", "DTYPES", "ELEM_SIZES", "LORA_R", "REPLAY_BYTES", "REPLAY_FLOPS",
           "SCENARIOS", "MemoryModel", "Pricer", "Shape", "analytic_flops", "attributed_saved_bytes", "calibrate",
           "check_family", "features", "fit_memory_model", "flat", "full_size_costs", "keep_freed_memory",
           "load_config", "materialize", "mlp_multiplier", "op_seconds", "op_trace", "plan", "predict_memory",
           "predict_time", "prepare", "pricer_for", "probe_model", "probe_trace", "replay_seconds", "scenarios_for",
           "shipped_configs", "shrunk", "sig_key", "skeleton", "state_bytes", "trace_step", "with_shape"]
