"""Experiments as data (issue 24): specs that validate themselves and are frozen, typed AttackRun records
(read back across schema versions), and the runner: a tiny spec end to end, killed after its first attack
run and resumed."""
import dataclasses
import json
from pathlib import Path

import pytest

from weightlock.errors import WeightlockError
from weightlock.experiments import AttackRun, CostPoint, ExperimentSpec, load_spec, run_experiment, shipped_specs

FIELDS = Path(__file__).parent / "fixtures" / "demo_quick_fields.json"


def test_shipped_specs_are_the_demo_plans():
    """`weightlock demo [--quick]` runs the shipped specs through the one engine; the spec is the plan (the engine
    reads it through RunPlan, a view, no copy of its values)."""
    from weightlock.experiments.engine import RunPlan

    assert {"demo", "demo-quick"} <= set(shipped_specs())
    for name in ("demo", "demo-quick"):
        spec = load_spec(name)
        assert [e.name for e in spec.defenses] == ["dlr", "pmp"] and spec.attacks is None and spec.seeds == (0,)
    quick = RunPlan(load_spec("demo-quick"), load_spec("demo-quick").models[0])
    assert (quick.preset, quick.block_size, quick.train_tokens, quick.tasks) == ("tiny", 64, 50_000,
                                                                                 ("prose", "recall-loglik"))
    full = RunPlan(load_spec("demo"), load_spec("demo").models[0])
    assert (full.block_size, full.train_tokens, full.attack_budget()["steps"]) == (128, 200_000, 150)


BASE = {"name": "x", "models": [{"preset": "tiny"}], "defenses": {"dlr": {"rank": 4}}}


@pytest.mark.parametrize("change, message", [
    ({"budgte": {}}, "unknown key 'budgte' in the spec; valid keys: name, description, models, defenses, targets"),
    ({"budget": {"step": 3}}, "unknown key 'step' in budget; valid keys: steps, batch, score_every, patience"),
    ({"models": [{"preset": "tiny", "size": 3}]}, "unknown key 'size' in models[0]; valid keys: preset, path, name"),
    ({"attacks": {"full": {"lrs": [1]}}}, "unknown key 'lrs' in attacks.full; valid keys: attack, lr, group, options"),
    ({"learning_rates": {"fast": 1e-3}}, "unknown key 'fast' in learning_rates; valid keys: full, lora, masked"),
    ({"measure": {"reprot": False}}, "unknown key 'reprot' in measure; valid keys: capability_tokens"),
    ({"defenses": {"dlr": {"rnak": 4}}}, "defenses.dlr: "),
    ({"defenses": {"nope": {}}}, "defenses.nope: unknown defense 'nope'"),
    # issue 34: sweeps, explicit attacks, targets, analyses, stages
    ({"defenses": [{"name": "dlr", "sweeps": {"rank": [4]}}]}, "unknown key 'sweeps' in defenses[0]; valid keys: name"),
    ({"defenses": [{"name": "dlr", "sweep": {"rank": []}}]}, "defenses[0].sweep.rank is an empty list"),
    ({"defenses": [{"name": "dlr", "sweep": {"rank": [4, 4]}}]}, "defenses[0].sweep repeats a point"),
    ({"defenses": [{"name": "dlr", "sweep": 4}]}, "defenses[0].sweep must be a grid"),
    ({"defenses": [{"name": "dlr", "sweep": {"rnak": [4, 8]}}]}, "defenses.dlr-rnak4: "),
    ({"defenses": [{"name": "dlr", "sweep": {"rank": [4, "x"]}}]}, "defenses.dlr-rankx: "),
    ({"defenses": ["dlr", {"name": "dlr", "config": {"rank": 8}}]}, "defense 'dlr' is named twice (give each a label)"),
    ({"attacks": {"lora-all": {"attack": "lora", "options": {"targets": "every"}}}}, "attacks.lora-all: "),
    ({"attacks": {"x": {"attack": "nope"}}}, "attacks.x: unknown attack 'nope'"),
    ({"attacks": {"x": {"attack": "lora", "group": "fast"}}}, "attacks.x.group must be one of full, lora, masked"),
    ({"attacks": {"x": {"attack": "lora", "sweep": {"lr": [1]}}}}, "sweep learning rates as attacks.x.lr"),
    ({"attacks": {"x": {"attack": "full", "against": ["pmp"]}}}, "attacks.x.against: 'pmp' is no defense or target"),
    ({"attacks": {"full": {}, "x": {"attack": "full", "lr": "best:nope"}}}, "attacks.x.lr: best:nope names no other"),
    ({"attacks": {"x": {"attack": "full", "lr": "best:"}}}, "attacks.x.lr: best: needs an attack label"),
    ({"attacks": {"x": {"attack": "full", "tasks": ["recall"]}}, "tasks": ["prose"]}, "attacks.x.tasks: 'recall' is"),
    ({"attacks": {"x": {"attack": "full", "seeds": [1, 1]}}}, "attacks.x.seeds must be a non-empty list of distinct"),
    ({"targets": [{"name": "t", "dir": "/m"}]}, "unknown key 'dir' in targets[0]; valid keys: name, path"),
    ({"targets": [{"name": "dlr", "path": "/m"}]}, "a target shares its name with a defense"),
    ({"analyses": ["nope"]}, "analyses.nope: unknown analysis 'nope'"),
    ({"analyses": [{"name": "attack-table", "options": {"tsk": "prose"}}]},
     "analyses.attack-table: unknown option 'tsk'; valid options: task, save_as"),
    ({"stages": ["attack", "report"]}, "stages must be a non-empty list of build, attack, analyse"),
    ({"budget": {"block_size": 0}}, "budget.block_size must be an integer ≥ 1, got 0"),
    ({"attacks": {"offload": {}}}, "unknown attack 'offload' in attacks; the defenses' attacks: full, lora"),
    ({"attacks": {"full": {"options": {"rnak": 2}}}}, "attacks.full: "),
    ({"attacks": {"full": {"lr": [1e-3, -1]}}}, "attacks.full.lr must be positive numbers"),
    ({"tasks": ["nope"]}, "tasks: unknown task 'nope'"),
    ({"models": [{"preset": "huge"}]}, "models[0].preset: unknown preset 'huge'"),
    ({"budget": {"steps": 0}}, "budget.steps must be an integer ≥ 1, got 0"),
    ({"seeds": [0, 0]}, "a seed is named twice"),
    ({"models": [{"preset": "small", "seed": -1}]}, "models[0].seed must be an integer ≥ 0, got -1"),
    ({"models": [{"path": "/m", "seed": 1}]}, "models[0].seed seeds the preset's pretraining; the model /m is used"),
    ({"models": [{"path": "/m"}], "defenses": ["pmp"]}, "pmp pretrains its own model"),
    ({"name": ""}, "the spec needs a name"),
])
def test_spec_refuses_bad_input_with_one_line(change, message):
    with pytest.raises(WeightlockError) as e:
        ExperimentSpec.from_dict({**BASE, **change}, source="s.yaml")
    text = str(e.value)
    assert text.startswith("s.yaml: ") and message in text and "\n" not in text, text


