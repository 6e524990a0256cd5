"""Cross-tokenizer loss: merged groups, one-to-one divergence, ULD, top-K input, identity case.

Oracles: a float64 textbook implementation written here with plain loops over groups (values and
autograd gradients), ``kdcompose.functional.generalized_jsd`` for the identity case, and numbers
worked out by hand. TRL's own GOLD code is the oracle in ``test_cross_tokenizer_gold_oracle.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kdcompose.functional import generalized_jsd
from kdcompose.functional.cross_tokenizer import (
    AlignedBatch,
    TeacherLogits,
    TeacherTopK,
    cross_tokenizer_loss,
    merged_group_logprobs,
    uld_distance,
)
from kdcompose.teachers.alignment import VocabMapping, align_text, align_token_ids, vocab_mapping
from kdcompose.testing.tokenizer_pair import build_pair_tokenizer, build_tokenizer_pair, embedding_rows

TEXTS = [
    "What is 12345 + 678? 13023",
    "a large red square in the center on a white background.",
    "Café 東京 😀 naïve 42",
]


@pytest.fixture(scope="module")
def pair():
    return build_tokenizer_pair()


@pytest.fixture(scope="module")
def vocab(pair):
    return vocab_mapping(*pair)


@pytest.fixture(scope="module")
def widths():
    return embedding_rows("student"), embedding_rows("teacher")  # 576 (padded), 741 (exact)


# ------------------------------------------------------------------------------ textbook reference


def _jsd(p_log: torch.Tensor, q_log: torch.Tensor, beta: float) -> torch.Tensor:
    p, q = p_log.exp(), q_log.exp()
    if beta == 0:
        return (q * (q_log - p_log)).sum()
    if beta == 1:
        return (p * (p_log - q_log)).sum()
    m = (1 - beta) * p + beta * q
    return beta * (q * (q_log - m.log())).sum() + (1 - beta) * (p * (p_log - m.log())).sum()


def _sorted_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.sort(descending=True).values, b.sort(descending=True).values
    n = max(a.numel(), b.numel())
    a = torch.cat([a, a.new_zeros(n - a.numel())])
    b = torch.cat([b, b.new_zeros(n - b.numel())])
    return (a - b).abs().sum()


def reference(zs, zt, alignments, vocab, *, unmatched="uld", uld_weight=1.0, beta=0.5, temperature=1.0):
    """Loops over samples and groups; full teacher logits; float64 autograd."""
    total, compared, matched_tokens, tokens = zs.new_zeros(()), 0, 0, 0
    s_off = t_off = 0
    for a in alignments:
        s_lp = torch.log_softmax(zs[s_off : s_off + len(a.student_ids)] / temperature, -1)
        t_lp = torch.log_softmax(zt[t_off : t_off + len(a.teacher_ids)].detach() / temperature, -1)
        flags = a.one_to_one(vocab)
        for g, one in zip(a.groups, flags, strict=True):
            s_rest = sum(s_lp[p, a.student_ids[p]] for p in g.student[1:])
            t_rest = sum(t_lp[p, a.teacher_ids[p]] for p in g.teacher[1:])
            s_row, t_row = s_lp[g.student[0]], t_lp[g.teacher[0]]
            if one:
                s_cols, t_cols = vocab.pairs(zs.shape[-1], zt.shape[-1])
                p = torch.log_softmax(s_row[s_cols], -1)
                q = torch.log_softmax(t_row[t_cols], -1)
                total = total + _jsd(p, q, beta)
                compared += 1
            elif unmatched == "uld":
                total = total + uld_weight * _sorted_l1((s_row + s_rest).exp(), (t_row + t_rest).exp())
                compared += 1
        matched_tokens += sum(flags)
        tokens += len(a.student_ids)
        s_off += len(a.student_ids)
        t_off += len(a.teacher_ids)
    return total / max(compared, 1), matched_tokens / tokens


def _logits(rows: int, width: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, width, generator=gen, dtype=torch.float64) * scale).requires_grad_(True)


# ------------------------------------------------------------------------------------ the numbers


@given(
    texts=st.lists(st.sampled_from(TEXTS), min_size=1, max_size=2),
    beta=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    temperature=st.sampled_from([0.7, 1.0, 2.0]),
    unmatched=st.sampled_from(["uld", "skip"]),
    uld_weight=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_matches_textbook_reference_values_and_gradients(
    pair, vocab, widths, texts, beta, temperature, unmatched, uld_weight, seed
) -> None:
    student, teacher = pair
    alignments = [align_text(student, teacher, t) for t in texts]
    n_s = sum(len(a.student_ids) for a in alignments)
    n_t = sum(len(a.teacher_ids) for a in alignments)
    zs, zt = _logits(n_s, widths[0], seed), _logits(n_t, widths[1], seed + 1)
    zt_in = zt.detach().clone().requires_grad_(True)
    got = cross_tokenizer_loss(
        zs,
        TeacherLogits(zt_in),
        AlignedBatch.from_alignments(alignments, vocab),
        unmatched=unmatched,
        uld_weight=uld_weight,
        beta=beta,
        temperature=temperature,
    )
    ref_zs = zs.detach().clone().requires_grad_(True)
    want, frac = reference(
        ref_zs,
        zt,
        alignments,
        vocab,
        unmatched=unmatched,
        uld_weight=uld_weight,
        beta=beta,
        temperature=temperature,
    )
    torch.testing.assert_close(got.loss, want, rtol=1e-9, atol=1e-12)
    assert got.matched_frac == frac
    got.loss.backward()
    want.backward()
    torch.testing.assert_close(zs.grad, ref_zs.grad, rtol=1e-7, atol=1e-12)
    assert zt_in.grad is None  # the teacher gets no gradient


@given(
    ids=st.lists(st.lists(st.integers(0, 555), min_size=0, max_size=10), min_size=1, max_size=3),
    beta=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]),
    temperature=st.sampled_from([0.5, 1.0, 1.7]),
    seed=st.integers(0, 2**16),
)
def test_student_tokenizer_on_both_sides_equals_the_same_tokenizer_jsd(
    pair, widths, ids, beta, temperature, seed
) -> None:
    """The forced cross-tokenizer path (alignment, merging, vocabulary map with padding rows) with
    the student's tokenizer on both sides is exactly the same-tokenizer JSD."""
    student = pair[0]
    twin = build_pair_tokenizer("student")
    alignments = [align_token_ids(student, x, twin, x) for x in ids]
    n = sum(len(x) for x in ids)
    zs, zt = _logits(n, widths[0], seed), _logits(n, widths[0], seed + 1)
    got = cross_tokenizer_loss(
        zs,
        TeacherLogits(zt),
        AlignedBatch.from_alignments(alignments, vocab_mapping(student, twin)),
        beta=beta,
        temperature=temperature,
    )
    want = generalized_jsd(zs, zt.detach(), beta=beta, temperature=temperature)
    torch.testing.assert_close(got.loss, want, rtol=1e-10, atol=1e-12)
    assert got.matched_frac == (1.0 if n else 0.0) and got.num_uld == 0
    if n:
        (g_got,) = torch.autograd.grad(got.loss, zs)
        (g_want,) = torch.autograd.grad(
            generalized_jsd(zs, zt.detach(), beta=beta, temperature=temperature), zs
        )
        torch.testing.assert_close(g_got, g_want, rtol=1e-8, atol=1e-12)


