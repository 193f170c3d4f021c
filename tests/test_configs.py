"""Configs validate themselves, flat attack options map into the nested TrainConfig, the CLI's defaults are
the dataclasses' own, adafactor is a TrainConfig optimizer, and the cost probe measures what it claims."""
from dataclasses import dataclass, field, replace
from typing import Literal

import pytest
import torch

from dlr_helpers import tiny_model
from weightlock.attacks import AttackConfig, LoraAttackConfig, attack_options, finetune, make_attack
from weightlock.config import check_types, choice, default
from weightlock.dlr import LockConfig
from weightlock.errors import WeightlockError
from weightlock.eval.cost import CostProbe
from weightlock.models.presets import ModelConfig
from weightlock.pmp import PMPConfig
from weightlock.train.finetune import FinetuneConfig
from weightlock.train.loop import TrainConfig, Trainer, lr_factor
from weightlock.train.pretrain import PretrainConfig

BLOCKS = torch.randint(0, 100, (32, 16), generator=torch.Generator().manual_seed(0))


@dataclass
class _Demo:
    mode: Literal["a", "b"] = choice("a", "demo mode")
    inner: TrainConfig = field(default_factory=TrainConfig)
    ratio: float = 1.0
    limit: int | None = None


def test_check_types_understands_literal_nested_configs_and_optionals():
    d = _Demo(ratio=2)
    check_types(d)
    assert d.ratio == 2.0 and isinstance(d.ratio, float)
    with pytest.raises(WeightlockError, match=r"unknown demo mode 'c' \(a, b\)"):
        check_types(_Demo(mode="c"))
    with pytest.raises(WeightlockError, match="option 'inner' expects a TrainConfig"):
        check_types(_Demo(inner={"lr": 1.0}))
    with pytest.raises(WeightlockError, match="option 'limit' expects int or None, got 'x'"):
        check_types(_Demo(limit="x"))
    check_types(_Demo(limit=None))
    assert default(_Demo, "mode") == "a" and default(_Demo, "inner") == TrainConfig()


@pytest.mark.parametrize("build,msg", [
    (lambda: TrainConfig(optimizer="lion"), r"unknown optimizer 'lion' \(adamw, sgd, adafactor\)"),
    (lambda: TrainConfig(warmup_steps=-1), "warmup_steps"),
    (lambda: LockConfig(activation="swish"), r"unknown activation 'swish' \(auto, gelu, relu, silu, tanh, gelu_tanh\)"),
    (lambda: LockConfig(mode="lazy"), "unknown mode 'lazy'"),
    (lambda: LockConfig(rank="8"), "option 'rank' expects int"),
    (lambda: LockConfig(max_rel_error=0.0), "max_rel_error must be positive"),
    (lambda: PMPConfig(pool="everything"), "unknown pool 'everything'"),
    (lambda: PMPConfig(patience=0), "patience"),
    (lambda: PretrainConfig(method="sparse"), "unknown method 'sparse'"),
    (lambda: PretrainConfig(preset="huge"), "unknown preset 'huge'"),
    (lambda: PretrainConfig(train={"lr": 1.0}), "expects a TrainConfig"),
    (lambda: ModelConfig(hidden_size=0), "hidden_size must be positive"),
    (lambda: FinetuneConfig(checkpointing="group:0"), "unknown checkpointing 'group:0'"),
])
def test_configs_refuse_bad_values_at_construction(build, msg):
    with pytest.raises(WeightlockError, match=msg) as e:
        build()
    assert "\n" not in str(e.value)


