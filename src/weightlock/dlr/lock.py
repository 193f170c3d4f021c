"""``weightlock lock``: a Hugging Face checkpoint in, a DLR-locked release out."""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from ..errors import WeightlockError
from ..io import MANIFEST, check_out_dir, dist_or_none, prepare_out_dir, read_json, sha256_file, write_json
from ..models.gguf import resolve_model_path
from ..models.hub import load
from ..schema import LOCK_REPORT, SCHEMA_VERSION
from ..version import __version__
from . import modeling_weightlock_dlr as M
from .config import LockConfig
from .distill import distill_model, readback_model, refine, specs_for

WORK = ".weightlock-work"
MODELING_FILE = "modeling_weightlock_dlr.py"


def _calibration_spec(model_dir: Path, cfg: LockConfig) -> str:
    from ..train.pretrain import run_config

    return cfg.data or run_config(model_dir).get("data", "builtin:code+prose")


def _say(cfg: LockConfig, msg: str) -> None:
    """A status line on stderr (when progress is on): what the lock is doing now."""
    if cfg.progress:
        import sys

        print(f"weightlock lock: {msg}", file=sys.stderr, flush=True)


def _ppl(model, blocks, cfg: LockConfig, desc: str) -> float | None:
    """Perplexity of a causal LM on ``blocks`` with a progress bar labelled ``desc`` (None for an encoder)."""
    from ..train.loop import evaluate_loss

    if not hasattr(model, "lm_head") and "CausalLM" not in type(model).__name__:
        return None
    return math.exp(evaluate_loss(model, blocks, progress=desc if cfg.progress else None))


def lock(model_dir: str | os.PathLike, out: str | os.PathLike, cfg: LockConfig | None = None,
         overwrite: bool = False, restart: bool = False, keep_work: bool = False) -> dict:
    """Lock the model in ``model_dir`` with DLR-Nets and write the release to ``out``; returns the report.

    An interrupted lock resumes from ``out/.weightlock-work`` when run again with the same settings; work
    left by different settings (model, data, DLR shape, distillation) is an error unless ``restart``
    discards it. ``keep_work`` keeps the work directory (captures, fitted layers) after the release is written,
    e.g. to lock other layer subsets from the same fits."""
    from ..data import load_blocks, load_tokenizer

    cfg = cfg or LockConfig()
    cfg.validate()
    out = Path(out)
    inputs = (model_dir, cfg.data)
    check_out_dir(out, inputs, non_empty_ok=overwrite or (out / WORK).exists(), hint=_BUSY)  # before heavy work
    _say(cfg, f"loading {model_dir}")
    model_dir = resolve_model_path(model_dir)  # a .gguf file: its cached Hugging Face conversion
    original = load(model_dir)
    if getattr(original.config, M.DLR_CONFIG_KEY, None):
        raise WeightlockError(f"{model_dir}: already DLR-locked")
    adapter, specs, mlp_sizes = specs_for(original, cfg)  # validates rank/architecture before writing
    tok = load_tokenizer(model_dir)
    spec = _calibration_spec(model_dir, cfg)
    block = min(cfg.block_size, getattr(original.config, "max_position_embeddings", cfg.block_size))
    calib = load_blocks(spec, "train", tok, block, cfg.calib_tokens, specials=True)
    val = load_blocks(spec, "validation", tok, block, 32768, specials=True)

    work = out / WORK
    dist = dist_or_none()
    main = dist is None or dist.get_rank() == 0
    if main:
        if restart:
            shutil.rmtree(work, ignore_errors=True)
        prepare_out_dir(out, overwrite=overwrite, resume=work.exists(), inputs=inputs, hint=_BUSY)
        _claim_work(work, _work_settings(model_dir, cfg, spec, block, adapter))
    if dist:
        dist.barrier()
    t0 = time.perf_counter()
    n_locked = sum(s is not None for s in specs)
    _say(cfg, f"{n_locked} of {len(specs)} MLPs to lock ({calib.numel():,} calibration tokens); work kept in {work}")
    ppl_before = None
    if main:  # cached: a resumed lock does not measure it again
        ref = work / "reference.json"
        ppl_before = read_json(ref)["ppl"] if ref.exists() else _ppl(original, val, cfg, "reference perplexity")
        write_json(ref, {"ppl": ppl_before})
    locked = load(model_dir)
    params_before = sum(p.numel() for p in locked.parameters())
    from .engine import fit_with_engine

    locked, layer_stats = distill_model(locked, calib, cfg, work, fit_together=fit_with_engine)
    if not main:
        return {}
    auto = None
    if cfg.layers is not None and cfg.layers.strip() == "auto":
        auto = _choose_layers(original, locked, layer_stats, val[:REFINE_VAL_BLOCKS], cfg)
        keep = set(auto["layers"])
        specs = [sp if k in keep else None for k, sp in enumerate(specs)]
        layer_stats = [st for st in layer_stats if st["layer"] in keep]
        locked = load(model_dir)
        from .distill import install_layer

        a = M.adapter_for(locked)
        layers = M.find_layers(locked, a)
        for k in sorted(keep):
            install_layer(layers[k], a, specs[k], work / f"layer_{k}.safetensors", "cpu")
        _say(cfg, f"auto: {len(keep)} MLPs fit ppl ratio ≤ {cfg.max_ppl_ratio:g}: {sorted(keep)}")
    refine_history = []
    if cfg.refine_steps > 0:
        ckpt = work / _refine_dir(cfg)
        _say(cfg, f"end-to-end refinement, {cfg.refine_steps} steps (checkpoints in {ckpt})")
        refine_history = refine(locked, original, calib, cfg, val=val[:REFINE_VAL_BLOCKS], checkpoint_dir=ckpt)
    ppl_after = _ppl(locked, val, cfg, "locked perplexity")
    readback = None
    if ppl_before is not None:
        rb = readback_model(locked)
        ppl_rb = _ppl(rb, val, cfg, "read-back perplexity")
        readback = {"ppl": ppl_rb, "ppl_ratio": ppl_rb / ppl_before,
                    "layer_rel_error_tokens": [st.get("readback", {}).get("rel_error_tokens") for st in layer_stats]}
        eval_block = min(256, getattr(original.config, "max_position_embeddings", 256))
        readback["by_data"] = fidelity(original, {"lock": locked, "readback": rb}, tok, cfg, eval_block)
        del rb
    params_after = sum(p.numel() for p in locked.parameters())
    report = {
        "kind": LOCK_REPORT, "schema_version": SCHEMA_VERSION, "base_model": str(model_dir), "family": adapter.family,
        "calibration_data": spec,
        "calibration_tokens": int(calib.numel()), "validation_tokens": int(val.numel()),
        # as applied: --init mlp runs without the sink whatever --sink says; the record says what the release holds
        "lock_config": {**asdict(cfg), "sink": cfg.uses_sink},
        "parameters_before": params_before, "parameters_after": params_after,
        "mlp_parameters": mlp_sizes, "dlr_parameters": [s.num_parameters() for s in specs if s is not None],
        "ppl_before": ppl_before, "ppl_after": ppl_after,
        "ppl_ratio": ppl_after / ppl_before if ppl_before else None, "readback": readback,
        "locked_layers": [k for k, sp in enumerate(specs) if sp is not None], "auto_layers": auto,
        "layers": layer_stats, "refine": refine_history[-1] if refine_history else None,
        "seconds": time.perf_counter() - t0, "weightlock_version": __version__,
    }
    _write_release(locked, tok, out, specs, report)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return report


