import json
import os
import shutil
import signal
import stat

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_config
from weightlock.cli import app
from weightlock.errors import WeightlockError
from weightlock.pmp import (
    EarlyBirdHook,
    MaskHook,
    PMPConfig,
    chance_iou,
    check_release,
    load_mask,
    mask_iou,
    pooled_parameters,
    pretrain_pmp,
    save_mask,
    topk_mask,
    verify,
)
from weightlock.train.loop import Hook, TrainConfig, Trainer

runner = CliRunner()


def test_topk_mask_is_exact_and_matches_a_sort():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.randn(37, 11, generator=g), "b": torch.randn(5, generator=g),
              "c": torch.randn(8, 8, generator=g)}
    flat = torch.cat([s.reshape(-1).abs() for s in scores.values()])
    for ratio in (0.01, 0.1, 0.3, 0.5, 0.9, 1.0):
        m = topk_mask(scores, ratio)
        k = round(ratio * flat.numel())
        got = torch.cat([m[n].reshape(-1) for n in scores])
        assert int(got.sum()) == k
        assert torch.equal(got, torch.zeros_like(got).index_fill(0, flat.topk(k).indices, True))
    ties = {"t": torch.ones(10)}
    assert int(topk_mask(ties, 0.3)["t"].sum()) == 3
    per = topk_mask(scores, 0.5, per_tensor=True)
    assert all(int(per[n].sum()) == round(0.5 * s.numel()) for n, s in scores.items())
    with pytest.raises(WeightlockError, match="mask ratio"):
        topk_mask(scores, 0.0)
    assert chance_iou(0.5) == pytest.approx(1 / 3)


def test_mask_bitpacking_round_trip_and_mode(tmp_path):
    g = torch.Generator().manual_seed(1)
    m = {"x.weight": torch.rand(13, 7, generator=g) < 0.3, "y": torch.rand(3, generator=g) < 0.5}
    c = save_mask(m, tmp_path / "mask.safetensors", b"salt")
    back, salt, _ = load_mask(tmp_path / "mask.safetensors")
    assert salt == b"salt" and all(torch.equal(back[n], m[n]) for n in m) and mask_iou(back, m) == 1.0
    assert stat.S_IMODE(os.stat(tmp_path / "mask.safetensors").st_mode) == 0o600
    assert (tmp_path / "mask.safetensors").stat().st_size < 13 * 7 // 8 + 200 + 300  # 1 bit per entry + header
    assert len(c) == 64


def _tiny_model_and_blocks(tokenizer):
    from weightlock.data import load_blocks
    from weightlock.train.pretrain import build_model

    cfg = tiny_config()
    return build_model(cfg, tokenizer), load_blocks("builtin:code", "train", tokenizer, 64, 40_000)


def test_stage2_complement_is_bit_identical(tokenizer):
    model, blocks = _tiny_model_and_blocks(tokenizer)
    params = pooled_parameters(model, "linear")
    g = torch.Generator().manual_seed(0)
    mask = {n: torch.rand(p.shape, generator=g) < 0.3 for n, p in params.items()}
    before = {n: p.detach().clone() for n, p in params.items()}
    Trainer(model, blocks, TrainConfig(max_steps=5, batch_size=8, progress=False, weight_decay=0.1),
            hooks=[MaskHook(params, mask)]).fit(resume=False)
    for n, p in params.items():
        assert torch.equal(p[~mask[n]], before[n][~mask[n]]), n
        assert not torch.equal(p[mask[n]], before[n][mask[n]]), n


