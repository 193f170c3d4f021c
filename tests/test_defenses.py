"""Defenses are plug-ins: the registry, and a defense registered from user code run through the demo."""
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from weightlock.cli import app
from weightlock.defenses import (
    DEFENSES,
    AttackSpec,
    Defense,
    DefenseConfig,
    DefenseInfo,
    get_defense,
    make_defense,
    register_defense,
)
from weightlock.errors import WeightlockError

runner = CliRunner()


@dataclass
class NoiseConfig(DefenseConfig):
    sigma: float = 0.1  # noise std as a fraction of each weight tensor's own std
    seed: int = 0

    def validate(self) -> None:
        if not self.sigma >= 0:
            raise WeightlockError(f"sigma must be ≥ 0, got {self.sigma}")


class NoiseDefense(Defense):
    """A toy post-hoc defense: Gaussian noise on every weight (it costs capability and stops nothing)."""

    spec = DefenseInfo(Config=NoiseConfig, title="Noise", description="Gaussian noise added to every weight")

    def apply(self, source, out):
        from weightlock.data import load_tokenizer
        from weightlock.models.hub import load, save_model_dir
        from weightlock.train.pretrain import RUN_FILE

        model = load(source)
        g = torch.Generator().manual_seed(self.cfg.seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim >= 2:
                    p.add_(torch.randn(p.shape, generator=g) * self.cfg.sigma * p.std())
        save_model_dir(model, load_tokenizer(source), out)
        shutil.copy(Path(source) / RUN_FILE, Path(out) / RUN_FILE)  # its pretraining record (block size, data)
        return out


@pytest.fixture
def noise_defense():
    register_defense("noise")(NoiseDefense)
    yield NoiseDefense
    DEFENSES.pop("noise", None)


def test_registry_builds_validated_defenses():
    assert list(DEFENSES)[:3] == ["none", "dlr", "pmp"]
    d = make_defense("dlr", rank=4, steps=10)
    assert d.cfg.rank == 4 and d.hooks().label == "DLR-locked" and [s.label for s in d.plan()] == [
        "full", "lora", "checkpointing", "reverse-distill"]
    pmp = make_defense("pmp", mask_ratio=0.2)
    assert pmp.spec.pretraining and pmp.spec.authorized.attack == "masked" and pmp.plan()[-1] is pmp.spec.authorized
    assert get_defense("none")().apply("some/model", "ignored") == Path("some/model")
    with pytest.raises(WeightlockError, match="unknown defense 'nope'"):
        get_defense("nope")
    with pytest.raises(WeightlockError, match="has no option"):
        make_defense("pmp", rank=3)
    with pytest.raises(WeightlockError, match="mask ratio"):
        make_defense("pmp", mask_ratio=1.5)
    with pytest.raises(WeightlockError, match="expects float"):
        NoiseConfig(sigma="a lot")
    with pytest.raises(WeightlockError, match="source is a PretrainConfig"):
        pmp.build("some/model", "out")
    with pytest.raises(WeightlockError, match="source is a model directory"):
        d.build("no/such/dir", "out")
    with pytest.raises(WeightlockError, match="Defense subclass"):
        register_defense("x")(object)


def _members(cls: type) -> list[str]:
    """The names a class body defines (assignments, annotations, functions), dunders left out."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    names = []
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
    return [n for n in names if not (n.startswith("__") and n.endswith("__"))]


def test_defense_interface_stays_small():
    """Defense: a name, a spec (DefenseInfo), its plan, its harness hooks, its record and the build (#34)."""
    members = _members(Defense)
    assert len(members) <= 8, members
    assert set(members) == {"name", "spec", "plan", "hooks", "record", "apply", "build", "release"}


def test_a_defense_written_with_class_attributes_gets_them_in_its_spec():
    class Old(NoiseDefense):  # the older style: class attributes instead of spec
        description = "old style"
        attacks = (AttackSpec("full", "full", {}, "full", "full"),)
        pretraining = False

    assert Old.spec.description == "old style" and Old.spec.Config is NoiseConfig and Old.spec.title == "Noise"
    assert [s.label for s in Old().plan()] == ["full"] and NoiseDefense.spec.description != "old style"


def test_demo_refuses_bad_selections_before_any_work(tmp_path, noise_defense):
    from weightlock.demo import run_demo

    with pytest.raises(WeightlockError, match="unknown defense"):
        run_demo(tmp_path / "a", quick=True, defenses=["nope"])
    with pytest.raises(WeightlockError, match="named twice"):
        run_demo(tmp_path / "a", quick=True, defenses=["noise", "noise"])

    class Odd(NoiseDefense):
        attacks = (AttackSpec("full", "full", {}, "full", "offload"),)

    with pytest.raises(WeightlockError, match="compared with reference 'offload'"):
        run_demo(tmp_path / "a", quick=True, defenses=[Odd()])
    assert not (tmp_path / "a").exists()


def test_user_defense_runs_through_the_demo_and_the_report(tmp_path, tiny_model_dir, noise_defense):
    base, _ = tiny_model_dir
    out = tmp_path / "demo"
    shutil.copytree(base, out / "base-tiny")  # the demo reuses the session's tiny base model
    r = runner.invoke(app, ["demo", "--quick", "--out", str(out), "--defense", "noise"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "demo" and summary["schema_version"] >= 1
    assert [d["name"] for d in summary["defenses"]] == ["noise"] and summary["defenses"][0]["config"]["sigma"] == 0.1
    cap = summary["capability"]
    assert set(cap) == {"reference", "noise"} and cap["noise"]["code"] > cap["reference"]["code"]
    rows = summary["attacks"]
    # the reference runs only what the noise defense's attacks are compared with (no checkpointing)
    assert {(r["defense"], r["attack"]) for r in rows} == {
        (d, a) for d in ("reference", "noise") for a in ("full", "lora")}
    assert {r["task"] for r in rows} == {"prose", "recall-loglik"}
    assert all(r["gain"] != 0 for r in rows)  # every task moves within the quick budget (issue 23)
    assert all(r["gain_ratio"] == pytest.approx(r["gain"] / r["reference_gain"]) for r in rows
               if r["defense"] == "noise" and abs(r["reference_gain"]) > 1e-12)
    assert not {"mask_recovery", "memory_vs_depth", "frontier", "pmp_gain_vs_ratio"} & set(summary)
    assert set(summary["verdicts"]) == {"Noise"}
    verdict = summary["verdicts"]["Noise"]
    assert verdict.startswith(("HOLDS", "FAILS")) and "prose: " in verdict and "recall-loglik: " in verdict
    # every attack result records its kind; the build is recorded beside its directory
    results = [json.loads(f.read_text()) for f in (out / "attacks").rglob("result.json")]
    assert len(results) == 8 and all(x["kind"] == "attack_run" for x in results)
    assert json.loads((out / "noise-tiny.defense.json").read_text())["release"] == str(out / "noise-tiny")
    # the terminal summary and the report show the defense and the JSON's numbers
    assert "Noise" in r.output and f"Noise: {verdict.split(' — ')[0]}" in r.output
    assert all(f"{row['gain']:+.4f}" in r.output for row in rows)
    md = (out / "report" / "README.md").read_text()
    assert f"| Noise | {verdict.replace('|', chr(92) + '|')} |" in md
    assert all(f"{row['gain']:+.4f}" in md for row in rows if row["defense"] == "noise")
    assert (out / "report" / "curves.png").stat().st_size > 500
    # a second run reuses the base model, the build and every attack
    r = runner.invoke(app, ["demo", "--quick", "--out", str(out), "--defense", "noise"])
    assert r.exit_code == 0 and r.output.count("reusing") == 2, r.output
    assert json.loads((out / "summary.json").read_text())["attacks"] == rows
    # another config of the same defense is another build: rebuilt, its attacks run again
    from weightlock.demo import run_demo

    again = run_demo(out, quick=True, report=False, defenses=[make_defense("noise", sigma=0.5)])
    assert again["capability"]["noise"]["code"] > cap["noise"]["code"]
    assert again["capability"]["reference"] == cap["reference"]
