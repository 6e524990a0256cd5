"""TRL's GOLD (``trl.experimental.gold``) as the oracle of the cross-tokenizer loss.

TRL's ``ULDLoss`` is a plain ``nn.Module``, but its module imports TRL's whole trainer stack (SFT
trainer, PEFT, accelerate, datasets, vLLM client: ~15 s here). So the test reads the installed
``gold_trainer.py``, takes the ``ULDLoss`` class and ``GOLDTrainer.generalized_jsd_loss`` (the
JSD its hybrid mode calls) out of it with ``ast`` and executes that code unchanged, with the same
``torch`` / ``nn`` / ``F`` the module binds. Nothing is copied into this repository.

Modes both have, which must agree:
- the alignment groups, on text whose tokens are whole characters (GOLD compares decoded
  prefixes, so it cannot split groups inside a character cut across tokens; see the last test);
- the merged group probabilities;
- extended ULD on every group (GOLD ``use_extended_uld``, no hybrid) = ours with no vocabulary map
  (``vocab=None``, ``unmatched="uld"``), per sample; GOLD averages per sample then over the batch,
  ours pools the batch (documented in docs/cross_tokenizer.md);
- GOLD's hybrid with identical tokenizers (every column matched) = ours on the identity = the JSD.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from kdcompose.functional.cross_tokenizer import AlignedBatch, TeacherLogits, cross_tokenizer_loss
from kdcompose.teachers.alignment import align_text, vocab_mapping
from kdcompose.testing.tokenizer_pair import build_pair_tokenizer, build_tokenizer_pair, embedding_rows


def _gold_source() -> Path:
    spec = importlib.util.find_spec("trl")  # finds the package without importing it
    if spec is None or spec.origin is None:
        pytest.skip("TRL is not installed (it comes with ms-swift, the `swift` extra)")
    return Path(spec.origin).parent / "experimental" / "gold" / "gold_trainer.py"


@pytest.fixture(scope="module")
def ULDLoss():
    path = _gold_source()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    jsd = next(
        n
        for n in classes["GOLDTrainer"].body
        if isinstance(n, ast.FunctionDef) and n.name == "generalized_jsd_loss"
    )
    jsd.decorator_list = []  # a @staticmethod inside the class; here a module-level function
    namespace = {"torch": torch, "nn": torch.nn, "F": F, "GOLDConfig": object}
    exec(compile(ast.Module(body=[jsd], type_ignores=[]), str(path), "exec"), namespace)
    namespace["GOLDTrainer"] = SimpleNamespace(generalized_jsd_loss=namespace["generalized_jsd_loss"])
    exec(compile(ast.Module(body=[classes["ULDLoss"]], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["ULDLoss"]


def _config(*, hybrid: bool = False, beta: float = 0.5, temperature: float = 1.0) -> SimpleNamespace:
    """The GOLDConfig fields ULDLoss reads (cross-entropy off, EOS kept: we give it the exact rows)."""
    return SimpleNamespace(
        uld_crossentropy_weight=0.0,
        uld_distillation_weight=1.0,
        uld_student_temperature=temperature,
        uld_teacher_temperature=temperature,
        uld_skip_student_eos=False,
        uld_skip_teacher_eos=False,
        use_extended_uld=True,
        uld_use_hybrid_loss=hybrid,
        uld_hybrid_matched_weight=None,
        uld_hybrid_unmatched_weight=None,
        beta=beta,
    )


@pytest.fixture(scope="module")
def pair():
    return build_tokenizer_pair()


ASCII = st.text(
    alphabet=st.sampled_from(list("abcdefghinorstuwy THE.,?!+-=0123456789")), min_size=1, max_size=30
)


def _logits(rows: int, width: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, width, generator=gen) * 2.0


def _rows(seqs: list[torch.Tensor], ids: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad per-sample rows into GOLD's [B, T, V] layout; labels = ids, -100 on padding. GOLD reads the
    logits and the ids of the label span at the same indices, so row i faces token i (as ours)."""
    length = max(len(x) for x in ids)
    logits = torch.stack([F.pad(s, (0, 0, 0, length - s.shape[0])) for s in seqs])
    labels = torch.full((len(ids), length), -100, dtype=torch.int64)
    for b, x in enumerate(ids):
        labels[b, : len(x)] = torch.tensor(x)
    return logits, labels


@given(text=ASCII)
def test_alignment_groups_equal_golds(ULDLoss, pair, text) -> None:
    student, teacher = pair
    a = align_text(student, teacher, text)
    gold = ULDLoss(_config(), student_tokenizer=student, teacher_tokenizer=teacher)
    s_groups, t_groups = gold._build_alignment_groups_from_ids(list(a.student_ids), list(a.teacher_ids))
    assert s_groups == [list(g.student) for g in a.groups]
    assert t_groups == [list(g.teacher) for g in a.groups]


