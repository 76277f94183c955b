"""Truncated SVD of embedding tables: exactness, weighting, rank budgets, bad input."""

from __future__ import annotations

import pytest
import torch

from llmslim.compress import svd


@pytest.fixture
def table() -> torch.Tensor:
    return torch.randn(40, 12, generator=torch.Generator().manual_seed(0))


def test_full_rank_is_exact(table):
    a, b = svd.factorize(table, 12)
    assert a.shape == (40, 12) and b.shape == (12, 12)
    torch.testing.assert_close(a @ b, table, atol=1e-5, rtol=1e-5)


def test_full_rank_is_exact_with_weights(table):
    weights = torch.rand(40, generator=torch.Generator().manual_seed(1)) + 0.1
    a, b = svd.factorize(table, 12, weights)
    torch.testing.assert_close(a @ b, table, atol=1e-4, rtol=1e-4)


def test_weighted_svd_lowers_the_weighted_error(table):
    weights = svd.token_frequencies(torch.tensor([0, 1, 2, 3] * 50 + list(range(40))), 40)
    plain = svd.factorize(table, 4)
    weighted = svd.factorize(table, 4, weights)
    err_plain = svd.weighted_error(table, plain[0] @ plain[1], weights)
    err_weighted = svd.weighted_error(table, weighted[0] @ weighted[1], weights)
    assert err_weighted < err_plain
    assert svd.weighted_error(table, weighted[0] @ weighted[1]) >= svd.weighted_error(table, plain[0] @ plain[1])


def test_rank_for_energy_meets_the_budget(table):
    s = svd.singular_values(table)
    rank = svd.rank_for_energy(s, 0.8)
    a, b = svd.factorize(table, rank)
    assert svd.weighted_error(table, a @ b) <= 0.2 + 1e-6
    a, b = svd.factorize(table, rank - 1)
    assert svd.weighted_error(table, a @ b) > 0.2


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda t: svd.factorize(t, 13), r"rank must be an integer in \[1, 12\] for a \(40, 12\) table, got 13"),
        (lambda t: svd.factorize(t, 0), r"got 0"),
        (lambda t: svd.rank_for_energy(svd.singular_values(t), 1.0), r"energy must be in \(0, 1\).*got 1.0"),
        (lambda t: svd.factorize(t, 3, torch.zeros(40)), r"token_weights must be 40 positive numbers"),
        (lambda t: svd.token_frequencies(torch.tensor([50]), 40), r"token ids must lie in \[0, 40\)"),
    ],
)
def test_bad_input(table, call, match):
    with pytest.raises(ValueError, match=match):
        call(table)
