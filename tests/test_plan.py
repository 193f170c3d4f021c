"""weightlock plan: the analytic memory model is exact on tiny Llama-family models, FLOPs match torch's
counter, the CLI reads a config.json, and user mistakes fail with one clear line."""
import json

import pytest
import torch
from transformers import LlamaConfig

from weightlock.errors import WeightlockError
from weightlock.eval import plan as P
from weightlock.eval.cost import flop_counter, saved_bytes_of_step

SHAPES = [  # (config, DLR rank, batch, seq): widths and heads the probe never saw
    (dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
          vocab_size=300), 8, 2, 16),
    (dict(hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
          head_dim=16, vocab_size=500, tie_word_embeddings=True), 16, 1, 24),
]


def _measure(cfg, rank, scenario, b, T):
    torch.manual_seed(0)
    model, specs = P.skeleton(cfg, rank, device="cpu")
    P.prepare(model, scenario)
    ids = torch.randint(0, cfg.vocab_size, (b, T))
    return model, specs, ids


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("locked", [False, True])
@pytest.mark.parametrize("scenario", ["full", "freeze-ffn"])
def test_memory_prediction_is_exact(shape, locked, scenario):
    kw, rank, b, T = shape
    cfg = LlamaConfig(**kw)
    model, specs, ids = _measure(cfg, rank if locked else None, scenario, b, T)
    measured = saved_bytes_of_step(model, lambda: model(input_ids=ids, labels=ids, use_cache=False).loss)
    s = P.Shape.of(cfg, specs[0].depth if locked else 0, rank if locked else 0)
    assert P.predict_memory(cfg, s, scenario, b, T)["saved_bytes"] == measured


def test_memory_exact_for_lora_and_checkpointing_and_bf16():
    kw, rank, b, T = SHAPES[0]
    cfg = LlamaConfig(**kw)
    for locked, scenario, dtype in [(True, "lora-all", torch.float32), (True, "ckpt-dlr", torch.float32),
                                    (False, "ckpt-layer", torch.float32), (True, "full", torch.bfloat16)]:
        model, specs, ids = _measure(cfg, rank if locked else None, scenario, b, T)
        model.to(dtype)
        measured = saved_bytes_of_step(model, lambda: model(input_ids=ids, labels=ids, use_cache=False).loss)  # noqa: B023
        s = P.Shape.of(cfg, specs[0].depth if locked else 0, rank if locked else 0)
        assert P.predict_memory(cfg, s, scenario, b, T, dtype)["saved_bytes"] == measured, (locked, scenario, dtype)


def test_dlr_coefficients_are_the_known_ones():
    """Per token and block, a DLR-Net saves d + 2r elements (fp32) when trained, r when frozen."""
    cfg = LlamaConfig(**SHAPES[0][0])
    full = P.fit_memory_model(cfg, True, "full").coef["ffn"]
    frozen = P.fit_memory_model(cfg, True, "freeze-ffn").coef["ffn"]
    assert list(full[:2]) == [4, 8] and list(frozen[:2]) == [0, 4]


@pytest.mark.parametrize("locked", [False, True])
@pytest.mark.parametrize("scenario", ["full", "lora-attn", "freeze-ffn", "ckpt-dlr"])
def test_flops_match_torch_counter(locked, scenario):
    if scenario == "ckpt-dlr" and not locked:
        pytest.skip("per-DLR checkpointing needs a lock")
    kw, rank, b, T = SHAPES[0]
    cfg = LlamaConfig(**kw)
    model, specs, ids = _measure(cfg, rank if locked else None, scenario, b, T)
    with flop_counter() as fc:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    meta, _ = P.skeleton(cfg, rank if locked else None)
    P.prepare(meta, scenario)
    predicted = P.analytic_flops(meta, b, T, scenario)["flops"]
    assert predicted == pytest.approx(fc.get_total_flops(), rel=0.03)
    # the full-size extrapolation from 2- and 3-layer skeletons gives the same count
    ext = P.full_size_costs(cfg, rank if locked else None, specs[0].depth if locked else 0, scenario, b, T,
                            torch.float32, None)
    assert ext["flops"] == pytest.approx(predicted, rel=1e-9)


