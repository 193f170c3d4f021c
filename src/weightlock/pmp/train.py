"""Private-mask pretraining (PMP): early-bird mask discovery, rewind, masked pretraining, secret-safe output.

Both stages run in the one training loop; the mask is just two hooks:
* :class:`EarlyBirdHook` (Stage I) takes the top-ρ of |grad| every step and stops once the IoU of
  consecutive masks stays ≥ threshold for ``patience`` steps (or at a step cap);
* :class:`MaskHook` (Stage II) zeroes complement gradients before clipping and, after every optimizer
  step, writes the complement entries back bit for bit — so Adam updates and weight decay never move
  them (the ``paper`` variant instead leaves decay on and rescales the complement into an L2 ball).
"""
from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch

from ..config import check_types, choice, option
from ..errors import WeightlockError
from ..io import write_json, write_manifest
from ..schema import PMP_RUN, SCHEMA_VERSION
from ..train.loop import Hook, TrainConfig, Trainer
from .allowlist import PMP_KIND
from .mask import Mask, chance_iou, mask_density, mask_iou, save_mask, topk_mask

PAPER_SEED = 42


@dataclass
class PMPConfig:
    """Settings of PMP. ``variant='paper'`` reproduces the authors' script; ``hardened`` is the default.

    Validated at construction; code that changes a field afterwards calls :meth:`validate` again
    (``pretrain_pmp`` does, before any work)."""

    mask_ratio: float = option(0.3, "Fraction ρ of the pooled weight entries that are trained (the private "
                               "mask); the rest keep their initial values.")
    variant: Literal["hardened", "paper"] = choice("hardened", "PMP variant", "hardened (the complement entries "
                                                   "written back bit for bit after every step) or paper (the "
                                                   "authors' script: the complement left to weight decay, a fixed "
                                                   "seed; `pretrain` also takes the script's other settings).")
    pool: Literal["all", "linear", "no-embed-norm"] = choice("linear", "pool", "Which parameters the mask covers "
                                                             "(the others train densely): all, linear (the 2-D "
                                                             "weights of linear layers) or no-embed-norm (every "
                                                             "2-D weight but the embeddings).")
    per_tensor: bool = option(False, "Take the top-ρ entries within each tensor (default: over the whole pool).")
    iou_threshold: float = option(0.99, "Stage I (early-bird discovery) stops once consecutive masks' IoU stays "
                                  "at least this for --patience steps.")
    patience: int = option(5, "Steps in a row at --iou-threshold before the early-bird mask is taken.")
    discovery_max_steps: int = option(100, "Step cap of Stage I (mask discovery).")
    rewind: bool = option(True, "Rewind to the initial weights before Stage II (off: keep the Stage-I warm-up "
                          "weights).")
    projection_every: int = option(0, "Rescale the complement into an L2 ball every this many steps (the "
                                   "authors' script: 50; 0: never).")
    projection_radius: float = option(2.0, "Radius of that L2 ball.")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (types and ranges); raise :class:`WeightlockError` on the first bad one."""
        check_types(self, "PMP config")
        if not 0.0 < self.mask_ratio <= 1.0:
            raise WeightlockError(f"mask ratio must be in (0, 1], got {self.mask_ratio}")
        if not 0.0 < self.iou_threshold <= 1.0:
            raise WeightlockError(f"iou_threshold must be in (0, 1], got {self.iou_threshold}")
        if self.patience < 1 or self.discovery_max_steps < 1 or self.projection_every < 0:
            raise WeightlockError("patience and discovery_max_steps must be ≥ 1, projection_every ≥ 0")
        if not self.projection_radius > 0:
            raise WeightlockError(f"projection_radius must be positive, got {self.projection_radius}")

    @classmethod
    def paper(cls, mask_ratio: float) -> "PMPConfig":
        """The settings of the authors' script (``variant='paper'``) at ``mask_ratio``."""
        return cls(mask_ratio=mask_ratio, variant="paper", pool="all", iou_threshold=0.99, patience=5,
                   discovery_max_steps=500, rewind=True, projection_every=50, projection_radius=2.0)


def pooled_parameters(model: torch.nn.Module, pool: str) -> dict[str, torch.nn.Parameter]:
    """The parameters a mask covers (others train densely)."""
    out = {}
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    seen = set()
    for n, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if pool == "all" or (pool == "linear" and id(p) in linear) or \
                (pool == "no-embed-norm" and p.ndim >= 2 and "embed" not in n):
            out[n] = p
    return out