def test_spec_is_frozen_and_round_trips(tmp_path):
    spec = load_spec("demo-quick")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.budget.steps = 1
    with pytest.raises(TypeError):
        spec.defenses[0].config["rank"] = 1
    assert ExperimentSpec.from_dict(spec.to_dict()) == spec
    (tmp_path / "s.json").write_text(json.dumps(spec.to_dict()))
    assert load_spec(tmp_path / "s.json") == spec
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(WeightlockError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")
    with pytest.raises(WeightlockError, match="nor a shipped spec .shipped: attacks, cost-to-target, "):
        load_spec("no-such-spec")
    # a sweep: per attack label, else the plan's group; the YAML spelling 1e-3 (a string to YAML) is a number
    s = ExperimentSpec.from_dict({**BASE, "attacks": {"full": {"lr": ["1e-3", 3e-3]}, "lora": {}}})
    assert s.lrs("full", "full") == (1e-3, 3e-3) and s.lrs("lora", "lora") == (1e-2,)
    assert s.with_defenses(["none"]).attacks.keys() == {"full", "lora"}


def test_sweeps_expand_to_one_entry_per_point_with_generated_labels():
    from weightlock.experiments.spec import expand_sweep

    assert expand_sweep({"rank": [8, 16], "steps": [1, 2]}, "s", "x") == [
        {"rank": 8, "steps": 1}, {"rank": 8, "steps": 2}, {"rank": 16, "steps": 1}, {"rank": 16, "steps": 2}]
    assert expand_sweep([{"rank": 8}, {"rank": 16, "steps": 3}], "s", "x") == [{"rank": 8}, {"rank": 16, "steps": 3}]
    spec = ExperimentSpec.from_dict({
        "name": "sweep", "models": ["tiny"],
        "defenses": [{"name": "dlr", "config": {"steps": 10}, "sweep": {"rank": [8, 16, 32]}},
                     {"name": "pmp", "label": "hardened", "sweep": [{"mask_ratio": 0.1}, {"mask_ratio": "5e-1"}]}],
        "targets": [{"path": "runs/locks/gated.gguf"}],
        "attacks": {"full": {"lr": [1e-3, 3e-3]},
                    "lora-all": {"attack": "lora", "options": {"targets": "all-linear"}, "sweep": {"r": [4, 8]},
                                 "against": ["dlr-rank8", "gated"]},
                    "lora": {"sweep": {"r": [2]}}},
        "analyses": [{"name": "attack-table", "options": {"task": "prose"}}], "stages": ["analyse", "build"]})
    assert [(e.key, dict(e.config)) for e in spec.defenses] == [
        ("dlr-rank8", {"steps": 10, "rank": 8}), ("dlr-rank16", {"steps": 10, "rank": 16}),
        ("dlr-rank32", {"steps": 10, "rank": 32}), ("hardened-mask_ratio0.1", {"mask_ratio": 0.1}),
        ("hardened-mask_ratio0.5", {"mask_ratio": 0.5})]
    assert [d.name for d in (e.make() for e in spec.defenses)][:1] == ["dlr-rank8"]  # rows, dirs: the label
    assert [(t.name, t.path) for t in spec.targets] == [("gated", "runs/locks/gated.gguf")]
    assert list(spec.attacks) == ["full", "lora-all-r4", "lora-all-r8", "lora-r2"]
    a = spec.attacks["lora-all-r8"]
    assert (a.attack, a.group, dict(a.options), a.against) == ("lora", "lora", {"targets": "all-linear", "r": 8},
                                                          ("dlr-rank8", "gated"))
    # a swept planned attack becomes its plan's attack with the point's options
    b = spec.attacks["lora-r2"]
    assert (b.attack, b.group, dict(b.options)) == ("lora", "lora", {"targets": "attention", "r": 2})
    assert spec.stages == ("build", "analyse") and spec.lrs("full", "full") == (1e-3, 3e-3)
    assert ExperimentSpec.from_dict(spec.to_dict()) == spec  # expanded once, read back the same

    from weightlock.defenses import make_defense
    from weightlock.experiments.engine import _target_defense, attack_specs

    dlr8 = spec.defenses[0].make()
    assert [s.label for s in attack_specs(dlr8, spec)] == ["full", "lora-all-r4", "lora-all-r8", "lora-r2"]
    assert [s.label for s in attack_specs(spec.defenses[1].make(), spec)] == ["full", "lora-r2"]
    assert [s.label for s in attack_specs(_target_defense(spec.targets[0]), spec)] == [
        "full", "lora-all-r4", "lora-all-r8", "lora-r2"]
    assert make_defense("dlr").name == "dlr"  # a label never leaks into the registered class


def _run(scores=(0.5, 0.6, 0.8)):
    curve = [{"step": 2 * i, "tokens": 256 * i, "seconds": 1.5 * i, "flops": 1e9 * i, "score": s}
             for i, s in enumerate(scores)]
    return {"model": "m", "before": {"score": scores[0]}, "after": {"score": scores[-1]}, "gain": 0.3,
            "cost_curve": curve, "score_curve": [[p["step"], p["score"]] for p in curve], "parameters": 10,
            "trainable_parameters": 10, "tokens": 512, "stopped_early": False, "capability_ppl_before": 5.0,
            "capability_ppl_after": 5.5, "capability_data": "builtin:code", "loss_curve": [1.0, 0.5],
            "cost": {"saved_activation_bytes_per_step": 100, "training_memory_bytes": 400, "step_time_s": 0.75,
                     "prepare_seconds": 0.0, "train_seconds": 3.0, "peak_rss_bytes": 1000,
                     "peak_rss_delta_bytes": 10, "flops_estimate": 2e9, "flops_counted": 1.9e9}}


def test_attack_run_records_round_trip_and_read_old_locked_results(tmp_path):
    from weightlock.attacks.run import with_target
    from weightlock.eval.cost_to_target import load_attack_curves

    result = {"kind": "attack_run", "schema_version": 2, "model": "m", "reference": None, "task": "prose",
              "attack": "full", "options": {"lr": 1e-3, "seed": 0, "optimizer": "adamw"}, "target": _run()}
    rec = AttackRun.from_result(result, defense="dlr", label="full")
    assert (rec.target, rec.defense, rec.attack, rec.attack_name, rec.task, rec.seed) == ("m", "dlr", "full", "full",
                                                                                           "prose", 0)
    assert rec.curve[1] == CostPoint(2, 256, 1.5, 1e9, 0.6) and rec.steps == 4 and rec.gain == 0.3
    assert rec.total_seconds() == 0.75 * 4 and rec.memory()["counted"] == 400 and rec.flops_counted == 1.9e9
    assert rec.score_curve == [[0, 0.5], [2, 0.6], [4, 0.8]] and rec.cost_curve() == result["target"]["cost_curve"]
    d = json.loads(json.dumps(rec.to_dict()))
    assert d["kind"] == "attack_record" and d["schema_version"] == 1 and AttackRun.from_dict(d) == rec
    with pytest.raises(WeightlockError, match="upgrade weightlock"):
        AttackRun.from_dict({**d, "schema_version": 99})
    # before attack_run schema 2 the attacked model's run was stored under "locked" (the unlocked original's
    # too): such records are still read, by the records, by run_attack (reused runs) and by the cost multiplier
    old = {**{k: v for k, v in result.items() if k != "target"}, "schema_version": 1, "locked": _run()}
    assert AttackRun.from_result(old, defense="dlr", label="full") == rec
    assert with_target(old)["target"] == old["locked"] and "target" not in old
    for name, r in (("new", result), ("old", old)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text(json.dumps(r))
    curves = load_attack_curves([tmp_path / "new", tmp_path / "old"])
    assert [c.curve for c in curves] == [rec.cost_curve()] * 2 and [c.memory_bytes for c in curves] == [400, 400]
    with pytest.raises(WeightlockError, match="neither 'target' nor 'locked'"):
        AttackRun.from_result({"kind": "attack_run", "schema_version": 2, "attack": "full"})


TINY_SPEC = """\
name: tiny-resume
description: one defense, one attack at two learning rates, a few steps
models:
  - {{preset: tiny, path: {model}, name: tiny}}
defenses:
  none: {{}}
attacks:
  full: {{lr: [1.0e-3, 3.0e-3], options: {{eval_tokens: 2048}}}}
tasks: [prose]
seeds: [0]
budget: {{steps: 2, batch: 2, score_every: 1, patience: 0}}
measure: {{capability_tokens: 1024, memory_depths: [2, 4], report: false}}
"""


class Killed(Exception):
    pass


def _records(out: Path) -> dict:
    return {str(f.parent.relative_to(out / "attacks")): AttackRun.from_dict(json.loads(f.read_text()))
            for f in sorted((out / "attacks").rglob("record.json"))}


def _deterministic(r: AttackRun) -> tuple:
    """What two runs of the same attack share (not the time or the measured memory)."""
    return (r.defense, r.attack, r.task, r.config, r.seed, [(p.step, p.tokens, p.score) for p in r.curve],
            r.score_before, r.score_after, r.gain, r.training_memory_bytes, r.saved_activation_bytes,
            r.flops_estimate, r.capability_ppl_after)


@pytest.mark.slow
def test_tiny_spec_end_to_end_killed_and_resumed(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from weightlock.cli import app

    model, _ = tiny_model_dir
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(TINY_SPEC.format(model=model))

    # uninterrupted, through the command line
    r = CliRunner().invoke(app, ["run", str(spec_file), "--out", str(tmp_path / "whole")])
    assert r.exit_code == 0, r.output
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert json.loads((tmp_path / "whole" / "spec.json").read_text())["name"] == "tiny-resume"

    # killed after its first finished attack run
    out, seen = tmp_path / "killed", []

    def kill(record):
        seen.append(record)
        raise Killed

    with pytest.raises(Killed):
        run_experiment(spec_file, out, on_record=kill)
    first = _records(out)
    assert len(first) == 1 and not (out / "summary.json").exists()
    (done,) = first
    mtime = (out / "attacks" / done / "record.json").stat().st_mtime_ns
    resumed: list = []
    summary = run_experiment(spec_file, out, on_record=resumed.append)["tiny"]
    records = _records(out)
    (killed,) = seen
    assert len(resumed) == 3  # the finished run is skipped
    assert (killed.defense, killed.config["lr"]) not in {(r.defense, r.config["lr"]) for r in resumed}
    assert (out / "attacks" / done / "record.json").stat().st_mtime_ns == mtime
    assert records[done] == first[done]
    # 2 models (the reference and the defense's release, here the same directory) × 2 learning rates
    assert sorted(records) == sorted(_records(tmp_path / "whole")) == [
        f"{k}/prose/full/lr{lr}-seed0" for k in ("none", "reference") for lr in ("0.001", "0.003")]
    for k, rec in _records(tmp_path / "whole").items():
        assert _deterministic(records[k]) == _deterministic(rec), k
    # the summary reads the records: the attacker's best learning rate, every point in the sweep
    rows = {(x["defense"], x["attack"]): x for x in summary["attacks"]}
    assert set(rows) == {("reference", "full"), ("none", "full")}
    for (defense, _), row in rows.items():
        recs = [v for k, v in records.items() if k.startswith(defense + "/")]
        assert row["gain"] == max(x.gain for x in recs) and row["cost_curve"] is not None
    assert [[p["gain"] for p in s["points"]] for s in summary["sweep"]] == \
        [[p["gain"] for p in s["points"]] for s in whole["sweep"]]
    assert [r["gain"] for r in summary["attacks"]] == [r["gain"] for r in whole["attacks"]]
    # the same fields as the demo's summary and rows (the demo's defense-specific keys aside; "sweep": >1 point)
    fields = json.loads(FIELDS.read_text())
    assert set(summary) - {"sweep"} == set(fields["summary"]) - set(fields["defense_keys"])
    assert all(set(x) == set(fields["row"]) for x in summary["attacks"])
    # a second run skips everything
    again: list = []
    assert run_experiment(spec_file, out, on_record=again.append)["tiny"]["attacks"] == summary["attacks"]
    assert again == []
    # another sweep: the runs it shares with the finished one are kept, the new learning rate runs
    spec_file.write_text(TINY_SPEC.format(model=model).replace("3.0e-3]", "1.0e-2]"))
    summary = run_experiment(spec_file, out, on_record=again.append)["tiny"]
    assert sorted((r.defense, r.config["lr"]) for r in again) == [("none", 1e-2), ("reference", 1e-2)]
    assert [p["lr"] for p in summary["sweep"][0]["points"]] == [1e-3, 1e-2]
    # another setting of a finished run (here the budget) runs it again, its old run discarded
    spec = load_spec(spec_file)
    changed = dataclasses.replace(spec, attacks={"full": dataclasses.replace(spec.attacks["full"], lr=(1e-3,))},
                                  budget=dataclasses.replace(spec.budget, steps=1))
    again.clear()
    run_experiment(changed, out, on_record=again.append)
    assert len(again) == 2 and all(r.steps == 1 for r in again)
    assert all(r.steps == 1 for k, r in _records(out).items() if "seed" not in k)


def test_readme_example_spec_is_valid():
    """The docs' complete example (docs/specs.md) is a spec that loads (every key and value checked)."""
    import re

    import yaml

    page = (Path(__file__).parents[1] / "docs" / "specs.md").read_text()
    section = page.split("# Experiments as specs", 1)[1]
    text = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    spec = ExperimentSpec.from_dict(yaml.safe_load(text), source="README")
    assert spec.name == "lock-vs-lora" and spec.lrs("lora", "lora") == (3e-3, 1e-2, 3e-2) and spec.seeds == (0, 1)
    assert spec.lrs("full", "full") == (2e-3,) and dict(spec.attacks["lora"].options) == {"r": 16}


SWEEP_SPEC = """\
name: tiny-sweep
models:
  - {{preset: tiny, path: {model}, name: tiny}}
defenses:
  - {{name: none, sweep: {{copy: [false, true]}}}}
targets:
  - {{name: locked, path: {locked}}}
attacks:
  full: {{options: {{eval_tokens: 2048}}}}
  lora-all:
    attack: lora
    options: {{targets: all-linear, eval_tokens: 2048}}
    sweep: {{r: [2, 4]}}
    against: [locked]
  full@seed1: {{attack: full, lr: "best:full", seeds: [1], against: [locked], options: {{eval_tokens: 2048}}}}
tasks: [prose]
budget: {{steps: 2, batch: 2, score_every: 1, patience: 0}}
measure: {{capability_tokens: 1024, memory_depths: [2, 4], report: false}}
analyses:
  - {{name: attack-table, options: {{task: prose}}}}
  - attack-gains
  - memory-time-frontier
  - {{name: lock-cost, options: {{timing_repeats: 1, timing_steps: 2, figure: null}}}}
"""


@pytest.mark.slow
def test_sweep_spec_with_a_target_and_explicit_attacks_runs_end_to_end(tmp_path, tiny_model_dir, tiny_locked_dir):
    """A defense sweep (one build per point, labelled), a given release as a target, an explicit attack swept over
    its options on the target only (and on the original, its reference), then the analyse stage, alone too."""
    model, _ = tiny_model_dir
    spec_file = tmp_path / "sweep.yaml"
    spec_file.write_text(SWEEP_SPEC.format(model=model, locked=tiny_locked_dir))
    out = tmp_path / "run"
    summary = run_experiment(spec_file, out)["tiny"]
    rows = {(r["defense"], r["attack"]) for r in summary["attacks"]}
    assert rows == {("reference", "full"), ("reference", "lora-all-r2"), ("reference", "lora-all-r4"),
                    ("none-copyFalse", "full"), ("none-copyTrue", "full"),
                    ("locked", "full"), ("locked", "lora-all-r2"), ("locked", "lora-all-r4"),
                    ("reference", "full@seed1"), ("locked", "full@seed1")}
    # a later stage: a second seed at the best learning rate the first stage found, on each side
    second = AttackRun.from_dict(json.loads((out / "attacks" / "locked" / "prose" / "full@seed1" / "record.json")
                                            .read_text()))
    assert second.seed == 1 and second.config["lr"] == 2e-3
    assert set(summary["capability"]) == {"reference", "none-copyFalse", "none-copyTrue", "locked"}
    assert summary["targets"] == {"locked": str(tiny_locked_dir)} and "locked" in summary["verdicts"]
    assert {"none (none-copyFalse)", "none (none-copyTrue)"} <= set(summary["verdicts"])
    lora = next(r for r in summary["attacks"] if r["defense"] == "locked" and r["attack"] == "lora-all-r4")
    assert lora["reference_attack"] == "lora-all-r4"
    rec = AttackRun.from_dict(json.loads((out / "attacks" / "locked" / "prose" / "lora-all-r4" / "record.json")
                                         .read_text()))
    assert rec.config["r"] == 4 and rec.config["targets"] == "all-linear" and rec.target == str(tiny_locked_dir)
    table = json.loads((out / "analysis" / "attack-table.json").read_text())
    assert table["spec"] == "tiny-sweep" and len(table["rows"]) == 10
    # the bench grids' analyses read the same records (what bench/results/attacks.json, frontier.json hold)
    gains = json.loads((out / "analysis" / "attack-gains.json").read_text())
    assert gains["kind"] == "attack_curves" and len(gains["results"]) == 6
    row = next(r for r in gains["results"] if r["release"] == "locked" and r["attack"] == "lora-all-r4")
    assert row["gain_locked_mean"] == pytest.approx(lora["gain"]) and len(row["score_curves"]["locked"]) == 1
    assert (out / "analysis" / "attacks.png").stat().st_size > 500
    frontier = json.loads((out / "analysis" / "memory-time-frontier.json").read_text())
    assert frontier["kind"] == "memory_time_frontier" and len(frontier["rows"]) == 10
    assert all(r["saved_activation_bytes"] > 0 and r["step_time_s"] > 0 for r in frontier["rows"])
    # the lock cost multiplier (was bench/cost_to_target.py): rows from the records, a quiet timing pass
    cost = json.loads((out / "analysis" / "lock-cost.json").read_text())
    assert cost["kind"] == "lock_cost" and {a["defense"] for a in cost["analysis"]} == {
        "none-copyFalse", "none-copyTrue", "locked"}
    labels = {(r["model"], r["label"]) for r in cost["runs"]}
    assert ("original", "full-lr0.002") in labels and ("locked", "full-lr0.002-seed1") in labels
    assert all(p.get("seconds_in_run") is not None for r in cost["runs"] for p in r["cost_curve"])
    assert len(cost["quiet_timings"]) >= 3
    # the analyse stage alone reads the recorded summary: no attack runs again
    (out / "analysis" / "attack-table.json").unlink()
    again: list = []
    spec = dataclasses.replace(load_spec(spec_file), stages=("analyse",))
    run_experiment(spec, out, on_record=again.append)
    assert again == [] and (out / "analysis" / "attack-table.json").exists()


def test_every_shipped_spec_loads_and_expands_without_running():
    """Every spec shipped in the package (the demo and the bench grids) validates, expands (sweeps, explicit
    attacks, targets) and names registered analyses; `weightlock run --list` lists each."""
    from typer.testing import CliRunner

    from weightlock.cli import app
    from weightlock.defenses import make_defense
    from weightlock.experiments.analyses import ANALYSES
    from weightlock.experiments.engine import _reference_specs, _target_defense, attack_specs

    names = shipped_specs()
    assert {"demo", "demo-quick", "attacks", "pmp-sweep", "frontier", "dlr-regime", "dlr-fidelity",
            "pmp-recovery", "cost-to-target", "cost-to-target-reanalyse"} <= set(names)
    listed = CliRunner().invoke(app, ["run", "--list"]).output
    for name in names:
        spec = load_spec(name)
        assert ExperimentSpec.from_dict(spec.to_dict()) == spec and name in listed
        assert all(a.name in ANALYSES and a.name in listed for a in spec.analyses)
        releases = [e.make() for e in spec.defenses] + [_target_defense(t) for t in spec.targets]
        _reference_specs(make_defense("none"), releases, spec)  # every attack has its reference on the original
        if "attack" in spec.stages and spec.attacks != {}:  # attacks: [] builds and evaluates only
            assert all(attack_specs(d, spec) for d in releases), name
    assert "spec keys:" in listed and "against" in listed and "reverse distillation's own" in listed
    recovery = load_spec("pmp-recovery")
    assert [e.key for e in recovery.defenses] == ["pmp-paper", "pmp-hardened"] and recovery.attacks == {}
    assert dict(recovery.defenses[0].config)["variant"] == "paper" and "label" not in recovery.defenses[0].config
    sweep = load_spec("pmp-sweep")
    assert [dict(e.config)["mask_ratio"] for e in sweep.defenses] == [0.1, 0.3, 0.5, 0.7, 0.9]
    cost = load_spec("cost-to-target")
    assert [e.key for e in cost.defenses] == ["dlr-16", "dlr-32", "dlr-8", "dlr-64", "dlr-32-norm", "pmp"]
    assert (cost.attacks["ckpt-dlr"].best_of, cost.attacks["full@regime"].best_of) == ("full", "reference:full")
    assert cost.attacks["full@seed1"].seeds == (1,) and cost.attacks["freeze-dlr@regime"].tasks == ("prose",)
    frontier = load_spec("frontier")
    locked, = (_target_defense(t) for t in frontier.targets)
    assert [s.label for s in attack_specs(locked, frontier)] == list(frontier.attacks)
    assert frontier.attacks["ckpt-dlr"].reference == "none"


def test_pmp_gain_vs_ratio_reads_the_sweeps_rows(tmp_path):
    from weightlock.experiments.analyses import ANALYSES, AnalysisContext

    summary = {"defenses": [{"name": f"pmp-mask_ratio{r}", "config": {"mask_ratio": r}} for r in (0.1, 0.5)],
               "models": {"reference": str(tmp_path / "base"), "pmp-mask_ratio0.1": str(tmp_path / "a" / "release"),
                          "pmp-mask_ratio0.5": str(tmp_path / "b" / "release")},
               "plan": {"block_size": 128},
               "attacks": [{"defense": d, "attack": a, "task": "prose", "gain": g, "score_before": 1.0,
                            "score_after": 1.0 + g, "capability_ppl_after": 5.0}
                           for d, a, g in (("reference", "full", 0.5), ("reference", "lora", 0.3),
                                           ("pmp-mask_ratio0.1", "full", 0.1), ("pmp-mask_ratio0.5", "full", 0.2))]}
    r = ANALYSES.get("pmp-gain-vs-ratio")(AnalysisContext(tmp_path, load_spec("pmp-sweep"), summary), figure=None)
    assert r["dense_gains"] == {"prose": {"full": 0.5, "lora": 0.3}}
    assert [(x["ratio"], x["method"], x["gain"]) for x in r["rows"]] == [(0.1, "full", 0.1), (0.5, "full", 0.2)]


def test_a_seeded_rerun_pretrains_the_preset_at_its_seed(tmp_path, monkeypatch):
    """--seed N (spec.with_seed): the preset model is pretrained at N (the default stays the preset's 0), the seed
    round-trips through the spec's data, and a spec of model directories refuses it."""
    import weightlock.train.pretrain as pt

    class Stop(Exception):
        pass

    seen = []

    def fake_pretrain(cfg, out, **kw):
        seen.append(cfg.train.seed)
        raise Stop

    monkeypatch.setattr(pt, "pretrain", fake_pretrain)
    spec = load_spec("pmp-recovery")
    for s, want in ((spec, 0), (spec.with_seed(3), 3)):
        with pytest.raises(Stop):
            run_experiment(s, tmp_path / f"run{want}")
        assert seen[-1] == want
    seeded = spec.with_seed(3)
    assert seeded.models[0].seed == 3 and ExperimentSpec.from_dict(seeded.to_dict()) == seeded
    assert spec.models[0].seed is None and "seed" not in spec.to_dict()["models"][0]  # old summaries stay current
    with pytest.raises(WeightlockError, match="models are all directories"):
        ExperimentSpec.from_dict({**BASE, "models": [{"preset": "tiny", "path": "/m"}]}).with_seed(1)
    # a run directory pretrained at another seed is refused, not resumed at the saved seed (base and PMP's run)
    for d, f in (("base-small", "weightlock_run.json"), ("pmp-paper", "pmp_config.json")):
        run = tmp_path / f"other-{d}"
        (run / d).mkdir(parents=True)
        (run / d / f).write_text(json.dumps({"config": {"train": {"seed": 5}}}))
        with pytest.raises(WeightlockError, match=f"{d} was pretrained at seed 5, this run asks for seed 3"):
            run_experiment(seeded, run)
    assert seen == [0, 3]


@pytest.mark.slow
def test_a_spec_without_attacks_builds_evaluates_and_analyses(tmp_path, tiny_model_dir):
    """attacks: [] — the build, the capability and the defenses' own evaluations, then the analyses (the bench's
    base-model and lock-fidelity records come from such a spec)."""
    model, _ = tiny_model_dir
    spec = ExperimentSpec.from_dict({
        "name": "no-attacks", "models": [{"preset": "tiny", "path": str(model), "name": "tiny"}],
        "defenses": [{"name": "none", "sweep": [{"label": "plain"}, {"label": "copied", "copy": True}]}],
        "attacks": [], "tasks": ["prose"], "measure": {"capability_tokens": 1024, "report": False},
        "analyses": [{"name": "base-model", "options": {"max_tokens": 2048}}, "lock-fidelity"]})
    assert [(e.key, dict(e.config)) for e in spec.defenses] == [("plain", {}), ("copied", {"copy": True})]
    summary = run_experiment(spec, tmp_path / "run")["tiny"]
    assert summary["attacks"] == [] and summary["verdicts"] == {} and set(summary["capability"]) == {
        "reference", "plain", "copied"}
    base = json.loads((tmp_path / "run" / "analysis" / "base-model.json").read_text())
    assert base["preset"] == "tiny" and base["validation_perplexity"]["code"]["model"] > 1
    assert json.loads((tmp_path / "run" / "analysis" / "lock-fidelity.json").read_text())["ranks"] == []


def test_real_attacks_analysis_reproduces_the_recorded_red_team(tmp_path):
    """The red team's analysis moved from bench/real_attacks.py into the library: re-analysing the recorded
    runs gives the recorded analysis exactly (no file under bench/results is written)."""
    from weightlock.experiments.analyses import ANALYSES, AnalysisContext

    recorded = Path(__file__).resolve().parents[1] / "bench" / "results" / "real_attacks_gated-s4096.json"
    d = json.loads(recorded.read_text())
    ctx = AnalysisContext(tmp_path, load_spec("real-attacks-reanalyse"), {})
    r = ANALYSES.get("real-attacks")(ctx, reanalyse=[str(recorded)], figure=False)
    assert json.dumps(r["releases"]["gated-s4096"]["analysis"], sort_keys=True) == json.dumps(d["analysis"],
                                                                                             sort_keys=True)
    assert not list(tmp_path.iterdir())


def test_a_target_must_be_faithful_when_the_spec_says_so(tmp_path):
    from weightlock.experiments.engine import check_run, run_model

    release = tmp_path / "release"
    release.mkdir()
    (release / "config.json").write_text("{}")
    (release / "manifest.json").write_text(json.dumps({"fidelity": {"ppl_ratio": 1.2}}))
    spec = ExperimentSpec.from_dict({**BASE, "defenses": [], "targets": [{"name": "r", "path": str(release),
                                                                          "max_ppl_ratio": 1.05}],
                                     "models": [{"preset": "tiny", "path": str(release)}]})
    check_run(spec)
    with pytest.raises(WeightlockError, match="ppl ratio 1.2000 > 1.05: not a faithful release"):
        run_model(tmp_path / "out", spec)
    assert not (tmp_path / "out").exists()


def test_compare_judges_a_record_against_its_seed_reruns(tmp_path):
    """weightlock compare: rows keyed by rank (not position), the 95% prediction interval of one more run
    (mean ± t·s·√(1+1/n)), a figure outside named, a figure with fewer than two reruns not judged."""
    from typer.testing import CliRunner

    from weightlock.cli import app
    from weightlock.experiments.reproduce import compare, headline_patterns

    def rec(r8, r32, kind="lock_fidelity"):
        rows = [{"rank": 8, "ppl_ratio": r8}] if r8 is not None else []
        return {"kind": kind, "schema_version": 1, "ranks": rows + [{"rank": 32, "ppl_ratio": r32, "flag": True}]}

    reruns = [rec(1.0, 1.10), rec(None, 1.20), rec(None, 1.30)]  # rank 8 only in the first: 32 moved to row 0
    got = compare(rec(1.5, 1.5), reruns, ("ranks.*.ppl_ratio",))
    by = {r["figure"]: r for r in got["figures"]}
    assert set(by) == {"ranks.8.ppl_ratio", "ranks.32.ppl_ratio"}
    r32 = by["ranks.32.ppl_ratio"]
    half = 4.303 * 0.1 * (1 + 1 / 3) ** 0.5  # t(0.975, 2) · s · √(1 + 1/n), s = 0.1
    assert r32["mean"] == pytest.approx(1.2) and r32["high"] == pytest.approx(1.2 + half)
    assert r32["within"] is True and r32["in_range"] is False  # outside the range, inside the interval
    assert got["outside_range"] == ["ranks.32.ppl_ratio"]
    assert by["ranks.8.ppl_ratio"]["within"] is None and got["counts"]["judged"] == 1 and got["reproduced"] is True
    assert got["counts"]["figures"] - got["counts"]["judged"] == 1
    assert compare(rec(1.0, 1.5), reruns[:1], ("ranks.*",))["reproduced"] is None
    assert "ranks.32.rank" not in compare(rec(1.0, 1.5), reruns, ("ranks.*",))["outside"] + [
        r["figure"] for r in compare(rec(1.0, 1.5), reruns, ("ranks.*",))["figures"]]  # the row's name: no figure
    same = compare(rec(1.0, 1.2 + 1e-12), [rec(1.0, 1.2)] * 3, ("ranks.*.ppl_ratio",))  # no spread: float rounding
    assert same["reproduced"] is True
    far = compare(rec(1.0, 3.0), reruns, ("ranks.*.ppl_ratio",))
    assert far["reproduced"] is False and far["outside"] == ["ranks.32.ppl_ratio"]
    with pytest.raises(WeightlockError, match="no figure matching nope"):
        compare(rec(1.0, 1.0), reruns, ("nope",))
    assert "ranks.*.ppl_ratio" in headline_patterns("lock_fidelity")
    assert headline_patterns(analysis="base-model") == ("validation_perplexity.*.model",)

    files = []
    for i, r in enumerate([rec(1.0, 1.2), *reruns]):
        files.append(tmp_path / f"r{i}.json")
        files[-1].write_text(json.dumps(r))
    res = CliRunner().invoke(app, ["compare", *map(str, files), "--out", str(tmp_path / "c.json")])
    assert res.exit_code == 0, res.output
    assert "reproduced: yes (1 of 1 judged figures inside, 1 not judged; 0 beyond the reruns' range)" in res.output
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["kind"] == "bench.reproduction" and saved["schema_version"] >= 1 and saved["reproduced"]
    assert len(saved["rerun_files"]) == 3
    (tmp_path / "other.json").write_text(json.dumps(rec(1.0, 1.0, kind="mask_recovery")))
    res = CliRunner().invoke(app, ["compare", str(files[0]), str(tmp_path / "other.json")])
    assert res.exit_code == 2 and "a mask_recovery record, not a lock_fidelity record" in res.output
    (tmp_path / "plain.json").write_text(json.dumps({"x": 1.0}))
    res = CliRunner().invoke(app, ["compare", str(tmp_path / "plain.json"), str(tmp_path / "plain.json")])
    assert res.exit_code == 2 and "a record of no known kind without registered headline figures" in res.output
    assert "--analysis NAME" in res.output
