"""Timings: the cold demo, `release check` on a real-sized release, the distillation engine, GPU inference.

    python bench/timing.py demo [options]            # was bench/demo_timing.py
    python bench/timing.py release-check [options]   # was bench/release_check_scan.py
    python bench/timing.py engine [options]          # was bench/dlr_engine.py
    python bench/timing.py gpu [options]             # was bench/gpu.py

(`python bench/timing.py COMMAND --help`: a command's options; the ``*_DOC`` texts below describe each.)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from weightlock.dlr.distill import fit_module, holdout_split
from weightlock.dlr.engine import fit_stacked
from weightlock.dlr.modeling_weightlock_dlr import DLRNet, DLRSpec
from weightlock.experiments.harness import run_command, save

# ------------------------------ demo (was bench/demo_timing.py) -----------------------------------

DEMO_TIMING_DOC = """\
Benchmark: wall time of a first (cold) `weightlock demo` run, full or `--quick`.

    python bench/timing.py demo --quick      # target ≤ 3 minutes on 2 CPU cores
    python bench/timing.py demo              # target ≤ 20 minutes on 2 CPU cores

Runs the demo as a user would (the CLI, in a subprocess) into a fresh directory, so no cached stage is
reused, and writes bench/results/demo_timing_{quick,full}.json: wall seconds, the demo's own per-stage
seconds, peak resident memory, the load averages around the run, the verdicts, and whether the budget
was met. Keep the machine otherwise idle while it runs.
"""


def demo_timing_main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--keep", default=None, help="copy the demo's summary.json and report here")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="weightlock-demo-")) / "demo"
    cmd = [sys.executable, "-m", "weightlock.cli", "demo", "--out", str(out)] + (["--quick"] if args.quick else [])
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"demo failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    budget = 180 if args.quick else 1200
    res = {"command": " ".join(["python bench/timing.py demo", *sys.argv[1:]]), "preset": summary["preset"],
           "wall_seconds": wall,
           # 1/5/15-minute load averages before and after: a run beside other work is an upper bound
           "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
           "budget_seconds": budget, "within_budget": wall <= budget,
           "demo_seconds": summary["seconds"],
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
           "report_files": sorted(p.name for p in (out / "report").iterdir()), "verdicts": summary["verdicts"]}
    if args.keep:
        keep = Path(args.keep)
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "summary.json", keep / "summary.json")
        shutil.copytree(out / "report", keep / "report", dirs_exist_ok=True)
    shutil.rmtree(out.parent, ignore_errors=True)
    print(json.dumps({k: res[k] for k in ("wall_seconds", "within_budget")}))
    save(f"demo_timing_{'quick' if args.quick else 'full'}", res)


# ------------------------------ release-check (was bench/release_check_scan.py) -------------------

RELEASE_CHECK_SCAN_DOC = """\
Benchmark: how long `weightlock release check` takes on a SmolLM2-sized PMP release, and that it grows linearly.

    OMP_NUM_THREADS=1 python bench/timing.py release-check [--model runs/smollm2] [--work DIR]

