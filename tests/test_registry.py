"""One registry type for attacks, defenses and tasks; plug-ins through entry points; CLI options generated
from config dataclasses (one source of truth for a setting's type, default and help)."""
import dataclasses
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from weightlock.attacks import ATTACKS, Attack
from weightlock.cli import app
from weightlock.defenses import DEFENSES, Defense
from weightlock.dlr.config import LockConfig
from weightlock.errors import WeightlockError
from weightlock.eval.tasks import TASKS, Task, get_task
from weightlock.pmp.train import PMPConfig
from weightlock.registry import DuplicateName, Registry, UnknownName

runner = CliRunner()


class Base:
    pass


def test_register_get_names_and_errors():
    reg = Registry("widget", Base)

    @reg.register("a")
    class A(Base):
        pass

    class B(Base):
        pass

    assert reg.register("b", B) is B and A.name == "a" and B.name == "b"
    assert reg.names() == ["a", "b"] and list(reg) == ["a", "b"] and "a" in reg and len(reg) == 2
    assert reg.get("a") is A and reg["b"] is B and reg.get("zzz", None) is None
    assert dict(reg.items()) == {"a": A, "b": B}
    with pytest.raises(UnknownName, match=r"unknown widget 'c'; available: a, b"):
        reg.get("c")
    with pytest.raises(KeyError):  # reads like a dict
        reg["c"]
    assert reg.pop("b") is B and reg.pop("b", None) is None and reg.names() == ["a"]


def test_duplicate_registration_raises():
    reg = Registry("widget", Base)
    reg.register("a", type("A", (Base,), {}))
    with pytest.raises(DuplicateName, match="widget 'a' is already registered"):
        reg.register("a", type("A2", (Base,), {}))
    A = reg["a"]
    assert reg.register("a", A) is A, "the same object again is no duplicate"
    with pytest.raises(DuplicateName):  # the built-ins are guarded the same way
        ATTACKS.register("full", type("Other", (Attack,), {}))
    with pytest.raises(DuplicateName):
        DEFENSES.register("dlr", type("Other", (Defense,), {}))
    with pytest.raises(DuplicateName):
        TASKS.register("prose", lambda: None)


def test_wrong_base_class_or_bad_name_raises():
    reg = Registry("widget", Base)
    with pytest.raises(WeightlockError, match="a widget registers a Base subclass; 'x' is builtins.object"):
        reg.register("x", object)
    with pytest.raises(WeightlockError, match="Base subclass"):
        reg.register("x", Base())  # an instance where classes are registered
    with pytest.raises(WeightlockError, match="Attack subclass"):
        ATTACKS.register("not-an-attack", type("D", (Defense,), {}))
    with pytest.raises(WeightlockError, match="Defense subclass"):
        DEFENSES.register("not-a-defense", type("A", (Attack,), {}))
    for bad in ("", "a/b", "two words", 3):
        with pytest.raises(WeightlockError, match="non-empty string"):
            reg.register(bad, type("C", (Base,), {}))
    with pytest.raises(WeightlockError, match="reserved"):
        DEFENSES.register("reference", type("R", (Defense,), {}))
    tasks = Registry("task", Callable, instances=True)
    with pytest.raises(WeightlockError, match="a task registers a Callable"):
        tasks.register("t", "not callable")
    assert not {"x", "not-an-attack", "not-a-defense", "reference"} & (set(ATTACKS) | set(DEFENSES) | set(reg))


def test_tasks_are_a_registry_of_factories():
    assert {"prose", "tests", "addition", "reverse", "recall"} <= set(TASKS)

    @TASKS.register("echo-test")
    def echo() -> Task:
        return Task("echo-test", "exact", train_texts=lambda: ["a=a\n"], test_pairs=lambda: [("a=", "a")])

    try:
        assert get_task("echo-test").kind == "exact" and get_task("echo-test-loglik").kind == "loglik"
    finally:
        TASKS.unregister("echo-test")
    TASKS.register("broken-test", lambda: "not a task")
    try:
        with pytest.raises(WeightlockError, match="not a Task"):
            get_task("broken-test")
    finally:
        TASKS.unregister("broken-test")
    with pytest.raises(WeightlockError, match="unknown task 'nope'; choose one of prose"):
        get_task("nope")


