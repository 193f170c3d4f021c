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
    original = [AttackCurve("full", curve([0, 0.5, 1.0, 1.0]), memory_bytes=100),
                AttackCurve("lora", curve([0, 0.3, 0.6, 0.7]), memory_bytes=60)]
    locked = [AttackCurve("full", curve([0, 0.3, 0.6, 0.9, 1.0], seconds_per_point=15), memory_bytes=250),
              AttackCurve("lora", curve([0, 0.3, 0.6, 0.7]), memory_bytes=50)]
    r = lock_cost_multiplier(locked, original, q=0.9)
    assert r["target_gain"] == pytest.approx(0.9)
    assert r["original_min"] == pytest.approx(18.0)  # full: 10 + 0.8·10
    assert r["locked_min"] == pytest.approx(45.0)  # full: 3 points × 15 s
    assert r["multiplier"] == pytest.approx(2.5) and r["locked"]["lora"] is None
    # the attacker may use at most the unlocked full fine-tune's training memory: locked full does not fit
    b = lock_cost_multiplier(locked, original, q=0.9, memory_budget=100)
    assert b["locked"]["full"] == "over memory budget" and b["multiplier"] == math.inf
    # a checkpointed attack that fits the budget and pays in time is what counts then
    locked.append(AttackCurve("full+checkpointing", curve([0, 0.3, 0.6, 0.9, 1.0], seconds_per_point=20),
                              memory_bytes=90))
    b = lock_cost_multiplier(locked, original, q=0.9, memory_budget=100)
    assert b["multiplier"] == pytest.approx(60.0 / 18.0)
    # exactly the budget fits; a measured peak is never the budget, and no count does not fit
    locked[-1].memory_bytes = 100
    assert lock_cost_multiplier(locked, original, q=0.9, memory_budget=100)["multiplier"] == pytest.approx(60 / 18)
    locked[-1] = AttackCurve(locked[-1].attack, locked[-1].curve, peak_bytes=10)
    b = lock_cost_multiplier(locked, original, q=0.9, memory_budget=100)
    assert b["locked"]["full+checkpointing"] == "memory not counted" and b["multiplier"] == math.inf
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

    orig = [AttackCurve("full", _pts([0, 0.5, 1.0]), memory_bytes=100)]
    lock = [AttackCurve("full", _pts([0, 0.5, 1.0], dt=3.0, fl=20.0), memory_bytes=200),
            AttackCurve("checkpointing", _pts([0, 0.5, 1.0], dt=4.0, fl=30.0), memory_bytes=90)]
    note = multiplier_note(lock, orig, memory_budget=100)
    # target 0.9 is reached at 1.8 steps: 1.8 s on the original, 5.4 s on the lock, 7.2 s within the budget
    assert note == ("reaching 90% of the best unlocked gain costs 3.00× the time (full), 2.00× the FLOPs, "
                    "4.00× the time within the unlocked full fine-tune's training memory (checkpointing)")
    # records without a count: said so, never a guess
    unknown = multiplier_note(lock, orig, memory_budget=None, memory_basis="unknown")
    assert unknown.endswith("within the unlocked full fine-tune's memory: unknown (no training-memory count "
                            "(runs recorded before weightlock counted it, without parameter counts): run the "
                            "attacks again)")
    held = multiplier_note([AttackCurve("full", _pts([0, 0.1, 0.2]))], orig)
    assert "no attack on the lock reaches 90%" in held and "∞" in held
    assert multiplier_note(lock, [AttackCurve("full", _pts([0, -0.1]))]).startswith("no cost multiplier")


