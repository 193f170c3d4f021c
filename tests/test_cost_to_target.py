"""Cost to target on synthetic curves, the lock cost multiplier, memory budgets, patience stopping."""
import math

import pytest
import torch

from weightlock.errors import WeightlockError
from weightlock.eval.cost_to_target import AttackCurve, cost_to_target, lock_cost_multiplier
from weightlock.train.loop import PatienceHook


def curve(scores, seconds_per_point=10.0, start=0.0):
    return [{"step": 10 * i, "tokens": 1000 * i, "seconds": seconds_per_point * i, "flops": 1e9 * i,
             "score": start + s} for i, s in enumerate(scores)]


def test_cost_to_target_interpolates_and_can_be_never():
    c = curve([0.0, 0.4, 0.8, 1.0])
    assert cost_to_target(c, 0.6) == pytest.approx(15.0)  # halfway between 10 s (0.4) and 20 s (0.8)
    assert cost_to_target(c, 0.8, "step") == pytest.approx(20.0)
    assert cost_to_target(c, 0.2, "tokens") == pytest.approx(500.0)
    assert cost_to_target(c, 1.5) is None, "never reached within the budget"
    assert cost_to_target(c, 0.0) == 0.0
    # the gain is relative to the score before training, not the raw score
    assert cost_to_target(curve([0.0, 0.4, 0.8], start=-3.0), 0.6) == pytest.approx(15.0)
    # first crossing counts even if the curve falls back later
    assert cost_to_target(curve([0.0, 0.9, 0.1, 0.95]), 0.5) == pytest.approx(10 * 0.5 / 0.9)
    with pytest.raises(WeightlockError, match="must not decrease"):
        cost_to_target([{"seconds": 2, "score": 0}, {"seconds": 1, "score": 1}], 0.5)
    with pytest.raises(WeightlockError, match="unknown cost"):
        cost_to_target(c, 0.5, "euros")


def test_lock_cost_multiplier_and_memory_budget():
    original = [AttackCurve("full", curve([0, 0.5, 1.0, 1.0]), peak_bytes=100),
                AttackCurve("lora", curve([0, 0.3, 0.6, 0.7]), peak_bytes=60)]
    locked = [AttackCurve("full", curve([0, 0.3, 0.6, 0.9, 1.0], seconds_per_point=15), peak_bytes=250),
              AttackCurve("lora", curve([0, 0.3, 0.6, 0.7]), peak_bytes=50)]
    r = lock_cost_multiplier(locked, original, q=0.9)
    assert r["target_gain"] == pytest.approx(0.9)
    assert r["original_min"] == pytest.approx(18.0)  # full: 10 + 0.8·10
    assert r["locked_min"] == pytest.approx(45.0)  # full: 3 points × 15 s
    assert r["multiplier"] == pytest.approx(2.5) and r["locked"]["lora"] is None
    # the attacker may use at most the unlocked full fine-tune's peak: locked full does not fit
    b = lock_cost_multiplier(locked, original, q=0.9, memory_budget=100)
    assert b["locked"]["full"] == "over memory budget" and b["multiplier"] == math.inf
    # a checkpointed attack that fits the budget and pays in time is what counts then
    locked.append(AttackCurve("full+checkpointing", curve([0, 0.3, 0.6, 0.9, 1.0], seconds_per_point=20),
                              peak_bytes=90))
    b = lock_cost_multiplier(locked, original, q=0.9, memory_budget=100)
    assert b["multiplier"] == pytest.approx(60.0 / 18.0)
    with pytest.raises(WeightlockError, match="gains nothing"):
        lock_cost_multiplier(locked, [AttackCurve("full", curve([0, -0.1]))])


class _FakeTrainer:
    def __init__(self):
        self.step, self.tokens_seen, self.should_stop = 0, 0, False


