"""Group embedding GE(X) = softmax(X W) Gm and the static fusion's masking."""

from __future__ import annotations

import numpy as np
import torch

from dipro.model.group import GroupEmbedding, StaticFusion, TaskHeads


def test_group_embedding_matches_reference() -> None:
    torch.manual_seed(0)
    ge = GroupEmbedding(d_model=6, num_groups=4)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    ge = ge.double()
    W = ge.assign.weight.detach().numpy().T  # D x G
    Gm = ge.groups.detach().numpy()  # G x D
    scores = x.numpy() @ W
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(ge(x).detach().numpy(), probs @ Gm, rtol=1e-10)
    assert W.shape == (6, 4) and Gm.shape == (4, 6)


def test_group_embedding_lies_in_the_hull_of_the_groups() -> None:
    torch.manual_seed(0)
    ge = GroupEmbedding(d_model=4, num_groups=3)
    with torch.no_grad():
        ge.assign.weight.mul_(1e4)  # near one-hot assignment
    out = ge(torch.randn(10, 4))
    nearest = torch.cdist(out, ge.groups).min(dim=-1).values
    assert torch.all(nearest < 1e-3)


def test_static_fusion_masks_padded_static_tokens() -> None:
    torch.manual_seed(0)
    fusion = StaticFusion(d_model=8, num_heads=2, num_groups=4, num_demographics=17, dropout=0.1)
    fusion.eval()
    cls, static, demo = torch.randn(1, 2, 8), torch.randn(1, 6, 8), torch.randn(1, 17)
    valid = torch.tensor([[True, True, True, False, False, False]])
    out = fusion(cls, static, valid, demo)
    static2 = static.clone()
    static2[0, 3:] = torch.randn(3, 8)
    torch.testing.assert_close(fusion(cls, static2, valid, demo), out)
    assert not torch.allclose(fusion(cls, static, valid, demo + 1.0), out)


def test_task_heads_one_per_token() -> None:
    heads = TaskHeads(d_model=8, num_tokens=7, out_dim=3, dropout=0.1)
    assert heads(torch.randn(2, 7, 8)).shape == (2, 7, 3)
