"""The built-in defenses: ``none`` (the unlocked original), ``dlr`` (DLR-Lock) and ``pmp`` (PMP)."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ..dlr.config import LockConfig
from ..io import prepare_out_dir, read_json
from ..pmp.train import PMPConfig
from ..tables import REFERENCE_LABEL, memory_cell
from .base import Defense, DefenseConfig, DefenseHooks, DefenseInfo, register_defense
from .plan import FULL, LORA, AttackSpec, HarnessPlan


@dataclass
class NoneConfig(DefenseConfig):
    """Settings of the ``none`` defense (the unlocked original)."""

    copy: bool = False  # False: the release is the model directory itself; True: a copy in ``out``


class NoneHooks(DefenseHooks):
    @property
    def label(self) -> str:
        return REFERENCE_LABEL


@register_defense("none")
class NoDefense(Defense):
    """The unlocked original: every other defense's attacks are measured against these runs on it."""

    spec = DefenseInfo(
        Config=NoneConfig, title="none",
        description="the unlocked original (no defense): the reference every attack is compared with",
        attacks=(FULL, LORA, AttackSpec("checkpointing", "full", {"checkpointing": "layer"}, "full", "checkpointing")),
        build_options=("overwrite",), hooks=NoneHooks)

    def apply(self, source, out: Path, overwrite: bool = True) -> Path:
        if not self.cfg.copy:
            return Path(source)
        out = prepare_out_dir(out, overwrite=overwrite, inputs=(source,))
        for f in sorted(Path(source).iterdir()):
            if f.is_file():
                shutil.copy2(f, out / f.name)
        return out


class DLRHooks(DefenseHooks):
    cfg: LockConfig

    @property
    def label(self) -> str:
        return "DLR-locked"

    def build_title(self) -> str:
        return f"lock the base model with DLR-Lock (rank {self.cfg.rank})"

    def attack_options(self, spec: AttackSpec, out: Path, plan: HarnessPlan) -> dict:
        steps = getattr(plan, "reverse_distill_steps", None)
        return {"distill_steps": steps} if spec.attack == "reverse-distill" and steps else {}

    def evaluate(self, release: Path, out: Path, plan: HarnessPlan) -> dict:
        from ..eval.cost import depth_linearity

        spec = read_json(release / "lock_report.json")["layers"][0]["spec"]
        return {"memory_vs_depth": depth_linearity(spec["width"], spec["rank"], list(plan.memory_depths), 256)}

    def summarize(self, rows: list[dict], out: Path, plan: HarnessPlan) -> dict:
        """The memory–time frontier (plain, checkpointed and LoRA fine-tuning on the original and the lock, first
        task) and the per-layer distillation error."""
        names = {"reference": "original", self.defense.name: self.label}
        frontier = [{"model": names[r["defense"]], "strategy": "none" if r["attack"] == "full" else r["attack"],
                     "saved_activation_bytes": r["saved_activation_bytes"], "step_time_s": r["step_time_s"]}
                    for r in rows if r["defense"] in names and r["attack"] in ("full", "checkpointing", "lora")
                    and r["task"] == plan.tasks[0]]
        layers = read_json(out / "lock_report.json")["layers"]
        return {"frontier": frontier, "layer_rel_error": [l["rel_error"] for l in layers]}

    def verdict_notes(self, rows: list[dict], summary: dict) -> list[str]:
        full = [r for r in rows if r["defense"] == self.defense.name and r["attack"] == "full"]
        if not (full and full[0]["memory_ratio"]):
            return []
        f = full[0]
        memory = memory_cell(f)  # training memory ÷ the original full fine-tune's, as the table shows it
        return [f"full fine-tuning costs {f['memory_ratio']:.1f}× activation memory"
                + (f", {memory}× training memory" if memory != "n/a" else "")
                + (f" ({f['peak_ratio']:.1f}× measured RSS peak growth)" if f.get("peak_ratio") else "")
                + f", {f['time_ratio']:.1f}× time"]

    def report(self, summary: dict) -> list:
        """Its summary's memory vs depth, memory–time frontier and per-layer error, drawn beside the bench's."""
        from ..tables import Panels

        mem = summary.get("memory_vs_depth")
        return [Panels(file, items) for file, items in (
            ("memory_vs_depth.png", [(f"demo (d={mem['d']}, r={mem['rank']})", mem)] if mem else []),
            ("frontier.png", [("demo", summary["frontier"])] if summary.get("frontier") else []),
            ("layer_error.png", [("demo", summary["layer_rel_error"])] if summary.get("layer_rel_error") else []),
        ) if items]


@register_defense("dlr")
class DLRLockDefense(Defense):
    """DLR-Lock: every MLP replaced by a deep low-rank residual network distilled from it."""

    spec = DefenseInfo(
        Config=LockConfig, title="DLR-Lock",
        description="every MLP replaced by a deep low-rank residual network distilled from it (weightlock lock)",
        workdir="locked",
        attacks=(FULL, LORA, AttackSpec("checkpointing", "full", {"checkpointing": "dlr"}, "full", "checkpointing"),
                 AttackSpec("reverse-distill", "reverse-distill", {}, "full", "full")),
        evaluations=("memory_vs_depth",),
        build_options=("overwrite", "restart", "keep_work"),  # as ``weightlock lock``'s flags
        finished_file="lock_report.json", hooks=DLRHooks)

    def apply(self, source, out: Path, overwrite: bool = True, restart: bool = False, keep_work: bool = False) -> Path:
        from ..dlr.lock import lock

        lock(source, out, self.cfg, overwrite=overwrite, restart=restart, keep_work=keep_work)
        return Path(out)


