"""Benchmark: the price of unreadability on SmolLM2-135M — faithful-and-readable vs unreadable-and-unfaithful.

    python bench/real_unreadable.py                       # every recipe, resumable (kill it and run it again)
    python bench/real_unreadable.py --recipes structured  # one recipe

A DLR-Net's blocks laid side by side are one dense MLP (its *read-back*, what an attacker reads off a release
in seconds). For each recipe and each of its points, this records:

* the lock's fidelity (perplexity ratio, top-1 agreement, KL to the original on the test split of
  builtin:prose and builtin:code) and its per-layer token-weighted error against the MLP;
* the read-back's fidelity (the same, for the model with every net replaced by its read-back);
* reverse distillation from the read-back: the read-back MLP trained on the lock's own input/output pairs
  (what an attacker can capture) until its error against the lock is at most the lock's own error against
  the original MLP — steps, seconds and FLOPs, against the owner's;
* the owner's compute (seconds of fitting).

Recipes (``--recipes``):

* ``structured``: every MLP replaced by gated blocks started from its own hidden units (``weightlock lock
  --block gated --init mlp --steps 0``) at read-outs s = 4096 … 4; no training.
* ``anneal``: on ``--layers``, the structured start at s = ``--start`` lowered by halves to ``--end``, each
  stage repaired by ``--steps`` distillation steps (``--anneal-to``); a point per stage.
* ``penalty``: the same with a term that pushes the read-back away (``--readback-penalty``).
* ``random``: on ``--layers``, gated blocks from a random start (U = 0), distilled in segments of
  ``--random-steps`` steps; a point per segment.

Continuation and random points lock only ``--layers`` (the other MLPs stay the original's): the model-level
figures are those layers' cost, said as such. Writes bench/results/real_unreadable.json and .png; every fitted
net and every measured point is cached under ``--out``, so a killed run resumes where it was.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from weightlock import load
from weightlock.data import load_blocks, load_tokenizer
from weightlock.dlr.distill import (
    LockConfig,
    anneal_readouts,
    capture,
    error_stats,
    fidelity_metrics,
    fit_layer,
    fit_module,
    holdout_split,
    mlp_init,
    readback_model,
    specs_for,
    teacher_logprobs,
)
from weightlock.dlr.modeling_weightlock_dlr import DLRNet, find_layers, readback_net, replace_mlp
from weightlock.experiments.harness import RESULTS, save
from weightlock.io import read_json, write_json

SPECS = ("builtin:prose", "builtin:code")
REVERSE_TOLERANCE = 1.25
REVERSE_CRITERION = f"error vs the MLP <= {REVERSE_TOLERANCE} x the lock's"


def evaluate(model, data: dict) -> dict:
    out = {s: fidelity_metrics(model, data[s]["blocks"], *data[s]["teacher"]) for s in SPECS}
    # NaN (an overflowing lock) is the worst, not skipped by max()
    out["worst_ppl_ratio"] = max(math.inf if out[s]["ppl_ratio"] != out[s]["ppl_ratio"] else out[s]["ppl_ratio"]
                                 for s in SPECS)
    out["min_top1_agreement"] = min(out[s]["top1_agreement"] for s in SPECS)
    return out


class Bench:
    def __init__(self, args):
        self.args, self.root = args, Path(args.out)
        self.root.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(args.device)
        self.original = load(args.model).eval().to(self.device)
        self.tok = load_tokenizer(args.model)
        self.adapter, self.specs, _ = specs_for(self.original, self.cfg())
        self.layers = find_layers(self.original, self.adapter)
        self.data = {}
        for s in SPECS:
            b = load_blocks(s, "test", self.tok, 256, args.eval_tokens).to(self.device)
            self.data[s] = {"blocks": b, "teacher": teacher_logprobs(self.original, b)}
        self.points = read_json(self.root / "points.json") if (self.root / "points.json").exists() else {}
        self._caps = {}

    def cfg(self, **kw) -> LockConfig:
        a = self.args
        base = dict(rank=a.rank, block="gated", init="mlp", steps=0, sink=False, progress=False, batch_tokens=a.batch,
                    loss="row", grad_clip=1.0, max_rel_error=None, lr=a.lr)
        return LockConfig(**{**base, **kw})

    def capture(self, k: int):
        """Layer k's (input, output) pairs on builtin:code+prose (train split), cached on disk."""
        from safetensors.torch import load_file, save_file

        path = self.root / f"capture_{k}.safetensors"
        if k not in self._caps:
            if not path.exists():
                blocks = load_blocks("builtin:code+prose", "train", self.tok, 128, self.args.calib_tokens,
                                     specials=True)
                for j, (x, y) in capture(self.original, blocks, self.chosen()).items():
                    save_file({"x": x.contiguous(), "y": y.contiguous()}, str(self.root / f"capture_{j}.safetensors"))
            t = load_file(str(path))
            self._caps[k] = (t["x"], t["y"])
        return self._caps[k]

    def chosen(self) -> list[int]:
        return [int(k) for k in self.args.layers.split(",")]

    def record(self, key: str, point: dict) -> None:
        self.points[key] = point
        write_json(self.root / "points.json", self.points)
        lock, rb = point["lock"], point["readback"]
        rd = point.get("reverse", {})
        print(f"{key}: lock ppl x{lock['worst_ppl_ratio']:.4f} top-1 {lock['min_top1_agreement']:.3f} | read-back "
              f"ppl x{rb['worst_ppl_ratio']:.4g} top-1 {rb['min_top1_agreement']:.3f} | "
              f"owner {point['owner_seconds']:.0f} s"
              + (f" | reverse {rd['seconds']:.0f} s (reached: {rd['reached']})" if rd else ""), flush=True)

    def model_with(self, nets: dict[int, DLRNet]):
        m = copy.deepcopy(self.original)
        layers = find_layers(m, self.adapter)
        for k, net in nets.items():
            replace_mlp(layers[k], self.adapter, net.to(self.device))
        return m

    def reverse_longer(self, key: str, cap: int) -> None:
        """Reverse distillation of the point ``key`` (a continuation point) again with ``cap`` steps a layer, kept
        beside the first measurement as ``reverse_long``: where the first cap was too short to reach the lock's
        fidelity, how long it really takes (or that it does not within this cap either). Kept in
        ``reverse_long.json`` (its own file: it may run beside the main run) and merged into the result."""
        from safetensors.torch import load_file

        name, _, sval = key.partition("/s=")
        first = self.root / name / f"layer_{self.chosen()[0]}_s{sval}.safetensors"
        if name not in ("anneal", "penalty") or not first.exists():
            raise SystemExit(f"--reverse-point: {key!r} is not a fitted continuation point")
        nets = {}
        for k in self.chosen():
            net = DLRNet(replace(self.specs[k], readout=float(sval)))
            net.load_state_dict(load_file(str(self.root / name / f"layer_{k}_s{sval}.safetensors")))
            nets[k] = net
        old = self.args.reverse_cap
        self.args.reverse_cap = cap
        try:
            long = {"cap": cap, **self.reverse(nets)}
        finally:
            self.args.reverse_cap = old
        path = self.root / "reverse_long.json"
        write_json(path, {**(read_json(path) if path.exists() else {}), key: long})
        print(f"{key}: reverse distillation with up to {cap} steps a layer: {long['seconds']:.0f} s, reached: "
              f"{long['reached']}", flush=True)

    def reverse_only(self, key: str, nets: dict[int, DLRNet]) -> bool:
        """True when ``key`` is measured; its reverse distillation is measured again (the fidelities kept) when
        it was made with another stopping test."""
        if key not in self.points:
            return False
        if self.points[key].get("reverse", {}).get("criterion") != REVERSE_CRITERION:
            self.points[key]["reverse"] = self.reverse(nets)
            self.record(key, self.points[key])
        return True

    def measure(self, nets: dict[int, DLRNet], owner_seconds: float, extra: dict, reverse: bool,
                readback: dict | None = None) -> dict:
        """A point: the lock's and its read-back's fidelity (``readback``: already measured on the same
        read-back weights), and with ``reverse`` the attacker's reverse distillation."""
        m = self.model_with(nets)
        point = {"layers": sorted(nets), "owner_seconds": owner_seconds, **extra, "lock": evaluate(m, self.data),
                 "readback": readback or evaluate(readback_model(m), self.data)}
        if reverse:
            point["reverse"] = self.reverse(nets)
        return point

    def reverse(self, nets: dict[int, DLRNet]) -> dict:
        """The attacker: each read-back MLP distilled on the lock's own (input, output) pairs (what an attacker
        can capture) until it is as faithful to the original MLP as the lock is — its held-out token-weighted
        error against the MLP at most ``REVERSE_TOLERANCE`` × the lock's (the meter's stopping test; the
        attacker would stop on the model's quality) — capped at ``--reverse-cap`` steps; a read-back already
        that faithful costs nothing."""
        a = self.args
        per, secs, reached, flops = [], 0.0, True, 0.0
        for k, net in nets.items():
            x, y = (t.to(self.device) for t in self.capture(k))
            net = net.to(self.device)
            hold, train = holdout_split(x.shape[0], 0.1, 0, 128)
            with torch.no_grad():
                xf = x.float()
                target = torch.cat([net(xf[i:i + 4096]) for i in range(0, len(xf), 4096)])
            xh, yh = xf[hold], y[hold].float()
            own = error_stats(net, xh, yh)["rel_error_tokens"]
            student = readback_net(net)
            start = error_stats(student, xh, yh)["rel_error_tokens"]
            def faithful(m, xh=xh, yh=yh, own=own) -> bool:
                return error_stats(m, xh, yh)["rel_error_tokens"] <= REVERSE_TOLERANCE * own

            t0 = time.perf_counter()
            _, st = fit_module(lambda s=student: s, xf, target, steps=a.reverse_cap, lr=a.reverse_lr,
                               batch_tokens=a.batch, progress=False, loss="row", grad_clip=1.0,
                               split=(hold, train), until=faithful, device=self.device)
            dt = time.perf_counter() - t0
            n = next(v for v in (st["reached_at_step"], st["stopped_at_step"], a.reverse_cap) if v is not None)
            # the attacker's pass over the lock to capture its pairs (2 FLOPs a weight a token) + 6 a weight a
            # token for each distillation step of the dense MLP
            flops += 2.0 * net.spec.num_parameters() * x.shape[0] + 6.0 * student.spec.num_parameters() * a.batch * n
            secs += dt
            reached &= st["reached_at_step"] is not None
            per.append({"layer": k, "lock_rel_error_tokens": own, "readback_rel_error_tokens": start,
                        "end_rel_error_tokens": error_stats(student, xh, yh)["rel_error_tokens"], "steps": n,
                        "seconds": dt, "check_seconds": st["until_seconds"],
                        "reached": st["reached_at_step"] is not None})
        return {"criterion": REVERSE_CRITERION, "seconds": secs, "flops": flops, "reached": reached,
                "per_layer": per}

    # ---- recipes ----------------------------------------------------------------------------------------

    def layer_errors(self) -> None:
        """The structured start of every layer alone at each read-out of ``--readouts``: its token-weighted error
        against the MLP on ``--layer-tokens`` captured tokens (which layers limit how low s can go), in
        ``layer_errors.json`` beside the points."""
        path = self.root / "layer_errors.json"
        done = read_json(path) if path.exists() else {}
        blocks = load_blocks("builtin:code+prose", "validation", self.tok, 128, self.args.layer_tokens,
                             specials=True).to(self.device)
        todo = [k for k in range(len(self.layers)) if str(k) not in done]
        caps = capture(self.original, blocks, todo, dtype=torch.float32) if todo else {}
        for k in todo:
            x, y = caps[k]
            row = {}
            for s in [float(v) for v in self.args.readouts.split(",")]:
                net = DLRNet(replace(self.specs[k], readout=s)).to(self.device)
                mlp_init(self.layers[k], self.adapter)(net)
                e = error_stats(net, x.to(self.device), y.to(self.device))
                row[f"{s:g}"] = {"rel_error_tokens": e["rel_error_tokens"], "rel_error": e["rel_error"]}
            done[str(k)] = row
            write_json(path, done)
            print(f"layer {k}: " + ", ".join(f"s={s} {r['rel_error_tokens']:.2g}" for s, r in row.items()), flush=True)

    def attribution(self) -> None:
        """Each ``--layers`` layer's last random-start net swapped in alone: its KL by position and by input
        token on prose and code (why layer 0 costs more than its error predicts)."""
        from safetensors.torch import load_file

        seg = self.args.random_segments
        for k in self.chosen():
            key = f"attribution/layer={k}"
            path = self.root / "random" / f"layer_{k}_seg{seg}.safetensors"
            if key in self.points or not path.exists():
                continue
            net = DLRNet(replace(self.specs[k], readout=4.0))
            net.load_state_dict(load_file(str(path)))
            m = self.model_with({k: net})
            meta = read_json(self.root / "random" / f"layer_{k}_seg{seg}.json")
            self.points[key] = {"recipe": "attribution", "layer": k, "steps": seg * self.args.random_steps,
                                "rel_error_tokens": meta["rel_error_tokens"],
                                **{sp: {**attribute(kl_map(m, d["blocks"], d["teacher"][0]), d["blocks"], self.tok),
                                        "ppl_ratio": fidelity_metrics(m, d["blocks"], *d["teacher"])["ppl_ratio"]}
                                   for sp, d in self.data.items()}}
            write_json(self.root / "points.json", self.points)
            p = self.points[key]
            print(f"{key}: error {p['rel_error_tokens']:.4f}; " + "; ".join(
                f"{sp}: ppl x{p[sp]['ppl_ratio']:.3f}, position 0 {p[sp]['position_share']['0']:.0%} of the KL, "
                f"top token {p[sp]['top_tokens'][0]['token']!r} {p[sp]['top_tokens'][0]['share']:.0%}"
                for sp in SPECS), flush=True)

    def structured(self) -> None:
        first = None
        for s in [float(v) for v in self.args.readouts.split(",")]:
            key = f"structured/s={s:g}"
            t0 = time.perf_counter()
            nets = {}
            for k, spec in enumerate(self.specs):
                net = DLRNet(replace(spec, readout=s))
                mlp_init(self.layers[k], self.adapter)(net)
                nets[k] = net
            owner = time.perf_counter() - t0
            if first is None:
                first = (key, nets)
            if key in self.points:
                continue
            # the read-back does not depend on s (s·U/s): measured once, reused where the weights are equal
            same = first[0] in self.points and all(
                torch.allclose(a, b, rtol=1e-6, atol=0) for k in nets for a, b in
                zip(_rb(nets[k]), _rb(first[1][k])))
            # all 30 MLPs; the read-back is the original itself, so reverse distillation costs nothing
            self.record(key, self.measure(nets, owner, {"recipe": "structured", "readout": s, "locked": "all",
                                                        "readback_reused_from": first[0] if same else None},
                                          reverse=False, readback=self.points[first[0]]["readback"] if same else None))

    def continuation(self, name: str, penalty: float) -> None:
        a = self.args
        cfg = self.cfg(readout=a.start, anneal_to=a.end, steps=a.steps, readback_penalty=penalty)
        stages = anneal_readouts(a.start, a.end)
        done = lambda k, s: (self.root / name / f"layer_{k}_s{s:g}.safetensors").exists()  # noqa: E731
        for k in self.chosen():
            if all(done(k, s) for s in stages):
                continue
            x, y = self.capture(k)
            (self.root / name).mkdir(exist_ok=True)
            log = []

            def save_stage(net, stage, k=k, log=log):
                from safetensors.torch import save_file

                log.append(stage)
                save_file({n: p.detach().cpu().contiguous() for n, p in net.state_dict().items()},
                          str(self.root / name / f"layer_{k}_s{stage['readout']:g}.safetensors"))
                write_json(self.root / name / f"layer_{k}.json", {"stages": log})

            fit_layer(x, y, self.specs[k], cfg, desc=f"{name} layer {k}", init=mlp_init(self.layers[k], self.adapter),
                      block=128, on_stage=save_stage, device=self.device)
            print(f"{name} layer {k}: " + ", ".join(f"s={st['readout']:g} lock {st['rel_error_tokens']:.4f} "
                                                     f"read-back {st['readback_rel_error_tokens']:.4f}" for st in log),
                  flush=True)
        self._points_from_stages(name, stages, {"readback_penalty": penalty, "steps_per_stage": a.steps})

    def _points_from_stages(self, name: str, stages: list, extra: dict) -> None:
        from safetensors.torch import load_file

        logs = {k: read_json(self.root / name / f"layer_{k}.json")["stages"] for k in self.chosen()}
        for i, s in enumerate(stages):
            key = f"{name}/s={s:g}"
            if key in self.points and self.points[key].get("reverse", {}).get("criterion") == REVERSE_CRITERION:
                continue
            nets = {}
            for k in self.chosen():
                net = DLRNet(replace(self.specs[k], readout=float(s)))
                net.load_state_dict(load_file(str(self.root / name / f"layer_{k}_s{s:g}.safetensors")))
                nets[k] = net
            if self.reverse_only(key, nets):
                continue
            owner = sum(st["seconds"] for k in self.chosen() for st in logs[k][:i + 1])
            layer_err = {k: {"lock": logs[k][i]["rel_error_tokens"],
                             "readback": logs[k][i]["readback_rel_error_tokens"]} for k in self.chosen()}
            self.record(key, self.measure(nets, owner, {"recipe": name, "readout": s, "layer_errors": layer_err,
                                                        **extra}, reverse=True))

    def random(self) -> None:
        """Zero-start gated nets (read-out 4) distilled in segments; a point after each segment."""
        from safetensors.torch import load_file, save_file

        a = self.args
        cfg = self.cfg(init="zero", readout=4.0, steps=a.random_steps, lr=3e-3, activation="silu")
        for seg in range(1, a.random_segments + 1):
            key = f"random/steps={seg * a.random_steps}"
            nets, owner, errs = {}, 0.0, {}
            for k in self.chosen():
                path = self.root / "random" / f"layer_{k}_seg{seg}.safetensors"
                meta = self.root / "random" / f"layer_{k}_seg{seg}.json"
                spec = replace(self.specs[k], readout=4.0)
                if not meta.exists():
                    (self.root / "random").mkdir(exist_ok=True)
                    x, y = self.capture(k)
                    prev = self.root / "random" / f"layer_{k}_seg{seg - 1}.safetensors"

                    def make(spec=spec, prev=prev, seg=seg):
                        net = DLRNet(spec)
                        if seg > 1:
                            net.load_state_dict(load_file(str(prev)))
                        return net

                    split = holdout_split(x.shape[0], 0.1, 0, 128)
                    net, st = fit_module(make, x, y, steps=cfg.steps, lr=cfg.lr, batch_tokens=cfg.batch_tokens,
                                         progress=False, loss="row", grad_clip=1.0, split=split, device=self.device,
                                         desc=f"random layer {k}")
                    rb = error_stats(readback_net(net), x[split[0]].float(), y[split[0]].float())
                    save_file({n: p.detach().cpu().contiguous() for n, p in net.state_dict().items()}, str(path))
                    write_json(meta, {"seconds": st["seconds"], "rel_error_tokens": st["rel_error_tokens"],
                                      "readback_rel_error_tokens": rb["rel_error_tokens"]})
                    print(f"random layer {k} segment {seg}: lock {st['rel_error_tokens']:.4f} read-back "
                          f"{rb['rel_error_tokens']:.4g}", flush=True)
                m = read_json(meta)
                net = DLRNet(spec)
                net.load_state_dict(load_file(str(path)))
                nets[k] = net
                owner += sum(read_json(self.root / "random" / f"layer_{k}_seg{j}.json")["seconds"]
                             for j in range(1, seg + 1))
                errs[k] = {"lock": m["rel_error_tokens"], "readback": m["readback_rel_error_tokens"]}
            if not self.reverse_only(key, nets):
                self.record(key, self.measure(nets, owner, {"recipe": "random", "steps": seg * a.random_steps,
                                                            "layer_errors": errs}, reverse=True))