def test_any_divergence_gets_normalized_log_probabilities_over_the_paired_columns(
    pair, vocab, widths
) -> None:
    """A divergence that trusts its inputs (no log-softmax of its own): forward KL written out must
    give the beta = 0 value, so both sides must arrive restricted to the map's pairs and renormalized."""
    student, teacher = pair
    a = align_text(student, teacher, TEXTS[1])
    batch = AlignedBatch.from_alignments([a], vocab)
    zs, zt = _logits(len(a.student_ids), widths[0], 7), _logits(len(a.teacher_ids), widths[1], 8)
    calls = []

    def forward_kl(s_lp: torch.Tensor, t_lp: torch.Tensor) -> torch.Tensor:
        calls.append(s_lp.shape)
        return (t_lp.exp() * (t_lp - s_lp)).sum()

    got = cross_tokenizer_loss(zs, TeacherLogits(zt), batch, divergence=forward_kl, unmatched="skip")
    want = cross_tokenizer_loss(zs, TeacherLogits(zt), batch, beta=0.0, unmatched="skip")
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-10, atol=1e-12)
    assert calls == [torch.Size([got.num_matched, len(vocab)])]


def test_identity_in_float32_is_within_float_tolerance(pair, widths) -> None:
    student = pair[0]
    a = align_text(student, build_pair_tokenizer("student"), TEXTS[0])
    zs, zt = (
        _logits(len(a.student_ids), widths[0], 3).float(),
        _logits(len(a.student_ids), widths[0], 4).float(),
    )
    got = cross_tokenizer_loss(
        zs, TeacherLogits(zt), AlignedBatch.from_alignments([a], vocab_mapping(student, student))
    )
    torch.testing.assert_close(got.loss, generalized_jsd(zs, zt), rtol=1e-5, atol=1e-7)