def test_demo_verdict_carries_the_cost_multiplier():
    from weightlock.defenses import make_defense
    from weightlock.experiments.engine import _memory_fields, verdicts

    def row(defense, attack, gain_ratio, curve, memory, peak):
        return {"defense": defense, "attack": attack, "task": "prose", "gain_ratio": gain_ratio,
                "cost_curve": curve, "peak_delta_bytes": peak, "memory_ratio": None,
                **_memory_fields(memory, 100, "counted")}

    # measured peaks that say the opposite of the counts: the verdict follows the counts
    rows = [row("reference", "full", 1.0, _pts([0, 0.5, 1.0]), 100, 10**9),
            row("dlr", "full", 1.0, _pts([0, 0.5, 1.0], dt=2.0), 250, 1),
            row("dlr", "lora", 0.2, _pts([0, 0.1, 0.2]), 80, 10**12)]
    line = verdicts(rows, {}, [make_defense("dlr")])["DLR-Lock"]
    assert "prose: best attack full gets 100% of what it gains on the unlocked model (reaching 90% of the best " \
           "unlocked gain costs 2.00× the time (full), 1.00× the FLOPs, never within the unlocked full fine-tune's " \
           "training memory)" in line


def test_demo_verdict_names_which_unlocked_gain_each_figure_compares_with():
    """Regression (the full demo of 2026-12-03, PMP on recall): "best attack lora gets 117% of the unlocked
    gain" beside "no attack on the lock reaches 90% of the unlocked gain" — the first compared LoRA with LoRA on
    the original (a weak attack there), the second with the original's best attack (full fine-tuning). Each
    figure now says which gain it is a share of."""
    from weightlock.defenses import make_defense
    from weightlock.experiments.engine import _memory_fields, verdicts

    def row(defense, attack, gain_ratio, curve):
        return {"defense": defense, "attack": attack, "task": "recall", "gain_ratio": gain_ratio,
                "cost_curve": curve, "peak_delta_bytes": 1, "memory_ratio": None,
                **_memory_fields(100, 100, "counted")}

    rows = [row("reference", "full", 1.0, _pts([0, 0.5, 1.0])), row("reference", "lora", 1.0, _pts([0, 0.05, 0.1])),
            row("pmp", "full", 0.2, _pts([0, 0.1, 0.2])), row("pmp", "lora", 1.17, _pts([0, 0.06, 0.12]))]
    line = verdicts(rows, {}, [make_defense("pmp")])["PMP"]
    assert "best attack lora gets 117% of what it gains on the unlocked model" in line
    assert "no attack on the lock reaches 90% of the best unlocked gain (any attack)" in line
    assert "of the unlocked gain" not in line


def _run_file(path, attack, curve, memory, options=None, reference=None, peak=1):
    """An attack run record: ``memory`` its counted training memory (``cost["training_memory_bytes"]``; a dict:
    the record's other fields instead, as older records hold them), ``peak`` its measured RSS peak growth."""
    import json

    from weightlock.schema import ATTACK_RUN, stamp

    path.mkdir(parents=True)
    old = isinstance(memory, dict)
    run = {"cost_curve": curve, "cost": {"peak_rss_delta_bytes": peak,
                                         **({} if old else {"training_memory_bytes": memory})},
           **(memory if old else {})}
    if old and "saved" in memory:
        run["cost"]["saved_activation_bytes_per_step"] = run.pop("saved")
    d = stamp(ATTACK_RUN, {"attack": attack, "options": options or {}, "locked": run})
    if reference is not None:
        d["reference_run"] = {"cost_curve": reference, "cost": {"peak_rss_delta_bytes": 1,
                                                                "training_memory_bytes": 100 * 2**20}}
    (path / "result.json").write_text(json.dumps(d))