def test_level_target_counts_from_the_original_release():
    """A lock that starts far below the original reaches the gain-based target without ever getting back
    to the original's level; the level target measures the climb from the original's release score."""
    original = [AttackCurve("full", curve([0, 0.5, 1.0, 1.0], start=-3.0))]
    degraded = [AttackCurve("full", curve([0, 1.0, 2.0, 2.5], start=-10.0))]  # ends at -7.5, far below -3
    by_gain = lock_cost_multiplier(degraded, original, q=0.9)
    # gain 0.9 at 9 s on the lock vs 18 s on the original: "twice as cheap", though it ends 4.5 nats worse
    assert by_gain["multiplier"] == pytest.approx(0.5)
    assert math.isfinite(by_gain["multiplier"]) and by_gain["target_score"] is None
    by_level = lock_cost_multiplier(degraded, original, q=0.9, level=True)
    assert by_level["target_score"] == pytest.approx(-3.0 + 0.9)
    assert by_level["locked"]["full"] is None and math.isinf(by_level["multiplier"])
    # a lock that keeps the original's score: both targets agree
    same = [AttackCurve("full", curve([0, 0.3, 0.9, 1.0], start=-3.0))]
    assert lock_cost_multiplier(same, original, level=True)["multiplier"] == pytest.approx(
        lock_cost_multiplier(same, original)["multiplier"])
    # the level is read off the original's attacks, which must start from one release score
    with pytest.raises(WeightlockError, match="different scores"):
        lock_cost_multiplier(same, [*original, AttackCurve("lora", curve([0, 0.2], start=-2.0))], level=True)


def test_patience_stops_when_the_score_stops_improving():
    scores = iter([0.0, 0.5, 0.7, 0.69, 0.7, 0.65, 0.9])
    hook = PatienceHook(lambda t: next(scores), every=5, patience=3)
    t = _FakeTrainer()
    hook.on_train_start(t)
    while not t.should_stop:
        t.step += 1
        t.tokens_seen += 100
        hook.on_step_end(t, {"step_time": 0.5})
    assert t.step == 25, "three evaluations (steps 15, 20, 25) without beating 0.7"
    assert [p["score"] for p in hook.curve] == [0.0, 0.5, 0.7, 0.69, 0.7, 0.65]
    assert hook.curve[-1]["seconds"] == pytest.approx(12.5) and hook.curve[-1]["tokens"] == 2500


def test_patience_hook_stops_a_real_training_run():
    from dlr_helpers import tiny_model
    from weightlock.train.loop import TrainConfig, Trainer

    model = tiny_model("llama")
    blocks = torch.randint(0, 128, (32, 16), generator=torch.Generator().manual_seed(0))
    hook = PatienceHook(lambda t: 0.0, every=2, patience=2)  # a score that never improves
    cfg = TrainConfig(max_steps=50, batch_size=4, warmup_steps=1, eval_every=10**9, checkpoint_every=0,
                      progress=False)
    Trainer(model, blocks, cfg, hooks=[hook]).fit(resume=False)
    assert [p["step"] for p in hook.curve] == [0, 2, 4]


def _pts(scores, dt=1.0, fl=10.0):
    return [{"step": i, "tokens": 100 * i, "seconds": dt * i, "flops": fl * i, "score": s}
            for i, s in enumerate(scores)]


def test_multiplier_note_states_time_flops_and_memory():
    from weightlock.eval.cost_to_target import multiplier_note

    orig = [AttackCurve("full", _pts([0, 0.5, 1.0]), peak_bytes=100)]
    lock = [AttackCurve("full", _pts([0, 0.5, 1.0], dt=3.0, fl=20.0), peak_bytes=200),
            AttackCurve("checkpointing", _pts([0, 0.5, 1.0], dt=4.0, fl=30.0), peak_bytes=90)]
    note = multiplier_note(lock, orig, memory_budget=100)
    # target 0.9 is reached at 1.8 steps: 1.8 s on the original, 5.4 s on the lock, 7.2 s within the budget
    assert note == ("reaching 90% of the unlocked gain costs 3.00× the time (full), 2.00× the FLOPs, "
                    "4.00× the time within the unlocked full fine-tune's memory")
    held = multiplier_note([AttackCurve("full", _pts([0, 0.1, 0.2]))], orig)
    assert "no attack on the lock reaches 90%" in held and "∞" in held
    assert multiplier_note(lock, [AttackCurve("full", _pts([0, -0.1]))]).startswith("no cost multiplier")