def fidelity(original, models: dict, tok, cfg: LockConfig, block: int) -> dict:
    """Per ``cfg.eval_data`` spec (its test split, ``cfg.eval_tokens`` tokens in blocks of ``block``): the
    perplexity ratio, top-1 agreement and KL of each of ``models`` (name → model) against ``original``."""
    from ..data import load_blocks
    from .distill import fidelity_metrics, teacher_logprobs

    out = {}
    for spec in [d.strip() for d in (cfg.eval_data or "").split(",") if d.strip() and d.strip() != "none"]:
        blocks = load_blocks(spec, "test", tok, block, cfg.eval_tokens, specials=True)
        teacher = teacher_logprobs(original, blocks)
        out[spec] = {name: fidelity_metrics(m, blocks, *teacher) for name, m in models.items()}
        _say(cfg, f"fidelity on {spec}: " + "; ".join(
            f"{n} ppl ×{r['ppl_ratio']:.4f}, top-1 {r['top1_agreement']:.3f}, KL {r['kl']:.4f}"
            for n, r in out[spec].items()))
    return out


def _choose_layers(original, locked, stats: list[dict], val, cfg: LockConfig) -> dict:
    """``layers="auto"``: the largest set of fitted layers, taken in order of their held-out error (best
    first), whose perplexity ratio on held-out blocks stays within ``cfg.max_ppl_ratio`` (binary search over
    the number of layers; each candidate is measured, not predicted). Returns the choice and its trail."""
    from .distill import gate_error

    adapter = M.adapter_for(locked)
    mine, theirs = M.find_layers(locked, adapter), M.find_layers(original, adapter)
    order = [s["layer"] for s in sorted(stats, key=gate_error)]
    nets = {k: M.get_path(mine[k], adapter.mlp) for k in order}
    mlps = {k: M.get_path(theirs[k], adapter.mlp) for k in order}
    base = _ppl(original, val, cfg, "auto: original")
    trail = []

    def ratio(n: int) -> float:
        for i, k in enumerate(order):  # the original's model with the first n nets swapped in
            M.set_path(theirs[k], adapter.mlp, nets[k] if i < n else mlps[k])
        try:
            r = _ppl(original, val, cfg, f"auto: {n} layers") / base
        finally:
            for k in order:
                M.set_path(theirs[k], adapter.mlp, mlps[k])
        trail.append({"layers": n, "ppl_ratio": r})
        return r

    lo, hi = 0, len(order)  # lo fits (0 layers: ratio 1); find the largest n that fits
    if ratio(hi) <= cfg.max_ppl_ratio:
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ratio(mid) <= cfg.max_ppl_ratio else (lo, mid)
    if lo == 0:
        raise WeightlockError(f"layers=auto: no fitted layer keeps the perplexity ratio within {cfg.max_ppl_ratio:g} "
                              f"on its own (trail: {trail}); distil longer or raise --max-ppl-ratio")
    return {"layers": sorted(order[:lo]), "order": order, "max_ppl_ratio": cfg.max_ppl_ratio, "trail": trail}