Builds a PMP-style release from the converted SmolLM2-135M (``weightlock convert smollm2 --out runs/smollm2``;
135M parameters, 538 MB of float32 weights): its weights, config and tokenizer, a private mask (a random
ρ = 0.3 over every weight matrix, as the ``linear`` pool covers), its salt and a secret seed, and a manifest with
the mask commitment, as ``pretrain --method pmp`` writes them. Without ``--model`` (or when it is missing) a
randomly initialised model of SmolLM2-135M's shape stands in. Times in this process (after a warm-up check of an
empty directory, so imports are not counted; the first check of the release also builds its config's model on
the meta device, once per process) `release check` without and with ``--private``: on the clean release, and on
the release with a planted Adam state (two tensors per weight: 3× the bytes to scan); `release prepare` (copy,
model card, manifest and a check of the folder with ``--private``); and the whole CLI command once, as a user
runs it. Writes bench/results/release_check_scan.json.
"""


SMOLLM2 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
           "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
           "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": True, "dtype": "float32", "bos_token_id": 1, "eos_token_id": 2}


def build_release(model: Path | None, work: Path) -> tuple[Path, Path]:
    """A PMP-style release (weights, config, tokenizer, manifest with the commitment) and its private directory."""
    from safetensors import safe_open

    from weightlock.io import write_json, write_manifest
    from weightlock.pmp.mask import save_mask

    release, private = work / "release", work / "private"
    release.mkdir(parents=True)
    private.mkdir()
    if model is not None:
        for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json"):  # what a PMP release holds (no chat template: the allow-list refuses it)
            if (model / name).exists():
                shutil.copyfile(model / name, release / name)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        from weightlock.models.save import save_model_dir

        torch.manual_seed(0)
        save_model_dir(LlamaForCausalLM(LlamaConfig(**SMOLLM2)), None, release)
    g = torch.Generator().manual_seed(0)
    with safe_open(str(release / "model.safetensors"), "pt") as f:
        mask = {k: torch.rand(f.get_slice(k).get_shape(), generator=g) < 0.3 for k in f.keys()
                if len(f.get_slice(k).get_shape()) == 2}
    salt = secrets.token_bytes(32)
    commit = save_mask(mask, private / "mask.safetensors", salt)
    write_json(private / "secrets.json", {"init_seed": secrets.randbits(63), "salt": salt.hex(), "commitment": commit})
    write_manifest(release, kind="weightlock-pmp", mask_commitment=commit,
                   pmp={"mask_ratio": 0.3, "variant": "hardened", "pool": "linear"})
    return release, private


def plant_adam_state(release: Path, out: Path) -> Path:
    """The release with an Adam state beside it: exp_avg and exp_avg_sq for every weight, zero off the mask."""
    from safetensors.torch import load_file, save_file

    from weightlock.pmp import load_mask

    shutil.copytree(release, out)
    mask, _, _ = load_mask(release.parent / "private" / "mask.safetensors")
    state = load_file(str(release / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    moments = {}
    for k, w in state.items():
        m = mask.get(k, torch.ones_like(w, dtype=torch.bool))
        moments[f"state.{k}.exp_avg"] = torch.where(m, torch.randn(w.shape, generator=g) * 1e-4, 0.0)
        moments[f"state.{k}.exp_avg_sq"] = torch.where(m, torch.rand(w.shape, generator=g) * 1e-8, 0.0)
    save_file(moments, str(out / "optimizer.safetensors"))
    return out


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    r = fn()
    return round(time.perf_counter() - t, 2), r


def release_check_scan_main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/smollm2", help="the converted SmolLM2-135M (a random stand-in if missing)")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one, removed)")
    args = ap.parse_args()
    from weightlock.pmp import check_release, write_upload_folder

    model = Path(args.model) if Path(args.model, "model.safetensors").exists() else None
    work = Path(args.work or tempfile.mkdtemp(prefix="release-check-scan-"))
    try:
        release, private = build_release(model, work / "pmp")
        warm = work / "warm"
        warm.mkdir()
        check_release(warm)  # imports (transformers, safetensors) once, before the clock
        size = sum(p.stat().st_size for p in release.iterdir())
        rows = {}
        first, _ = timed(lambda: check_release(release))  # also builds the config's model on the meta device once
        t, found = timed(lambda: check_release(release))
        rows["clean"] = {"bytes": size, "first_without_private_s": first, "without_private_s": t,
                         "findings_without_private": len(found)}
        t, found = timed(lambda: check_release(release, private=private))
        rows["clean"].update(with_private_s=t, findings_with_private=len(found))
        leaky = plant_adam_state(release, work / "leaky")
        lsize = sum(p.stat().st_size for p in leaky.iterdir())
        t, found = timed(lambda: check_release(leaky))
        rows["adam_state_planted"] = {"bytes": lsize, "without_private_s": t, "findings_without_private": len(found),
                                      "first_finding_without_private": found[0] if found else None}
        t, found = timed(lambda: check_release(leaky, private=private))
        rows["adam_state_planted"].update(with_private_s=t, findings_with_private=len(found))
        shutil.rmtree(leaky)
        t, r = timed(lambda: write_upload_folder(release, work / "upload", private=private))
        rows["prepare_with_private_s"] = t
        cmd = [sys.executable, "-m", "weightlock.cli", "release", "check", str(release), "--private", str(private)]
        t, p = timed(lambda: subprocess.run(cmd, capture_output=True, text=True))
        rows["cli_check_with_private_s"] = t  # the whole command: interpreter start, imports, hashing, scan
        rows["cli_check_rc"] = p.returncode
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result = {"model": str(model) if model else "random SmolLM2-135M-shaped stand-in", "threads":
              torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), **rows}
    print(json.dumps(result, indent=2))
    save("release_check_scan", result)


# ------------------------------ engine (was bench/dlr_engine.py) ----------------------------------

DLR_ENGINE_DOC = """\
Benchmark: the stacked engine's distillation throughput against the per-layer fits, on SmolLM2 shapes.

    OMP_NUM_THREADS=1 python bench/timing.py engine [--layers 30] [--steps 6] [--repeats 3] [--threads 1]

