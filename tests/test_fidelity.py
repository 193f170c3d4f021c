import copy

import torch

from dlr_helpers import tiny_model
from weightlock.eval.fidelity import greedy_agreement, next_token_agreement

X = torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(0))


def test_a_model_agrees_with_itself_and_not_with_a_perturbed_copy():
    a = tiny_model("llama")
    r = next_token_agreement(a, copy.deepcopy(a), X)
    assert r["top1_agreement"] == 1.0 and abs(r["ppl_ratio"] - 1) < 1e-6 and r["tokens"] == 6 * 23
    g = greedy_agreement(a, copy.deepcopy(a), X[:, :8], new_tokens=6, batch_size=4)
    assert g == {"prompts": 6, "new_tokens": 6, "token_agreement": 1.0, "common_prefix_mean": 6.0,
                 "identical_continuations": 1.0}
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in b.model.layers[0].mlp.parameters():
            p.add_(torch.randn_like(p))
    r = next_token_agreement(a, b, X)
    assert r["top1_agreement"] < 1.0 and r["ppl_ratio"] != 1.0
    g = greedy_agreement(a, b, X[:, :8], new_tokens=6)
    assert g["token_agreement"] < 1.0 and g["common_prefix_mean"] < 6


def test_rtn_quantization_error_is_bounded_by_half_a_step_and_shrinks_with_bits():
    import pytest

    from weightlock.errors import WeightlockError
    from weightlock.eval.quantize import quantize_linear_layers_, rtn

    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    groups = w.reshape(16, 4, 32)
    step4 = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(32, 1)
    q4 = rtn(w, 4, 32)
    assert ((q4 - w).abs() <= step4 / 2 + 1e-6).all()
    assert torch.allclose(rtn(q4, 4, 32), q4, atol=1e-6), "values on the grid stay where they are"
    e4, e8 = (q4 - w).norm() / w.norm(), (rtn(w, 8, 32) - w).norm() / w.norm()
    assert e8 < e4 / 10 and len(torch.unique(q4[0, :32])) <= 16
    with pytest.raises(WeightlockError, match="group size 48 must divide"):
        rtn(w, 4, 48)
    from dlr_helpers import tiny_model

    model = tiny_model("llama")
    before = {n: p.clone() for n, p in model.named_parameters()}
    n = quantize_linear_layers_(model, 4, 16)
    changed = [k for k, p in model.named_parameters() if not torch.equal(p, before[k])]
    assert n == sum(before[k].numel() for k in changed) and all(".layers." in k for k in changed)
    assert not any("embed" in k or "lm_head" in k for k in changed)
