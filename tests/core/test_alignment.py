"""Byte-offset alignment of two tokenizations, tokenizer identity and the vocabulary map.

Tokenizers are real: the two tiny byte-level BPEs of ``kdcompose.testing.tokenizer_pair`` (a
Qwen2-style student that splits every digit, a Llama-3-style teacher that splits digits in runs of
1-3, trained on different corpora with different vocabulary sizes) and a SentencePiece-style BPE
with byte fallback built here. Oracles: the text itself (groups must spell it), the tokenizers'
own offsets and decoders, and hand-derived examples.
"""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kdcompose.teachers.alignment import (
    AlignmentError,
    UnsupportedTokenizerError,
    align_text,
    align_token_ids,
    decode_bytes,
    same_tokenizer,
    token_table,
    tokenizer_difference,
    vocab_mapping,
)
from kdcompose.testing.tokenizer_pair import build_pair_tokenizer, build_tokenizer_pair


@pytest.fixture(scope="module")
def pair():
    return build_tokenizer_pair()


@pytest.fixture(scope="module")
def spm():
    """A Llama-2-style tokenizer: ``▁`` for spaces, a prefix space, ``<0xNN>`` byte fallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    merges = [("▁", "S"), ("▁S", "u"), ("▁Su", "r"), ("▁Sur", "e"), ("▁", "t"), ("h", "i"), ("▁t", "hi")]
    merges += [("n", "g"), ("▁thi", "ng"), ("1", "2"), ("12", "3")]
    for token in ["▁", "S", "u", "r", "e", "t", "h", "i", "n", "g", "a", "1", "2", "3", "4", "."]:
        vocab.setdefault(token, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


MIXED = st.text(
    alphabet=st.sampled_from(list("abcdeinorstuwy THE.,?!+-=0123456789\n") + list("éïß東京語😀€")),
    min_size=0,
    max_size=40,
)


def _check_partition(alignment, text: str) -> None:
    groups = alignment.groups
    assert [p for g in groups for p in g.student] == list(range(len(alignment.student_ids)))
    assert [p for g in groups for p in g.teacher] == list(range(len(alignment.teacher_ids)))
    assert all(g.student and g.teacher for g in groups)
    assert b"".join(g.text for g in groups) == unicodedata.normalize("NFC", text).encode("utf-8")


# ------------------------------------------------------------------------------------ token bytes


def test_byte_level_table_is_gpt2s_alphabet_and_spells_every_token(pair) -> None:
    from tokenizers import pre_tokenizers

    from kdcompose.teachers.alignment import _BYTE_DECODER

    assert set(_BYTE_DECODER) == set(pre_tokenizers.ByteLevel.alphabet())
    assert sorted(_BYTE_DECODER.values()) == list(range(256))
    assert _BYTE_DECODER["Ġ"] == 0x20 and _BYTE_DECODER["Ċ"] == 0x0A
    student, _ = pair
    table = token_table(student)
    # Independent oracle: tokens that are whole UTF-8 on their own decode to the same text.
    for i in range(table.size):
        text = student.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if "\ufffd" not in text:
            assert table.pieces[i] == text.encode("utf-8"), student.convert_ids_to_tokens(i)
    assert table.special == {i for i, t in student.added_tokens_decoder.items() if t.special}


@given(text=MIXED)
def test_decode_bytes_round_trips_any_text(pair, text) -> None:
    for tok in pair:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert decode_bytes(tok, ids) == unicodedata.normalize("NFC", text).encode("utf-8")


def test_token_bytes_agree_with_the_tokenizers_offsets(pair) -> None:
    text = "What is 12345 + 678? The answer, 13023, is right."
    for tok in pair:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        for i, (lo, hi) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            assert token_table(tok).pieces[i] == text[lo:hi].encode()


def test_sentencepiece_style_tokens_spell_spaces_and_fallback_bytes(spm) -> None:
    table = token_table(spm)
    assert table.scheme == "metaspace"
    ids = spm("Sure thing 東", add_special_tokens=False)["input_ids"]
    assert spm.convert_ids_to_tokens(ids)[:2] == ["▁Sure", "▁thing"]
    assert decode_bytes(spm, ids) == " Sure thing 東".encode()  # the prefix space is a token's byte
    assert [table.pieces[i] for i in ids[-3:]] == [b"\xe6", b"\x9d", b"\xb1"]
    assert set(ids[-3:]) <= table.fallback


def test_slow_or_unknown_tokenizers_are_refused_with_the_fix() -> None:
    from tokenizers import Tokenizer, decoders, models

    with pytest.raises(UnsupportedTokenizerError, match="fast tokenizer"):
        token_table(object())
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wordpiece.decoder = decoders.WordPiece()
    with pytest.raises(UnsupportedTokenizerError, match="decoder is \\['WordPiece'\\]"):
        token_table(wordpiece)


def test_table_is_cached_per_tokenizer_and_rebuilt_when_it_grows() -> None:
    tok = build_pair_tokenizer("student")
    first = token_table(tok)
    assert token_table(tok) is first
    tok.add_tokens(["<new_token>"])
    grown = token_table(tok)
    assert grown.size == first.size + 1 and grown.pieces[-1] == b"<new_token>"
    assert not same_tokenizer(tok, build_pair_tokenizer("student"))


# ------------------------------------------------------------------------------------ alignment


@given(text=MIXED)
def test_groups_partition_both_sides_and_spell_the_text_minimally(pair, text) -> None:
    student, teacher = pair
    a = align_text(student, teacher, text)
    _check_partition(a, text)
    s_table, t_table = token_table(student), token_table(teacher)
    for g in a.groups:
        s_bytes = [s_table.pieces[a.student_ids[p]] for p in g.student]
        t_bytes = [t_table.pieces[a.teacher_ids[p]] for p in g.teacher]
        assert b"".join(s_bytes) == b"".join(t_bytes) == g.text
        # Minimal: no shorter prefix of both sides reaches a common boundary inside the group.
        s_ends = {sum(map(len, s_bytes[: k + 1])) for k in range(len(s_bytes) - 1)}
        t_ends = {sum(map(len, t_bytes[: k + 1])) for k in range(len(t_bytes) - 1)}
        assert not s_ends & t_ends


@given(ids=st.lists(st.integers(0, 555), max_size=30))
def test_identical_tokenizers_give_one_token_groups_for_any_ids(pair, ids) -> None:
    student, _ = pair
    a = align_token_ids(student, ids, build_pair_tokenizer("student"), ids)
    assert [(g.student, g.teacher) for g in a.groups] == [((i,), (i,)) for i in range(len(ids))]
    assert all(a.one_to_one(vocab_mapping(student, student)))


def test_digits_split_differently_group_exactly(pair) -> None:
    """X-Token reports GOLD failing on numerals that split differently; here the student splits
    every digit and the teacher runs of up to three (``12|3|4|5``, ``6|78``, ``13|0|2|3``)."""
    student, teacher = pair
    a = align_text(student, teacher, "What is 12345 + 678? 13023")
    got = [(g.text, len(g.student), len(g.teacher)) for g in a.groups]
    assert got == [
        (b"What", 1, 1),
        (b" is", 1, 1),
        (b" ", 1, 1),
        (b"12", 2, 1),
        (b"3", 1, 1),
        (b"4", 1, 1),
        (b"5", 1, 1),
        (b" +", 2, 1),
        (b" ", 1, 1),
        (b"6", 1, 1),
        (b"78", 2, 1),
        (b"?", 1, 1),
        (b" ", 1, 1),
        (b"13", 2, 1),
        (b"0", 1, 1),
        (b"2", 1, 1),
        (b"3", 1, 1),
    ]
    assert sum(a.one_to_one(vocab_mapping(student, teacher))) == 13


def test_a_character_split_across_tokens_stays_inside_one_group(pair) -> None:
    student, teacher = pair
    a = align_text(student, teacher, "Café 東京 😀")
    assert [g.text for g in a.groups] == [b"Caf\xc3\xa9", b" ", "東京".encode(), " 😀".encode()]
    first = a.groups[0]
    pieces = [token_table(student).pieces[a.student_ids[p]] for p in first.student]
    assert b"\xc3" in pieces and b"\xa9" in pieces  # the student cut "é" in two tokens
    assert len(first.teacher) == 1  # the teacher has "Café" as one token


def test_special_tokens_pair_by_order(pair) -> None:
    student, teacher = pair
    s_ids = student("yes<|im_end|>", add_special_tokens=False)["input_ids"]
    t_ids = teacher("yes<|eot_id|>", add_special_tokens=False)["input_ids"]
    a = align_token_ids(student, s_ids, teacher, t_ids)
    last = a.groups[-1]
    assert last.special and last.text == b"<|im_end|>"
    assert (a.student_ids[last.student[0]], a.teacher_ids[last.teacher[0]]) == (
        student.convert_tokens_to_ids("<|im_end|>"),
        teacher.convert_tokens_to_ids("<|eot_id|>"),
    )
    assert not a.one_to_one(vocab_mapping(student, teacher))[-1]  # different specials: not one to one
    with pytest.raises(AlignmentError, match=r"1 special token\(s\) \['<\|im_end\|>'\] and the teacher's 0"):
        align_token_ids(student, s_ids, teacher, t_ids[:-1])


def test_template_whitespace_next_to_special_tokens_joins_their_group(pair) -> None:
    """ms-swift's ChatML labels end with '<|im_end|>\\n', Llama 3's with '<|eot_id|>' (measured with
    ms-swift 4.6's qwen2_5 and llama3 templates): the student's trailing newline joins the pair."""
    student, teacher = pair
    s_ids = student("12 + 345 = 357.<|im_end|>\n", add_special_tokens=False)["input_ids"]
    t_ids = teacher("12 + 345 = 357.<|eot_id|>", add_special_tokens=False)["input_ids"]
    last = align_token_ids(student, s_ids, teacher, t_ids).groups[-1]
    assert last.special and last.text == b"<|im_end|>\n" and (len(last.student), len(last.teacher)) == (2, 1)
    s_ids = student("Hi\n<|im_end|>", add_special_tokens=False)["input_ids"]
    t_ids = teacher("Hi<|eot_id|>", add_special_tokens=False)["input_ids"]
    a = align_token_ids(student, s_ids, teacher, t_ids)
    assert [g.text for g in a.groups] == [b"H", b"i", b"\n<|im_end|>"]
    with pytest.raises(AlignmentError, match="before the first special token"):
        align_token_ids(student, student("Hi!<|im_end|>")["input_ids"], teacher, t_ids)


SEPARATORS = st.sampled_from(["", "\n", " ", "\n\n"])


@given(
    segments=st.lists(st.tuples(MIXED, SEPARATORS, SEPARATORS), min_size=1, max_size=3),
    tail=MIXED,
)
def test_groups_partition_completions_with_special_tokens_and_template_whitespace(
    pair, segments, tail
) -> None:
    student, teacher = pair
    s_text = "".join(f"{text}{s_sep}<|im_end|>{t_sep}" for text, s_sep, t_sep in segments) + tail
    t_text = "".join(f"{text}<|eot_id|>" for text, _, _ in segments) + tail
    s_ids = student(s_text, add_special_tokens=False)["input_ids"]
    t_ids = teacher(t_text, add_special_tokens=False)["input_ids"]
    a = align_token_ids(student, s_ids, teacher, t_ids)
    _check_partition(a, s_text)
    s_table, t_table = token_table(student), token_table(teacher)
    assert sum(g.special for g in a.groups) == len(segments)
    for g in a.groups:
        s_bytes = b"".join(s_table.pieces[a.student_ids[p]] for p in g.student)
        t_bytes = b"".join(t_table.pieces[a.teacher_ids[p]] for p in g.teacher)
        if g.special:  # the special token plus whitespace next to it
            assert not s_bytes.replace(b"<|im_end|>", b"", 1).strip()
            assert not t_bytes.replace(b"<|eot_id|>", b"", 1).strip()
        else:  # identical, up to the extra whitespace of a token that also spells core text (" a")
            assert s_bytes.strip() == t_bytes.strip()


def test_different_text_names_the_first_differing_byte(pair) -> None:
    student, teacher = pair
    s_ids = student("the red square", add_special_tokens=False)["input_ids"]
    t_ids = teacher("the red circle", add_special_tokens=False)["input_ids"]
    with pytest.raises(AlignmentError, match="first difference at byte 8: student 'the red square'"):
        align_token_ids(student, s_ids, teacher, t_ids)
    with pytest.raises(ValueError, match="token id 9999 is outside"):
        align_token_ids(student, [9999], teacher, t_ids)


def test_sentencepiece_prefix_space_is_absorbed_into_the_first_group(pair, spm) -> None:
    student, _ = pair
    a = align_text(student, spm, "Sure thing 123.")
    assert b"".join(g.text for g in a.groups) == b"Sure thing 123."  # the student's text
    first = a.groups[0]
    assert [spm.convert_ids_to_tokens(a.teacher_ids[p]) for p in first.teacher] == ["▁Sure"]
    # Other leading text is still an error, not tolerated.
    s_ids = student("xSure", add_special_tokens=False)["input_ids"]
    with pytest.raises(AlignmentError):
        align_token_ids(student, s_ids, spm, spm("Sure", add_special_tokens=False)["input_ids"])


# ------------------------------------------------------------------------- same tokenizer / vocab


def test_same_tokenizer_is_decided_from_content(pair) -> None:
    student, teacher = pair
    assert same_tokenizer(student, build_pair_tokenizer("student"))
    assert tokenizer_difference(student, build_pair_tokenizer("student")) is None
    assert tokenizer_difference(student, teacher) == "vocabularies differ (553 vs 736 entries)"
    assert not same_tokenizer(student, teacher)


def test_vocab_mapping_pairs_identical_bytes_one_to_one(pair) -> None:
    student, teacher = pair
    m = vocab_mapping(student, teacher)
    assert not m.identical and m.ambiguous == 0
    assert len(set(m.student_ids)) == len(m.student_ids) == len(set(m.teacher_ids)) > 300
    s_table, t_table = token_table(student), token_table(teacher)
    for s, t in zip(m.student_ids, m.teacher_ids, strict=True):
        assert s_table.pieces[s] == t_table.pieces[t]
        assert (s in s_table.special) == (t in t_table.special)
    # Independent oracle: tokens decoding to the same whole text on both sides are all mapped.
    s_text = {student.decode([i]): i for i in range(len(student)) if i not in s_table.special}
    t2s = m.teacher_to_student()
    for t in range(len(teacher)):
        text = teacher.decode([t])
        if t not in t_table.special and "\ufffd" not in text and text in s_text:
            assert t2s[t] == s_text[text]
    assert t2s[teacher.convert_tokens_to_ids("Ġthe")] == student.convert_tokens_to_ids("Ġthe")


def test_vocab_mapping_prefers_regular_tokens_over_byte_fallback(pair, spm) -> None:
    student, _ = pair
    m = vocab_mapping(student, spm).teacher_to_student()
    assert m[spm.convert_tokens_to_ids("a")] == student.convert_tokens_to_ids("a")
    assert spm.convert_tokens_to_ids("<0x61>") not in m  # the fallback twin of "a" gives way
    assert m[spm.convert_tokens_to_ids("<0xE6>")] == student.convert_tokens_to_ids("æ")  # byte 0xE6
    assert m[spm.convert_tokens_to_ids("▁")] == student.convert_tokens_to_ids("Ġ")  # both a space


def test_identical_tokenizers_map_every_id_and_padding_rows(pair) -> None:
    student, _ = pair
    m = vocab_mapping(student, build_pair_tokenizer("student"))
    assert m.identical and m.student_ids == m.teacher_ids == tuple(range(len(student)))
    s, t = m.pairs(576, 600)
    assert s == t == list(range(576))