def test_merged_probabilities_equal_golds(ULDLoss, pair) -> None:
    from kdcompose.functional.cross_tokenizer import merged_group_logprobs

    student, teacher = pair
    a = align_text(student, teacher, "What is 12345 + 678? 13023")
    probs = torch.softmax(_logits(len(a.student_ids), 576, 0).double(), -1)
    gold = ULDLoss(_config(), student_tokenizer=student, teacher_tokenizer=teacher)
    want = gold._merge_probabilities_with_alignment_groups(
        probs, [list(g.student) for g in a.groups], list(a.student_ids)
    )
    batch = AlignedBatch.from_alignments([a], None)
    got = merged_group_logprobs(probs.log(), batch.student_ids, batch.student_group).exp()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@given(
    texts=st.lists(ASCII, min_size=1, max_size=2),
    temperature=st.sampled_from([0.8, 1.0, 1.5]),
    seed=st.integers(0, 2**16),
)
def test_extended_uld_equals_golds_per_sample_and_golds_batch_mean(
    ULDLoss, pair, texts, temperature, seed
) -> None:
    student, teacher = pair
    vs, vt = embedding_rows("student"), embedding_rows("teacher")
    alignments = [align_text(student, teacher, t) for t in texts]
    zs = [_logits(len(a.student_ids), vs, seed + 2 * i) for i, a in enumerate(alignments)]
    zt = [_logits(len(a.teacher_ids), vt, seed + 2 * i + 1) for i, a in enumerate(alignments)]
    gold = ULDLoss(_config(temperature=temperature), student_tokenizer=student, teacher_tokenizer=teacher)
    ours = []
    for a, s, t in zip(alignments, zs, zt, strict=True):
        got = cross_tokenizer_loss(
            s, TeacherLogits(t), AlignedBatch.from_alignments([a], None), temperature=temperature
        )
        s_logits, s_labels = _rows([s], [a.student_ids])
        t_logits, t_labels = _rows([t], [a.teacher_ids])
        want = gold(s_logits, t_logits, s_labels, t_labels, s_labels, t_labels)
        torch.testing.assert_close(got.loss, want, rtol=2e-5, atol=1e-6)
        ours.append(got.loss)
    s_logits, s_labels = _rows(zs, [a.student_ids for a in alignments])
    t_logits, t_labels = _rows(zt, [a.teacher_ids for a in alignments])
    batch_want = gold(s_logits, t_logits, s_labels, t_labels, s_labels, t_labels)
    torch.testing.assert_close(torch.stack(ours).mean(), batch_want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_golds_hybrid_with_identical_tokenizers_equals_ours_on_the_identity(ULDLoss, pair, beta) -> None:
    """Every column matched (logits exactly as wide as the tokenizer): GOLD's hybrid is its JSD on
    all columns with weight 1, ours is the same-tokenizer JSD."""
    student = pair[0]
    twin = build_pair_tokenizer("student")
    a = align_text(student, twin, "What is 12345 + 678? a red square. Café")
    v = len(student)
    zs, zt = _logits(len(a.student_ids), v, 11), _logits(len(a.student_ids), v, 12)
    gold = ULDLoss(_config(hybrid=True, beta=beta), student_tokenizer=student, teacher_tokenizer=twin)
    s_logits, s_labels = _rows([zs], [a.student_ids])
    t_logits, _ = _rows([zt], [a.student_ids])
    want = gold(s_logits, t_logits, s_labels, s_labels, s_labels, s_labels)
    got = cross_tokenizer_loss(
        zs, TeacherLogits(zt), AlignedBatch.from_alignments([a], vocab_mapping(student, twin)), beta=beta
    )
    torch.testing.assert_close(got.loss, want, rtol=2e-5, atol=1e-6)


def test_where_gold_decodes_a_split_character_ours_keeps_byte_groups(ULDLoss, pair) -> None:
    """Deliberate difference: GOLD builds groups from decoded prefixes; after the student cuts 'ï' in
    two tokens the prefixes never match again and GOLD puts the rest of the text in one group."""
    student, teacher = pair
    a = align_text(student, teacher, "naïve 12345")
    gold = ULDLoss(_config(), student_tokenizer=student, teacher_tokenizer=teacher)
    s_groups, _ = gold._build_alignment_groups_from_ids(list(a.student_ids), list(a.teacher_ids))
    assert len(s_groups) == 2  # GOLD: "n" and everything else
    assert [g.text for g in a.groups] == [b"n", "aïve".encode(), b" ", b"12", b"3", b"4", b"5"]
