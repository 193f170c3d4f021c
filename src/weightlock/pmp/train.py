"""Private-mask pretraining (PMP): early-bird mask discovery, rewind, masked pretraining, secret-safe output.

Both stages run in the one training loop; the mask is just two hooks:
* :class:`EarlyBirdHook` (Stage I) takes the top-ρ of |grad| every step and stops once the IoU of
  consecutive masks stays ≥ threshold for ``patience`` steps (or at a step cap);
* :class:`MaskHook` (Stage II) zeroes complement gradients before clipping and, after every optimizer
  step, writes the complement entries back bit for bit — so Adam updates and weight decay never move
  them (the ``paper`` variant instead leaves decay on and rescales the complement into an L2 ball).
"""
from __future__ import annotations

import os
import secrets
from dataclasses import asdict, dataclass

import torch

from ..errors import WeightlockError
from ..io import sha256_file, write_json
from ..train.loop import Hook, TrainConfig, Trainer
from .mask import Mask, chance_iou, mask_density, mask_iou, save_mask, topk_mask

PAPER_SEED = 42


@dataclass
class PMPConfig:
    """Settings of PMP. ``variant='paper'`` reproduces the authors' script; ``hardened`` is the default."""

    mask_ratio: float = 0.3
    variant: str = "hardened"  # hardened | paper
    pool: str = "linear"  # all | linear (2-D weights of linear layers) | no-embed-norm
    per_tensor: bool = False
    iou_threshold: float = 0.99
    patience: int = 5
    discovery_max_steps: int = 100
    rewind: bool = True  # False: keep the Stage-I (warm-up) weights
    projection_every: int = 0  # paper: rescale the complement into an L2 ball every τ steps
    projection_radius: float = 2.0

    def validate(self) -> None:
        if not 0.0 < self.mask_ratio <= 1.0:
            raise WeightlockError(f"mask ratio must be in (0, 1], got {self.mask_ratio}")
        if self.variant not in ("hardened", "paper"):
            raise WeightlockError(f"unknown PMP variant {self.variant!r} (hardened, paper)")
        if self.pool not in ("all", "linear", "no-embed-norm"):
            raise WeightlockError(f"unknown pool {self.pool!r} (all, linear, no-embed-norm)")

    @classmethod
    def paper(cls, mask_ratio: float) -> "PMPConfig":
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
    """Stage I: the top-ρ |grad| mask each step; stop when it has stabilised."""

    def __init__(self, params: dict[str, torch.nn.Parameter], cfg: PMPConfig) -> None:
        self.params, self.cfg = params, cfg
        self.mask: Mask | None = None
        self.ious: list[float] = []
        self.stable = 0

    def transform_gradients(self, trainer) -> None:
        grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in self.params.items()}
        new = topk_mask(grads, self.cfg.mask_ratio, self.cfg.per_tensor)
        if self.mask is not None:
            iou = mask_iou(self.mask, new)
            self.ious.append(iou)
            self.stable = self.stable + 1 if iou >= self.cfg.iou_threshold else 0
            if self.stable >= self.cfg.patience:
                trainer.should_stop = True
        self.mask = new


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


def pretrain_pmp(cfg, pmp: PMPConfig, out: str | os.PathLike, overwrite: bool = False) -> dict:
    """PMP pretraining into ``out/release`` (dense weights, public) and ``out/private`` (mask, seed: 0600).

    ``cfg`` is a :class:`weightlock.train.pretrain.PretrainConfig`; Stage II uses its training settings,
    so ``--method dense`` with the same config is the baseline with identical optimizer, data and tokens.
    """
    from ..data import load_blocks, load_tokenizer
    from ..io import prepare_out_dir
    from ..train.pretrain import build_model, pretrain

    pmp.validate()
    out = prepare_out_dir(out, overwrite=overwrite)
    release, private = out / "release", out / "private"
    private.mkdir(mode=0o700)
    init_seed = PAPER_SEED if pmp.variant == "paper" else secrets.randbits(63)
    tok = load_tokenizer(None, cfg.vocab_size)
    seed_backup = cfg.train.seed
    cfg.train.seed = init_seed
    model = build_model(cfg, tok)  # the (secret) initialisation
    cfg.train.seed = seed_backup
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = pooled_parameters(model, pmp.pool)

    train_blocks = load_blocks(cfg.data, "train", tok, cfg.block_size, cfg.train_tokens)
    stage1 = TrainConfig(**{**asdict(cfg.train), "max_steps": pmp.discovery_max_steps, "schedule": "constant",
                            "checkpoint_every": 0, "eval_every": 10**9})
    eb = EarlyBirdHook(params, pmp)
    Trainer(model, train_blocks, stage1, hooks=[eb]).fit(resume=False)
    discovery = {"steps": len(eb.ious) + 1, "ious": eb.ious, "converged": eb.stable >= pmp.patience}
    if pmp.rewind:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(w0[n])
    hook = MaskHook(params, eb.mask, restore_complement=pmp.variant != "paper",
                    projection_every=pmp.projection_every, projection_radius=pmp.projection_radius)
    metrics = pretrain(cfg, release, model=model, hooks=[hook])
    salt = secrets.token_bytes(32)
    commit = save_mask(eb.mask, private / "mask.safetensors", salt)
    secrets_file = private / "secrets.json"
    write_json(secrets_file, {"init_seed": init_seed, "salt": salt.hex(), "commitment": commit,
                              "pmp": asdict(pmp)})
    os.chmod(secrets_file, 0o600)
    files = {p.name: sha256_file(p) for p in sorted(release.iterdir()) if p.is_file()}
    write_json(release / "manifest.json", {
        "kind": "weightlock-pmp", "mask_commitment": commit, "files": files,
        "pmp": {"mask_ratio": pmp.mask_ratio, "variant": pmp.variant, "pool": pmp.pool},
    })
    summary = {"discovery": discovery, "density": mask_density(eb.mask), "chance_iou": chance_iou(pmp.mask_ratio),
               "val_ppl": metrics["val_ppl"], "release": str(release), "private": str(private)}
    write_json(out / "pmp_run.json", summary)
    return summary