def test_matched_frac_on_a_hand_example(pair, widths) -> None:
    """'What is 12345 + 678? 13023': 21 student tokens; the groups '12', ' +', '78', '13' hold two
    student tokens each (8 tokens), the other 13 groups are one token on each side."""
    student, teacher = pair
    a = align_text(student, teacher, TEXTS[0])
    assert len(a.student_ids) == 21
    zs, zt = _logits(21, widths[0], 0), _logits(len(a.teacher_ids), widths[1], 1)
    batch = AlignedBatch.from_alignments([a], vocab_mapping(student, teacher))
    got = cross_tokenizer_loss(zs, TeacherLogits(zt), batch)
    assert (got.num_matched, got.num_uld, got.num_compared) == (13, 4, 17)
    assert got.matched_frac == 13 / 21
    skipped = cross_tokenizer_loss(zs, TeacherLogits(zt), batch, unmatched="skip")
    assert (skipped.num_compared, skipped.matched_frac) == (13, 13 / 21)
    torch.testing.assert_close(skipped.loss, got.matched_sum / 13)
    none = cross_tokenizer_loss(zs, TeacherLogits(zt), AlignedBatch.from_alignments([a], None))
    assert (none.num_matched, none.num_uld, none.matched_frac) == (0, 17, 0.0)


def _hand_batch(matched: list[bool], s_group: list[int], t_group: list[int], s_ids, t_ids, vocab=None):
    long = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    return AlignedBatch(long(s_ids), long(t_ids), long(s_group), long(t_group), torch.tensor(matched), vocab)