class EarlyBirdHook(Hook):
    """Stage I: the top-ρ |grad| mask each step; stop when it has stabilised.

    Its state (the current mask, the IoU history, the stable count) travels through checkpoints, so an
    interrupted discovery continues exactly where it stopped.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], cfg: PMPConfig) -> None:
        self.params, self.cfg = params, cfg
        self.mask: Mask | None = None
        self.ious: list[float] = []
        self.stable = 0

    @property
    def converged(self) -> bool:
        """Whether the mask has been stable (IoU ≥ ``iou_threshold``) for ``patience`` steps in a row."""
        return self.stable >= self.cfg.patience

    def on_train_start(self, trainer) -> None:
        if self.converged:  # resumed from a checkpoint written at the very step discovery stopped
            trainer.should_stop = True

    def transform_gradients(self, trainer) -> None:
        grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in self.params.items()}
        new = topk_mask(grads, self.cfg.mask_ratio, self.cfg.per_tensor)
        if self.mask is not None:
            iou = mask_iou(self.mask, new)
            self.ious.append(iou)
            self.stable = self.stable + 1 if iou >= self.cfg.iou_threshold else 0
            if self.converged:
                trainer.should_stop = True
        self.mask = new

    def state_dict(self) -> dict:
        mask = None if self.mask is None else {n: m.detach().cpu() for n, m in self.mask.items()}
        return {"mask": mask, "ious": list(self.ious), "stable": self.stable}

    def load_state_dict(self, state: dict) -> None:
        mask = state.get("mask")
        if mask is not None and set(mask) != set(self.params):
            raise WeightlockError("early-bird checkpoint covers other parameters than this run's mask pool")
        self.mask = None if mask is None else {n: mask[n].to(p.device).bool() for n, p in self.params.items()}
        self.ious = [float(x) for x in state.get("ious", [])]
        self.stable = int(state.get("stable", 0))


class MaskHook(Hook):
    """Stage II (and authorized fine-tuning): only masked entries of the pooled parameters change."""

    def __init__(self, params: dict[str, torch.nn.Parameter], mask: Mask, restore_complement: bool = True,
                 projection_every: int = 0, projection_radius: float = 2.0) -> None:
        for n, p in params.items():
            if n not in mask:
                raise WeightlockError(f"mask has no entry for parameter {n!r}")
            if tuple(mask[n].shape) != tuple(p.shape):
                raise WeightlockError(f"mask shape {tuple(mask[n].shape)} for {n!r} does not match the "
                                      f"parameter's {tuple(p.shape)}: a mask for another model?")
        self.params = params
        self.mask = {n: mask[n].to(p.device) for n, p in params.items()}
        self.restore = restore_complement
        self.every, self.radius = projection_every, projection_radius
        self.frozen: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer) -> None:
        self.frozen = {n: p.detach().clone() for n, p in self.params.items()}

    def transform_gradients(self, trainer) -> None:
        for n, p in self.params.items():
            if p.grad is not None:
                p.grad.mul_(self.mask[n])

    @torch.no_grad()
    def after_optimizer_step(self, trainer) -> None:
        if self.restore:
            for n, p in self.params.items():
                p.copy_(torch.where(self.mask[n], p, self.frozen[n]))
        if self.every and trainer.step % self.every == 0:  # paper: complement into a global L2 ball
            norm = torch.sqrt(sum(((~self.mask[n]) * p).pow(2).sum() for n, p in self.params.items()))
            if norm > self.radius:
                scale = self.radius / norm
                for n, p in self.params.items():
                    p.copy_(torch.where(self.mask[n], p, p * scale))


CONFIG_FILE = "pmp_config.json"  # the run's settings (not secret), for --resume
SUMMARY_FILE = "pmp_run.json"  # written last: the run is finished


def pretrain_pmp(cfg, pmp: PMPConfig, out: str | os.PathLike, overwrite: bool = False, resume: bool = False,
                 hooks: Sequence[Hook] = ()) -> dict:
    """PMP pretraining into ``out/release`` (dense weights, public) and ``out/private`` (mask, seed: 0600).

    ``cfg`` is a :class:`weightlock.train.pretrain.PretrainConfig`; Stage II uses its training settings,
    so ``--method dense`` with the same config is the baseline with identical optimizer, data and tokens.

    While it runs, everything lives in ``out/private`` (0700): ``secrets.json`` (init seed, salt) from the
    start, the Stage-I checkpoint ``stage1/`` (its early-bird state holds the mask), then ``mask.safetensors``
    and Stage II's working directory ``stage2/`` with its checkpoints (their optimizer moments would reveal
    the mask). ``out/release`` is filled only once Stage II has finished. Both stages checkpoint every
    ``checkpoint_every`` steps and on Ctrl-C; ``resume=True`` continues an interrupted run with the settings
    saved in ``out`` (``cfg`` and ``pmp`` are then ignored) and ends bit-identical to an uninterrupted run.
    ``hooks`` are extra training hooks, run in both stages after the PMP hook.
    """
    from ..data import load_blocks, load_tokenizer
    from ..io import move_dir_contents, prepare_out_dir, read_json
    from ..train.pretrain import PretrainConfig, build_model, pretrain

    out = Path(out)
    if resume and (out / CONFIG_FILE).exists():
        saved = read_json(out / CONFIG_FILE)
        if saved.get("kind") != "pretrain-pmp":
            raise WeightlockError(f"{out / CONFIG_FILE}: not the settings of a PMP run")
        progress = cfg.train.progress
        cfg, pmp = PretrainConfig.from_dict(saved["config"]), PMPConfig(**saved["pmp"])
        cfg.train.progress = progress
        if (out / SUMMARY_FILE).exists():  # already finished
            _remove_work(out / "private")
            return read_json(out / SUMMARY_FILE)
    elif resume and out.is_dir() and any(out.iterdir()):
        raise WeightlockError(f"{out}: no {CONFIG_FILE} here, so not an interrupted PMP run; nothing to resume "
                              "(start again with --overwrite)")
    cfg.validate()
    pmp.validate()
    out = prepare_out_dir(out, overwrite=overwrite, resume=resume,
                          hint="pass --overwrite to replace it or --resume to continue a run")
    write_json(out / CONFIG_FILE, {"kind": "pretrain-pmp", "config": cfg.to_dict(), "pmp": asdict(pmp)})
    release, private = out / "release", out / "private"
    private.mkdir(mode=0o700, exist_ok=True)
    _restrict(private)  # also what an interrupted run of an older version left readable
    secrets_file = private / "secrets.json"
    if secrets_file.exists():
        saved_secrets = read_json(secrets_file)
        init_seed, salt = int(saved_secrets["init_seed"]), bytes.fromhex(saved_secrets["salt"])
    else:
        init_seed = PAPER_SEED if pmp.variant == "paper" else secrets.randbits(63)
        salt = secrets.token_bytes(32)
        with _private_files():
            _write_secret(secrets_file, {"init_seed": init_seed, "salt": salt.hex(), "pmp": asdict(pmp)})

    tok = load_tokenizer(None, cfg.vocab_size)
    seed_backup = cfg.train.seed
    cfg.train.seed = init_seed
    model = build_model(cfg, tok)  # the (secret) initialisation, regenerated exactly on resume
    cfg.train.seed = seed_backup
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = pooled_parameters(model, pmp.pool)

    # Stage I: its final checkpoint is kept until the run is finished, so a resumed run restores the
    # discovered mask (and, without rewind, the Stage-I weights) from it without training again
    train_blocks = load_blocks(cfg.data, "train", tok, cfg.block_size, cfg.train_tokens)
    stage1 = TrainConfig(**{**asdict(cfg.train), "max_steps": pmp.discovery_max_steps, "schedule": "constant",
                            "eval_every": 10**9})
    eb = EarlyBirdHook(params, pmp)
    with _private_files():  # its checkpoints (the early-bird mask, optimizer state) are 0600, directories 0700
        trainer1 = Trainer(model, train_blocks, stage1, hooks=[eb, *hooks], checkpoint_dir=private / "stage1")
        trainer1.fit(resume=True)
        trainer1.save_checkpoint()
    if eb.mask is None:
        raise WeightlockError("early-bird discovery ended without a mask (no Stage-I step ran)")
    discovery = {"steps": len(eb.ious) + 1, "ious": eb.ious, "converged": eb.converged}
    with _private_files():
        commit = save_mask(eb.mask, private / "mask.safetensors", salt)
        _write_secret(secrets_file, {"init_seed": init_seed, "salt": salt.hex(), "commitment": commit,
                                     "pmp": asdict(pmp)})
    if pmp.rewind:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(w0[n])

    # Stage II in the private working directory, then moved into the release
    stage2, stage2_done = private / "stage2", private / "stage2.done"
    if not stage2_done.exists():
        hook = MaskHook(params, eb.mask, restore_complement=pmp.variant != "paper",
                        projection_every=pmp.projection_every, projection_radius=pmp.projection_radius)
        with _private_files():  # Stage II's working directory and checkpoints (moved out: see below)
            pretrain(cfg, stage2, resume=True, model=model, hooks=[hook, *hooks])
            stage2_done.write_text("")
    if stage2.exists():
        move_dir_contents(stage2, release)  # the release's files get the usual mode (0666 less the umask)
    metrics = read_json(release / "metrics.json")
    write_manifest(release, kind=PMP_KIND, mask_commitment=commit,
                   pmp={"mask_ratio": pmp.mask_ratio, "variant": pmp.variant, "pool": pmp.pool})
    summary = {"kind": PMP_RUN, "schema_version": SCHEMA_VERSION, "discovery": discovery,
               "density": mask_density(eb.mask), "chance_iou": chance_iou(pmp.mask_ratio),
               "val_ppl": metrics["val_ppl"], "release": str(release), "private": str(private)}
    write_json(out / SUMMARY_FILE, summary)
    _remove_work(private)
    _restrict(private)
    return summary


@contextlib.contextmanager
def _private_files():
    """While it lasts, new files are created 0600 and directories 0700 (umask 077; every weightlock writer
    applies the umask), so nothing written under ``private/`` is ever readable by others, even briefly."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def _restrict(private: Path) -> None:
    """``private`` and every directory under it 0700, every file 0600."""
    os.chmod(private, 0o700)
    for root, dirs, files in os.walk(private):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o700)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o600)


def _write_secret(path: Path, obj: dict) -> None:
    write_json(path, obj)
    os.chmod(path, 0o600)


def _remove_work(private: Path) -> None:
    """Drop the checkpoints and working files of a finished run (the mask and secrets.json stay)."""
    import shutil

    for name in ("stage1", "stage1.tmp", "stage1.old", "stage2"):
        shutil.rmtree(private / name, ignore_errors=True)
    (private / "stage2.done").unlink(missing_ok=True)