REFINE_VAL_BLOCKS = 16  # held-out blocks on which refinement logs its fidelity as it goes
_BUSY = "pass --overwrite to replace it (an interrupted lock into it resumes by itself)"

# settings that do not change what the work directory holds (captures and distilled layers)
_NOT_IN_WORK = {"progress", "refine_steps", "refine_lr", "refine_batch", "max_rel_error", "refine_eval_every",
                "refine_checkpoint_every",
                "target_kl", "max_ppl_ratio", "eval_data", "eval_tokens"}


def _refine_dir(cfg: LockConfig) -> str:
    """The refinement checkpoint's directory in the work dir, named by the settings its trajectory depends on
    (other refinement settings start their own run and keep the distilled layers)."""
    import hashlib

    key = json.dumps([cfg.refine_steps, cfg.refine_lr, cfg.refine_batch, cfg.seed])
    return "refine-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _work_settings(model_dir: Path, cfg: LockConfig, data: str, block: int, adapter) -> dict:
    """What the captures and fitted layers in the work directory depend on."""
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and (p.suffix == ".safetensors"
                                                                       or p.name == "config.json"))
    return {"model": {p.name: sha256_file(p) for p in files}, "calibration_data": data, "block_size": block,
            "adapter": asdict(adapter),
            # in parallel mode a layer's fit does not depend on which other layers are locked
            "lock_config": {k: v for k, v in asdict(cfg).items()
                            if k not in _NOT_IN_WORK and not (k == "layers" and cfg.mode == "parallel")}}


def _claim_work(work: Path, settings: dict) -> None:
    """Record ``settings`` in a new work directory, or check that an existing one was made with them."""
    record = work / "settings.json"
    if work.exists() and any(work.iterdir()):
        old = read_json(record) if record.exists() else {}
        saved = json.loads(json.dumps(settings))  # tuples as lists, as read back from JSON
        if old != saved:
            diff = [k for k in saved["lock_config"] if old.get("lock_config", {}).get(k) != saved["lock_config"][k]]
            diff += [k for k in ("model", "calibration_data", "block_size", "adapter") if old.get(k) != saved[k]]
            raise WeightlockError(
                f"{work}: holds an interrupted lock made with other settings ({', '.join(diff) or 'unrecorded'}"
                " differ); rerun with the same settings to resume it, or pass --restart to discard it")
        return
    write_json(record, settings)


def _write_release(model, tokenizer, out: Path, specs: list, report: dict) -> None:
    from ..models.hub import save_model_dir

    cfg = model.config
    # the adapter travels with the release: a family registered only at lock time loads anywhere
    setattr(cfg, M.DLR_CONFIG_KEY, {"base_class": type(model).__name__,
                                    "layers": [asdict(s) if s is not None else None for s in specs],
                                    "adapter": M.adapter_for(model).to_dict(), "weightlock_version": __version__})
    auto = "AutoModelForCausalLM" if "CausalLM" in type(model).__name__ else "AutoModel"
    cfg.auto_map = {auto: "modeling_weightlock_dlr.DLRLockedModel"}
    save_model_dir(model, tokenizer, out, extra_files={"lock_report.json": report}, module_names=True)
    shutil.copyfile(M.__file__, out / MODELING_FILE)
    files = {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file() and p.name != MANIFEST}
    write_json(out / MANIFEST, {
        "kind": "weightlock-dlr-lock", "weightlock_version": __version__, "files": files,
        "lock": {k: report[k] for k in ("family", "lock_config", "parameters_before", "parameters_after",
                                        "calibration_data")},
        "fidelity": {"ppl_before": report["ppl_before"], "ppl_after": report["ppl_after"],
                     "ppl_ratio": report["ppl_ratio"],
                     "locked_layers": [k for k, s in enumerate(specs) if s is not None],
                     "layer_rel_error": [s["rel_error"] for s in report["layers"]],
                     "readback_ppl_ratio": (report.get("readback") or {}).get("ppl_ratio"),
                     "by_data": (report.get("readback") or {}).get("by_data")},
    })