def test_mutated_configs_are_validated_again_before_use(tmp_path):
    from weightlock.train.pretrain import default_config, pretrain

    cfg = default_config("tiny")
    cfg.train.max_steps = 0  # the CLI sets fields after construction
    with pytest.raises(WeightlockError, match="max_steps"):
        pretrain(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists(), "refused before any work"
    with pytest.raises(WeightlockError, match="unknown schedule"):
        default_config("tiny", schedule="step")


def test_flat_attack_options_map_into_the_nested_train_config():
    atk = make_attack("full", steps=3, lr=1, batch_size=4, warmup_steps=1, optimizer="sgd", seed=7,
                      checkpointing="layer")
    t = atk.cfg.training
    assert (t.max_steps, t.lr, t.batch_size, t.warmup_steps, t.optimizer, t.seed) == (3, 1.0, 4, 1, "sgd", 7)
    assert isinstance(t.lr, float) and atk.cfg.checkpointing == "layer"
    assert (atk.cfg.steps, atk.cfg.lr, atk.cfg.seed) == (3, 1.0, 7), "read access under the flat names"
    assert t.weight_decay == 0.0 and t.checkpoint_every == 0 and not t.progress, "fine-tuning defaults"
    flat = atk.cfg.options()
    assert flat["steps"] == 3 and "max_steps" not in flat and "training" not in flat
    assert type(atk.cfg).from_options(**flat) == atk.cfg, "options() round-trips"
    assert set(flat) == set(attack_options("full"))
    lora = attack_options("lora")
    assert lora["lr"] == 3e-3 and lora["targets"] == "attention" and lora["steps"] == 100
    assert LoraAttackConfig().training.lr == 3e-3
    assert attack_options("freeze")["train"] == "non-mlp", "an attack's own option may be called train"
    own = TrainConfig(max_steps=5, lr=0.5, progress=False)
    assert make_attack("full", training=own, lr=0.25).cfg.training == replace(own, lr=0.25)
    with pytest.raises(WeightlockError, match=r"has no option\(s\) max_steps"):
        make_attack("full", max_steps=3)  # the flat name is steps
    with pytest.raises(WeightlockError, match="option 'lr' expects float, got 'fast'"):
        AttackConfig.from_options(lr="fast")


def test_cli_defaults_are_the_dataclass_defaults():
    import typer.main

    from weightlock.cli import app

    cmds = typer.main.get_command(app).commands
    params = lambda cmd: {p.name: p.default for p in cmds[cmd].params}  # noqa: E731
    lock = params("lock")
    for name in ("rank", "depth", "data", "calib_tokens", "steps", "batch_tokens", "lr", "activation", "norm",
                 "init", "readout", "mode", "refine_steps", "refine_lr"):
        assert lock[name] == default(LockConfig, name), name
    assert float(lock["max_rel_error"]) == default(LockConfig, "max_rel_error")
    pre = params("pretrain")
    assert (pre["preset"], pre["data"], pre["method"]) == tuple(default(PretrainConfig, k)
                                                              for k in ("preset", "data", "method"))
    # pretrain's PMP options are generated from PMPConfig and passed on only when given (None: not given), so
    # the config's own default applies — and `--pmp-variant paper` still starts from the paper's settings
    assert (pre["mask_ratio"], pre["variant"]) == (None, None)
    assert [p.opts for p in cmds["pretrain"].params if p.name == "variant"] == [["--pmp-variant"]]
    ft, tc = params("finetune"), default(FinetuneConfig, "training")
    assert (ft["steps"], ft["lr"], ft["batch_size"]) == (tc.max_steps, tc.lr, tc.batch_size)
    assert params("attack")["seeds"] == str(attack_options("full")["seed"])


def test_adafactor_is_a_train_config_optimizer():
    """adafactor through make_optimizer moves the weights exactly as one torch Adafactor over the trainable
    parameters does (how attacks used to swap it in)."""
    torch.manual_seed(0)
    m1 = tiny_model("llama")
    torch.manual_seed(0)
    m2 = tiny_model("llama")
    before = [p.detach().clone() for p in m1.parameters()]
    atk = make_attack("full", steps=3, batch_size=4, lr=1e-2, warmup_steps=1, optimizer="adafactor")
    _, trainer = finetune(m1, BLOCKS, atk.cfg, measure=False)
    assert isinstance(trainer.optimizer.optimizer, torch.optim.Adafactor)
    tc = replace(atk.cfg.training, optimizer="adamw")
    old = Trainer(m2, BLOCKS, tc)
    old.optimizer = torch.optim.Adafactor([p for p in m2.parameters() if p.requires_grad], lr=tc.lr)
    old.scheduler = torch.optim.lr_scheduler.LambdaLR(old.optimizer, lambda s: lr_factor(s, tc))
    old.fit(resume=False)
    assert any(not torch.equal(a, b) for a, b in zip(before, m1.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


def test_cost_probe_measures_the_first_micro_batch_forward_and_backward():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(5, 16)
    probe = CostProbe(lin, measure=True)
    probe.begin_step()
    probe.micro_batch(lambda: lin(x).sum(), lambda loss: loss.backward())
    # y = x Wᵀ + b saves x only (W is a parameter): 5·16 floats; forward 2·5·16·8 FLOPs, weight gradient the same
    assert probe.saved_activation_bytes == 5 * 16 * 4
    assert probe.flops_per_micro_batch == 2 * (2 * 5 * 16 * 8)
    probe.micro_batch(lambda: lin(torch.randn(50, 16)).sum(), lambda loss: loss.backward())
    assert probe.saved_activation_bytes == 5 * 16 * 4, "only the first micro-batch is measured"
    probe.begin_optimizer()
    t = probe.end_step()
    assert set(t) == {"step_time", "forward_time", "backward_time", "optimizer_time"}
    assert t["step_time"] >= t["forward_time"] + t["backward_time"] > 0
    quiet = CostProbe(lin)
    quiet.begin_step()
    quiet.micro_batch(lambda: lin(x).sum(), lambda loss: loss.backward())
    assert quiet.saved_activation_bytes is None and quiet.flops_per_micro_batch is None
