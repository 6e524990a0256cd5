"""`head_topk` (the teacher server's LM head, one vocabulary slice at a time) against the textbook
computation in float64: log_softmax of the full logits, its top-K, the actual token's
log-probability and its rank (1 + the number of tokens more probable)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcompose.serve.head_topk import head_topk


def oracle(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
    logprobs = torch.log_softmax(logits, dim=-1)
    own = logprobs.gather(-1, targets[:, None]).squeeze(-1)
    return logprobs.topk(k, dim=-1).values, own, logprobs


def check(rows: int, hidden_size: int, vocab: int, k: int, slice_bytes: int, bias: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, hidden_size, generator=g)
    weight = torch.randn(vocab, hidden_size, generator=g)
    b = torch.randn(vocab, generator=g) if bias else None
    targets = torch.randint(0, vocab, (rows,), generator=g)
    values, ids, own, rank = head_topk(hidden, weight, b, targets, k, slice_bytes=slice_bytes)
    want_v, want_own, logprobs = oracle(hidden, weight, b, targets, min(k, vocab))
    assert values.dtype == own.dtype == torch.float32 and ids.dtype == rank.dtype == torch.int64
    assert values.shape == ids.shape == (rows, min(k, vocab))
    torch.testing.assert_close(values.double(), want_v, atol=1e-5, rtol=0)
    torch.testing.assert_close(own.double(), want_own, atol=1e-5, rtol=0)
    # the ids are a top-K: the oracle's log-probabilities at them are the K largest (ties either way)
    torch.testing.assert_close(logprobs.gather(-1, ids), want_v, atol=1e-5, rtol=0)
    # rank: 1 + tokens more probable, up to tokens within rounding of the actual one
    eps = 1e-5
    low = (logprobs > want_own[:, None] + eps).sum(-1) + 1
    high = (logprobs > want_own[:, None] - eps).sum(-1)  # counts the token itself
    assert bool(((rank >= low) & (rank <= high.clamp(min=1))).all())


@settings(deadline=None)
@given(
    rows=st.integers(1, 9),
    vocab=st.integers(1, 700),
    k=st.integers(0, 12),
    slice_columns=st.sampled_from([1, 7, 256, 10_000]),
    bias=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_matches_the_full_log_softmax_for_any_slicing(
    rows: int, vocab: int, k: int, slice_columns: int, bias: bool, seed: int
) -> None:
    check(rows, 6, vocab, k, slice_columns * 4 * rows, bias, seed)


@pytest.mark.parametrize("slice_bytes", [4 << 20, 1 << 12])
def test_a_large_vocabulary_in_one_or_many_slices(slice_bytes: int) -> None:
    check(rows=5, hidden_size=16, vocab=20_000, k=8, slice_bytes=slice_bytes, bias=False, seed=3)


def test_the_actual_token_on_top_has_rank_one_and_k_zero_gives_no_columns() -> None:
    hidden = torch.eye(3)
    weight = torch.eye(3) * 5
    values, ids, own, rank = head_topk(hidden, weight, None, torch.tensor([0, 1, 0]), 0)
    assert values.shape == ids.shape == (3, 0)
    assert rank.tolist() == [1, 1, 2]
    expected = torch.log_softmax(torch.tensor([5.0, 0.0, 0.0]), -1)
    torch.testing.assert_close(own, torch.stack([expected[0], expected[0], expected[1]]))