def test_pmp_pretraining_release_has_no_secrets(tmp_path, tokenizer):
    cfg = tiny_config(max_steps=10, train_tokens=30_000)
    r = pretrain_pmp(cfg, PMPConfig(mask_ratio=0.3, discovery_max_steps=8, patience=2, iou_threshold=0.5),
                     tmp_path / "run")
    release, private = tmp_path / "run" / "release", tmp_path / "run" / "private"
    assert abs(r["density"] - 0.3) < 1e-3
    assert check_release(release) == []
    assert stat.S_IMODE(os.stat(private / "mask.safetensors").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(private / "secrets.json").st_mode) == 0o600
    assert "init_seed" in json.loads((private / "secrets.json").read_text())
    assert verify(release, private / "mask.safetensors")
    res = runner.invoke(app, ["pmp", "verify", "--release", str(release), "--mask", str(private / "mask.safetensors")])
    assert res.exit_code == 0 and "verified" in res.output
    res = runner.invoke(app, ["release", "check", str(release)])
    assert res.exit_code == 0 and "clean" in res.output

    # planted secrets are caught
    leaky = tmp_path / "leaky"
    shutil.copytree(release, leaky)
    shutil.copy(private / "mask.safetensors", leaky / "weights2.safetensors")
    (leaky / "notes.json").write_text(json.dumps({"run": {"init_seed": 1234}}))
    found = check_release(leaky)
    assert any("weights2.safetensors" in f for f in found) and any("notes.json" in f for f in found)
    assert runner.invoke(app, ["release", "check", str(leaky)]).exit_code == 1

    # a different mask fails the commitment; a mask for another shape is refused
    mask, salt, _ = load_mask(private / "mask.safetensors")
    n0 = next(iter(mask))
    mask[n0] = mask[n0].clone()
    mask[n0].view(-1)[0] ^= True
    save_mask(mask, tmp_path / "other.safetensors", salt)
    with pytest.raises(WeightlockError, match="does not match the release"):
        verify(release, tmp_path / "other.safetensors")
    save_mask({n0: torch.zeros(3, 3, dtype=torch.bool)}, tmp_path / "shape.safetensors", salt)
    with pytest.raises(WeightlockError, match="another model"):
        verify(release, tmp_path / "shape.safetensors")

    # authorized fine-tuning moves only masked entries; unauthorized moves everything
    from safetensors.torch import load_file

    res = runner.invoke(app, ["finetune", "--model", str(release), "--mask", str(private / "mask.safetensors"),
                              "--out", str(tmp_path / "auth"), "--steps", "3", "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["finetune", "--model", str(release), "--out", str(tmp_path / "unauth"), "--steps", "3",
                              "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    w0, wa, wu = (load_file(str(d / "model.safetensors")) for d in (release, tmp_path / "auth", tmp_path / "unauth"))
    mask, _, _ = load_mask(private / "mask.safetensors")
    moved_out = moved_in = 0
    for n, m in mask.items():
        if n in w0:
            moved_out += int((wa[n] != w0[n])[~m].sum())
            moved_in += int((wa[n] != w0[n])[m].sum())
    assert moved_out == 0 and moved_in > 0
    assert sum(int((wu[n] != w0[n])[~m].sum()) for n, m in mask.items() if n in w0) > 0

    # the same through the attack suite's `masked` entry (the unlocked reference gets full fine-tuning)
    from weightlock.attacks import finetune, make_attack, run_attack
    from weightlock.dlr.lock import load

    r = run_attack(release, "prose", "masked", tmp_path / "masked", reference=release, steps=2, batch_size=4,
                   block_size=64, train_tokens=20000, mask=str(private / "mask.safetensors"))
    assert r["reference_attack"] == "full" and r["target"]["trainable_parameters"] > 0
    with pytest.raises(WeightlockError, match="is not the mask of"):  # another run's mask: refused
        run_attack(release, "prose", "masked", steps=1, batch_size=4, block_size=64, train_tokens=20000,
                   mask=str(tmp_path / "other.safetensors"))
    model, ctx = load(release), {"model_dir": str(release)}
    atk = make_attack("masked", mask=str(private / "mask.safetensors"), steps=2, batch_size=4, block_size=64)
    model = atk.prepare(model, None, ctx)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    from weightlock.data import load_blocks, load_tokenizer

    finetune(model, load_blocks("builtin:prose", "train", load_tokenizer(release), 64, 5000), atk.cfg,
             hooks=ctx["hooks"], measure=False)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n][~m], before[n][~m]) for n, m in mask.items())
    assert any(not torch.equal(after[n][m], before[n][m]) for n, m in mask.items())
    with pytest.raises(WeightlockError, match="needs mask=PATH"):
        make_attack("masked").prepare(load(release), None, {"model_dir": str(release)})