PLUGIN = '''
"""A third-party weightlock plug-in (a test package)."""
from weightlock.attacks import Attack, AttackConfig
from weightlock.defenses import Defense, DefenseConfig


class NoisyAttack(Attack):
    """Adds noise before fine-tuning (a plug-in registered through an entry point)."""
    Config = AttackConfig


class FullAgain(Attack):
    """A plug-in that takes a built-in's name: skipped with a warning."""
    Config = AttackConfig


class TwiceDefense(Defense):
    description = "a plug-in defense (entry point)"
'''


def _plugin_path(tmp_path: Path) -> Path:
    """A tiny installed distribution on a sys.path entry: dist-info (METADATA, entry_points.txt) and a module."""
    site = tmp_path / "site"
    (site / "wl_test_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "wl_test_plugin-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: wl-test-plugin\nVersion: 0.1\n")
    (site / "wl_test_plugin-0.1.dist-info" / "entry_points.txt").write_text(textwrap.dedent("""\
        [weightlock.attacks]
        noisy = wl_test_plugin:NoisyAttack
        full = wl_test_plugin:FullAgain
        broken = wl_test_plugin_missing:Nothing

        [weightlock.defenses]
        twice = wl_test_plugin:TwiceDefense
        """))
    (site / "wl_test_plugin.py").write_text(PLUGIN)
    return site


def _cli(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "weightlock.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_entry_point_plugin_shows_up_in_attack_list(tmp_path):
    site = _plugin_path(tmp_path)
    r = _cli(site, "attack", "--list")
    assert r.returncode == 0, r.stderr
    assert "noisy" in r.stdout and "Adds noise before fine-tuning" in r.stdout
    assert "full" in r.stdout and "reverse-distill" in r.stdout, "the built-ins are all still there"
    # a plug-in that takes a built-in's name, or fails to import, is skipped with a warning naming it
    assert "attack plug-in 'full'" in r.stderr and "already registered" in r.stderr
    assert "attack plug-in 'broken'" in r.stderr and "wl-test-plugin" in r.stderr
    r = _cli(site, "defend", "--list")
    assert r.returncode == 0, r.stderr
    assert "twice" in r.stdout + r.stderr and "a plug-in defense (entry point)" in r.stdout + r.stderr


def test_entry_point_plugin_shows_up_in_weightlock_run(tmp_path):
    """The same plug-ins are what ``weightlock run`` can name: listed by ``run --list``, and a spec that names
    the plug-in defense validates (``--check``) — a name no registry knows is refused with one line."""
    site = _plugin_path(tmp_path)
    r = _cli(site, "run", "--list")
    assert r.returncode == 0, r.stderr
    assert "twice" in r.stdout and "a plug-in defense (entry point)" in r.stdout
    assert "noisy" in r.stdout and "Adds noise before fine-tuning" in r.stdout
    assert "demo-quick" in r.stdout and "recall" in r.stdout
    spec = tmp_path / "plug.yaml"
    spec.write_text("name: plug\nmodels: [{preset: tiny}]\ndefenses: {twice: {}}\ntasks: [prose]\n")
    r = _cli(site, "run", str(spec), "--check")
    assert r.returncode == 0, r.stderr
    assert '"twice"' in r.stdout
    r = _cli(tmp_path / "empty", "run", str(spec), "--check")  # without the plug-in installed
    assert r.returncode != 0 and "twice" in r.stderr and r.stderr.count("\n") <= 3


def test_registries_load_entry_points_lazily_once(tmp_path, monkeypatch):
    full = ATTACKS["full"]  # the global registry has read its entry points before the plug-in is on the path
    site = _plugin_path(tmp_path)
    monkeypatch.syspath_prepend(str(site))
    reg = Registry("attack", Attack, group="weightlock.attacks")
    reg.register("full", full)
    assert not reg._plugins_loaded, "nothing loaded at construction"
    with pytest.warns(RuntimeWarning) as w:
        names = reg.names()
    assert names == ["full", "noisy"] and reg["noisy"].__name__ == "NoisyAttack"
    assert any("'broken'" in str(x.message) for x in w) and len(reg.plugin_errors) == 2
    reg.names()
    assert len(reg.plugin_errors) == 2, "loaded once"
    sys.modules.pop("wl_test_plugin", None)


# ---- configs: one source of truth for the command line ------------------------------------------------

def test_every_lock_config_field_is_a_lock_option_with_its_help():
    cmd = typer.main.get_command(app).commands["lock"]
    params = {p.name: p for p in cmd.params}
    for f in dataclasses.fields(LockConfig):
        assert f.metadata.get("help"), f"LockConfig.{f.name} has no help text"
        assert f.name in params, f"--{f.name.replace('_', '-')} missing"
        p = params[f.name]
        assert p.help == f.metadata["help"], f.name
        assert p.default == f.default, f.name
        assert f"--{f.name.replace('_', '-')}" in p.opts
    r = runner.invoke(app, ["lock", "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert r.exit_code == 0 and "--refine-checkpoint-every" in r.output and "--no-sink" in r.output


@pytest.mark.parametrize("cls", [LockConfig, PMPConfig])
def test_every_config_field_has_help(cls):
    missing = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("help")]
    assert not missing, f"{cls.__name__} fields without help text: {missing}"


def test_pretrain_has_every_pmp_config_field_as_an_option():
    cmd = typer.main.get_command(app).commands["pretrain"]
    params = {p.name: p for p in cmd.params}
    flags = {"variant": "--pmp-variant"}
    r = runner.invoke(app, ["pretrain", "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert r.exit_code == 0
    for f in dataclasses.fields(PMPConfig):
        flag = flags.get(f.name, "--" + f.name.replace("_", "-"))
        assert f.name in params and flag in params[f.name].opts, flag
        assert params[f.name].help == "PMP: " + f.metadata["help"], f.name
        assert flag in r.output, f"{flag} missing from pretrain --help"
    assert "--no-rewind" in r.output


@pytest.mark.parametrize("args, want", [
    ([], PMPConfig()),
    (["--mask-ratio", "0.2", "--pmp-variant", "hardened"], PMPConfig(mask_ratio=0.2)),
    (["--pmp-variant", "paper", "--mask-ratio", "0.2"], PMPConfig.paper(0.2)),
    (["--pmp-variant", "paper", "--pool", "linear", "--no-rewind"],
     dataclasses.replace(PMPConfig.paper(0.3), pool="linear", rewind=False)),
    (["--patience", "2", "--per-tensor", "--projection-every", "7"],
     PMPConfig(patience=2, per_tensor=True, projection_every=7)),
])
def test_pretrain_pmp_options_build_the_config(tmp_path, monkeypatch, args, want):
    import weightlock.cli as cli

    got = []
    monkeypatch.setattr(cli, "build_defense", lambda name, cfg, source, out, **kw: got.append((name, cfg)))
    r = runner.invoke(app, ["pretrain", "--method", "pmp", "--preset", "tiny", "--out", str(tmp_path / "o"), *args])
    assert r.exit_code == 0, r.output
    assert got == [("pmp", want)]


def test_pretrain_overrides_change_the_preset(tmp_path, monkeypatch):
    import weightlock.train.pretrain as tp

    got = []
    monkeypatch.setattr(tp, "pretrain", lambda cfg, out, **kw: got.append(cfg) or {
        "parameters": 1, "tokens_seen": 1, "val_ppl": 1.0, "wall_time_s": 0.0})
    r = runner.invoke(app, ["pretrain", "--preset", "tiny", "--out", str(tmp_path / "o"), "--steps", "3", "--lr",
                            "0.5", "--seed", "7", "--block-size", "32", "--train-tokens", "999", "--layers", "3",
                            "--hidden-size", "48"])
    assert r.exit_code == 0, r.output
    cfg = got[0]
    assert (cfg.train.max_steps, cfg.train.lr, cfg.train.seed, cfg.block_size, cfg.train_tokens) == (3, 0.5, 7, 32, 999)
    assert (cfg.model.num_hidden_layers, cfg.model.hidden_size) == (3, 48)
    r = runner.invoke(app, ["pretrain", "--out", str(tmp_path / "o2"), "--steps", "abc"])
    assert r.exit_code == 2 and "error: --steps expects an integer or 'none', got 'abc'" in r.output


def test_bad_pretrain_pmp_value_is_one_clear_line(tmp_path):
    r = runner.invoke(app, ["pretrain", "--method", "pmp", "--out", str(tmp_path / "o"), "--mask-ratio", "1.5"])
    assert r.exit_code == 2 and "error: mask ratio must be in (0, 1], got 1.5" in r.output


@pytest.mark.parametrize("args, message", [
    (["--rank", "abc"], "error: --rank expects an integer, got 'abc'"),
    (["--rank", "0"], "error: rank must be at least 1, got 0"),
    (["--activation", "swish"], "error: unknown activation 'swish' (auto, gelu, relu, silu, tanh, gelu_tanh)"),
    (["--max-rel-error", "lots"], "error: --max-rel-error expects a number or 'none', got 'lots'"),
    (["--layers", "1-x"], "error: layers: '1-x' is not a layer id"),
])
def test_bad_lock_value_is_one_clear_line(tmp_path, args, message):
    out = tmp_path / "o"
    r = runner.invoke(app, ["lock", "--model", str(tmp_path), "--out", str(out), *args])
    assert r.exit_code == 2, r.output
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), r.output
    assert not out.exists()


def test_lock_config_is_frozen_and_validated():
    cfg = LockConfig(rank=4, lr=1)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)  # converted while it validated itself
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rank = 8
    assert dataclasses.replace(cfg, rank=8).rank == 8
    with pytest.raises(WeightlockError, match="rank must be at least 1"):
        dataclasses.replace(cfg, rank=0)


def test_defend_validates_settings_against_the_defense_config(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    cases = [
        (["defend", "dlr", "--set", "rnak=4"], "defense 'dlr' has no setting 'rnak'; valid: rank, depth"),
        (["defend", "dlr", "--set", "rank"], "--set expects KEY=VALUE"),
        (["defend", "dlr", "--set", "rank=four"], "rank expects an integer, got 'four'"),
        (["defend", "dlr", "--set", "rank=0"], "rank must be at least 1"),
        (["defend", "pmp", "--set", "mask_ratio=2"], "mask ratio must be in (0, 1]"),
        (["defend", "nope"], "unknown defense 'nope'; available: none, dlr, pmp"),
        (["defend", "pmp", "--model", str(model)], "pretrains its own model"),
        (["defend", "dlr"], "give it --model"),
        (["defend", "none", "--model", str(model), "--resume"], "defense 'none' has no build option(s) resume"),
    ]
    for args, message in cases:
        r = runner.invoke(app, [*args, "--out", str(tmp_path / "o")])
        assert r.exit_code == 2 and message in r.output, (args, r.output)
        assert len([l for l in r.output.splitlines() if l.strip()]) == 1, r.output
    assert not (tmp_path / "o").exists()


def test_defend_applies_a_registered_defense(tmp_path, tiny_model_dir):
    """``none`` with copy=true: the registered path end to end, with its build record beside --out."""
    import json

    base, _ = tiny_model_dir
    out = tmp_path / "copy"
    r = runner.invoke(app, ["defend", "none", "--set", "copy=true", "--model", str(base), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "config.json").exists()
    record = json.loads((tmp_path / "copy.defense.json").read_text())
    assert record["defense"] == "none" and record["config"] == {"copy": True}
    r = runner.invoke(app, ["defend", "none", "--set", "copy=yes", "--model", str(base), "--out", str(out)])
    assert r.exit_code == 2 and "pass --overwrite" in r.output, r.output  # the CLI's default: no overwrite
    r = runner.invoke(app, ["defend", "none", "--set", "copy=yes", "--model", str(base), "--out", str(out),
                            "--overwrite"])
    assert r.exit_code == 0, r.output
