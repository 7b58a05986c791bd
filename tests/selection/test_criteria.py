"""shrink.selection.criteria: Gaussian entropy, streaming moments, the head input, skipping attention."""
from __future__ import annotations

import pytest
import torch

from shrink import ShrinkError
from shrink.selection.criteria import RunningMoments, gaussian_entropy, pre_logits, skip_attention

from ..conftest import tiny_vit


def test_gaussian_entropy_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    sigma = torch.tensor([0.1, 0.5, 1.0, 3.0, 20.0], dtype=torch.float64)
    x = torch.randn(200_000, 5, generator=g, dtype=torch.float64) * sigma + 7.0
    expected = float(torch.log(sigma).sum())  # sum_c log sigma_c, nats
    assert gaussian_entropy(x) == pytest.approx(expected, abs=1e-2)


def test_streaming_moments_equal_one_shot():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 7, generator=g) * 3 + 100  # large mean: the naive sum-of-squares would lose digits
    m = RunningMoments()
    for chunk in torch.split(x, [1, 13, 400, 586]):
        m.update(chunk)
    assert m.n == 1000
    assert torch.allclose(m.std(), x.double().std(dim=0), rtol=0, atol=1e-12)
    assert m.entropy() == pytest.approx(float(x.double().std(dim=0).log().sum()), abs=1e-10)


def test_entropy_needs_two_samples():
    with pytest.raises(ShrinkError):
        gaussian_entropy(torch.randn(1, 3))


def test_feature_is_the_head_input():
    m = tiny_vit()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        f = pre_logits(m, x)
        assert f.shape == (4, 32)
        torch.testing.assert_close(m.head(f), m(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(f, m.forward_features(x)[:, 0], rtol=0, atol=0)  # class token after the final norm


def test_skip_attention_is_identity_branch_and_restores():
    m = tiny_vit()
    blk = m.blocks[2]
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        before = blk(x)
        with skip_attention(m, [2]):
            skipped = blk(x)
            expected = x + blk.mlp(blk.norm2(x))
        after = blk(x)
    torch.testing.assert_close(skipped, expected, rtol=0, atol=0)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert "forward" not in blk.__dict__
    assert (skipped - before).abs().max() > 1e-4  # skipping really changed something


def test_skip_attention_restores_after_exception():
    m = tiny_vit()
    with pytest.raises(RuntimeError), skip_attention(m, [0, 1]):
        raise RuntimeError("boom")
    assert all("forward" not in b.__dict__ for b in m.blocks)