def test_pmp_config_errors(tmp_path):
    with pytest.raises(WeightlockError, match="mask ratio"):
        PMPConfig(mask_ratio=1.5).validate()
    with pytest.raises(WeightlockError, match="variant"):
        PMPConfig(variant="magic").validate()
    with pytest.raises(WeightlockError, match="mask file not found"):
        load_mask(tmp_path / "none.safetensors")


@pytest.mark.parametrize("variant", ["paper", "hardened"])
def test_mask_recovery_attacks(tmp_path, tokenizer, variant):
    """The paper variant leaks its mask exactly through init regeneration; the hardened one does not."""
    from weightlock.dlr.lock import load
    from weightlock.pmp.recover import recover_all

    cfg = tiny_config(max_steps=15, train_tokens=30_000)
    pmp = PMPConfig.paper(0.3) if variant == "paper" else PMPConfig(mask_ratio=0.3)
    pmp.discovery_max_steps, pmp.patience, pmp.iou_threshold = 6, 2, 0.5
    pmp.projection_every = 5 if variant == "paper" else 0
    pretrain_pmp(cfg, pmp, tmp_path / "run")
    model = load(tmp_path / "run" / "release")
    mask, _, _ = load_mask(tmp_path / "run" / "private" / "mask.safetensors")
    res = recover_all(model, mask, pmp)
    assert res["chance_iou"] == pytest.approx(0.3 / 1.7)
    if variant == "paper":
        assert res["init-regen/global"] > 0.95 and res["best"]["attack"].startswith("init-regen")
    else:  # the secret seed defeats exact regeneration (what is left is the magnitude signal: see the bench)
        assert res["init-regen/global"] < 0.5


def test_mask_recover_attack_fine_tunes_guessed_entries(tmp_path, tiny_model_dir):
    from weightlock.attacks import run_attack

    model, _ = tiny_model_dir
    r = run_attack(model, "prose", "mask-recover", tmp_path / "mr", steps=2, batch_size=4, block_size=64,
                   train_tokens=20000, method="magnitude", mask_ratio=0.2)
    assert r["target"]["recovered_mask_density"] == pytest.approx(0.2, abs=1e-3)
    with pytest.raises(WeightlockError, match="unknown mask-recovery method"):
        run_attack(model, "prose", "mask-recover", method="psychic", steps=1)


class _InterruptAt(Hook):
    """A real Ctrl-C (SIGINT to this process) at the end of one step of one PMP stage: deterministic, no timing."""

    def __init__(self, stage: int, step: int) -> None:
        self.stage, self.step = stage, step

    def on_step_end(self, trainer, metrics) -> None:
        stage = 1 if any(isinstance(h, EarlyBirdHook) for h in trainer.hooks) else 2
        if (stage, trainer.step) == (self.stage, self.step):
            signal.raise_signal(signal.SIGINT)  # the trainer's handler: finish the step, checkpoint, stop


def _pmp_resume_settings():
    return (tiny_config(max_steps=6, train_tokens=30_000),
            PMPConfig(mask_ratio=0.3, discovery_max_steps=12, patience=3, iou_threshold=0.5))