def test_cli_cost_reads_attack_runs_and_applies_the_memory_budget(tmp_path):
    import json

    from typer.testing import CliRunner

    from weightlock.cli import app

    # run_attack records every option, the defaults included: a plain full fine-tune has checkpointing "none";
    # the measured peaks say the opposite of the counts (the lock's full fine-tune would fit): never the budget
    _run_file(tmp_path / "orig" / "full", "full", _pts([0, 0.5, 1.0]), 100 * 2**20,
              {"checkpointing": "none", "offload": False}, peak=10**12)
    _run_file(tmp_path / "lock" / "full", "full", _pts([0, 0.5, 1.0], dt=3.0, fl=20.0), 300 * 2**20, peak=1)
    _run_file(tmp_path / "lock" / "ckpt", "full", _pts([0, 0.5, 1.0], dt=4.0, fl=30.0), 90 * 2**20,
              {"checkpointing": "layer"})
    r = CliRunner().invoke(app, ["cost", "--locked", str(tmp_path / "lock"), "--original", str(tmp_path / "orig"),
                                 "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    # target 0.9: 1.8 steps; the original's full fine-tune (100 MiB) sets the budget, only ckpt fits it
    assert out["seconds"]["multiplier"] == pytest.approx(3.0)
    assert out["seconds within memory"]["multiplier"] == pytest.approx(4.0)
    assert out["memory budget"]["budget_bytes"] == 100 * 2**20 and out["memory budget"]["basis"] == "counted"
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


def test_cli_cost_says_how_it_counted_older_runs_memory(tmp_path):
    """Runs recorded before weightlock counted training memory: estimated from their parameter counts, every run
    on the same basis (a counted budget is never compared with an estimated run), or said to be unknown."""
    import json

    from typer.testing import CliRunner

    from weightlock.cli import app

    def older(params, trainable, saved):
        return {"parameters": params, "trainable_parameters": trainable, "saved": saved}

    # a counted original (with its parameter counts, as run_attack records them) and older lock runs
    _run_file(tmp_path / "orig" / "full", "full", _pts([0, 0.5, 1.0]), 10**9, {"checkpointing": "none"})
    rec = json.loads((tmp_path / "orig" / "full" / "result.json").read_text())
    rec["locked"].update(parameters=1000, trainable_parameters=1000)
    rec["locked"]["cost"]["saved_activation_bytes_per_step"] = 4000
    (tmp_path / "orig" / "full" / "result.json").write_text(json.dumps(rec))
    # AdamW, float32: 4·params + (4 + 8)·trainable + saved = 4000 + 12000 + 4000 (the original's estimate)
    _run_file(tmp_path / "lock" / "full", "full", _pts([0, 0.5, 1.0], dt=3.0), older(1000, 1000, 4001))
    _run_file(tmp_path / "lock" / "frozen", "freeze", _pts([0, 0.5, 1.0], dt=4.0), older(1000, 500, 4000))
    args = ["cost", "--locked", str(tmp_path / "lock"), "--original", str(tmp_path / "orig")]
    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["memory budget"]["basis"] == "estimated" and out["memory budget"]["budget_bytes"] == 20000
    assert out["seconds within memory"]["locked"]["full (" + str(tmp_path / "lock" / "full") + ")"] \
        == "over memory budget"
    assert out["seconds within memory"]["multiplier"] == pytest.approx(4.0)
    r = CliRunner().invoke(app, args)
    assert "estimated from older records' parameter counts" in r.output, r.output
    # nothing to count from: said so, and an explicit budget is refused rather than applied to nothing
    _run_file(tmp_path / "bare" / "full", "full", _pts([0, 0.5, 1.0], dt=3.0), {})
    args = ["cost", "--locked", str(tmp_path / "bare"), "--original", str(tmp_path / "bare")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0 and "no memory budget (no training-memory count" in r.output, r.output
    assert "within memory" not in r.output
    r = CliRunner().invoke(app, [*args, "--memory-budget-mib", "100"])
    assert r.exit_code == 2 and "no training-memory count" in r.output


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "adafactor"])
@pytest.mark.parametrize("frozen", [False, True])
def test_training_memory_count_is_the_tensors_after_a_real_step(optimizer, frozen):
    """The analytic count (parameter counts and dtypes) equals what one real step holds: every parameter, its
    .grad, the optimizer's state tensors, and the bytes autograd saved (hooks)."""
    from dlr_helpers import tiny_model
    from weightlock.eval.cost import count_saved_tensors, training_memory
    from weightlock.train.loop import TrainConfig, make_optimizer

    model = tiny_model("llama")
    if frozen:
        for n, p in model.named_parameters():
            p.requires_grad_("mlp" not in n)
    opt = make_optimizer(model.named_parameters(), TrainConfig(optimizer=optimizer))
    x = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    with count_saved_tensors(tuple(model.parameters())) as saved:
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()

    def nbytes(t):
        return t.numel() * t.element_size()

    truth = {"param_bytes": sum(nbytes(p) for p in model.parameters()),
             "grad_bytes": sum(nbytes(p.grad) for p in model.parameters() if p.grad is not None),
             "optimizer_state_bytes": sum(nbytes(t) for st in opt.state.values() for t in st.values()
                                          if torch.is_tensor(t))}
    count = training_memory(model, optimizer, saved.bytes)
    assert {k: count[k] for k in truth} == truth
    assert count["saved_activation_bytes"] == saved.bytes > 0
    assert count["training_memory_bytes"] == sum(truth.values()) + saved.bytes
    assert (count["grad_bytes"] < count["param_bytes"]) == frozen


def test_memory_fit_on_the_tiny_preset_pmp_fits_exactly_dlr_full_does_not(tmp_path, tiny_model_dir, tiny_locked_dir):
    """The counted budget on real attack runs: PMP's model has the original's architecture, so its full fine-tune
    and mask recovery need exactly the original full fine-tune's training memory (fit); LoRA less. The DLR lock's
    full fine-tune stores more activations (does not fit); with its DLR-Nets frozen it fits. The runs' measured
    RSS peaks are recorded beside the count, and are not what decides."""
    from conftest import tiny_config
    from weightlock.attacks import run_attack
    from weightlock.pmp.train import PMPConfig, pretrain_pmp

    original, _ = tiny_model_dir
    pretrain_pmp(tiny_config(max_steps=3, train_tokens=30_000), PMPConfig(mask_ratio=0.3, discovery_max_steps=3),
                 tmp_path / "pmp")
    pmp = tmp_path / "pmp" / "release"
    kw = dict(steps=1, batch_size=2, block_size=64, train_tokens=2000, eval_tokens=64)

    def cost(model, attack, **options):
        c = run_attack(model, "prose", attack, **kw, **options)["target"]["cost"]
        parts = c["training_memory"]
        assert c["training_memory_bytes"] == sum(parts[k] for k in ("param_bytes", "grad_bytes",
                                                                     "optimizer_state_bytes", "saved_activation_bytes"))
        assert parts["saved_activation_bytes"] == c["saved_activation_bytes_per_step"]
        assert c["peak_rss_delta_bytes"] is not None  # the measurement stays, beside the count
        return c["training_memory_bytes"]

    budget = cost(original, "full")
    assert cost(pmp, "full") == budget
    assert cost(pmp, "mask-recover", method="magnitude") == budget
    assert cost(pmp, "lora") < budget
    assert cost(tiny_locked_dir, "full") > budget
    assert cost(tiny_locked_dir, "freeze", train="non-mlp") <= budget


def _record(score_curve_gains, dt, memory, peak, params=1000):
    """A synthetic attack run (``run_attack``'s ``target``) for the demo's rows."""
    pts = _pts([0.0, *score_curve_gains], dt=dt)
    return {"before": {"score": 0.0}, "after": {"score": pts[-1]["score"]}, "gain": pts[-1]["score"],
            "capability_ppl_before": 10.0, "capability_ppl_after": 10.0, "parameters": params,
            "trainable_parameters": params, "score_curve": [[p["step"], p["score"]] for p in pts], "cost_curve": pts,
            "cost": {"step_time_s": dt, "prepare_seconds": 0.0, "saved_activation_bytes_per_step": 100,
                     "peak_rss_bytes": peak, "peak_rss_delta_bytes": peak, "training_memory_bytes": memory}}


def test_demo_verdict_summary_and_table_agree_on_memory_fit(tmp_path):
    """Every row's memory × cell (≤ 1.00: fits) is what the verdict's "within memory" clause counts: the
    within-memory multiplier is the cheapest fitting attack's, named, and a same-architecture attack with the
    budget's exact count fits however its measured RSS peak came out. The report shows the same cells and
    verdicts."""
    from weightlock.defenses import make_defense
    from weightlock.eval.cost_to_target import cost_to_target
    from weightlock.experiments.engine import _attack_rows, training_memory_summary, verdicts
    from weightlock.tables import ATTACK_HEAD, attack_rows

    budget = 10_000
    runs = {("reference", "full", "prose"): _record([0.5, 1.0], 1.0, budget, peak=100),
            # PMP: same architecture, same count, a measured peak far above the original's
            ("pmp", "full", "prose"): _record([0.4, 0.8, 1.0], 1.0, budget, peak=10**9),
            ("pmp", "lora", "prose"): _record([0.1, 0.2], 1.0, budget // 2, peak=10**9),
            # DLR: the fastest attack needs one byte more than the budget (memory × prints as 1.00)
            ("dlr", "full", "prose"): _record([0.9, 1.0], 1.0, budget + 1, peak=1),
            ("dlr", "checkpointing", "prose"): _record([0.3, 0.6, 0.9, 1.0], 1.5, budget - 1, peak=10**9),
            ("dlr", "lora", "prose"): _record([0.1, 0.1], 1.0, budget * 3, peak=1)}
    references = {("reference", "full"): None, ("pmp", "full"): "full", ("pmp", "lora"): "full",
                  ("dlr", "full"): "full", ("dlr", "checkpointing"): "full", ("dlr", "lora"): "full"}
    from weightlock.eval.records import AttackRun

    # the demo's rows read only typed records (one per run; a sweep would give several)
    records = {k: [AttackRun.from_run(r, attack=k[1], task=k[2], defense=k[0], config={"lr": 1e-3})]
               for k, r in runs.items()}
    rows, sweep = _attack_rows(records, references, 3)
    assert sweep == []
    summary = {"attacks": rows, "training_memory": training_memory_summary(rows)}
    assert summary["training_memory"]["budget_bytes"] == {"prose": budget}
    assert summary["training_memory"]["basis"] == "counted"
    cells = {(r[0], r[1]): r[ATTACK_HEAD.index("memory ×")] for r in attack_rows(summary)}
    assert cells[("dlr", "full")] == ">1.00" and cells[("pmp", "full")] == "1.00"

    def fits(cell):
        return cell != "n/a" and not cell.startswith(">") and float(cell) <= 1.0

    for row in rows:  # the row's fields, the table and the budget say the same
        if row["defense"] != "reference":
            assert fits(cells[(row["defense"], row["attack"])]) == row["fits_memory"] \
                == (row["training_memory_bytes"] <= budget)
    lines = verdicts(rows, summary, [make_defense("dlr"), make_defense("pmp")])
    target = 0.9 * runs[("reference", "full", "prose")]["gain"]  # the best gain on the original: 1.0 → 0.9
    orig_cost = cost_to_target(runs[("reference", "full", "prose")]["cost_curve"], target)
    for name, defense in (("DLR-Lock", "dlr"), ("PMP", "pmp")):
        fitting = {r["attack"]: cost_to_target(r["cost_curve"], target) for r in rows
                   if r["defense"] == defense and fits(cells[(defense, r["attack"])])}
        reached = {k: v for k, v in fitting.items() if v is not None}
        cheapest = min(reached, key=reached.get)
        clause = f"{reached[cheapest] / orig_cost:.2f}× the time within the unlocked full fine-tune's training " \
                 f"memory ({cheapest})"
        assert clause in lines[name], lines[name]
        assert "never within" not in lines[name]
    # 0.9 at 1.8 s on the original; PMP full at 2.5 s; DLR full at 1.0 s, checkpointing at 3 × 1.5 s
    assert "1.39× the time within the unlocked full fine-tune's training memory (full)" in lines["PMP"]
    # the DLR lock's fastest attack does not fit: the within-memory multiplier is checkpointing's, not full's
    assert "0.56× the time (full), 0.56× the FLOPs, 2.50× the time within the unlocked full fine-tune's training " \
           "memory (checkpointing)" in lines["DLR-Lock"]
    # the report of this summary: the same memory × cells and verdicts, no "older result" caveat
    import json

    from weightlock import schema
    from weightlock.report import OLD_DEMO_MEMORY, build_report

    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "summary.json").write_text(json.dumps(
        {"kind": schema.DEMO, "schema_version": schema.SCHEMA_VERSION, "preset": "tiny", **summary,
         "capability": {k: {"code": 2.0, "prose": 3.0} for k in ("reference", "dlr", "pmp")}, "verdicts": lines}))
    md = build_report([tmp_path / "demo"], tmp_path / "rep").with_name("README.md").read_text()
    for (defense, attack), cell in cells.items():
        row = next(line for line in md.splitlines() if line.startswith(f"| {defense} | {attack} | prose |"))
        assert row.split(" | ")[ATTACK_HEAD.index("memory ×")] == cell, row
    assert all(line in md for line in lines.values()) and OLD_DEMO_MEMORY not in md


def test_report_within_memory_column_is_the_counted_budget_only(tmp_path):
    """The lock-cost analysis: the report's "time × within training memory" shows the counted (or
    estimated, marked) budget's multiplier; an analysis from before the count (its budget was the RSS peak)
    shows n/a, not its number."""
    import json
    from pathlib import Path

    from weightlock.report import build_report

    d = json.loads((Path(__file__).parent / "fixtures" / "report" / "bench" / "cost_to_target.json").read_text())
    old = d["analysis"][0]
    new = {**old, "defense": "dlr-99", "memory_basis": "counted", "seconds_memory_budget": {
        **old["seconds_memory_budget"], "multiplier": 1.234}}
    est = {**new, "defense": "dlr-98", "memory_basis": "estimated"}
    none = {**new, "defense": "dlr-97", "memory_basis": "unknown",
            "seconds_memory_budget": {"multiplier": None}}
    d["analysis"] = [old, new, est, none]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "cost_to_target.json").write_text(json.dumps(d))
    md = build_report([tmp_path / "in"], tmp_path / "rep").with_name("README.md").read_text()

    def row(defense):
        return next(line for line in md.splitlines() if line.startswith(f"| {old['task']} | {defense} |"))

    assert "| n/a (older result: RSS-peak budget, not reliable) |" in row(old["defense"])
    assert "| 1.23× |" in row("dlr-99") and "| 1.23× (estimated) |" in row("dlr-98")
    assert "| n/a (no training-memory count) |" in row("dlr-97")