SmolLM2-135M's MLP shape (d = 576, d_ff = 1536, SwiGLU): gated DLR-Nets of rank 32 and depth 48 (exactly the
MLP's parameters), ``--layers`` of them, batches of ``--batch`` tokens, random (input, output) pairs (a step's
time does not depend on the values). Measured in one run, interleaved, median of ``--repeats``: layer-steps
per second of

* ``per_layer``: :func:`weightlock.dlr.distill.fit_module` once per layer, fp32 (today's path), and
  ``per_layer_bf16``: the same under bf16 autocast;
* ``stacked_fp32`` and ``stacked_bf16``: :func:`weightlock.dlr.engine.fit_stacked` over all layers at once,
  fp32 and bf16 products (its hand-written forward and backward);
* on the whole machine (``--cores``, default all): ``per_layer_all_cores``, today's lock path as ``weightlock
  lock`` runs it (per-layer fp32 fits, torch's threads = the cores), against ``engine_all_cores``, the engine
  as it runs there (bf16, the layers dealt to one process per core, one thread each; the fitting loops'
  throughput, process start-up reported apart as ``engine_start_seconds``);
* ``gemm_ceiling_fp32`` and ``gemm_ceiling_bf16``: only the matrix products of the same layer-steps (per block,
  forward x·Vᵀ and h·Uᵀ, backward the four products for dU, dh, dV, dx) on preallocated tensors, no
  elementwise work, no optimizer, no autograd: the throughput no implementation built on this machine's GEMMs
  can beat at this batch (the ceiling an engine's ratio is bounded by); and ``square_gemm_gflops``: a 1024³
  product's GFLOP/s in each dtype, the machine's practical peak.

Writes bench/results/dlr_engine.json with the ratios to ``per_layer``.
"""


def dlr_engine_main() -> None:
    ap = argparse.ArgumentParser(description=DLR_ENGINE_DOC.split("\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--steps", type=int, default=6, help="fitting steps per measurement (after one warm-up)")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)),
                    help="the whole machine's cores (today's path: this many threads; the engine: processes)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = DLRSpec(576, 32, 48, "silu", readout=4.0, form="gated", init_scale=0.5)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(args.tokens, 576, generator=g).bfloat16() for _ in range(args.layers)]
    ys = [torch.randn(args.tokens, 576, generator=g).bfloat16() for _ in range(args.layers)]
    split = holdout_split(args.tokens, 0.1, 0, 128)
    kw = dict(steps=args.steps, lr=1e-3, batch_tokens=args.batch, loss="row", grad_clip=1.0)

    def per_layer(bf16: bool = False) -> float:
        t = 0.0
        for k in range(args.layers):
            _, st = fit_module(lambda: DLRNet(spec), xs[k], ys[k], progress=False, split=split, bf16=bf16, **kw)
            t += st["seconds"]
        return args.layers * args.steps / t

    def stacked(bf16: bool, processes: int = 1) -> float:
        _, st = fit_stacked(lambda k: DLRNet(spec), list(range(args.layers)), xs, ys, split=split, bf16=bf16,
                            processes=processes, **kw)
        if processes > 1:
            start_up.append(st["wall_seconds"] - st["seconds"])
        return st["layer_steps_per_s"]

    def all_cores(fn):
        def run():
            torch.set_num_threads(args.cores)
            try:
                return fn()
            finally:
                torch.set_num_threads(args.threads)
        return run

    start_up: list[float] = []

    d, r2, r1 = spec.width, 2 * spec.rank, spec.rank  # the gated block's V: d → 2r, U: r → d

    def gemm_ceiling(dtype) -> float:
        x, g = torch.randn(args.batch, d, dtype=dtype), torch.randn(args.batch, d, dtype=dtype)
        v, u = torch.randn(r2, d, dtype=dtype), torch.randn(d, r1, dtype=dtype)
        pre, h = torch.randn(args.batch, r2, dtype=dtype), torch.randn(args.batch, r1, dtype=dtype)
        t = time.perf_counter()
        for _ in range(args.layers * args.steps):
            for _ in range(spec.depth):
                x @ v.T, h @ u.T  # forward
                g.T @ h, g @ u, pre.T @ x, pre @ v  # backward: dU, dh, dV, dx
        return args.layers * args.steps / (time.perf_counter() - t)

    runs = {"gemm_ceiling_fp32": lambda: gemm_ceiling(torch.float32),
            "gemm_ceiling_bf16": lambda: gemm_ceiling(torch.bfloat16), "per_layer": per_layer,
            "per_layer_bf16": lambda: per_layer(True), "stacked_fp32": lambda: stacked(False),
            "stacked_bf16": lambda: stacked(True), "per_layer_all_cores": all_cores(per_layer),
            "engine_all_cores": lambda: stacked(True, args.cores)}
    for fn in runs.values():  # warm-up
        fn()
    samples = {k: [] for k in runs}
    for r in range(args.repeats):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):  # interleaved, order alternating
            samples[name].append(runs[name]())
            print(f"repeat {r}: {name} {samples[name][-1]:.3f} layer-steps/s", flush=True)
    med = {k: statistics.median(v) for k, v in samples.items()}
    peak = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(1024, 1024, dtype=dtype)
        a @ a
        t = time.perf_counter()
        for _ in range(10):
            a @ a
        peak[str(dtype).removeprefix("torch.")] = 10 * 2 * 1024**3 / (time.perf_counter() - t) / 1e9
    flops = 3 * 2 * args.batch * spec.depth * (d * r2 + r1 * d)  # one layer-step: forward + backward GEMMs
    result = {"square_gemm_gflops": peak, "engine_start_seconds": start_up,
              "whole_machine_ratio": med["engine_all_cores"] / med["per_layer_all_cores"],
              "layer_step_gflop": flops / 1e9, "gflops": {k: v * flops / 1e9 for k, v in med.items()},
              "command": "python bench/timing.py engine " + " ".join(sys.argv[1:]), "settings": vars(args),
              "spec": spec.__dict__, "layer_steps_per_s": samples, "median": med,
              "ratio_to_per_layer": {k: med[k] / med["per_layer"] for k in med},
              "spread": {k: (max(v) - min(v)) / statistics.median(v) for k, v in samples.items()}}
    for k, v in result["ratio_to_per_layer"].items():
        print(f"{k}: {med[k]:.3f} layer-steps/s, x{v:.2f} the per-layer fits")
    print(f"whole machine ({args.cores} cores): the engine x{result['whole_machine_ratio']:.2f} today's lock path")
    save("dlr_engine", result)


# ------------------------------ gpu (was bench/gpu.py) --------------------------------------------

GPU_DOC = """\
Benchmark on a CUDA GPU: the locked model's CUDA inference paths, training cost and memory vs the original.

    python bench/timing.py gpu [--layers 4] [--rank 64] [--repeats 7] [--smollm2 runs/smollm2]

Refuses to run without CUDA (one line on stderr, exit status 2). Writes

- ``bench/results/gpu_llama_d2048.json``: a random Llama-shaped model (d=2048, d_ff=8192, vocab 4,096,
  ``--layers`` layers, bf16; ``weightlock.experiments.harness.llama_shaped_pair``) and its DLR version at ``--rank``
  (L=192 blocks per layer at r=64);
- ``bench/results/gpu_smollm2.json``: the same for SmolLM2-135M (``make smollm2`` converts it to
  ``runs/smollm2``) and a random-weight DLR version of it, when that directory exists;

each with, median of ``--repeats`` (interleaved):

- prefill: one forward pass of 4 × 512 tokens, no grad; decode: ``generate`` of 64 new tokens, greedy, KV
  cache, 16-token prompt — original vs locked on the eager fast path (``use_triton = False``), the fused
  Triton kernel (the default on CUDA) and the kernel replayed as CUDA graphs (``compile_small``, what
  ``weightlock.load(..., compile=True)`` sets); the relative difference of each locked path's logits to the
  reference path;
- training: forward and backward time of one step (1 × 512 tokens, bf16 weights, all trainable), their
  ratio, locked / original; ``torch.cuda.max_memory_allocated`` of that step above the model's own memory,
  locked vs original, next to the analytic saved-activation bytes of weightlock.eval.cost
  (``dlr_saved_elements_per_token`` / ``mlp_saved_elements_per_token``);
- the fused kernel alone on one layer's net (1 token and 4,096 tokens): time, achieved bandwidth (weights
  + input + output bytes / time) vs the device's peak HBM bandwidth (from a table by device name) and vs a
  measured device-to-device copy.

The DLR weights are random (timing and memory do not depend on their values); the up-projections get a
non-zero init so that the logits comparison is not between zeros.
"""


# peak HBM bandwidth (bytes/s) by a substring of torch.cuda.get_device_name(), most specific first
PEAK_HBM = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12),
            ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12),
            ("L40S", 0.864e12), ("L4", 0.3e12), ("A10G", 0.6e12), ("RTX 4090", 1.008e12)]


PATHS = ("original", "locked_fast", "locked_triton", "locked_graph")


def peak_hbm() -> float | None:
    name = torch.cuda.get_device_name()
    return next((bw for key, bw in PEAK_HBM if key in name), None)


def cuda_time(fn, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` measured with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def dlr_nets(model) -> list:
    from weightlock.dlr.modeling_weightlock_dlr import DLRNet

    return [m for m in model.modules() if isinstance(m, DLRNet)]


def set_path(model, path: str) -> None:
    """Put every DLR-Net of ``model`` on one inference path (see PATHS)."""
    for n in dlr_nets(model):
        n.use_triton = path in ("locked_triton", "locked_graph")
        n.compile_small = path == "locked_graph"


def nonzero_init(locked) -> None:
    with torch.no_grad():
        for n in dlr_nets(locked):
            n.spec.init_scale = 0.5
            n.reset_parameters()


def inference(original, locked, vocab: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (4, 512), generator=g).cuda()
    prompt = torch.randint(0, vocab, (1, 16), generator=g).cuda()
    new = 64
    models = {p: original if p == "original" else locked for p in PATHS}

    def run(path, what):
        set_path(locked, path)
        model = models[path]
        with torch.no_grad():
            if what == "prefill":
                return model(ids)
            return model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    times = {(p, w): [] for p in PATHS for w in ("prefill", "decode")}
    for what in ("prefill", "decode"):
        for p in PATHS:
            cuda_time(lambda: run(p, what), 1, warmup=1)  # noqa: B023  (called within this iteration)
        for _ in range(repeats):  # interleaved: drift in clocks or load hits every path alike
            for p in PATHS:
                times[(p, what)].append(cuda_time(lambda: run(p, what), 1, warmup=0))  # noqa: B023
    med = {p: {w: statistics.median(times[(p, w)]) for w in ("prefill", "decode")} for p in PATHS}
    res = {"prefill_batch": list(ids.shape), "decode_new_tokens": new, "decode_prompt": 16, "repeats": repeats,
           "seconds": med, "all_seconds": {f"{p}/{w}": v for (p, w), v in times.items()},
           "decode_tokens_per_s": {p: new / med[p]["decode"] for p in PATHS}}
    for p in PATHS[1:]:
        for w in ("prefill", "decode"):
            res[f"{w}_ratio_{p}"] = med[p][w] / med["original"][w]
    # agreement of each locked path with the reference path (bf16), on the prefill batch's first row
    from weightlock.dlr.modeling_weightlock_dlr import DLRNet

    with torch.no_grad():
        DLRNet.fast = False
        try:
            ref = locked(ids[:1]).logits.float()
        finally:
            DLRNet.fast = True
        for p in PATHS[1:3]:
            set_path(locked, p)
            out = locked(ids[:1]).logits.float()
            res[f"logits_rel_diff_{p}_vs_reference"] = ((out - ref).norm() / ref.norm()).item()
    set_path(locked, "locked_triton")
    res["inference_path_prefill"] = dlr_nets(locked)[0].inference_path(torch.empty(1, 512, locked.config.hidden_size,
                                                                                    device="cuda",
                                                                                    dtype=torch.bfloat16))
    return res


def training(original, locked, vocab: int, repeats: int, specs, d_ff: int) -> dict:
    from weightlock.eval.cost import dlr_saved_elements_per_token, mlp_saved_elements_per_token

    tokens = 512
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(1)).cuda()
    res = {"tokens": tokens}
    for name, model in (("original", original), ("locked", locked)):
        model.train()
        for p in model.parameters():
            p.requires_grad_(True)
        box = {}

        def fwd(model=model, box=box):
            box["loss"] = model(input_ids=ids, labels=ids, use_cache=False).loss

        def bwd(box=box):
            box["loss"].backward()

        fwd_t, bwd_t = [], []
        for i in range(repeats + 1):
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            t_f = cuda_time(fwd, 1, warmup=0)
            t_b = cuda_time(bwd, 1, warmup=0)
            if i:  # the first step is a warm-up
                fwd_t.append(t_f)
                bwd_t.append(t_b)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd()
        bwd()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        model.zero_grad(set_to_none=True)
        model.eval()
        res[name] = {"forward_s": statistics.median(fwd_t), "backward_s": statistics.median(bwd_t),
                     "backward_over_forward": statistics.median(bwd_t) / statistics.median(fwd_t),
                     "step_peak_bytes_above_model": peak}
    for k in ("forward_s", "backward_s", "step_peak_bytes_above_model"):
        res[f"{k}_locked_over_original"] = res["locked"][k] / res["original"][k]
    d = original.config.hidden_size
    elem = 2  # bf16
    mlp = sum(mlp_saved_elements_per_token(d, d_ff) for _ in specs) * tokens * elem
    dlr = sum(dlr_saved_elements_per_token(s.width, s.rank, s.depth, s.norm) for s in specs) * tokens * elem
    res["analytic"] = {"mlp_saved_bytes": mlp, "dlr_saved_bytes": dlr, "dlr_minus_mlp_bytes": dlr - mlp}
    res["measured_peak_difference_bytes"] = (res["locked"]["step_peak_bytes_above_model"]
                                             - res["original"]["step_peak_bytes_above_model"])
    res["measured_over_analytic_difference"] = res["measured_peak_difference_bytes"] / (dlr - mlp)
    return res


def kernel_bandwidth(net, repeats: int) -> dict:
    """The fused kernel alone on one net: time and achieved bandwidth at 1 and 4,096 tokens."""
    from weightlock.dlr import triton_dlr as K

    s = net.spec
    weight_bytes = sum(t.numel() * t.element_size() for t in K.stacked(net) if t is not None)
    out = {"width": s.width, "rank": s.rank, "depth": s.depth, "weight_bytes": weight_bytes}
    big = torch.empty(2 ** 28, dtype=torch.uint8, device="cuda")
    copy_s = cuda_time(lambda: big.clone(), max(repeats, 10))
    out["device_copy_bytes_per_s"] = 2 * big.numel() / copy_s  # read + write
    out["peak_hbm_bytes_per_s"] = peak_hbm()
    for tokens in (1, 4096):
        x = torch.randn(tokens, s.width, device="cuda", dtype=net.blocks[0].down.weight.dtype)
        assert K.supported(net, x)
        t = cuda_time(lambda: K.forward(net, x), max(repeats, 20))  # noqa: B023  (called within this iteration)
        moved = weight_bytes + 2 * x.numel() * x.element_size()
        with torch.no_grad():
            t_fast = cuda_time(lambda: net.forward_fast(x), max(repeats, 20))  # noqa: B023
        row = {"kernel_s": t, "eager_fast_path_s": t_fast, "bytes_moved": moved, "achieved_bytes_per_s": moved / t,
               "launch_config": list(K.launch_config(tokens, s.width, s.rank, x.dtype))}
        if out["peak_hbm_bytes_per_s"]:
            row["fraction_of_peak_hbm"] = row["achieved_bytes_per_s"] / out["peak_hbm_bytes_per_s"]
        row["fraction_of_device_copy"] = row["achieved_bytes_per_s"] / out["device_copy_bytes_per_s"]
        out[f"tokens_{tokens}"] = row
    return out


def measure(original, locked, specs, d_ff: int, repeats: int) -> dict:
    nonzero_init(locked)
    original, locked = original.to("cuda", torch.bfloat16).eval(), locked.to("cuda", torch.bfloat16).eval()
    vocab = original.config.vocab_size
    res = {"layers": original.config.num_hidden_layers, "hidden_size": original.config.hidden_size, "d_ff": d_ff,
           "dlr_specs": [dict(s.__dict__) for s in specs[:1]], "dtype": "bfloat16"}
    res["inference"] = inference(original, locked, vocab, repeats)
    print({k: v for k, v in res["inference"].items() if "ratio" in k or "rel" in k}, flush=True)
    res["fused_kernel"] = kernel_bandwidth(dlr_nets(locked)[0], repeats)
    print({k: v for k, v in res["fused_kernel"].items() if k.startswith("tokens_")}, flush=True)
    res["training"] = training(original, locked, vocab, repeats, specs, d_ff)
    print({k: v for k, v in res["training"].items() if "over" in k}, flush=True)
    return res


def smollm2_pair(path: str, rank: int):
    import copy

    from weightlock.dlr import LockConfig, apply_dlr
    from weightlock.dlr.distill import specs_for
    from weightlock.models.hub import load

    original = load(path)
    _, specs, _ = specs_for(original, LockConfig(rank=rank))
    locked = apply_dlr(copy.deepcopy(original), [s.__dict__ for s in specs])
    return original, locked, specs


def gpu_main() -> None:
    ap = argparse.ArgumentParser(description=GPU_DOC.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--smollm2-rank", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--smollm2", default="runs/smollm2")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/timing.py gpu needs a CUDA GPU (torch.cuda.is_available() is False): nothing measured",
              file=sys.stderr)
        sys.exit(2)
    import triton  # noqa: F401  (the fused kernel is what is measured: fail here, not halfway)

    from weightlock.experiments.harness import llama_shaped_pair, save

    meta = {"command": "python " + " ".join(["bench/timing.py gpu", *sys.argv[1:]]),
            "device": torch.cuda.get_device_name(),
            "peak_hbm_bytes_per_s": peak_hbm(), "torch": torch.__version__, "triton": triton.__version__}
    original, locked, specs = llama_shaped_pair(layers=args.layers, rank=args.rank)
    save("gpu_llama_d2048", {**meta, **measure(original, locked, specs, 8192, args.repeats)})
    del original, locked
    torch.cuda.empty_cache()
    if Path(args.smollm2).is_dir():
        original, locked, specs = smollm2_pair(args.smollm2, args.smollm2_rank)
        save("gpu_smollm2", {**meta, **measure(original, locked, specs, original.config.intermediate_size,
                                               args.repeats)})
    else:
        print(f"{args.smollm2} not found (make smollm2): SmolLM2-135M skipped", flush=True)


COMMANDS = {
    "demo": (demo_timing_main, DEMO_TIMING_DOC),
    "release-check": (release_check_scan_main, RELEASE_CHECK_SCAN_DOC),
    "engine": (dlr_engine_main, DLR_ENGINE_DOC),
    "gpu": (gpu_main, GPU_DOC),
}


if __name__ == "__main__":
    run_command(COMMANDS, __doc__)
