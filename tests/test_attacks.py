import json

import pytest
import torch

from dlr_helpers import FAMILIES, tiny_model
from weightlock.attacks import (  # noqa: F401
    ATTACKS,
    AttackConfig,
    ReverseDistillConfig,
    apply_checkpointing,
    finetune,
    make_attack,
    run_attack,
)
from weightlock.dlr import LockConfig, apply_dlr
from weightlock.dlr.distill import specs_for
from weightlock.dlr.modeling_weightlock_dlr import DLRNet
from weightlock.errors import WeightlockError
from weightlock.eval.cost import count_saved_tensors, saved_bytes_of_step
from weightlock.eval.tasks import get_task

BLOCKS = torch.randint(0, 100, (32, 16), generator=torch.Generator().manual_seed(0))


def locked_tiny():
    model = tiny_model("llama")
    _, specs, _ = specs_for(model, LockConfig(rank=2))
    apply_dlr(model, [s.__dict__ | {"init_scale": 1.0} for s in specs])
    return model


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model, before):
    return {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}


CFG = dict(steps=3, batch_size=4, block_size=16, lr=1e-2, warmup_steps=1)


def test_registry_lists_attacks():
    assert {"full", "lora", "freeze", "reverse-distill"} <= set(ATTACKS)
    with pytest.raises(WeightlockError, match="unknown attack 'nope'"):
        make_attack("nope")
    with pytest.raises(WeightlockError, match="has no option"):
        make_attack("full", rank=3)


def test_full_changes_every_weight():
    model = locked_tiny()
    before = snapshot(model)
    atk = make_attack("full", **CFG)
    finetune(atk.prepare(model, None, {}), BLOCKS, atk.cfg)
    # a DLR-Net's sink that is off (no outlier tokens in the calibration data: value 0, gate closed) has no
    # gradient through its amplitude and gate, by construction (weight decay may still shrink their weights);
    # every other weight moves
    off = {n.rsplit(".", 1)[0] for n, p in before.items() if n.endswith("sink.value") and not p.any()}
    inert = {n for n in before if any(n.startswith(s + ".amp.") or n.startswith(s + ".gate.") for s in off)}
    assert off and set(before) - inert <= changed(model, before)


@pytest.mark.parametrize("targets,expect", [("attention", "self_attn"), ("dlr", ".blocks."), ("all-linear", None)])
def test_lora_trains_only_adapters_and_resolves_dlr_targets(targets, expect):
    model = locked_tiny()
    before = snapshot(model)
    atk = make_attack("lora", targets=targets, **CFG)
    pm = atk.prepare(model, None, {})
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    if expect:
        assert all(expect in n for n in trainable), trainable[:3]
    finetune(pm, BLOCKS, atk.cfg)
    base_now = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
                for n, p in pm.named_parameters() if "lora_" not in n}
    assert all(torch.equal(base_now[n], before[n]) for n in before), "base weights untouched"
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in pm.named_parameters() if "lora_B" in n)


def test_lora_on_dlr_needs_dlr_model():
    with pytest.raises(WeightlockError, match="needs a DLR-locked model"):
        make_attack("lora", targets="dlr").prepare(tiny_model("llama"), None, {})


def test_freeze_leaves_dlr_nets_alone():
    model = locked_tiny()
    before = snapshot(model)
    atk = make_attack("freeze", **CFG)
    finetune(atk.prepare(model, None, {}), BLOCKS, atk.cfg)
    moved = changed(model, before)
    assert moved and not any(".mlp." in n for n in moved)
    assert any("self_attn" in n for n in moved) and any("embed" in n for n in moved)


def test_checkpointing_same_gradients_less_memory():
    grads, saved = {}, {}
    for mode in ("none", "dlr", "group:4", "layer"):
        torch.manual_seed(0)
        model = locked_tiny().train()
        apply_checkpointing(model, mode)
        x = BLOCKS[:4]
        with count_saved_tensors(tuple(model.parameters())) as st:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        saved[mode] = st.bytes
        grads[mode] = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    for mode in ("dlr", "group:4", "layer"):
        assert torch.allclose(grads[mode], grads["none"], atol=1e-6), mode
        assert saved[mode] < saved["none"], mode
    assert saved["dlr"] < saved["group:4"] < saved["none"]
    with pytest.raises(WeightlockError, match="needs DLR-Nets"):
        apply_checkpointing(tiny_model("llama"), "dlr")
    with pytest.raises(WeightlockError, match="unknown checkpointing"):
        apply_checkpointing(locked_tiny(), "group:x")


