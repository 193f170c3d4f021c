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