def test_uld_example_number() -> None:
    """Student: 'ab' as two tokens, p(first) = [.5, .3, .2], p(actual second token) = .5, so the merged
    row is [.25, .15, .10]; teacher: 'ab' as one token, [.6, .4]. Sorted L1:
    |.25-.6| + |.15-.4| + |.10-0| = .35 + .25 + .10 = 0.7."""
    zs = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3]], dtype=torch.float64).log().requires_grad_(True)
    zt = torch.tensor([[0.6, 0.4]], dtype=torch.float64).log()
    batch = _hand_batch([False], [0, 0], [0], [0, 1], [0])
    got = cross_tokenizer_loss(zs, TeacherLogits(zt), batch)
    torch.testing.assert_close(got.loss, torch.tensor(0.7, dtype=torch.float64))
    weighted = cross_tokenizer_loss(zs, TeacherLogits(zt), batch, uld_weight=2.0)
    torch.testing.assert_close(weighted.loss, torch.tensor(1.4, dtype=torch.float64))
    merged = merged_group_logprobs(torch.log_softmax(zs, -1), batch.student_ids, batch.student_group).exp()
    torch.testing.assert_close(merged, torch.tensor([[0.25, 0.15, 0.10]], dtype=torch.float64))
    torch.testing.assert_close(
        uld_distance(merged, zt.exp()), torch.tensor([0.7], dtype=torch.float64), rtol=0, atol=1e-12
    )
    skipped = cross_tokenizer_loss(zs, TeacherLogits(zt), batch, unmatched="skip")
    assert skipped.num_compared == 0 and skipped.loss.item() == 0.0
    skipped.loss.backward()  # connected to the student's graph: DDP does not hang
    assert torch.count_nonzero(zs.grad) == 0


def test_one_to_one_example_number() -> None:
    """One matched group; the map pairs student ids 0, 1 with teacher ids 1, 0 (teacher id 2 has no
    partner): the student's [.5, .3, .2] is compared as [.5, .3]/.8 against the teacher's
    [.1, .6, .3] read at [1, 0], i.e. [.6, .1]/.7, with beta = 0 (forward KL)."""
    zs = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64).log()
    zt = torch.tensor([[0.1, 0.6, 0.3]], dtype=torch.float64).log()
    vocab = VocabMapping(student_ids=(0, 1), teacher_ids=(1, 0), student_size=3, teacher_size=3)
    batch = _hand_batch([True], [0], [0], [0], [1], vocab)
    got = cross_tokenizer_loss(zs, TeacherLogits(zt), batch, beta=0.0)
    p, q = [0.5 / 0.8, 0.3 / 0.8], [0.6 / 0.7, 0.1 / 0.7]
    want = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q, strict=True))
    assert got.loss.item() == pytest.approx(want, rel=1e-12)
    assert got.matched_frac == 1.0


# ------------------------------------------------------------------------------------ top-K input


def _topk(zt: torch.Tensor, teacher_ids, k: int, temperature: float = 1.0) -> TeacherTopK:
    lp = torch.log_softmax(zt.detach() / temperature, -1)
    values, ids = lp.topk(k, dim=-1)
    token = lp.gather(-1, torch.tensor(teacher_ids).unsqueeze(-1)).squeeze(-1)
    return TeacherTopK(ids, values, token, temperature=temperature)