def test_reverse_distill_restores_dense_architecture(tokenizer):
    from weightlock.attacks import reverse_distill

    model = tiny_model("llama")
    model.config.vocab_size = 128
    locked = locked_tiny()
    locked.config.weightlock_dlr = {"base_class": "LlamaForCausalLM", "layers": []}
    cfg = ReverseDistillConfig.from_options(distill_steps=150, block_size=16, distill_tokens=4096, progress=False)
    dense, stats = reverse_distill(locked, _SmallTok(tokenizer), cfg)
    assert not any(isinstance(m, DLRNet) for m in dense.modules())
    assert type(dense.model.layers[0].mlp).__name__ == "LlamaMLP"
    assert all(s["rel_error"] < s["rel_error_init"] for s in stats)
    # public weights were copied
    assert torch.equal(dense.model.layers[0].self_attn.q_proj.weight, locked.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama", "gemma"])
def test_reverse_distill_readback_recovers_an_mlp_init_release_without_training(family, tokenizer):
    """A release locked with --init mlp keeps the original MLPs in its weights: reading them back (no
    distillation step) gives a dense model equal to the original, and close to the locked model — plain
    blocks from a plain MLP, gated blocks from a gated one (SwiGLU, GeGLU)."""
    from weightlock.attacks import reverse_distill
    from weightlock.dlr.distill import mlp_init
    from weightlock.dlr.modeling_weightlock_dlr import adapter_for, find_layers, get_path

    original, locked = tiny_model(family), tiny_model(family)
    adapter = adapter_for(original)
    _, specs, _ = specs_for(original, LockConfig(rank=8, depth=8, init="mlp", readout=16.0,
                                                 block="gated" if adapter.gated else "plain"))
    apply_dlr(locked, [s.__dict__ for s in specs])
    for orig, lay in zip(find_layers(original, adapter), find_layers(locked, adapter)):
        mlp_init(orig, adapter)(get_path(lay, adapter.mlp))
    locked.config.weightlock_dlr = {"base_class": type(original).__name__, "layers": []}
    cfg = ReverseDistillConfig.from_options(init="readback", distill_steps=0, block_size=16, distill_tokens=2048,
                                            progress=False)
    dense, stats = reverse_distill(locked, _SmallTok(tokenizer), cfg)
    assert not any(isinstance(m, DLRNet) for m in dense.modules())
    assert all(s["steps"] == 0 and s["rel_error"] < 1e-3 for s in stats)  # vs the DLR-Nets' bf16 captures
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        a, b = original.eval()(input_ids=ids), dense.eval()(input_ids=ids)
    key = "last_hidden_state" if family == "bert" else "logits"
    assert torch.allclose(getattr(a, key), getattr(b, key), atol=1e-4)
    with pytest.raises(WeightlockError, match="init"):
        reverse_distill(locked, _SmallTok(tokenizer), ReverseDistillConfig.from_options(init="guess", progress=False))
    # with nothing to distil, only the read-back's check is captured (an attacker's read-back is not charged a
    # 65k-token capture): the counted FLOPs are one forward over READBACK_CHECK_TOKENS
    from weightlock.attacks.reverse_distill import READBACK_CHECK_TOKENS, reverse_distill_flops

    weights = sum(p.numel() for p in locked.parameters() if p.ndim >= 2)
    big = ReverseDistillConfig.from_options(init="readback", distill_steps=0, distill_tokens=65_536, progress=False)
    assert reverse_distill_flops(locked, dense, big) == 2.0 * weights * READBACK_CHECK_TOKENS


class _SmallTok:
    """The built-in tokenizer with ids folded into the tiny models' 128-entry vocabulary."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_token_id = 0
        self.sep_token_id = None

    def __call__(self, texts, add_special_tokens=False, **kwargs):
        ids = self.tok(texts, add_special_tokens=False)["input_ids"]
        return {"input_ids": [[i % 128 for i in row] for row in ids]}

    @property
    def backend_tokenizer(self):
        return self.tok.backend_tokenizer


def test_saved_activation_count_is_exact_for_linear_and_mlp():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(5, 16, requires_grad=True)
    # y = x W^T + b saves only x (W is a parameter, excluded): 5*16 floats
    assert saved_bytes_of_step(lin, lambda: lin(x)) == 5 * 16 * 4
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    # x for fc1 (80), relu output for fc2 and for relu's backward (shared: 160) -> 240 floats
    assert saved_bytes_of_step(mlp, lambda: mlp(x)) == (5 * 16 + 5 * 32) * 4
    gelu_mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
    # x, fc1 output (gelu input), gelu output: 80 + 160 + 160
    assert saved_bytes_of_step(gelu_mlp, lambda: gelu_mlp(x)) == (5 * 16 + 2 * 5 * 32) * 4


def test_tasks_deterministic_and_disjoint():
    for name in ("addition", "reverse", "recall"):
        t1, t2 = get_task(name), get_task(name)
        assert t1.test_pairs() == t2.test_pairs() and t1.train_texts() == t2.train_texts()
        test_prompts = {p for p, _ in t1.test_pairs()}
        train_text = t1.train_texts()[0]
        assert len(test_prompts) > 100
        assert not any(f"\n{p}" in train_text or train_text.startswith(p) for p in list(test_prompts)[:200])
    p, a = get_task("addition").test_pairs()[0]
    x, y = p[:-1].split("+")
    assert int(a) == int(x) + int(y)
    p, a = get_task("recall").test_pairs()[0]
    pairs, key = p[:-1].split("; ")
    assert dict(kv.split("=") for kv in pairs.split())[key] == a.strip()
    with pytest.raises(WeightlockError, match="unknown task"):
        get_task("chess")


def test_loglik_task_is_the_skill_scored_by_its_answers_likelihood(tiny_model_dir):
    from weightlock.data import load_tokenizer
    from weightlock.models.hub import load

    t, base = get_task("recall-loglik"), get_task("recall")
    assert (t.name, t.kind) == ("recall-loglik", "loglik")
    assert t.test_pairs() == base.test_pairs() and t.train_texts() == base.train_texts()
    model_dir, _ = tiny_model_dir
    model, tok = load(model_dir), load_tokenizer(model_dir)
    r = t.evaluate(model, tok, max_examples=40)
    nll, n = 0.0, 0  # one pair at a time, by hand: the completion's tokens given EOS + prompt
    with torch.no_grad():
        for p, a in t.test_pairs()[:40]:
            pi = [tok.eos_token_id] + tok(p, add_special_tokens=False)["input_ids"]
            ai = tok(a, add_special_tokens=False)["input_ids"]
            logp = model(torch.tensor([pi + ai])).logits[0, len(pi) - 1:-1].log_softmax(-1)
            nll -= logp[range(len(ai)), ai].sum().item()
            n += len(ai)
    assert r["examples"] == 40 and r["score"] == -r["loss"] and r["loss"] == pytest.approx(nll / n, rel=1e-5)
    with pytest.raises(WeightlockError, match="prompt/completion task"):
        get_task("prose-loglik")
    with pytest.raises(WeightlockError, match="unknown task"):
        get_task("chess-loglik")


def test_jsonl_user_task(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": f"q{i}?", "completion": f" a{i}"}) for i in range(300)))
    t = get_task(str(f))
    assert t.kind == "exact" and t.test_pairs() and "q" in t.train_texts()[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": 1}\n')
    with pytest.raises(WeightlockError, match="prompt\\+completion"):
        get_task(str(bad))


def test_run_attack_end_to_end_with_reference(tiny_model_dir, tmp_path):
    model, _ = tiny_model_dir
    r = run_attack(model, "prose", "full", tmp_path / "run", reference=model, steps=4, batch_size=4, block_size=64,
                   train_tokens=20000, score_every=2)
    assert r["gain_ratio"] == pytest.approx(1.0, abs=1e-6), "same model, same seed: the same gain"
    assert r["target"]["gain"] > 0, "fine-tuning on prose lowers prose loss"
    c = r["target"]["cost"]
    assert c["saved_activation_bytes_per_step"] > 0 and c["step_time_s"] > 0 and c["flops_estimate"] > 0
    # torch's FLOP counter agrees with 6·N·tokens to within the embedding lookups it does not count
    assert 0.3 < c["flops_counted"] / c["flops_estimate"] < 1.2
    curve = r["target"]["score_curve"]
    assert curve[0] == [0, r["target"]["before"]["score"]] and curve[-1] == [4, r["target"]["after"]["score"]]
    assert (tmp_path / "run" / "result.json").exists()
    assert [p[0] for p in curve] == [0, 2, 4]
    again = run_attack(model, "prose", "full", tmp_path / "run", reference=model, steps=4)
    assert again == r, "a finished run is skipped"
    with pytest.raises(WeightlockError, match="reverse-distill needs a DLR-locked model"):
        run_attack(model, "prose", "reverse-distill", steps=1)
    with pytest.raises(WeightlockError, match="reference model directory not found"):
        run_attack(model, "prose", "full", reference=tmp_path / "nope", steps=1)


def test_attack_cost_curve_and_patience(tiny_model_dir, tmp_path):
    """Every scored point carries its cumulative cost; patience stops a run whose score stops improving."""
    model, _ = tiny_model_dir
    r = run_attack(model, "prose", "full", steps=6, batch_size=4, block_size=64, train_tokens=20000,
                   score_every=2)["target"]
    curve = r["cost_curve"]
    assert [p["step"] for p in curve] == [0, 2, 4, 6] and not r["stopped_early"]
    assert curve[0] == {"step": 0, "tokens": 0, "seconds": 0.0, "flops": 0.0, "score": r["before"]["score"]}
    assert curve[-1]["score"] == r["after"]["score"]
    assert [p["tokens"] for p in curve] == [0, 2 * 4 * 64, 4 * 4 * 64, 6 * 4 * 64]
    assert curve[-1]["flops"] == pytest.approx(r["cost"]["flops_counted"])
    for cost in ("seconds", "flops"):
        assert all(b[cost] > a[cost] for a, b in zip(curve, curve[1:])), cost
    assert curve[-1]["seconds"] == pytest.approx(r["cost"]["train_seconds"] + r["cost"]["prepare_seconds"])
    # lr 1e-9 leaves the score where it is: patience 2 stops after two scores without improvement
    r = run_attack(model, "prose", "full", steps=40, lr=1e-9, batch_size=4, block_size=64, train_tokens=20000,
                   score_every=2, patience=2, min_delta=1e-3)["target"]
    assert r["stopped_early"] and [p["step"] for p in r["cost_curve"]] == [0, 2, 4]
    with pytest.raises(WeightlockError, match="patience needs a score"):
        make_attack("full", patience=3)


def test_eval_tokens_bounds_the_score_and_capability_data(tiny_model_dir):
    """A real LLM on a CPU scores on fewer held-out tokens: eval_tokens caps the task's test blocks and must
    hold one block."""
    model, _ = tiny_model_dir
    small = run_attack(model, "prose", "full", steps=1, batch_size=2, block_size=64, train_tokens=2000,
                       eval_tokens=256)["target"]
    assert small["before"]["tokens"] == 256 and small["after"]["tokens"] == 256
    default = run_attack(model, "prose", "full", steps=1, batch_size=2, block_size=64, train_tokens=2000)["target"]
    assert default["before"]["tokens"] > 256
    with pytest.raises(WeightlockError, match="eval_tokens .* must hold one block of 128 tokens"):
        make_attack("full", eval_tokens=64)


def test_reverse_distill_curve_starts_with_its_own_cost(tiny_locked_dir):
    """The distillation is part of the attacker's bill: the curve's second point is the distilled dense
    model, at the distillation's time and FLOPs, before any fine-tuning step."""
    r = run_attack(tiny_locked_dir, "prose", "reverse-distill", steps=2, batch_size=4, block_size=64,
                   train_tokens=20000, score_every=1, distill_steps=5, distill_tokens=2048)["target"]
    c = r["cost_curve"]
    assert [p["step"] for p in c] == [0, 0, 1, 2]
    assert c[1]["seconds"] >= r["reverse_distill"]["seconds"] > 0
    assert c[1]["flops"] == r["reverse_distill"]["flops"] > 0
    assert c[1]["score"] != c[0]["score"], "the distilled model is scored, not the lock"


def test_sweep_grid_and_random_search_points():
    from weightlock.attacks.suite import parse_grid, sample_points

    grid = parse_grid(["lr=1e-3,3e-3", "optimizer=adamw,sgd"])
    assert grid == {"lr": [1e-3, 3e-3], "optimizer": ["adamw", "sgd"]}
    assert len(sample_points(grid, None)) == 4
    space = parse_grid(["lr=1e-4..1e-2", "steps=10..40", "optimizer=adamw,sgd"])
    pts = sample_points(space, 20, seed=1)
    assert pts == sample_points(space, 20, seed=1), "random search is reproducible"
    assert all(1e-4 <= p["lr"] <= 1e-2 and isinstance(p["steps"], int) and 10 <= p["steps"] <= 40 for p in pts)
    assert len({p["lr"] for p in pts}) > 10 and {p["optimizer"] for p in pts} == {"adamw", "sgd"}
    with pytest.raises(WeightlockError, match="random search"):
        sample_points(space, None)
    with pytest.raises(WeightlockError, match="LO < HI"):
        parse_grid(["lr=1e-2..1e-4"])
    with pytest.raises(WeightlockError, match="KEY=V1"):
        parse_grid(["lr"])


@pytest.mark.parametrize("family", FAMILIES)
def test_reverse_distill_student_computes_the_original_feed_forward(family):
    """The dense student reverse distillation fits, initialised from the original MLP's weights, reproduces the
    original MLP's output exactly on real activations, for every registered family (an activation-less
    ``Sequential(fc1, fc2)`` does not: OPT, GPT-J, Bloom)."""
    from torch import nn

    from weightlock.attacks.reverse_distill import dense_feed_forward
    from weightlock.dlr.modeling_weightlock_dlr import ADAPTERS, adapter_for, find_layers, get_path

    model = tiny_model(family)
    adapter = adapter_for(model)
    layers = find_layers(model, adapter)
    seen = {}
    hooks = []
    for k, layer in enumerate(layers):
        hooks.append(get_path(layer, adapter.mlp).register_forward_pre_hook(
            lambda m, args, kwargs, k=k: seen.__setitem__(("x", k), (args[0] if args else
                                                                    next(iter(kwargs.values()))).detach().clone()),
            with_kwargs=True))
        hooks.append(get_path(layer, adapter.out_path()).register_forward_hook(
            lambda m, args, out, k=k: seen.__setitem__(("y", k), (out[0] if isinstance(out, tuple) else out)
                                                      .detach().clone())))
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    for h in hooks:
        h.remove()
    for k, layer in enumerate(layers):
        x, y = seen["x", k], seen["y", k]
        student = dense_feed_forward(layer, adapter)
        with torch.no_grad():
            assert torch.equal(student(x), y), f"{family} layer {k}: the student is not the original feed-forward"
            if adapter.out_path() != adapter.mlp:  # the two linear maps alone miss what lies between them
                bare = nn.Sequential(get_path(layer, adapter.mlp), get_path(layer, adapter.out_path()))
                if len(adapter.identity) > 1:
                    assert not torch.allclose(bare(x), y, atol=1e-4), family
        assert {id(p) for p in student.parameters()} >= {id(p) for p in get_path(layer, adapter.mlp).parameters()}, \
            "the student's weights are the dense layer's own (fitting it fits the model)"
    assert {a.family for a in ADAPTERS.values()} <= set(FAMILIES), "every registered family is tested"