def test_bench_cost_to_target_budget_is_counted_training_memory_not_the_rss_peak():
    """The lock-cost analysis's ``*_memory_budget``: the original full fine-tune's training memory (counted),
    never the runs' measured RSS peaks. A same-architecture attack with the budget's exact count fits however its
    peak came out; a run one byte over does not; rows with no count anywhere give no within-memory multiplier."""
    from weightlock.experiments import lock_cost as bench

    def row(model, label, attack, scores, dt, memory, peak):
        return {"model": model, "task": "prose", "label": label, "attack": attack, "options": {},
                "cost_curve": _pts(scores, dt=dt), "peak_delta_bytes": peak, "saved_activation_bytes": 100,
                "training_memory": {"counted": memory, "estimated": None}}

    rows = [row("original", "full", "full", [0, 0.5, 1.0], 1.0, 1000, peak=1),
            row("pmp", "full", "full", [0, 0.5, 1.0], 2.0, 1000, peak=10**9),  # same architecture: fits
            row("dlr", "full", "full", [0, 0.5, 1.0], 1.0, 1001, peak=1),  # one byte over: does not
            row("dlr", "freeze", "freeze", [0, 0.5, 1.0], 3.0, 800, peak=10**9)]
    by = {a["defense"]: a for a in bench.analyse(rows, ["pmp", "dlr"], ["prose"])}
    assert by["pmp"]["memory_budget_bytes"] == 1000 and by["pmp"]["memory_basis"] == "counted"
    assert by["pmp"]["seconds_memory_budget"]["multiplier"] == pytest.approx(2.0) \
        == by["pmp"]["seconds_any_memory"]["multiplier"]
    assert by["dlr"]["seconds_any_memory"]["multiplier"] == pytest.approx(1.0)
    assert by["dlr"]["seconds_memory_budget"]["locked"]["full"] == "over memory budget"
    assert by["dlr"]["seconds_memory_budget"]["multiplier"] == pytest.approx(3.0)  # freeze fits
    # rows analysed before the count, their run directories gone: no budget, said so (not the RSS peak's)
    for r in rows:
        del r["training_memory"]
    by = {a["defense"]: a for a in bench.analyse(rows, ["pmp", "dlr"], ["prose"])}
    assert by["pmp"]["memory_basis"] == "unknown" and by["pmp"]["memory_budget_bytes"] is None
    assert by["pmp"]["seconds_memory_budget"]["multiplier"] is None