def test_demo_verdict_carries_the_cost_multiplier():
    from weightlock.defenses import make_defense
    from weightlock.demo import verdicts

    def row(defense, attack, gain_ratio, curve, peak):
        return {"defense": defense, "attack": attack, "task": "prose", "gain_ratio": gain_ratio,
                "cost_curve": curve, "peak_delta_bytes": peak, "memory_ratio": None}

    rows = [row("reference", "full", 1.0, _pts([0, 0.5, 1.0]), 100),
            row("dlr", "full", 1.0, _pts([0, 0.5, 1.0], dt=2.0), 250),
            row("dlr", "lora", 0.2, _pts([0, 0.1, 0.2]), 80)]
    line = verdicts(rows, {}, [make_defense("dlr")])["DLR-Lock"]
    assert "prose: best attack full gets 100% of the unlocked gain (reaching 90% of the unlocked gain costs " \
           "2.00× the time (full), 1.00× the FLOPs, never within the unlocked full fine-tune's memory)" in line


def _run_file(path, attack, curve, peak, options=None, reference=None):
    import json

    from weightlock.schema import ATTACK_RUN, stamp

    path.mkdir(parents=True)
    run = {"cost_curve": curve, "cost": {"peak_rss_delta_bytes": peak}}
    d = stamp(ATTACK_RUN, {"attack": attack, "options": options or {}, "locked": run})
    if reference is not None:
        d["reference_run"] = {"cost_curve": reference, "cost": {"peak_rss_delta_bytes": 100 * 2**20}}
    (path / "result.json").write_text(json.dumps(d))


def test_cli_cost_reads_attack_runs_and_applies_the_memory_budget(tmp_path):
    import json

    from typer.testing import CliRunner

    from weightlock.cli import app

    # run_attack records every option, the defaults included: a plain full fine-tune has checkpointing "none"
    _run_file(tmp_path / "orig" / "full", "full", _pts([0, 0.5, 1.0]), 100 * 2**20,
              {"checkpointing": "none", "offload": False})
    _run_file(tmp_path / "lock" / "full", "full", _pts([0, 0.5, 1.0], dt=3.0, fl=20.0), 300 * 2**20)
    _run_file(tmp_path / "lock" / "ckpt", "full", _pts([0, 0.5, 1.0], dt=4.0, fl=30.0), 90 * 2**20,
              {"checkpointing": "layer"})
    r = CliRunner().invoke(app, ["cost", "--locked", str(tmp_path / "lock"), "--original", str(tmp_path / "orig"),
                                 "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    # target 0.9: 1.8 steps; the original's full fine-tune (100 MiB) sets the budget, only ckpt fits it
    assert out["seconds"]["multiplier"] == pytest.approx(3.0)
    assert out["seconds within memory"]["multiplier"] == pytest.approx(4.0)
    assert out["flops"]["multiplier"] == pytest.approx(2.0) and out["tokens"]["multiplier"] == pytest.approx(1.0)
    r = CliRunner().invoke(app, ["cost", "--locked", str(tmp_path / "lock"), "--original", str(tmp_path / "orig"),
                                 "--memory-budget-mib", "50"])
    assert r.exit_code == 2 and "no attack on the original reaches the target within the memory budget" in r.output
    # without --original: the reference runs recorded beside the lock's runs
    _run_file(tmp_path / "paired" / "a", "full", _pts([0, 0.2, 0.4]), 300 * 2**20, reference=_pts([0, 0.5, 1.0]))
    r = CliRunner().invoke(app, ["cost", "--locked", str(tmp_path / "paired")])
    assert r.exit_code == 0 and "∞ (never)" in r.output, r.output
    (tmp_path / "old" / "x").mkdir(parents=True)
    _run_file(tmp_path / "old" / "x" / "run", "full", [], 1)
    r = CliRunner().invoke(app, ["cost", "--locked", str(tmp_path / "old"), "--original", str(tmp_path / "orig")])
    assert r.exit_code == 2 and "no cost curve" in r.output
    # --level: a lock that starts 5 below the original and gains 2 never reaches the original's level
    low = [{**p, "score": p["score"] - 5.0} for p in _pts([0, 1.0, 2.0])]
    _run_file(tmp_path / "low" / "full", "full", low, 100 * 2**20)
    args = ["cost", "--locked", str(tmp_path / "low"), "--original", str(tmp_path / "orig")]
    by_gain = CliRunner().invoke(app, [*args, "--json"])
    assert json.loads(by_gain.stdout)["seconds"]["multiplier"] == pytest.approx(0.5)
    by_level = CliRunner().invoke(app, [*args, "--level"])
    assert by_level.exit_code == 0 and "∞ (never)" in by_level.output and "score level" in by_level.output