@torch.no_grad()
def kl_map(model, blocks: torch.Tensor, teacher: list[torch.Tensor], batch_size: int = 8) -> torch.Tensor:
    """KL(original ‖ model) of every predicted token, [sequences, positions] (the teacher's log-probabilities
    per batch of ``batch_size``, as :func:`teacher_logprobs` gives them)."""
    out = []
    for i, t in zip(range(0, blocks.shape[0], batch_size), teacher):
        s = torch.log_softmax(model(input_ids=blocks[i:i + batch_size]).logits[:, :-1].float(), -1)
        t = t.float()
        out.append((t.exp() * (t - s)).sum(-1))
    return torch.cat(out)


def attribute(kl: torch.Tensor, blocks: torch.Tensor, tok, top: int = 8) -> dict:
    """Where a lock's KL sits: the share at each of the first positions and in the rest, and the input tokens
    (the token *at* the position, which the prediction follows) with the largest shares of the total."""
    total = kl.sum().item()
    pos = kl.mean(0)
    ids = blocks[:, :-1].reshape(-1)
    per_tok = torch.zeros(int(ids.max()) + 1).index_add_(0, ids, kl.reshape(-1))
    count = torch.bincount(ids, minlength=per_tok.numel())
    best = per_tok.argsort(descending=True)[:top]
    return {"mean_kl": kl.mean().item(), "position_share": {str(p): kl[:, p].sum().item() / total for p in range(4)},
            "rest_share": kl[:, 4:].sum().item() / total, "mean_kl_by_position_first8": pos[:8].tolist(),
            "mean_kl_after_position_4": kl[:, 4:].mean().item(),
            "top_tokens": [{"token": tok.decode([int(i)]), "share": per_tok[i].item() / total,
                            "count": int(count[i]), "mean_kl": per_tok[i].item() / max(int(count[i]), 1)}
                           for i in best]}


