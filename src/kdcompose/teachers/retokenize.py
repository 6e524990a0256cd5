"""A completion the student generated, as a teacher with another tokenizer must be given it.

On-policy distillation scores the student's own sampled tokens. A teacher with the student's
tokenizer can take them as they are (ms-swift sends the token ids); a teacher with another one
needs the *text* they spell, encoded by its own tokenizer and template. Two things the student may
generate have no text, and this module decides what the teacher gets for them:

* bytes that are not UTF-8 (a byte-level BPE can emit half a character; random or young models
  often do): the teacher gets its own single-byte tokens for them, when its vocabulary has them
  (byte-level BPE always does, SentencePiece with byte fallback does), so it scores exactly those
  bytes; otherwise the completion is compared up to there.
* a special token before the end (e.g. ``<|im_start|>`` in the middle of a sampled answer): the
  other family has no counterpart, so the completion is compared up to there; likewise an id of
  the LM head's padding rows beyond the tokenizer, which spells nothing.

A special token at the end (the student's end-of-turn) becomes the teacher's own (``add_eos``).
Everything is read from the token tables, never from a decode round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kdcompose.teachers.alignment import TokenTable, token_table


@dataclass(frozen=True)
class TeacherResponse:
    """What the teacher's template gets as the assistant's answer for one sampled completion.

    `text`: the answer as text, or None when it must be given as `ids` (the teacher's own token
    ids: the completion has bytes that are not UTF-8). `add_eos`: the template appends the
    teacher's end-of-turn (the student's completion ended with a special token). `kept`: how many
    of the student's completion tokens this covers (all, unless it stopped at something the
    teacher cannot spell)."""

    text: str | None
    ids: tuple[int, ...] | None
    add_eos: bool
    kept: int

    @property
    def content(self) -> str | list[int]:
        """The assistant message's content for ms-swift's template (text, or token ids)."""
        return self.text if self.text is not None else list(self.ids or ())


_BYTE_TOKENS: dict[str, dict[int, int]] = {}


def _byte_tokens(table: TokenTable) -> dict[int, int]:
    """byte value -> the id of a non-special token spelling exactly that byte (a regular token
    before a byte-fallback one); cached per tokenizer fingerprint."""
    found = _BYTE_TOKENS.get(table.fingerprint)
    if found is None:
        found = {}
        for i, piece in enumerate(table.pieces):
            if len(piece) != 1 or i in table.special:
                continue
            if piece[0] not in found or (found[piece[0]] in table.fallback and i not in table.fallback):
                found[piece[0]] = i
        _BYTE_TOKENS[table.fingerprint] = found
    return found


def _encode_bytes(teacher: Any, table: TokenTable, data: bytes) -> tuple[list[int], int] | None:
    """The teacher's ids spelling `data`: valid UTF-8 runs through its tokenizer, other bytes as its
    single-byte tokens. Returns (ids, bytes covered); covers less than all when a byte has no token."""
    from kdcompose.teachers.alignment import _backend

    backend = _backend(teacher)
    bytes_tokens = _byte_tokens(table)
    ids: list[int] = []
    at = 0
    while at < len(data):
        try:
            text = data[at:].decode("utf-8")
            run_end = len(data)
        except UnicodeDecodeError as error:
            text = data[at : at + error.start].decode("utf-8")
            run_end = at + error.start
        if text:
            ids.extend(backend.encode(text, add_special_tokens=False).ids)
        at = run_end
        if at < len(data):  # one byte that is not UTF-8 here
            token = bytes_tokens.get(data[at])
            if token is None:
                return ids, at
            ids.append(token)
            at += 1
    return ids, at


def teacher_response(student: Any, teacher: Any, completion: Sequence[int]) -> TeacherResponse:
    """The answer the teacher's template gets for the student's sampled `completion` (its token
    ids, as labelled), and how much of it that covers (see the module doc)."""
    s_table, t_table = token_table(student), token_table(teacher)
    ids = [int(i) for i in completion]
    end = len(ids)
    add_eos = False
    specials = [p for p, i in enumerate(ids) if i in s_table.special or not 0 <= i < s_table.size]
    if specials and specials[0] == len(ids) - 1 and ids[-1] < s_table.size:
        end, add_eos = len(ids) - 1, True  # ends with the student's end-of-turn
    elif specials:
        end = specials[0]  # a special token mid-text: compare up to there
    data = s_table.spell(ids[:end])
    try:
        return TeacherResponse(data.decode("utf-8"), None, add_eos, len(ids) if add_eos else end)
    except UnicodeDecodeError:
        pass
    encoded = _encode_bytes(teacher, t_table, data)
    assert encoded is not None
    t_ids, covered = encoded
    if covered == len(data):
        return TeacherResponse(None, tuple(t_ids), add_eos, len(ids) if add_eos else end)
    # a byte the teacher cannot spell: keep the student's tokens that end before it
    kept, spelled = 0, 0
    while kept < end and spelled + len(s_table.pieces[ids[kept]]) <= covered:
        spelled += len(s_table.pieces[ids[kept]])
        kept += 1
    prefix = s_table.spell(ids[:kept])
    again = _encode_bytes(teacher, t_table, prefix)
    assert again is not None
    return TeacherResponse(None, tuple(again[0]), False, kept)


__all__ = ["TeacherResponse", "teacher_response"]
