"""`cross_tokenizer:` on lm_jsd / lm_kd, and the framework-neutral plan and aligned view.

Real tokenizers: the two different locally trained BPEs of ``kdcompose.testing.tokenizer_pair``.
Oracles: ``cross_tokenizer_loss`` called directly with a textbook divergence written here, and,
for the identity case, the same composition on its ordinary (position-by-position) path.
"""

from __future__ import annotations

import pytest
import torch

from kdcompose import parse_config
from kdcompose.errors import ConfigError
from kdcompose.functional import cross_tokenizer_loss
from kdcompose.teachers.alignment import AlignmentError
from kdcompose.terms.base import LossContext
from kdcompose.testing.tokenizer_pair import build_pair_tokenizer, build_tokenizer_pair
from kdcompose.training.context import shift_labels
from kdcompose.training.cross_tokenizer import (
    TeacherCompletion,
    TeacherTokenizer,
    aligned_from_logits,
    aligned_from_topk,
    plan_cross_tokenizer,
)

ANSWERS = ["12 + 345 = 357. a red square.", "Café naïve 42 blue circles"]


@pytest.fixture(scope="module")
def pair():
    return build_tokenizer_pair()


def composer(terms: dict, **rlhf):
    """The composition of `terms` alone (lm_jsd, always present, is off unless given)."""
    terms = {"lm_jsd": {"weight": 0.0}, **terms}
    return parse_config({"rlhf": {"loss_terms": terms, **rlhf}}).composer


def local(tokenizer, name: str = "") -> TeacherTokenizer:
    return TeacherTokenizer(name, tokenizer, "the default teacher (local model)", "model.teacher_model")


def encode_rows(tokenizer, prompt_len: int, eos: str) -> torch.Tensor:
    """Unshifted labels [B, S]: `prompt_len` prompt positions (-100), then each answer + eos, padded."""
    rows = []
    for text in ANSWERS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids(eos)]
        rows.append([-100] * prompt_len + ids)
    width = max(len(r) for r in rows) + 1
    return torch.tensor([r + [-100] * (width - len(r)) for r in rows])