def _rb(net: DLRNet) -> list[torch.Tensor]:
    from weightlock.dlr.modeling_weightlock_dlr import readback_weights

    with torch.no_grad():
        return [t for t in readback_weights(net).values() if t is not None]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    markers = {"structured": "o", "anneal": "s", "penalty": "^", "random": "x"}
    result = {**result, "points": {k: p for k, p in result["points"].items() if p["recipe"] in markers}}
    for recipe, mk in markers.items():
        pts = [p for p in result["points"].values() if p["recipe"] == recipe]
        if not pts:
            continue
        lx = [p["lock"]["worst_ppl_ratio"] for p in pts]
        rx = [p["readback"]["worst_ppl_ratio"] for p in pts]
        where = "all 30 MLPs" if recipe == "structured" else "layers " + result["layers"]
        a.plot(lx, rx, mk + "-", label=f"{recipe} ({where})")
        rev = [p.get("reverse", {}).get("seconds", 0.0) / max(p["owner_seconds"], 1e-9) for p in pts]
        b.plot(lx, [max(r, 1e-3) for r in rev], mk + "-", label=recipe)
    a.axvline(1.05, color="red", lw=1)
    a.axhline(2.0, color="red", lw=1, ls=":")
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel("lock: perplexity ratio (worse of prose, code)")
    a.set_ylabel("read-back: perplexity ratio")
    a.set_title("faithful (left of red) and unreadable (above dotted)?")
    a.legend(fontsize=7)
    b.axhline(1.0, color="red", lw=1)
    b.set_xscale("log")
    b.set_yscale("log")
    b.set_xlabel("lock: perplexity ratio (worse of prose, code)")
    b.set_ylabel("reverse distillation seconds / owner seconds")
    b.set_title("attacker's cost to undo, relative to the owner's")
    b.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M: the price of unreadability (aim: x <= 1.05, read-back >= x2, reverse >= owner)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/smollm2")
    ap.add_argument("--out", default="runs/unreadable")
    ap.add_argument("--recipes", default="structured,anneal,penalty,random")
    ap.add_argument("--layers", default="0,10,20", help="layers the continuation and random recipes lock")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--readouts", default="4096,1024,256,64,16", help="read-outs of the structured recipe")
    ap.add_argument("--start", type=float, default=1024.0, help="the continuation's first read-out")
    ap.add_argument("--end", type=float, default=8.0, help="the continuation's last read-out")
    ap.add_argument("--steps", type=int, default=100, help="repair steps per continuation stage")
    ap.add_argument("--penalty", type=float, default=0.3, help="read-back penalty λ of the penalty recipe")
    ap.add_argument("--lr", type=float, default=1e-2, help="distillation rate (divided by s for the structured start)")
    ap.add_argument("--batch", type=int, default=512, help="tokens per step")
    ap.add_argument("--calib-tokens", type=int, default=32768)
    ap.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens per domain")
    ap.add_argument("--layer-tokens", type=int, default=4096, help="captured tokens per layer for layer_errors")
    ap.add_argument("--random-steps", type=int, default=200)
    ap.add_argument("--random-segments", type=int, default=3)
    ap.add_argument("--reverse-cap", type=int, default=1000, help="most reverse-distillation steps per layer")
    ap.add_argument("--reverse-lr", type=float, default=1e-4)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the device script runs it there)")
    ap.add_argument("--name", default="real_unreadable", help="results file name under bench/results")
    ap.add_argument("--reverse-point", default=None, help="measure this point's reverse distillation again with "
                    "--reverse-long-cap steps a layer (e.g. penalty/s=64)")
    ap.add_argument("--reverse-long-cap", type=int, default=3000)
    ap.add_argument("--table", action="store_true", help="print the recorded result as a markdown table and exit")
    args = ap.parse_args()
    if args.table:
        print(table(read_json(RESULTS / f"{args.name}.json")))
        return
    torch.manual_seed(0)
    bench = Bench(args)
    if args.reverse_point:
        bench.reverse_longer(args.reverse_point, args.reverse_long_cap)
    recipes = args.recipes.split(",") if not args.reverse_point else []
    for r in recipes:
        if r == "structured":
            bench.structured()
        elif r in ("anneal", "penalty"):
            bench.continuation(r, 0.0 if r == "anneal" else args.penalty)
        elif r == "random":
            bench.random()
        elif r == "attribution":
            bench.attribution()
        elif r == "layer_errors":
            bench.layer_errors()
        else:
            raise SystemExit(f"unknown recipe {r!r} (structured, anneal, penalty, random, attribution, layer_errors)")
    result = {"command": "python bench/real_unreadable.py " + " ".join(sys.argv[1:]), "model": args.model,
              "layers": args.layers, "settings": vars(args), "lock_config": asdict(bench.cfg()),
              "points": bench.points, "aim": {"max_ppl_ratio": 1.05, "min_readback_ppl_ratio": 2.0,
                                               "min_reverse_over_owner": 1.0}}
    longs = bench.root / "reverse_long.json"
    for key, long in (read_json(longs) if longs.exists() else {}).items():
        if key in bench.points:
            bench.points[key]["reverse_long"] = long
    result["best"] = best_point(bench.points)
    errors = bench.root / "layer_errors.json"
    result["structured_layer_errors"] = read_json(errors) if errors.exists() else None
    save(args.name, result)
    plot(result, RESULTS / f"{args.name}.png")