def mask_file(out: Path) -> Path:
    """The private mask a PMP build into ``out`` leaves (never part of the release)."""
    return Path(out) / "private" / "mask.safetensors"


class PMPHooks(DefenseHooks):
    cfg: PMPConfig

    @property
    def label(self) -> str:
        return f"PMP ({self.cfg.variant})"

    def build_title(self) -> str:
        return f"pretrain a PMP model ({self.cfg.variant}, ρ={self.cfg.mask_ratio}), same settings"

    def attack_options(self, spec: AttackSpec, out: Path, plan: HarnessPlan) -> dict:
        if spec.attack == "masked":
            return {"mask": str(mask_file(out))}
        if spec.attack == "mask-recover":
            return {"mask_ratio": self.cfg.mask_ratio}
        return {}

    def evaluate(self, release: Path, out: Path, plan: HarnessPlan) -> dict:
        """Every mask-recovery attack's IoU with the true mask, against chance."""
        from ..data import load_blocks, load_tokenizer
        from ..models.hub import load
        from ..pmp import load_mask
        from ..pmp.recover import recover_all

        tok = load_tokenizer(release)
        mask, _, _ = load_mask(mask_file(out))
        public = load_blocks("builtin:code", "train", tok, plan.block_size, 50_000)
        return {"mask_recovery": recover_all(load(release), mask, self.cfg, tok, public)}

    def summarize(self, rows: list[dict], out: Path, plan: HarnessPlan) -> dict:
        """Gains at the mask ratio ρ, and of the dense original as ρ = 1 (every entry trained)."""
        gains = []
        for r in rows:
            if r["defense"] == self.defense.name:
                gains.append({"ratio": self.cfg.mask_ratio, "task": r["task"], "method": r["attack"],
                              "gain": r["gain"]})
            elif r["defense"] == "reference" and r["attack"] in ("full", "lora"):
                gains.append({"ratio": 1.0, "task": r["task"], "method": r["attack"], "gain": r["gain"]})
        return {"pmp_gain_vs_ratio": gains}

    def verdict_notes(self, rows: list[dict], summary: dict) -> list[str]:
        rec = summary.get("mask_recovery")
        if not rec:
            return []
        b = rec["best"]
        return [f"best mask recovery ({b['attack']}) IoU {b['iou']:.2f} vs chance {rec['chance_iou']:.2f}"
                + (" — the mask leaks" if b["excess_over_chance"] > 0.05 else " — at chance")]

    def summary_lines(self, summary: dict) -> list[str]:
        rec = summary.get("mask_recovery")
        if not rec:
            return []
        return [f"PMP mask recovery: best {rec['best']['attack']} IoU {rec['best']['iou']:.3f} "
                f"(chance {rec['chance_iou']:.3f})"]

    def report(self, summary: dict) -> list:
        """Its summary's gains per mask ratio and mask recovery against chance, drawn beside the bench's."""
        from ..tables import Panels

        rec, gains = summary.get("mask_recovery"), summary.get("pmp_gain_vs_ratio")
        return [Panels(file, items) for file, items in (
            ("gain_vs_ratio.png", [("demo", gains)] if gains else []),
            ("mask_recovery.png", [(f"hardened (demo, ρ={rec['mask_ratio']})", rec)] if rec else []),
        ) if items]


@register_defense("pmp")
class PMPDefense(Defense):
    """PMP: pretraining that updates only a private mask's entries; the owner fine-tunes with the mask."""

    spec = DefenseInfo(
        Config=PMPConfig, title="PMP",
        description=("private-mask pretraining: only a secret mask of the weights is trained; the owner's "
                     "authorized fine-tuning uses the mask (weightlock pretrain --method pmp)"),
        pretraining=True, workdir="pmp",
        attacks=(FULL, LORA, AttackSpec("mask-recover", "mask-recover", {"method": "spectral"}, "masked", "full")),
        authorized=AttackSpec("masked (authorized)", "masked", {}, "masked", "full"),
        evaluations=("mask_recovery",),
        build_options=("overwrite", "resume"),  # as ``weightlock pretrain``'s flags
        finished_file="pmp_run.json", release_subdir="release", hooks=PMPHooks)
    mask_file = staticmethod(mask_file)

    def apply(self, source, out: Path, overwrite: bool = True, resume: bool = False) -> Path:
        from ..pmp.train import pretrain_pmp

        pretrain_pmp(source, self.cfg, out, overwrite=overwrite, resume=resume)
        return Path(out) / self.spec.release_subdir


__all__ = ["NoneConfig", "NoDefense", "DLRLockDefense", "PMPDefense", "NoneHooks", "DLRHooks", "PMPHooks", "mask_file"]