@pytest.fixture(scope="module")
def batch(pair):
    student, teacher = pair
    torch.manual_seed(0)
    s_labels = encode_rows(student, 3, "<|im_end|>")
    t_labels = encode_rows(teacher, 5, "<|eot_id|>")
    s_logits = torch.randn(*s_labels.shape, 576, dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(*t_labels.shape, 741, dtype=torch.float64)
    return s_labels, t_labels, s_logits, t_logits


# ------------------------------------------------------------------------------ the plan


def test_a_different_tokenizer_without_the_block_is_refused_naming_term_teacher_and_fix(pair) -> None:
    student, teacher = pair
    terms = composer({"lm_jsd": {"weight": 1.0}, "ce": {"weight": 0.1}}).active_terms
    plan, issues = plan_cross_tokenizer(terms, student, [local(teacher)])
    assert [i.path for i in issues] == ["rlhf.loss_terms.lm_jsd"]  # ce does not read the teacher
    message = issues[0].message
    assert "the default teacher (local model)" in message and "vocabularies differ" in message
    assert "cross_tokenizer: {unmatched: uld}" in message
    with_block = composer({"lm_jsd": {"cross_tokenizer": {"unmatched": "uld"}}}).active_terms
    plan, issues = plan_cross_tokenizer(with_block, student, [local(teacher)])
    assert issues == [] and "" in plan and plan.teachers[""].difference == issues_free_difference(pair)


def issues_free_difference(pair) -> str:
    from kdcompose.teachers.alignment import tokenizer_difference

    return tokenizer_difference(*pair)


def test_the_same_tokenizer_runs_the_ordinary_path_unless_forced(pair) -> None:
    student, _ = pair
    twin = build_pair_tokenizer("student")
    block = composer({"lm_jsd": {"cross_tokenizer": {}}}).active_terms
    plan, issues = plan_cross_tokenizer(block, student, [local(twin)])
    assert not plan and issues == []
    forced = composer(
        {"lm_jsd": {"cross_tokenizer": {"force": True}}, "k": {"type": "lm_kd", "divergence": "fkl"}}
    )
    plan, issues = plan_cross_tokenizer(forced.active_terms, student, [local(twin)])
    assert plan.teachers[""].identical
    assert [i.path for i in issues] == ["rlhf.loss_terms.k"] and "force" in issues[0].message


def test_unknown_tokenizer_and_remote_temperature_are_named(pair) -> None:
    student, teacher = pair
    terms = composer(
        {"lm_jsd": {"teacher": "llama", "topk": 4, "cross_tokenizer": {}}},
        teachers={"llama": {"server": "http://127.0.0.1:1"}},
    ).active_terms
    remote = frozenset({"llama"})
    unknown = TeacherTokenizer(
        "llama", None, "teacher 'llama'", "rlhf.teachers.llama", "set `tokenizer: PATH`"
    )
    _, issues = plan_cross_tokenizer(terms, student, [unknown], remote)
    assert [i.path for i in issues] == ["rlhf.teachers.llama"] and "tokenizer: PATH" in issues[0].message
    served = TeacherTokenizer("llama", teacher, "teacher 'llama'", "rlhf.teachers.llama", temperature=1.0)
    _, issues = plan_cross_tokenizer(terms, student, [served], remote)
    assert [i.path for i in issues] == ["rlhf.loss_terms.lm_jsd.cross_tokenizer"]  # lm_jsd's T is 0.9
    assert "temperature: 1" in issues[0].message


def test_settings_the_path_cannot_honour_are_config_errors() -> None:
    with pytest.raises(ConfigError) as info:
        composer({"k": {"type": "lm_kd", "divergence": "fkl", "cross_tokenizer": {"unmatched": "bogus"}}})
    assert [i.path for i in info.value.issues] == ["rlhf.loss_terms.k.cross_tokenizer.unmatched"]
    with pytest.raises(ConfigError) as info:
        composer(
            {
                "lm_jsd": {"fused": True, "normalize": "global_tokens", "compile": True, "cross_tokenizer": {}},
                "k": {
                    "type": "lm_kd",
                    "divergence": "fkl",
                    "topk": 4,
                    "missing_mass": "tail",
                    "tokens": {"by": "teacher_entropy", "keep": 0.5},
                    "cross_tokenizer": {},
                },
            }
        )
    assert {i.path for i in info.value.issues} == {
        "rlhf.loss_terms.lm_jsd.fused",
        "rlhf.loss_terms.lm_jsd.normalize",
        "rlhf.loss_terms.lm_jsd.compile",
        "rlhf.loss_terms.k.tokens",
        "rlhf.loss_terms.k.missing_mass",
    }


# ------------------------------------------------------------------------------ the term's value


def _context(s_labels, s_logits, aligned) -> LossContext:
    return LossContext(labels=shift_labels(s_labels), student_logits=s_logits, aligned_teachers={"": aligned})


def test_lm_kd_uses_its_own_divergence_on_one_to_one_groups_and_logs_matched_frac(pair, batch) -> None:
    student, teacher = pair
    s_labels, t_labels, s_logits, t_logits = batch
    comp = composer(
        {
            "k": {
                "type": "lm_kd",
                "divergence": "fkl",
                "temperature": 2.0,
                "cross_tokenizer": {"uld_weight": 0.5},
            }
        }
    )
    plan, _ = plan_cross_tokenizer(comp.active_terms, student, [local(teacher)])
    aligned = aligned_from_logits(plan.teachers[""], s_labels, t_labels, t_logits)
    out = comp(_context(s_labels, s_logits, aligned))

    def forward_kl(ls: torch.Tensor, lt: torch.Tensor) -> torch.Tensor:  # KL(teacher || student)
        return (lt.exp() * (lt - ls)).sum()

    rows = shift_labels(s_labels) != -100
    want = cross_tokenizer_loss(
        s_logits[rows], aligned.teacher, aligned.batch, uld_weight=0.5, divergence=forward_kl, temperature=2.0
    )
    torch.testing.assert_close(out.total, want.loss.float(), rtol=1e-6, atol=1e-7)
    metrics = out.metrics()
    assert 0 < want.matched_frac < 1
    assert metrics["k_loss_matched_frac"].item() == pytest.approx(want.matched_frac)
    out.total.backward()
    assert s_logits.grad is not None and s_logits.grad.abs().sum() > 0


def test_forced_path_with_the_same_tokenizer_equals_the_ordinary_path(pair, batch) -> None:
    student, _ = pair
    twin = build_pair_tokenizer("student")
    s_labels, _, s_logits, _ = batch
    teacher_logits = torch.randn_like(s_logits.detach())
    for terms in (
        {"lm_jsd": {"beta": 0.3, "temperature": 0.7}},
        {"k": {"type": "lm_kd", "divergence": {"kind": "skew_rkl", "alpha": 0.2}}},
        {"k": {"type": "lm_kd", "divergence": "tvd"}},
    ):
        name, spec = next(iter(terms.items()))
        ordinary = composer(terms)(
            LossContext(labels=shift_labels(s_labels), student_logits=s_logits, teacher_logits=teacher_logits)
        )
        forced = composer({name: {**spec, "cross_tokenizer": {"force": True}}})
        plan, issues = plan_cross_tokenizer(forced.active_terms, student, [local(twin)])
        assert issues == []
        aligned = aligned_from_logits(plan.teachers[""], s_labels, s_labels, teacher_logits)
        out = forced(_context(s_labels, s_logits, aligned))
        torch.testing.assert_close(out.total, ordinary.total, rtol=1e-6, atol=1e-8)
        assert out.metrics()[f"{forced.active_terms[0].metric_key}_matched_frac"].item() == 1.0


def test_a_top_k_answer_and_a_partly_spelled_completion(pair, batch) -> None:
    """Top-K rows as a cache or server gives them; `kept` compares only a prefix of the student."""
    student, teacher = pair
    s_labels, t_labels, s_logits, t_logits = batch
    comp = composer({"lm_jsd": {"temperature": 1.0, "cross_tokenizer": {}}})
    plan, _ = plan_cross_tokenizer(comp.active_terms, student, [local(teacher)])
    cross = plan.teachers[""]
    full = aligned_from_logits(cross, s_labels, t_labels, t_logits)
    lp = torch.log_softmax(full.teacher.logits.float(), -1)
    completions, offset = [], 0
    for row in t_labels:
        ids = row[row != -100].tolist()
        chunk = lp[offset : offset + len(ids)]
        top = chunk.topk(741)  # K covering the vocabulary: equals the full-logits value
        token = chunk.gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
        completions.append(TeacherCompletion(ids, top.indices, top.values, token))
        offset += len(ids)
    topk = aligned_from_topk(cross, s_labels, completions)
    a = comp(_context(s_labels, s_logits, full)).total
    b = comp(_context(s_labels, s_logits, topk)).total
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the first sample's teacher saw only the student's first 4 completion tokens ("12 + ")
    s_first = s_labels[0][s_labels[0] != -100].tolist()
    text = bytes(cross.student.spell(s_first[:4])).decode()
    t_ids = teacher(text, add_special_tokens=False)["input_ids"]
    short = completions[0].__class__(
        t_ids,
        *(
            t[: len(t_ids)]
            for t in (completions[0].topk_ids, completions[0].topk_logprobs, completions[0].token_logprobs)
        ),
    )
    part = aligned_from_topk(
        cross, s_labels, [short, completions[1]], kept=[4, len(s_labels[1][s_labels[1] != -100])]
    )
    assert part.student_rows is not None and part.student_rows[:4].tolist() == [0, 1, 2, 3]
    assert torch.isfinite(comp(_context(s_labels, s_logits, part)).total)
    with pytest.raises(AlignmentError, match="sample 0 of the micro-batch"):
        aligned_from_topk(cross, s_labels, [short, completions[1]])  # all student tokens vs a prefix
