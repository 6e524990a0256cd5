"""The alignment audit on id lists and collated batches (no ms-swift): a teacher's scored tokens
must equal the student's, and the error locates the first difference in the sample it belongs to,
for padded (left or right) and packed batches."""

from __future__ import annotations

import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kdcompose.teachers.audit import (
    TeacherAlignmentError,
    check_same_tokens,
    check_served_tokens,
    first_difference,
    token_text,
)
from kdcompose.teachers.server_client import ScoredPrompt

FIX = "start the server with the run's template"


class CharTokenizer:
    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


def padded(rows: list[list[int]], side: str) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids, mask = [], []
    for r in rows:
        pad = [0] * (width - len(r))
        ids.append(pad + r if side == "left" else r + pad)
        mask.append([0] * len(pad) + [1] * len(r) if side == "left" else [1] * len(r) + [0] * len(pad))
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}


@given(
    student=st.lists(st.integers(0, 3), max_size=8),
    teacher=st.lists(st.integers(0, 3), max_size=8),
)
def test_first_difference_is_the_first_index_where_the_prefixes_part(
    student: list[int], teacher: list[int]
) -> None:
    at = first_difference(student, teacher)
    if at is None:
        assert student == teacher
    else:
        assert student[:at] == teacher[:at]
        assert at == min(len(student), len(teacher)) or student[at] != teacher[at]
        assert student != teacher


def test_the_message_names_the_sample_position_and_both_tokens_decoded() -> None:
    with pytest.raises(TeacherAlignmentError) as info:
        check_same_tokens(
            [72, 105, 33],
            [72, 111, 33],
            source="the teacher cache /c",
            sample="sample 3 of the batch (key ab)",
            fix=FIX,
            tokenizer=CharTokenizer(),
            positions=[10, 11, 12],
        )
    assert str(info.value) == (
        "the teacher cache /c scored other tokens than the student's for sample 3 of the batch (key ab): "
        "first difference at position 11: student 'i' (id 105) vs teacher 'o' (id 111); " + FIX
    )
    assert (info.value.position, info.value.student, info.value.teacher) == (11, 105, 111)
    assert token_text(None, 7) == "id 7" and token_text(CharTokenizer(), None) == "(end of sequence)"


@pytest.mark.parametrize("side", ["left", "right"])
def test_served_answers_are_compared_with_each_unpadded_sample(side: str) -> None:
    rows = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    check_served_tokens(rows, padded(rows, side), source="s", fix=FIX)
    wrong = [rows[0], rows[1], [7, 8, 0]]
    with pytest.raises(TeacherAlignmentError) as info:
        check_served_tokens(wrong, padded(rows, side), source="s", fix=FIX)
    assert info.value.sample == "sample 2 of the micro-batch" and info.value.position == 2
    short = [rows[0], [5], rows[2]]
    with pytest.raises(TeacherAlignmentError, match=r"the student has 2, the teacher 1.*\(end of sequence\)"):
        check_served_tokens(short, padded(rows, side), source="s", fix=FIX)


def test_a_packed_batch_is_located_in_its_sample() -> None:
    rows = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    packed = {"input_ids": torch.tensor([[t for r in rows for t in r]])}
    check_served_tokens(rows, packed, source="s", fix=FIX)
    with pytest.raises(TeacherAlignmentError) as info:
        check_served_tokens([rows[0], rows[1], [6, 7, 0, 9]], packed, source="s", fix=FIX)
    assert info.value.sample == "sample 2 of the micro-batch (packed)" and info.value.position == 2


def test_an_answer_without_ids_or_of_another_size_fails() -> None:
    rows = [[1, 2], [3, 4]]
    with pytest.raises(TeacherAlignmentError, match="without the token ids it scored"):
        check_served_tokens([rows[0], None], padded(rows, "left"), source="s", fix=FIX)
    with pytest.raises(TeacherAlignmentError, match="answered 1 samples for a micro-batch of 2"):
        check_served_tokens([rows[0]], padded(rows, "left"), source="s", fix=FIX)


def test_a_scored_prompt_is_the_pair_ms_swift_expects_and_survives_pickling() -> None:
    scored = ScoredPrompt([[-0.1]], [[5]], [1, 5])
    logprobs, ids = scored
    assert (logprobs, ids) == ([[-0.1]], [[5]]) and scored == ([[-0.1]], [[5]])
    again = pickle.loads(pickle.dumps(scored))  # ms-swift broadcasts answers between ranks
    assert again == scored and again.prompt_token_ids == [1, 5]