def test_cli_plan_on_config_json(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from weightlock.cli import app

    cfg = LlamaConfig(**SHAPES[0][0]).to_dict()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    monkeypatch.setattr(P.pricer, "ELEM_SIZES", (2 ** 12, 2 ** 16))  # a quick calibration
    mallopt_calls = []  # the process-wide allocator setting is opt-in: a plain plan never applies it
    monkeypatch.setattr(P.pricer, "keep_freed_memory", lambda: mallopt_calls.append(1) or True)
    res = CliRunner().invoke(app, ["plan", "--model", str(path), "--rank", "8", "--tokens-per-step", "64",
                                   "--seq-len", "32", "--dtype", "float32", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    rows = {(r["model"], r["scenario"]): r for r in out["rows"]}
    assert out["batch"] == 2 and out["depth"] == 30
    assert set(rows) == {(m, s) for m in ("original", "locked") for s in P.SCENARIOS} - {("original", "ckpt-dlr")}
    full = rows[("locked", "full")]
    assert full["activation_vs_original"] > 1 and full["time_s"] > 0
    assert rows[("original", "full")]["parameters"] == sum(
        p.numel() for p in P.skeleton(LlamaConfig(**SHAPES[0][0]))[0].parameters())
    # the table form runs too, and a second run reuses the cached calibration
    res = CliRunner().invoke(app, ["plan", "--model", str(path), "--rank", "8", "--tokens-per-step", "64",
                                   "--seq-len", "32", "--dtype", "float32"])
    assert res.exit_code == 0 and "locked" in res.output and "checkpointing per DLR-Net" in res.output
    assert mallopt_calls == [] and out["calibration"]["keep_freed_memory"] is False


def test_meta_forward_overrides_are_scoped_and_library_code_has_no_mock_patch():
    """The planner's meta-device forward passes swap two functions (transformers' packed-sequence check, torch's
    attention) for the ``with`` block only, explicitly, restoring them on an error too; no library module
    patches with unittest.mock."""
    import importlib
    from pathlib import Path

    from transformers import masking_utils

    trace = importlib.import_module("weightlock.eval.plan.trace")
    check, sdpa = masking_utils.find_packed_sequence_indices, torch.nn.functional.scaled_dot_product_attention
    with pytest.raises(RuntimeError, match="inside"):
        with trace._meta_safe(), trace._sdpa_as_cpu_flash():
            assert masking_utils.find_packed_sequence_indices(torch.zeros(1, 3, device="meta")) is None
            assert torch.nn.functional.scaled_dot_product_attention is not sdpa
            raise RuntimeError("inside")
    assert masking_utils.find_packed_sequence_indices is check
    assert torch.nn.functional.scaled_dot_product_attention is sdpa
    with pytest.raises(AttributeError, match="no attribute"):
        with trace._attribute_set(masking_utils, "no_such_function", None):
            pass
    src = Path(P.__file__).resolve().parents[2]
    offenders = [str(f.relative_to(src)) for f in src.rglob("*.py")
                 if "unittest import mock" in f.read_text() or "mock.patch" in f.read_text()]
    assert offenders == []


def test_replay_signatures_keep_layout_and_shrink_consistently():
    """The op pricer replays each traced op on real operands laid out like the traced ones (transposed and
    expanded operands included) and shrinks ops too large to replay along dimensions their time scales with."""
    a = torch.empty(64, 32, device="meta")
    w = torch.empty(48, 32, device="meta").t()  # a transposed weight, as nn.Linear's forward passes it
    mm = torch.ops.aten.mm.default
    assert P.sig_key((mm, (a, w), {})) != P.sig_key((mm, (a, w.contiguous()), {}))
    real = P.materialize(w, torch.device("cpu"))
    assert real.shape == w.shape and real.stride() == w.stride()
    big = P.materialize(w, torch.device("cpu"), (32, 24))
    assert big.shape == (32, 24) and big.stride() == (1, 32)  # still column-major
    ex = P.materialize(torch.empty(8, device="meta").expand(4, 8), torch.device("cpu"))
    assert ex.stride() == (0, 1)
    args, _, scale = P.shrunk((mm, (a, w), {}), 2 * 64 * 32 * 48 / 4, "mm")
    shapes = [x.shape for x in args]
    assert shapes[0][1] == shapes[1][0] and scale == pytest.approx(2 * 64 * 32 * 48 / (
        2 * shapes[0][0] * shapes[0][1] * shapes[1][1]))
    x = torch.empty(8, 16, 32, device="meta")
    args, _, scale = P.shrunk((torch.ops.aten.add.Tensor, (x, x), {}), 2 * x.numel() * 4 / 4, "elementwise")
    assert args[0].shape == args[1].shape == (2, 16, 32) and scale == 4
    # the trace keeps views (a call's cost, no kernel) apart from computing ops
    ops = P.probe_trace(P.probe_model(width=8, depth=2).to("meta"),
                         torch.empty(2, 8, device="meta", requires_grad=True))
    kinds = {o[0] for o in ops}
    assert {"mm", "elementwise", "view"} <= kinds
    assert all(o[4] is not None for o in ops if o[0] != "view")


def test_shipped_configs_load():
    assert set(P.shipped_configs()) >= {"smollm2-135m", "llama-3.2-1b", "llama-3.1-8b", "qwen2.5-7b"}
    cfg = P.load_config("llama-3.1-8b")
    assert cfg.hidden_size == 4096 and cfg.num_hidden_layers == 32


def test_user_errors(tmp_path):
    from typer.testing import CliRunner

    from weightlock.cli import app

    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "t5", "d_model": 64}))
    with pytest.raises(WeightlockError, match="not supported by DLR-Lock"):
        P.load_config(bad)
    with pytest.raises(WeightlockError, match="cannot match the MLP"):
        P.plan("smollm2-135m", rank=500, with_time=False)
    with pytest.raises(WeightlockError, match="no config"):
        P.load_config(tmp_path / "missing")
    res = CliRunner().invoke(app, ["plan", "--model", str(bad)])
    assert res.exit_code == 2 and "not supported by DLR-Lock" in res.output and "Traceback" not in res.output