def _bench_cost_to_target():
    """The cost-to-target analysis (``weightlock run cost-to-target``, was bench/cost_to_target.py)."""
    from weightlock.experiments import lock_cost

    return lock_cost


def test_bench_recount_is_the_training_memory_a_real_attack_run_counts(tiny_model_dir, tiny_locked_dir):
    """The lock-cost analysis's recount (a row recorded before weightlock counted training memory, its run
    directory gone): the run's model rebuilt with random weights and nothing distilled, set up by the attack's
    own preparation, counted with the run's saved-activation bytes — exactly the bytes and parts a real run of
    the attack records: full fine-tuning and LoRA (every linear map) on the original; on the tiny lock full
    fine-tuning, LoRA through the DLR factors, frozen DLR-Nets, per-DLR-Net checkpointing and reverse
    distillation (its dense student). A recorded count that the recount does not reproduce is an error."""
    from weightlock.attacks import run_attack
    from weightlock.eval.cost_to_target import run_training_memory
    from weightlock.schema import target_run

    bench = _bench_cost_to_target()
    original, _ = tiny_model_dir
    kw = dict(steps=1, batch_size=2, block_size=64, train_tokens=2000, eval_tokens=64)
    cases = [("original", original, "full", {}), ("original", original, "lora", {"targets": "all-linear"}),
             ("dlr-8", tiny_locked_dir, "full", {}), ("dlr-8", tiny_locked_dir, "lora", {"targets": "all-linear"}),
             ("dlr-8", tiny_locked_dir, "freeze", {"train": "non-mlp"}),
             ("dlr-8", tiny_locked_dir, "full", {"checkpointing": "dlr"}),
             ("dlr-8", tiny_locked_dir, "reverse-distill", {"distill_steps": 2, "distill_tokens": 256})]
    rows, runs = [], []
    for key, model, attack, options in cases:
        r = target_run(run_attack(model, "prose", attack, **kw, **options))
        runs.append(r)
        # a row as the bench recorded it before the count: the run's saved-activation bytes, no training memory
        rows.append({"model": key, "task": "prose", "label": f"{attack}-{options}", "attack": attack,
                     "options": {**kw, **options}, "dir": "gone",
                     "saved_activation_bytes": r["cost"]["saved_activation_bytes_per_step"]})
    # the tiny lock fixture is today's lock at rank 8 (default settings): no lock settings to restore
    recounted, how = bench.with_training_memory(rows, preset="tiny", lock_settings={})
    assert how["rows"] == len(cases) and how["how"] == bench.RECOUNT_HOW
    assert how["models"]["dlr-8"]["parameters"] == runs[2]["parameters"]
    for row, r in zip(recounted, runs):
        m, cost = row["training_memory"], r["cost"]
        assert m["counted"] == cost["training_memory_bytes"], row["label"]
        assert m["parts"] == cost["training_memory"], row["label"]
        assert m["estimated"] == run_training_memory(r)["estimated"] and m["how"] == "recounted"
    counted = {row["label"]: row["training_memory"]["counted"] for row in recounted}
    assert counted["freeze-{'train': 'non-mlp'}"] < counted["full-{}"]  # the trainable set matters
    # rows with their runs' own counts: recounting them all reproduces every one; a wrong one is caught
    measured = [{**row, "training_memory": run_training_memory(r)} for row, r in zip(rows, runs)]
    again, _ = bench.with_training_memory(measured, preset="tiny", lock_settings={}, recount_all=True)
    assert [a["training_memory"]["counted"] for a in again] == [r["cost"]["training_memory_bytes"] for r in runs]
    measured[4] = {**measured[4], "training_memory": {"counted": 1, "estimated": None}}
    with pytest.raises(RuntimeError, match="recounted"):
        bench.with_training_memory(measured, preset="tiny", lock_settings={}, recount_all=True)


