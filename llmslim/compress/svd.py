"""Truncated SVD of an embedding table, plain or weighted by token frequencies, and rank budgets.

A V x H table W is replaced by A (V x E) @ B (E x H). Plain truncated SVD minimises the
Frobenius error ||W - AB||; with token weights f (one per row) the weighted error
sum_v f_v ||w_v - (AB)_v||^2 is minimised exactly by the SVD of diag(sqrt f) W, scaled back:
frequent tokens, which dominate the loss on real text, are reconstructed best.
"""

from __future__ import annotations

from pathlib import Path

import torch


def factorize(weight: torch.Tensor, rank: int, token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors (A, B) of `weight`, in float32.

    Args:
        weight: the (V, H) embedding table.
        rank: E, the inner dimension, 1 <= E <= min(V, H) (min(V, H) reconstructs exactly).
        token_weights: (V,) positive weights of the rows; None for plain truncated SVD.

    Returns:
        A of shape (V, E) and B of shape (E, H), with B's rows orthonormal.
    """
    _check_rank(rank, weight.shape)
    u, s, vh = _scaled_svd(weight, token_weights)  # (V, k), (k,), (k, H)
    a = u[:, :rank] * s[:rank]  # (V, E)
    if token_weights is not None:
        a = a / _row_scale(token_weights, weight.shape[0])  # undo diag(sqrt f)
    return a.contiguous(), vh[:rank].contiguous()


def singular_values(weight: torch.Tensor, token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Singular values of `weight` (of diag(sqrt f) weight with token weights), largest first."""
    return torch.linalg.svdvals(_scaled(weight, token_weights))


def rank_for_energy(singular: torch.Tensor, energy: float) -> int:
    """Smallest rank whose factors keep `energy` of sum(s^2): the relative squared error is then <= 1 - energy."""
    if not 0 < energy < 1:
        raise ValueError(f"energy must be in (0, 1), e.g. 0.9 keeps 90% of the table's energy, got {energy!r}")
    share = torch.cumsum(singular.double() ** 2, 0) / (singular.double() ** 2).sum()  # (k,)
    return int(torch.searchsorted(share, torch.tensor([energy], dtype=share.dtype)).item()) + 1


def weighted_error(weight: torch.Tensor, approx: torch.Tensor, token_weights: torch.Tensor | None = None) -> float:
    """Relative (frequency-weighted) squared reconstruction error of `approx` against `weight`."""
    diff = _scaled(weight - approx, token_weights)
    return float(diff.square().sum() / _scaled(weight, token_weights).square().sum())


def token_frequencies(token_ids: torch.Tensor, vocab_size: int, smoothing: float = 1.0) -> torch.Tensor:
    """Counts of each token id in `token_ids` plus `smoothing` (so unseen tokens keep a small weight), (V,) float32."""
    if smoothing <= 0:
        raise ValueError(f"smoothing must be > 0 so that every row keeps a positive weight, got {smoothing!r}")
    ids = token_ids.reshape(-1).long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}) (the embedding's rows), got ids up to {int(ids.max())}")
    return torch.bincount(ids, minlength=vocab_size).float() + smoothing


def corpus_frequencies(path: str | Path, tokenizer, vocab_size: int, max_chars: int | None = 2_000_000) -> torch.Tensor:
    """Token weights measured on a UTF-8 text file (its first `max_chars` characters), see `token_frequencies`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"embedding corpus {str(path)!r} is not a file: give a UTF-8 text file to measure token frequencies on")
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")[:max_chars]
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return token_frequencies(torch.tensor(ids, dtype=torch.long), vocab_size)


def _check_rank(rank: int, shape: torch.Size) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(shape):
        raise ValueError(f"rank must be an integer in [1, {min(shape)}] for a {tuple(shape)} table, got {rank!r}")


def _row_scale(token_weights: torch.Tensor, n_rows: int) -> torch.Tensor:
    if token_weights.shape != (n_rows,) or not bool((token_weights > 0).all()):
        raise ValueError(
            f"token_weights must be {n_rows} positive numbers (one per embedding row; add smoothing to counts), "
            f"got shape {tuple(token_weights.shape)}"
        )
    return token_weights.float().sqrt().unsqueeze(1)  # (V, 1)


def _scaled(weight: torch.Tensor, token_weights: torch.Tensor | None) -> torch.Tensor:
    w = weight.detach().float()
    return w if token_weights is None else w * _row_scale(token_weights.to(w.device), w.shape[0])


def _scaled_svd(weight: torch.Tensor, token_weights: torch.Tensor | None):
    return torch.linalg.svd(_scaled(weight, token_weights), full_matrices=False)
