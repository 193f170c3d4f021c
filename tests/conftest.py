import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Every test session gets its own weightlock cache (tokenizer, token blocks)."""
    os.environ["WEIGHTLOCK_CACHE"] = str(tmp_path_factory.mktemp("wlcache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    yield


@pytest.fixture(scope="session")
def tokenizer(_isolated_cache):
    from weightlock.data import builtin_tokenizer

    return builtin_tokenizer()


def tiny_config(**overrides):
    from weightlock.train.pretrain import default_config

    cfg = default_config("tiny", **overrides)
    cfg.train.progress = False
    return cfg


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny model pretrained once per session on builtin:code."""
    from weightlock.train.pretrain import pretrain

    out = tmp_path_factory.mktemp("tiny") / "model"
    metrics = pretrain(tiny_config(), out)
    return out, metrics


@pytest.fixture(scope="session")
def tiny_locked_dir(tmp_path_factory, tiny_model_dir):
    """The session's tiny model, DLR-locked once (rank 8, few distillation steps)."""
    from weightlock.dlr import LockConfig, lock

    model, _ = tiny_model_dir
    out = tmp_path_factory.mktemp("tinylock") / "locked"
    lock(model, out, LockConfig(rank=8, steps=150, calib_tokens=8192, batch_tokens=512, progress=False))
    return out


@pytest.fixture(scope="session")
def pmp_kit(tmp_path_factory, tokenizer):
    """A small PMP run made by the pipeline (``pretrain_pmp``, what ``weightlock pretrain --method pmp`` runs), and
    what its Stage II held in memory, as a training run leaves it next to a model: the weights it started from
    (the rewound initialisation), the (masked) gradients and Adam moments of its second step and the weights
    after it (an earlier checkpoint). A dict: release, private, init, grads, moments, checkpoint."""
    from weightlock.models.save import dedupe_shared
    from weightlock.pmp import MaskHook, PMPConfig, pretrain_pmp
    from weightlock.train.loop import Hook

    class Capture(Hook):
        def __init__(self):
            self.got = {}

        def _stage2(self, trainer):
            return any(isinstance(h, MaskHook) for h in trainer.hooks)

        def _state(self, trainer):
            return dedupe_shared({k: v.detach().clone() for k, v in trainer.raw_model.state_dict().items()})

        def on_train_start(self, trainer):
            if self._stage2(trainer):
                self.got["init"] = self._state(trainer)

        def transform_gradients(self, trainer):  # after the mask hook zeroed the complement's gradients
            if self._stage2(trainer) and trainer.step == 1:
                self.got["grads"] = {n: p.grad.detach().clone() for n, p in trainer.raw_model.named_parameters()
                                     if p.grad is not None}

        def after_optimizer_step(self, trainer):
            if self._stage2(trainer) and trainer.step == 1:
                names = {id(p): n for n, p in trainer.raw_model.named_parameters()}
                self.got["moments"] = {f"state.{names[id(p)]}.{k}": v.detach().clone()
                                       for p, st in trainer.optimizer.state.items() for k, v in st.items()
                                       if k in ("exp_avg", "exp_avg_sq")}

        def on_step_end(self, trainer, metrics):
            if self._stage2(trainer) and trainer.step == 2:
                self.got["checkpoint"] = self._state(trainer)

    run = tmp_path_factory.mktemp("pmprun") / "run"
    cap = Capture()
    pretrain_pmp(tiny_config(max_steps=3, train_tokens=30_000), PMPConfig(mask_ratio=0.3, discovery_max_steps=3), run,
                 hooks=[cap])
    assert set(cap.got) == {"init", "grads", "moments", "checkpoint"}, set(cap.got)
    return {"release": run / "release", "private": run / "private", **cap.got}