def test_pmp_pretraining_resumes_bit_identically(tmp_path, tokenizer, monkeypatch):
    """Interrupted twice in Stage I (mid-discovery and at the very step it converges) and once in Stage II,
    then finished by `pretrain --method pmp --resume`: the same weights, mask and discovery as one run."""
    from safetensors.torch import load_file

    import weightlock.pmp.train as pmp_train

    monkeypatch.setattr(pmp_train.secrets, "randbits", lambda bits: 1234567890123456789)  # same W0 in both runs
    ref = pretrain_pmp(*_pmp_resume_settings(), tmp_path / "ref")
    stop = ref["discovery"]["steps"]
    assert ref["discovery"]["converged"] and stop >= 4  # early-bird stopped before its step cap

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        pretrain_pmp(*_pmp_resume_settings(), run, hooks=[_InterruptAt(1, 2)])
    assert (run / "private" / "stage1" / "trainer_state.json").exists()
    with pytest.raises(KeyboardInterrupt):
        pretrain_pmp(*_pmp_resume_settings(), run, resume=True, hooks=[_InterruptAt(1, stop)])
    with pytest.raises(KeyboardInterrupt):
        pretrain_pmp(*_pmp_resume_settings(), run, resume=True, hooks=[_InterruptAt(2, 3)])
    # Stage II checkpoints (whose Adam moments are zero exactly off the mask) stay private; no release yet
    assert (run / "private" / "stage2" / "checkpoint" / "trainer_state.json").exists()
    assert not (run / "release").exists()
    res = runner.invoke(app, ["pretrain", "--method", "pmp", "--resume", "--out", str(run)])
    assert res.exit_code == 0, res.output

    a, b = (load_file(str(d / "release" / "model.safetensors")) for d in (tmp_path / "ref", run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, _, _ = load_mask(tmp_path / "ref" / "private" / "mask.safetensors")
    mb, _, _ = load_mask(run / "private" / "mask.safetensors")
    assert ma.keys() == mb.keys() and all(torch.equal(ma[n], mb[n]) for n in ma)
    got = json.loads((run / "pmp_run.json").read_text())
    assert got["discovery"] == ref["discovery"] and got["val_ppl"] == ref["val_ppl"]
    assert verify(run / "release", run / "private" / "mask.safetensors")
    assert check_release(run / "release", private=run / "private") == []
    assert sorted(os.listdir(run / "private")) == ["mask.safetensors", "secrets.json"]  # no stale work files
    assert stat.S_IMODE(os.stat(run / "private").st_mode) == 0o700
    assert pretrain_pmp(*_pmp_resume_settings(), run, resume=True) == got  # finished: nothing to do
    with pytest.raises(WeightlockError, match="not an interrupted PMP run"):
        pretrain_pmp(*_pmp_resume_settings(), run / "release", resume=True)


@pytest.fixture(scope="module")
def pmp_run(pmp_kit):
    """A small PMP run made by the pipeline: (release, private) (built once per session, see conftest)."""
    return pmp_kit["release"], pmp_kit["private"]


def _plant(tmp_path, release, name, write, prefix="leaky-"):
    leaky = tmp_path / (prefix + name.replace("/", "_"))
    shutil.copytree(release, leaky)
    write(leaky / name)
    return leaky


def test_release_check_finds_secrets_by_content(tmp_path, pmp_run):
    """The mask under any name and dtype, beside the weights or packed in raw bytes, the seed under any key,
    the salt in hex: all found by content (the last three only given the private directory); the release
    itself (config, tokenizer, manifest with its commitment, metrics) is clean."""
    import numpy as np
    from safetensors.torch import load_file, save_file

    release, private = pmp_run
    assert check_release(release) == [] and check_release(release, private=private) == []
    res = runner.invoke(app, ["release", "check", str(release), "--private", str(private)])
    assert res.exit_code == 0 and "clean" in res.output, res.output
    mask, salt, _ = load_mask(private / "mask.safetensors")
    seed = json.loads((private / "secrets.json").read_text())["init_seed"]
    name = next(n for n in sorted(mask) if mask[n].ndim == 2 and "layers.1" in n)
    m = mask[name]

    def into_model(f, tensors):
        state = load_file(str(release / "model.safetensors"))
        save_file({**state, **tensors}, str(f), metadata={"format": "pt"})

    packed = b"".join(np.packbits(mask[n].reshape(-1).numpy()).tobytes() for n in sorted(mask))  # pack()'s bits
    planted = {  # file -> (writer, found by content without the private directory too)
        "model.safetensors": (lambda f: into_model(f, {"model.layers.0.mlp.gate_proj.scale": m.half()}), True),
        "extra.safetensors": (lambda f: save_file({"w": m.to(torch.int8) * 3}, str(f)), True),
        "stats.npy": (lambda f: np.save(f, m.numpy().astype(np.float32)), True),
        "state.pt": (lambda f: torch.save({"w": m.float()}, f), True),
        "vocab.bin": (lambda f: f.write_bytes(bytes(range(5)) + packed), True),  # a .bin is reported anyway
        "vocab.dat": (lambda f: f.write_bytes(b"abc" + np.packbits(m.reshape(-1).numpy(), bitorder="little")
                                              .tobytes() + b"xyz"), False),
        "table.dat": (lambda f: m.numpy().astype(np.uint8).tofile(f), True),
        "data/bits.json": (lambda f: f.parent.mkdir() or f.write_text(json.dumps({"b": m.int().tolist()})), True),
        "notes.txt": (lambda f: f.write_text(f'"rng": {seed}\n'), False),
        "extra_config.json": (lambda f: f.write_text(json.dumps({"nonce": salt.hex()})), False),
        "blob.dat": (lambda f: f.write_bytes(b"\x00" * 13 + salt + b"\x00" * 7), False),
    }
    for fname, (write, without_private) in planted.items():
        leaky = _plant(tmp_path, release, fname, write)
        found = check_release(leaky, private=private)
        assert [f for f in found if not f.startswith(fname + ":")] == [], found
        assert found, f"{fname} not detected"
        assert (check_release(leaky, manifest=False) != []) == without_private, (fname, check_release(leaky))
        plain = check_release(leaky)  # without the secrets the allow-list reports every planted file anyway
        assert plain and all(f.startswith(fname + ":") for f in plain), plain
        if fname in ("model.safetensors", "extra.safetensors", "stats.npy", "table.dat"):
            assert any("reproduces the private mask of" in f for f in found), found
        res = runner.invoke(app, ["release", "check", str(leaky), "--private", str(private)])
        assert res.exit_code == 1 and fname in res.output, res.output
    assert str(seed) not in " ".join(check_release(_plant(tmp_path, release, "n2.txt", lambda f: f.write_text(
        str(seed))), private=private))  # findings never print the secret itself

    # real weights and legitimate constant tensors are not masks
    clean = _plant(tmp_path, release, "model.safetensors", lambda f: into_model(
        f, {"extra.norm.weight": torch.ones(256), "tiny": torch.tensor([0.0, 1.0])}), "clean-")
    assert check_release(clean, private=private, manifest=False) == []  # (the changed file fails the manifest)


def test_finetune_refuses_a_mask_of_another_run(tmp_path, pmp_run, tiny_model_dir):
    release, private = pmp_run
    other = tmp_path / "other.safetensors"  # the same shapes, another run's mask and salt
    mask, _, _ = load_mask(private / "mask.safetensors")
    save_mask({n: m.flip(-1) for n, m in mask.items()}, other, b"another run")
    args = ["finetune", "--model", str(release), "--out", str(tmp_path / "ft"), "--steps", "2", "--batch-size", "4"]
    res = runner.invoke(app, args + ["--mask", str(other)])
    assert res.exit_code == 2 and "is not the mask of" in res.output, res.output
    assert not (tmp_path / "ft").exists()  # refused before anything was written
    res = runner.invoke(app, args + ["--mask", str(private / "mask.safetensors")])
    assert res.exit_code == 0 and "saved" in res.output, res.output

    # a model without a commitment (a dense checkpoint of the same shape): refused unless asked for
    dense, _ = tiny_model_dir
    args = ["finetune", "--model", str(dense), "--mask", str(private / "mask.safetensors"), "--out",
            str(tmp_path / "ft2"), "--steps", "2", "--batch-size", "4"]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "no mask commitment" in res.output and "--allow-uncommitted" in res.output
    res = runner.invoke(app, args + ["--allow-uncommitted"])
    assert res.exit_code == 0, res.output


# ---- secrets hidden under a leaker's transforms: found given the private directory ------------------------
SEED = 0x5DEECE66D1B2C3A7  # a fixed 63-bit init seed (halves 1575931494 and 3517104039), for deterministic plants


@pytest.fixture(scope="module")
def leak_kit(pmp_run, tmp_path_factory):
    """(release, private directory with the fixed SEED, mask entry name, its mask, salt, all packed bits,
    the released weights)."""
    import numpy as np
    from safetensors.torch import load_file

    release, private = pmp_run
    priv = tmp_path_factory.mktemp("priv") / "private"
    shutil.copytree(private, priv)
    secrets_json = json.loads((priv / "secrets.json").read_text())
    secrets_json["init_seed"] = SEED
    (priv / "secrets.json").write_text(json.dumps(secrets_json))
    mask, _, _ = load_mask(priv / "mask.safetensors")
    salt = bytes.fromhex(secrets_json["salt"])
    name = next(n for n in sorted(mask) if mask[n].ndim == 2 and "layers.1" in n)
    packed = b"".join(np.packbits(mask[n].reshape(-1).numpy()).tobytes() for n in sorted(mask))
    state = load_file(str(release / "model.safetensors"))
    assert name in state
    return release, priv, name, mask[name], salt, packed, state


def _variant_writers(kit):
    """The 24 planted variants: name -> (file, writer)."""
    import base64

    import numpy as np
    from safetensors.torch import save_file

    release, _, name, m, salt, packed, state = kit
    g = torch.Generator().manual_seed(0)
    mag = torch.rand(m.shape, generator=g) + 0.1
    noise = torch.randn(m.shape, generator=g)
    other_bit = (torch.rand(m.shape, generator=g) < 0.5).to(torch.int8)
    pub = state[name]

    def signs(bits):  # a random-looking float tensor whose sign pattern is ``bits``
        return torch.where(bits, -mag, mag)

    def st(t):
        return lambda f: save_file({"w": t.contiguous()}, str(f))

    def stray_half():
        t = m.float().clone()
        t.view(-1)[7] = 0.5
        return t

    def mantissa(f):
        w = ((pub.view(torch.int32) & ~1) | m.to(torch.int32)).view(torch.float32)
        save_file({**state, name: w}, str(f), metadata={"format": "pt"})

    packed_values = torch.tensor(list(packed), dtype=torch.float32)
    return {
        "bool-safetensors": ("extra.safetensors", st(m)),
        "float01-npy": ("stats.npy", lambda f: np.save(f, m.numpy().astype(np.float32))),
        "packed-raw-dat": ("vocab.dat", lambda f: f.write_bytes(bytes(range(5)) + packed)),
        "json-01-list": ("data.json", lambda f: f.write_text(json.dumps({"b": m.int().tolist()}))),
        "salt-hex-json": ("extra_config.json", lambda f: f.write_text(json.dumps({"nonce": salt.hex()}))),
        "seed-decimal-txt": ("notes.txt", lambda f: f.write_text(f"rng: {SEED}\n")),
        "sign-pattern": ("aux.safetensors", st(signs(m))),
        "sign-pattern-flat": ("aux.safetensors", st(signs(m).reshape(-1))),
        "sign-pattern-npy": ("aux.npy", lambda f: np.save(f, signs(m).reshape(-1).numpy())),
        "sign-pattern-complement": ("aux.safetensors", st(signs(~m))),
        "sign-pattern-xor-public": ("aux.safetensors", st(signs(m ^ torch.signbit(pub)))),
        "zero-one-plus-noise": ("aux.safetensors", st(m.float() + 1e-3 * noise)),
        "int8-bit0": ("aux.safetensors", st(m.to(torch.int8) | (other_bit << 1))),
        "int8-bit1": ("aux.safetensors", st((m.to(torch.int8) << 1) | other_bit)),
        "stray-half": ("aux.safetensors", st(stray_half())),
        "packed-as-float32": ("aux.safetensors", st(packed_values)),
        "packed-as-float32-scaled": ("aux.safetensors", st(packed_values / 255)),
        "mantissa-low-bits": ("model.safetensors", mantissa),
        "seed-hex": ("notes.txt", lambda f: f.write_text(f"rng=0x{SEED:x}\n")),
        "seed-two-halves": ("run.json", lambda f: f.write_text(json.dumps({"rng": [SEED >> 32, SEED & 0xFFFFFFFF]}))),
        "seed-raw-bytes": ("blob.dat", lambda f: f.write_bytes(b"\x01\x02" + SEED.to_bytes(8, "little") + bytes(5))),
        "seed-float-string": ("run.json", lambda f: f.write_text(json.dumps({"lr": 0.001, "rng": float(SEED)}))),
        "salt-base64": ("extra_config.json", lambda f: f.write_text(json.dumps(
            {"nonce": base64.b64encode(salt).decode()}))),
        "packed-base64-json": ("tables.json", lambda f: f.write_text(json.dumps(
            {"data": base64.b64encode(packed).decode()}))),
    }


VARIANTS = ["bool-safetensors", "float01-npy", "packed-raw-dat", "json-01-list", "salt-hex-json", "seed-decimal-txt",
            "sign-pattern", "sign-pattern-flat", "sign-pattern-npy", "sign-pattern-complement",
            "sign-pattern-xor-public", "zero-one-plus-noise", "int8-bit0", "int8-bit1", "stray-half",
            "packed-as-float32", "packed-as-float32-scaled", "mantissa-low-bits", "seed-hex", "seed-two-halves",
            "seed-raw-bytes", "seed-float-string", "salt-base64", "packed-base64-json"]
CAUGHT_WITHOUT_PRIVATE = {  # by content alone: two values, or a tensor with the size of a weight matrix (not in the
    "bool-safetensors", "float01-npy", "json-01-list", "sign-pattern", "sign-pattern-flat",  # model file)
    "sign-pattern-npy", "sign-pattern-complement", "sign-pattern-xor-public", "zero-one-plus-noise", "int8-bit0",
    "int8-bit1", "stray-half"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_release_check_private_finds_hidden_secrets(tmp_path, leak_kit, variant):
    """Each planted variant, in a fresh copy of the release, is caught given the private directory, in the
    planted file only (the manifest check is off: a changed model.safetensors must be caught by its content)."""
    fname, write = _variant_writers(leak_kit)[variant]
    release, priv = leak_kit[0], leak_kit[1]
    leaky = _plant(tmp_path, release, fname, write)
    found = check_release(leaky, private=priv, manifest=False)
    assert found, f"{variant} not detected"
    assert all(f.startswith(fname + ":") for f in found), found
    assert str(SEED) not in " ".join(found) and leak_kit[4].hex() not in " ".join(found)  # never print secrets
    assert (check_release(leaky, manifest=False) != []) == (variant in CAUGHT_WITHOUT_PRIVATE), check_release(leaky)
    plain = check_release(leaky)  # the allow-list: not in the manifest, or not the file the manifest lists
    assert plain and all(f.startswith(fname + ":") for f in plain), plain


def test_release_check_private_has_no_false_positives(tmp_path, leak_kit):
    """Random tensors of a mask entry's shape, real weights re-saved, random bytes and numbers: all clean."""
    import numpy as np
    from safetensors.torch import save_file

    release, priv, name, m, _, _, state = leak_kit
    assert check_release(release, private=priv) == []
    g = torch.Generator().manual_seed(1)
    clean = tmp_path / "clean"
    shutil.copytree(release, clean)
    save_file({"a": torch.randn(m.shape, generator=g), "b": torch.randn(m.shape, generator=g).reshape(-1),
               "c": torch.randint(0, 4, m.shape, generator=g, dtype=torch.int8), "d": state[name].t().contiguous(),
               "e": torch.randint(0, 256, (4096,), generator=g).float()}, str(clean / "extra.safetensors"))
    np.save(clean / "stats.npy", torch.rand(m.numel(), generator=g).numpy())
    (clean / "blob.dat").write_bytes(torch.randint(0, 256, (m.numel(),), generator=g, dtype=torch.uint8).numpy()
                                     .tobytes())
    (clean / "run.json").write_text(json.dumps({"lr": 0.001, "big": 1.2345678901234567e18, "seed": 12345,
                                                "ids": [17, 4242424242]}))
    assert check_release(clean, private=priv, manifest=False) == []
    assert check_release(clean, private=priv) == [  # the allow-list refuses them all the same
        "blob.dat: not listed in manifest.json: a binary or unknown file",
        "extra.safetensors: not listed in manifest.json: a tensor file holding 5 tensor(s) with the size of a "
        "weight matrix: a second copy of weights, optimizer state, gradients or a delta — these reveal the mask",
        "run.json: not listed in manifest.json: a text file (.json)",
        "stats.npy: not listed in manifest.json: a tensor file holding 1 tensor(s) with the size of a weight "
        "matrix: a second copy of weights, optimizer state, gradients or a delta — these reveal the mask"]


def test_release_check_without_private_lists_its_rules(pmp_run):
    release, _ = pmp_run
    res = runner.invoke(app, ["release", "check", str(release)])
    assert res.exit_code == 0 and "clean" in res.output, res.output
    out = " ".join(res.output.split())
    assert "without --private only these rules apply:" in out and "exactly two values" in out
    assert "need --private PRIVDIR" in out
    res = runner.invoke(app, ["release", "check", str(release), "--private", str(pmp_run[1])])
    assert res.exit_code == 0 and "without --private" not in res.output, res.output


def test_release_check_and_pmp_verify_refuse_a_changed_file(tmp_path, pmp_run):
    """One flipped byte in the weights: `release check` and `pmp verify` fail with one line naming the file."""
    release, private = pmp_run
    changed = tmp_path / "changed"
    shutil.copytree(release, changed)
    f = changed / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    line = ("model.safetensors: SHA-256 does not match manifest.json (changed or corrupted since the release "
            "was written)")
    assert check_release(changed) == [line]
    res = runner.invoke(app, ["release", "check", str(changed)])
    assert res.exit_code == 1, res.output
    assert [x for x in res.output.splitlines() if "manifest.json (" in x] == [f"changed: {changed}/{line}"]
    res = runner.invoke(app, ["pmp", "verify", "--release", str(changed), "--mask", str(private / "mask.safetensors")])
    assert res.exit_code == 2 and "verified" not in res.output, res.output
    assert res.output.strip() == f"error: {changed}/{line}"
    with pytest.raises(WeightlockError, match="model.safetensors: SHA-256 does not match manifest.json"):
        verify(changed, private / "mask.safetensors")
    (changed / "tokenizer.json").unlink(missing_ok=True)
    f.unlink()
    assert "model.safetensors: listed in manifest.json but missing" in check_release(changed)
    manifest = json.loads((changed / "manifest.json").read_text())
    manifest["files"] = {"../secrets.json": "0" * 64}  # a manifest never makes the check read outside the release
    (changed / "manifest.json").write_text(json.dumps(manifest))
    found = check_release(changed)
    assert "../secrets.json: listed in manifest.json but outside the release directory" in found, found
    assert not any("SHA-256" in f for f in found), found  # nothing outside the release was read


def test_pmp_private_files_are_0600(tmp_path, tokenizer):
    """Everything written under private/ (Stage-I and Stage-II checkpoints included) is 0600, its directories
    0700, also while the run is interrupted; the release's files keep the usual mode."""
    run = tmp_path / "run"
    settings = (tiny_config(max_steps=4, train_tokens=30_000), PMPConfig(mask_ratio=0.3, discovery_max_steps=3))
    umask = os.umask(0o022)
    try:
        with pytest.raises(KeyboardInterrupt):
            pretrain_pmp(*settings, run, hooks=[_InterruptAt(2, 2)])
        assert os.umask(0o022) == 0o022  # restored after the interruption
        private = run / "private"
        modes = {p.relative_to(private).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in private.rglob("*")}
        assert "stage1/trainer_state.json" in modes and "stage2/checkpoint/trainer_state.json" in modes, modes
        assert {p: oct(m) for p, m in modes.items() if m != (0o700 if (private / p).is_dir() else 0o600)} == {}
        assert stat.S_IMODE((run / "private").stat().st_mode) == 0o700
        pretrain_pmp(*settings, run, resume=True)
        assert sorted(os.listdir(run / "private")) == ["mask.safetensors", "secrets.json"]
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in (run / "private").iterdir())
        assert stat.S_IMODE((run / "release" / "model.safetensors").stat().st_mode) == 0o644
    finally:
        os.umask(umask)