def table(result: dict) -> str:
    """The points as a markdown table (what the README quotes, generated from the recorded JSON)."""
    rows = ["| point | MLPs locked | lock ppl ratio (prose / code) | lock top-1 | read-back ppl ratio (worse) | "
            "read-back top-1 | owner s | reverse distillation |", "|---|---|---|---|---|---|---|---|"]
    order = {"structured": 0, "anneal": 1, "penalty": 2, "random": 3}

    def rank(key: str):
        recipe, _, value = key.partition("/")
        number = float(value.split("=")[1])
        return order.get(recipe, 9), -number if "s=" in value else number

    for key, p in sorted(((k, p) for k, p in result["points"].items() if "lock" in p), key=lambda kp: rank(kp[0])):
        lk, rb = p["lock"], p["readback"]
        rev = p.get("reverse")
        if rev is None:
            rtxt = "none needed (the read-back is the original)"
        else:
            n = sum(r["steps"] for r in rev["per_layer"])
            rtxt = (f"{rev['seconds']:.0f} s, {n} steps, " + ("reached" if rev["reached"] else
                    f"not reached in {result['settings']['reverse_cap']} steps a layer"))
            long = p.get("reverse_long")
            if long:
                rtxt += (f"; with up to {long['cap']} steps a layer: {long['seconds']:.0f} s, "
                         f"{sum(r['steps'] for r in long['per_layer'])} steps, "
                         + ("reached" if long["reached"] else "not reached"))
        where = "all 30" if p.get("locked") == "all" else ",".join(map(str, p["layers"]))
        ratio = lambda v: "NaN" if v != v else f"{v:.4f}"  # noqa: E731
        rows.append(f"| {key} | {where} | {ratio(lk['builtin:prose']['ppl_ratio'])} / "
                    f"{ratio(lk['builtin:code']['ppl_ratio'])} | {lk['min_top1_agreement']:.3f} | "
                    f"{ratio(rb['worst_ppl_ratio'])} | {rb['min_top1_agreement']:.3f} | {p['owner_seconds']:.0f} | "
                    f"{rtxt} |")
    return "\n".join(rows)


def best_point(points: dict) -> dict | None:
    """The faithful point (ppl ratio ≤ 1.05) whose read-back is worst; None when no point is faithful."""
    faithful = {k: p for k, p in points.items() if "lock" in p and p["lock"]["worst_ppl_ratio"] <= 1.05}
    if not faithful:
        return None
    k = max(faithful, key=lambda k: faithful[k]["readback"]["worst_ppl_ratio"])
    p = faithful[k]
    rev = p.get("reverse_long") or p.get("reverse", {})
    return {"point": k, "lock_ppl_ratio": p["lock"]["worst_ppl_ratio"],
            "readback_ppl_ratio": p["readback"]["worst_ppl_ratio"],
            "reverse_over_owner": (rev.get("seconds", 0.0) / p["owner_seconds"]) if p["owner_seconds"] else math.inf,
            "reverse_reached": rev.get("reached"),
            "meets_aim": p["readback"]["worst_ppl_ratio"] >= 2.0 and rev.get("seconds", 0.0) >= p["owner_seconds"]}


if __name__ == "__main__":
    main()