def test_bench_reanalyse_recounts_rows_without_training_memory_instead_of_unknown():
    """--reanalyse on a JSON whose rows predate the training-memory count (saved-activation bytes only, run
    directories gone): the rows are counted again from their rebuilt architectures, so the analysis has a
    counted memory budget and a within-memory multiplier (it used to say "unknown" and n/a); the recount is
    recorded. The DLR lock's full fine-tune (more saved activations) does not fit; frozen DLR-Nets do."""
    bench = _bench_cost_to_target()

    def row(model, label, attack, options, scores, dt, saved):
        return {"model": model, "task": "prose", "label": label, "attack": attack, "options": options,
                "cost_curve": _pts(scores, dt=dt), "peak_delta_bytes": 1, "saved_activation_bytes": saved,
                "dir": "runs/bench/gone"}

    rows = [row("original", "full", "full", {}, [0, 0.5, 1.0], 1.0, 10_000),
            row("dlr-8", "full", "full", {}, [0, 0.5, 1.0], 1.0, 30_000),
            row("dlr-8", "freeze-dlr", "freeze", {"train": "non-mlp"}, [0, 0.5, 1.0], 3.0, 8_000)]
    d = {"models": {"original": "runs/bench/base", "dlr-8": "runs/bench/locked-r8"}, "preset": "tiny",
         "lock_settings": {}, "analysis": [{"task": "prose", "defense": "dlr-8"}], "runs": rows}
    assert bench.analyse(rows, ["dlr-8"], ["prose"])[0]["memory_basis"] == "unknown"  # the rows alone
    new = bench.reanalyse(d, ["prose"], command="python bench/cost_to_target.py --reanalyse")
    a = new["analysis"][0]
    assert a["memory_basis"] == "counted" and a["memory_budget_bytes"] == new["runs"][0]["training_memory"]["counted"]
    assert a["seconds_memory_budget"]["locked"]["full"] == "over memory budget"
    assert a["seconds_memory_budget"]["multiplier"] == pytest.approx(3.0)  # frozen DLR-Nets fit
    assert a["seconds_any_memory"]["multiplier"] == pytest.approx(1.0)
    assert new["memory_recounted"]["rows"] == 3 and new["memory_recounted"]["command"].endswith("--reanalyse")
    assert all(r["training_memory"]["how"] == "recounted" for r in new["runs"])
    assert "training_memory" not in rows[0]  # the record passed in is left as it was