@given(text=st.sampled_from(TEXTS), seed=st.integers(0, 2**16), beta=st.sampled_from([0.0, 0.5, 1.0]))
def test_topk_covering_the_vocabulary_equals_full_logits(pair, vocab, widths, text, seed, beta) -> None:
    student, teacher = pair
    a = align_text(student, teacher, text)
    batch = AlignedBatch.from_alignments([a], vocab)
    zs, zt = _logits(len(a.student_ids), widths[0], seed), _logits(len(a.teacher_ids), widths[1], seed + 1)
    full = cross_tokenizer_loss(zs, TeacherLogits(zt), batch, beta=beta, temperature=0.8)
    top = cross_tokenizer_loss(
        zs, _topk(zt, a.teacher_ids, widths[1], 0.8), batch, beta=beta, temperature=0.8
    )
    torch.testing.assert_close(top.loss, full.loss, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(top.uld_sum, full.uld_sum, rtol=1e-9, atol=1e-12)


@given(text=st.sampled_from(TEXTS), seed=st.integers(0, 2**16), k=st.integers(1, 40))
def test_topk_uld_is_a_lower_bound_and_matched_is_renormalized_over_the_known_ids(
    pair, vocab, widths, text, seed, k
) -> None:
    student, teacher = pair
    a = align_text(student, teacher, text)
    batch = AlignedBatch.from_alignments([a], vocab)
    zs, zt = _logits(len(a.student_ids), widths[0], seed), _logits(len(a.teacher_ids), widths[1], seed + 1)
    topk = _topk(zt, a.teacher_ids, k)
    full = cross_tokenizer_loss(zs, TeacherLogits(zt), batch)
    top = cross_tokenizer_loss(zs, topk, batch)
    assert top.uld_sum <= full.uld_sum + 1e-12
    # Matched groups, by hand: support = the top-K ids plus the actual token, those the map pairs.
    t2s = vocab.teacher_to_student()
    s_lp, want = torch.log_softmax(zs.detach(), -1), 0.0
    for g, one in zip(a.groups, a.one_to_one(vocab), strict=True):
        if not one:
            continue
        tp, sp = g.teacher[0], g.student[0]
        support = {int(i): float(v) for i, v in zip(topk.topk_ids[tp], topk.topk_logprobs[tp], strict=True)}
        support[a.teacher_ids[tp]] = float(topk.token_logprobs[tp])
        kept = [(t2s[t], v) for t, v in support.items() if t in t2s]
        p = torch.log_softmax(torch.stack([s_lp[sp, s] for s, _ in kept]), -1)
        q = torch.log_softmax(torch.tensor([v for _, v in kept], dtype=torch.float64), -1)
        want += float(_jsd(p, q, 0.5))
    assert top.matched_sum.item() == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_topk_with_absent_entries_and_gradient_to_the_student_only(pair, widths) -> None:
    student, teacher = pair
    a = align_text(student, teacher, TEXTS[2])
    batch = AlignedBatch.from_alignments([a], vocab_mapping(student, teacher))
    zs = _logits(len(a.student_ids), widths[0], 5)
    topk = _topk(_logits(len(a.teacher_ids), widths[1], 6), a.teacher_ids, 8)
    padded = TeacherTopK(
        torch.cat([topk.topk_ids, torch.zeros_like(topk.topk_ids[:, :3])], -1),
        torch.cat([topk.topk_logprobs, torch.full_like(topk.topk_logprobs[:, :3], -math.inf)], -1),
        topk.token_logprobs,
    )
    lp = padded.topk_logprobs.clone().requires_grad_(True)
    got = cross_tokenizer_loss(zs, TeacherTopK(padded.topk_ids, lp, padded.token_logprobs), batch)
    torch.testing.assert_close(got.loss, cross_tokenizer_loss(zs, topk, batch).loss, rtol=1e-12, atol=1e-12)
    got.loss.backward()
    assert torch.isfinite(zs.grad).all() and zs.grad.abs().sum() > 0 and lp.grad is None


# ------------------------------------------------------------------------------------ bad input


def test_bad_arguments_are_named(pair, widths) -> None:
    student, teacher = pair
    a = align_text(student, teacher, TEXTS[0])
    batch = AlignedBatch.from_alignments([a], vocab_mapping(student, teacher))
    zs, zt = _logits(21, widths[0], 0), _logits(len(a.teacher_ids), widths[1], 1)
    with pytest.raises(ValueError, match="unmatched must be one of"):
        cross_tokenizer_loss(zs, TeacherLogits(zt), batch, unmatched="drop")
    with pytest.raises(ValueError, match="uld_weight must be a finite number >= 0"):
        cross_tokenizer_loss(zs, TeacherLogits(zt), batch, uld_weight=-1.0)
    with pytest.raises(ValueError, match=r"student_logits must be \[tokens, V\] with one row per .* \(21\)"):
        cross_tokenizer_loss(zs[:-1], TeacherLogits(zt), batch)
    with pytest.raises(ValueError, match=r"computed at temperature 1\.0 but the loss runs at 2\.0"):
        cross_tokenizer_loss(zs, _topk(zt, a.teacher_ids, 4), batch, temperature=2.0)
    with pytest.raises(ValueError, match="exactly one student token"):
        _hand_batch([True], [0, 0], [0], [0, 1], [0]).check()
