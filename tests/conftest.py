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
