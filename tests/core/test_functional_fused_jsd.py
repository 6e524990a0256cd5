"""Tests of fused_linear_generalized_jsd against the unfused path (explicit logits).

The unfused oracle builds the logits with plain autograd matmuls and feeds them to
``generalized_jsd_reference`` (textbook autograd), so value and all three gradients (hidden
states, weight, bias) are checked against an implementation that shares no code with ours.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcompose.functional.fused_jsd import fused_linear_generalized_jsd
from kdcompose.functional.jsd import generalized_jsd, generalized_jsd_reference

IGNORE = -100
BETAS = (0.0, 0.25, 0.5, 0.9, 1.0)


def make_case(seed: int, leading=(2, 5), h_s=6, h_t=4, vocab=13, bias=True, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    case = {
        "student_hidden": randn(*leading, h_s),
        "student_weight": randn(vocab, h_s, scale=0.8),
        "teacher_hidden": randn(*leading, h_t),
        "teacher_weight": randn(vocab, h_t, scale=0.8),
        "student_bias": randn(vocab, scale=0.5) if bias else None,
        "teacher_bias": randn(vocab, scale=0.5) if bias else None,
    }
    return case


def student_leaves(case):
    leaves = {
        k: case[k].detach().clone().requires_grad_(True)
        for k in ("student_hidden", "student_weight", "student_bias")
        if case[k] is not None
    }
    return {**case, **leaves}


def run_fused(case, labels=None, **kwargs):
    c = student_leaves(case)
    value = fused_linear_generalized_jsd(
        c["student_hidden"],
        c["student_weight"],
        c["teacher_hidden"],
        c["teacher_weight"],
        labels,
        student_bias=c["student_bias"],
        teacher_bias=c["teacher_bias"],
        **kwargs,
    )
    return value, _grads(value, c)


def run_unfused(case, labels=None, fn=generalized_jsd_reference, **kwargs):
    c = student_leaves(case)
    s_logits = torch.nn.functional.linear(c["student_hidden"], c["student_weight"], c["student_bias"])
    t_logits = torch.nn.functional.linear(c["teacher_hidden"], c["teacher_weight"], c["teacher_bias"])
    value = fn(s_logits, t_logits, labels, **kwargs)
    return value, _grads(value, c)


def _grads(value, c):
    names = [k for k in ("student_hidden", "student_weight", "student_bias") if c[k] is not None]
    grads = torch.autograd.grad(value, [c[k] for k in names])
    return dict(zip(names, grads, strict=True))


def assert_same(fused, unfused, rtol=1e-5, atol=1e-6):
    (v1, g1), (v2, g2) = fused, unfused
    torch.testing.assert_close(v1, v2, rtol=rtol, atol=atol)
    assert g1.keys() == g2.keys()
    for name in g1:
        scale = g2[name].abs().max().item()
        assert (g1[name] - g2[name]).abs().max().item() <= rtol * scale + atol, name


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_equals_unfused_reference(beta, temperature, bias, masked):
    case = make_case(1, bias=bias)
    labels = torch.tensor([[1, IGNORE, 2, 3, IGNORE], [4, 4, IGNORE, 4, 0]]) if masked else None
    for chunk in (None, 1, 3, 100):
        assert_same(
            run_fused(case, labels, beta=beta, temperature=temperature, chunk_size=chunk),
            run_unfused(case, labels, beta=beta, temperature=temperature),
        )


@settings(deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    leading=st.lists(st.integers(1, 4), min_size=1, max_size=2).map(tuple),
    vocab=st.integers(2, 16),
    beta=st.one_of(st.sampled_from(BETAS), st.floats(0.0, 1.0)),
    temperature=st.sampled_from([0.5, 1.0, 3.0]),
    chunk=st.one_of(st.none(), st.integers(1, 6)),
    bias=st.booleans(),
    mask_seed=st.one_of(st.none(), st.integers(0, 1000)),
)
def test_property_fused_equals_unfused_chunked_path(
    seed, leading, vocab, beta, temperature, chunk, bias, mask_seed
):
    case = make_case(seed, leading=leading, vocab=vocab, bias=bias)
    labels = None
    if mask_seed is not None:
        keep = torch.rand(leading, generator=torch.Generator().manual_seed(mask_seed)) < 0.6
        labels = torch.where(keep, 1, IGNORE)
    fused = run_fused(case, labels, beta=beta, temperature=temperature, chunk_size=chunk)
    if labels is not None and not (labels != IGNORE).any():
        assert fused[0].item() == 0.0
        assert all(torch.all(g == 0) for g in fused[1].values())
        return
    assert_same(fused, run_unfused(case, labels, fn=generalized_jsd, beta=beta, temperature=temperature))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_float64_is_exact(beta):
    case = make_case(2, dtype=torch.float64)
    labels = torch.tensor([[1, 1, IGNORE, 1, 1], [IGNORE, 2, 2, 2, 2]])
    assert_same(
        run_fused(case, labels, beta=beta, temperature=1.3, chunk_size=2),
        run_unfused(case, labels, beta=beta, temperature=1.3),
        rtol=1e-10,
        atol=1e-13,
    )


def test_masked_rows_get_zero_hidden_gradient_and_do_not_matter():
    case = make_case(3, bias=True)
    labels = torch.tensor([[1, IGNORE, 1, IGNORE, 1], [IGNORE, IGNORE, 1, 1, 1]])
    value, grads = run_fused(case, labels, beta=0.5, chunk_size=2)
    assert torch.all(grads["student_hidden"][labels == IGNORE] == 0)
    noisy = dict(case)
    for key in ("student_hidden", "teacher_hidden"):
        noisy[key] = case[key].clone()
        noisy[key][labels == IGNORE] = float("nan")
    value2, grads2 = run_fused(noisy, labels, beta=0.5, chunk_size=2)
    assert torch.equal(value, value2)
    for name in grads:
        assert torch.equal(grads[name], grads2[name])


def test_no_valid_position_gives_connected_zero():
    case = make_case(4, bias=True)
    labels = torch.full((2, 5), IGNORE)
    value, grads = run_fused(case, labels)
    assert value.item() == 0.0
    assert set(grads) == {"student_hidden", "student_weight", "student_bias"}
    assert all(torch.all(g == 0) for g in grads.values())


def test_teacher_never_receives_a_gradient():
    case = make_case(5, bias=True)
    teacher = {
        k: case[k].clone().requires_grad_(True) for k in ("teacher_hidden", "teacher_weight", "teacher_bias")
    }
    s = student_leaves(case)
    value = fused_linear_generalized_jsd(
        s["student_hidden"],
        s["student_weight"],
        teacher["teacher_hidden"],
        teacher["teacher_weight"],
        student_bias=s["student_bias"],
        teacher_bias=teacher["teacher_bias"],
    )
    grads = torch.autograd.grad(value, list(teacher.values()), allow_unused=True)
    assert all(g is None for g in grads)


def test_only_requested_gradients_are_produced_and_grad_output_scales():
    case = make_case(6, bias=True)
    hidden = case["student_hidden"].clone().requires_grad_(True)
    weight = case["student_weight"]  # frozen LM head (e.g. LoRA): only the hidden states learn
    value = fused_linear_generalized_jsd(
        hidden,
        weight,
        case["teacher_hidden"],
        case["teacher_weight"],
        student_bias=case["student_bias"],
        teacher_bias=case["teacher_bias"],
    )
    (3.0 * value).backward()
    _, ref = run_unfused(case)
    torch.testing.assert_close(hidden.grad, 3.0 * ref["student_hidden"], rtol=1e-5, atol=1e-7)


def test_upstream_graph_and_non_contiguous_hidden():
    case = make_case(7, leading=(2, 6), bias=False)
    base = case["student_hidden"].clone().requires_grad_(True)
    proj = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[1, 1, IGNORE, 1, 1], [1, IGNORE, 1, 1, 1]])

    def loss(fused: bool):
        hidden = (base @ proj)[:, :-1]  # a shifted, non-contiguous view with a graph behind it
        teacher_hidden = case["teacher_hidden"][:, 1:]
        if fused:
            return fused_linear_generalized_jsd(
                hidden,
                case["student_weight"],
                teacher_hidden,
                case["teacher_weight"],
                labels,
                beta=0.7,
                chunk_size=3,
            )
        return generalized_jsd_reference(
            hidden @ case["student_weight"].T, teacher_hidden @ case["teacher_weight"].T, labels, beta=0.7
        )

    (g_fused,) = torch.autograd.grad(loss(True), base)
    (g_ref,) = torch.autograd.grad(loss(False), base)
    torch.testing.assert_close(g_fused, g_ref, rtol=1e-5, atol=1e-7)


def test_bf16_weights_follow_fp32_closely_and_keep_dtypes():
    case32 = make_case(8, bias=True)
    case16 = {k: None if v is None else v.to(torch.bfloat16) for k, v in case32.items()}
    value16, grads16 = run_fused(case16, beta=0.5, chunk_size=3)
    value32, grads32 = run_fused(
        {k: None if v is None else v.float() for k, v in case16.items()}, beta=0.5, chunk_size=3
    )
    assert value16.dtype == torch.float32
    assert value16.item() == pytest.approx(value32.item(), rel=2e-2)
    for name, g in grads16.items():
        assert g.dtype == torch.bfloat16
        assert (g.float() - grads32[name]).abs().max() <= 3e-2 * grads32[name].abs().max()


def test_second_backward_raises_clearly():
    case = make_case(9, bias=False)
    s = student_leaves(case)
    value = fused_linear_generalized_jsd(
        s["student_hidden"], s["student_weight"], case["teacher_hidden"], case["teacher_weight"]
    )
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        value.backward()


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"student_weight": torch.zeros(13, 5)}, "student_hidden.*student_weight.shape\\[1\\]"),
        ({"teacher_weight": torch.zeros(4, 13)}, "teacher_hidden.*teacher_weight.shape\\[1\\]"),
        ({"teacher_weight": torch.zeros(12, 4)}, "vocabulary"),
        ({"student_weight": torch.zeros(13)}, "student_weight must be \\[V, H\\]"),
        ({"teacher_hidden": torch.zeros(2, 4, 4)}, "leading"),
        ({"labels": torch.zeros(2, 4, dtype=torch.long)}, "labels"),
        ({"student_bias": torch.zeros(12)}, "student_bias"),
        ({"beta": 2.0}, "beta"),
        ({"temperature": 0}, "temperature"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_them(change, pattern):
    case = make_case(10, bias=False)
    args = {
        **{k: case[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")},
        "labels": None,
        **change,
    }
    positional = [
        args.pop(k)
        for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight", "labels")
    ]
    with pytest.raises(ValueError, match=pattern):
        fused_linear_generalized_jsd(*positional, **args)


def test_autocast_does_not_change_the_math():
    case = make_case(11, bias=True)
    plain = run_fused(case, beta=0.4, chunk_size=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = run_fused(case, beta=0.4, chunk_size=3)
    assert_same(cast, plain, rtol=1e-6, atol=1e-7)
