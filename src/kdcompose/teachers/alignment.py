"""Align a student's and a teacher's tokenization of the same completion, byte by byte.

Why: a teacher from another model family (a Llama teacher for a Qwen student) splits the same text
into different tokens, so its distributions cannot be compared position by position. The text is
shared, though: both tokenizations cover the same bytes. A *group* closes wherever both
tokenizations reach the same byte boundary; within a group the student's tokens and the teacher's
tokens spell exactly the same bytes, so their probabilities can be compared (see
:mod:`kdcompose.functional.cross_tokenizer`). This is TRL GOLD's alignment, done on bytes rather
than on decoded text: GOLD decodes growing prefixes and compares strings, which breaks where a
multi-byte character is split across tokens (the prefix decodes to U+FFFD) and depends on the
decoder's clean-up rules.

What each token spells is read from the tokenizer itself (never from a decode round trip):

``byte_level`` (GPT-2 / Qwen / Llama 3 / DeepSeek: decoder ``ByteLevel``)
    every vocabulary entry is a string over GPT-2's 256-character byte alphabet (``Ġ`` = space);
    it maps back to its bytes exactly, so a character split across tokens is split in bytes too.
``metaspace`` (SentencePiece style, Llama 2 / Mistral / Gemma: ``▁`` for space, ``<0xNN>`` byte
fallback)
    ``▁`` is a space, ``<0xNN>`` is the byte ``NN`` (when the decoder has ``ByteFallback``), any
    other entry is its UTF-8 text.
Added tokens (special or not) spell their content. Special tokens (``<|im_end|>``,
``<|eot_id|>`` ...) differ between families by design, so they are not aligned by text: the k-th
special token of the student's completion pairs with the k-th of the teacher's, as a group of its
own, and the text runs between them must spell the same bytes.

One tolerance: whitespace that only one side has *next to a special token or at the start of the
completion*. Chat templates put their own separators around special tokens (ms-swift's ChatML
labels end with ``<|im_end|>\n``, Llama 3's with ``<|eot_id|>``), and SentencePiece tokenizers
prepend a space to each encoded chunk (``"▁Sure"`` vs ``"Sure"``). Such whitespace joins the
neighbouring special token's group (at the completion's start: the first group). Any other
difference raises :class:`AlignmentError` naming the first differing byte, both texts around it
and the fix.

Also here: :func:`tokenizer_difference` / :func:`same_tokenizer` (is the teacher's tokenizer the
student's? decided from the tokenizers' vocabulary, merges, added tokens, normalizer, pre-tokenizer
and decoder, never assumed) and :func:`vocab_mapping` (token ids of the two vocabularies that spell
identical bytes, one-to-one; GOLD's exact-match mapping compares token *strings* instead).
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import hashlib
import json
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "AlignedGroup",
    "AlignmentError",
    "TokenAlignment",
    "TokenTable",
    "UnsupportedTokenizerError",
    "VocabMapping",
    "align_text",
    "align_token_ids",
    "decode_bytes",
    "same_tokenizer",
    "token_table",
    "tokenizer_difference",
    "vocab_mapping",
]


class UnsupportedTokenizerError(TypeError):
    """The tokenizer is not a fast (``tokenizers``-backed) one, or its decoder is not understood."""


class AlignmentError(ValueError):
    """The student's and the teacher's completions do not spell the same text."""


# ------------------------------------------------------------------------------------ token tables


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-character table (the alphabet of every byte-level BPE), inverted.

    Printable Latin-1 bytes map to themselves; the other 68 bytes to U+0100 onwards, in byte order.
    A test checks it against ``tokenizers.pre_tokenizers.ByteLevel.alphabet()`` and real encodings.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


_BYTE_DECODER = _gpt2_byte_decoder()
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@dataclass(frozen=True)
class TokenTable:
    """What every id of one tokenizer spells, in bytes.

    ``pieces[i]`` is the bytes of token ``i``; ``special`` the ids of special (control) tokens;
    ``fallback`` the ids of SentencePiece byte-fallback tokens (``<0xNN>``); ``scheme`` is
    ``"byte_level"`` or ``"metaspace"``; ``fingerprint`` hashes what decides the meaning of ids
    (model, added tokens, normalizer, pre-tokenizer, decoder): equal fingerprints, same tokenizer.
    """

    pieces: tuple[bytes, ...]
    special: frozenset[int]
    fallback: frozenset[int]
    scheme: str
    fingerprint: str
    names: tuple[str, ...] = field(repr=False)

    @property
    def size(self) -> int:
        return len(self.pieces)

    def spell(self, ids: Sequence[int]) -> bytes:
        """The bytes ``ids`` spell (special tokens as their content)."""
        self.check_ids(ids, "ids")
        return b"".join(self.pieces[i] for i in ids)

    def check_ids(self, ids: Sequence[int], what: str) -> None:
        bad = [i for i in ids if not 0 <= int(i) < self.size]
        if bad:
            raise ValueError(
                f"{what}: token id {bad[0]} is outside this tokenizer's vocabulary (0..{self.size - 1}); "
                f"were these ids produced by another tokenizer?"
            )


def _backend(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` behind ``tokenizer`` (a processor's tokenizer for a processor)."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # ProcessorMixin -> its tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and type(tokenizer).__module__.startswith("tokenizers"):
        backend = tokenizer
    if backend is None or not hasattr(backend, "to_str"):
        raise UnsupportedTokenizerError(
            f"cross-tokenizer alignment needs a fast tokenizer (a `tokenizers` backend); got "
            f"{type(tokenizer).__name__}. Load it with AutoTokenizer.from_pretrained(..., use_fast=True)."
        )
    return backend


def _decoder_parts(decoder: dict | None) -> list[dict]:
    if not decoder:
        return []
    if decoder.get("type") == "Sequence":
        return [p for d in decoder.get("decoders", []) for p in _decoder_parts(d)]
    return [decoder]


def _scheme(spec: dict) -> tuple[str, str, bool]:
    """``(scheme, space_marker, byte_fallback)`` from the tokenizer JSON's decoder."""
    parts = _decoder_parts(spec.get("decoder"))
    types = [p.get("type") for p in parts]
    if "ByteLevel" in types:
        return "byte_level", "", False
    fallback = "ByteFallback" in types or bool((spec.get("model") or {}).get("byte_fallback"))
    for part in parts:
        if part.get("type") == "Metaspace":
            return "metaspace", part.get("replacement", "▁"), fallback
        pattern = part.get("pattern") or {}
        if part.get("type") == "Replace" and part.get("content") == " " and "String" in pattern:
            return "metaspace", pattern["String"], fallback
    raise UnsupportedTokenizerError(
        f"cannot tell what this tokenizer's tokens spell: its decoder is {types or 'missing'}; "
        "cross-tokenizer alignment supports byte-level BPE (decoder ByteLevel) and SentencePiece-style "
        "tokenizers (Metaspace, or Replace('▁', ' ') with ByteFallback)"
    )


#: Byte-level alphabet -> Latin-1 character of the same byte: ``name.translate(...).encode("latin-1")``
#: turns a byte-level token into its bytes in C, fast enough for 150k-token vocabularies.
_BYTE_TRANSLATION = {ord(c): b for c, b in _BYTE_DECODER.items()}


def _piece_bytes(name: str, scheme: str, marker: str, fallback: bool) -> tuple[bytes, bool]:
    if scheme == "byte_level":
        latin = name.translate(_BYTE_TRANSLATION)
        try:
            return latin.encode("latin-1"), False
        except UnicodeEncodeError as exc:
            raise UnsupportedTokenizerError(
                f"token {name!r} has the character {name[exc.start]!r}, which is not in the byte-level "
                "alphabet; the tokenizer's vocabulary does not match its ByteLevel decoder"
            ) from None
    if fallback:
        m = _BYTE_FALLBACK.match(name)
        if m:
            return bytes([int(m.group(1), 16)]), True
    return name.replace(marker, " ").encode("utf-8"), False


#: Parts of a tokenizer's JSON that decide how text becomes ids and ids become text.
_IDENTITY_PARTS = ("model", "added_tokens", "normalizer", "pre_tokenizer", "decoder")


def _identity_spec(backend: Any) -> dict:
    """The parts of the tokenizer JSON that decide what ids mean (see :func:`tokenizer_difference`)."""
    return _identity_spec_of(backend.to_str())


def _identity_spec_of(tokenizer_json: str) -> dict:
    spec = json.loads(tokenizer_json)
    return {part: spec.get(part) for part in _IDENTITY_PARTS}


def _build_table(backend: Any) -> TokenTable:
    spec = _identity_spec(backend)
    fingerprint = hashlib.sha256(json.dumps(spec, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    scheme, marker, fallback = _scheme(spec)
    model = spec.get("model") or {}
    vocab = model.get("vocab")
    names: dict[int, str] = {}
    if isinstance(vocab, dict):  # BPE, WordLevel, WordPiece
        names = {int(i): str(t) for t, i in vocab.items()}
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...] in id order
        names = {i: str(entry[0]) for i, entry in enumerate(vocab)}
    added = {int(a["id"]): a for a in spec.get("added_tokens") or []}
    size = max([*names, *added], default=-1) + 1
    pieces: list[bytes] = [b""] * size
    name_list = [""] * size
    special: set[int] = set()
    fallback_ids: set[int] = set()
    for i in range(size):
        if i in added:
            content = str(added[i]["content"])
            pieces[i] = content.encode("utf-8")
            name_list[i] = content
            if added[i].get("special"):
                special.add(i)
        elif i in names:
            pieces[i], is_fallback = _piece_bytes(names[i], scheme, marker, fallback)
            name_list[i] = names[i]
            if is_fallback:
                fallback_ids.add(i)
        else:
            raise UnsupportedTokenizerError(
                f"the tokenizer's vocabulary has no token with id {i} (ids must be dense)"
            )
    return TokenTable(
        pieces=tuple(pieces),
        special=frozenset(special),
        fallback=frozenset(fallback_ids),
        scheme=scheme,
        fingerprint=fingerprint,
        names=tuple(name_list),
    )


#: Tables per tokenizer object, with the tokenizer's size when built (a tokenizer that gains tokens
#: gets a new table). Building one for a 150k vocabulary takes about a second; alignment runs per
#: sample, so it must not rebuild.
_TABLES: weakref.WeakKeyDictionary[Any, tuple[int, TokenTable]] = weakref.WeakKeyDictionary()


def token_table(tokenizer: Any) -> TokenTable:
    """The :class:`TokenTable` of ``tokenizer`` (a table is returned as is).

    Cached per tokenizer object and rebuilt when its number of tokens changes; after other in-place
    edits of a tokenizer (a token's ``special`` flag), build a new tokenizer object.
    """
    if isinstance(tokenizer, TokenTable):
        return tokenizer
    owner = getattr(tokenizer, "tokenizer", tokenizer)
    backend = _backend(owner)
    size = backend.get_vocab_size(with_added_tokens=True)
    try:
        hit = _TABLES.get(owner)
    except TypeError:  # not weak-referenceable (a bare tokenizers.Tokenizer)
        hit = None
    if hit is not None and hit[0] == size:
        return hit[1]
    table = _build_table(backend)
    with contextlib.suppress(TypeError):
        _TABLES[owner] = (size, table)
    return table


def decode_bytes(tokenizer: Any, ids: Sequence[int]) -> bytes:
    """The exact bytes ``ids`` spell under ``tokenizer`` (special tokens as their content).

    Unlike ``tokenizer.decode`` there is no clean-up and no U+FFFD for a character cut in half:
    use it to check that two sides encode the same completion.
    """
    return token_table(tokenizer).spell([int(i) for i in ids])


# ------------------------------------------------------------------------ same tokenizer / vocab map


def tokenizer_difference(student: Any, teacher: Any) -> str | None:
    """``None`` when the two tokenizers map text and ids alike, else what differs first.

    Compared: the model (type, vocabulary, merges, byte fallback ...), the added tokens (ids,
    contents, which are special), the normalizer, the pre-tokenizer and the decoder. Not compared:
    the post-processor (whether a BOS is prepended on request), truncation and padding, and which
    token is called eos/pad: none of them changes what an id means.
    """
    a_backend, b_backend = _backend(student), _backend(teacher)
    a_json, b_json = a_backend.to_str(), b_backend.to_str()
    if a_json == b_json:  # the same files: no table needed (building two takes about 2 s)
        return None
    a, b = _identity_spec_of(a_json), _identity_spec_of(b_json)
    if a == b:
        return None
    for part in _IDENTITY_PARTS:
        if a.get(part) == b.get(part):
            continue
        if part == "model":
            ma, mb = a.get("model") or {}, b.get("model") or {}
            if ma.get("type") != mb.get("type"):
                return f"model types differ ({ma.get('type')} vs {mb.get('type')})"
            va, vb = ma.get("vocab"), mb.get("vocab")
            if va != vb:
                na = len(va) if va is not None else 0
                nb = len(vb) if vb is not None else 0
                return f"vocabularies differ ({na} vs {nb} entries)"
            if ma.get("merges") != mb.get("merges"):
                return "merges differ"
            keys = sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k))
            return f"model settings differ ({', '.join(keys)})"
        if part == "added_tokens":
            ta = {(t["id"], t["content"], bool(t.get("special"))) for t in a.get(part) or []}
            tb = {(t["id"], t["content"], bool(t.get("special"))) for t in b.get(part) or []}
            only = sorted(ta ^ tb)
            if only:
                return f"added tokens differ (first: id {only[0][0]} {only[0][1]!r})"
            return "added tokens' options differ (lstrip / rstrip / normalized / single_word)"
        return f"{part.replace('_', '-')}s differ"
    return "the tokenizers differ"  # unreachable: equal parts give equal fingerprints


def same_tokenizer(student: Any, teacher: Any) -> bool:
    """True when the two tokenizers map text and ids alike (see :func:`tokenizer_difference`)."""
    return token_table(student).fingerprint == token_table(teacher).fingerprint


@dataclass(frozen=True)
class VocabMapping:
    """Pairs of token ids, one per side, that spell identical bytes (a one-to-one map).

    ``student_ids[k]`` and ``teacher_ids[k]`` spell the same bytes and are both special or both
    not; each id appears at most once. ``identical`` is True when the two tokenizers are the same
    (then the map is the identity over every id, and also over the LM heads' padding rows beyond
    the tokenizer, which mean the same on both sides). ``ambiguous`` counts byte strings left out
    because one side spells them with several ids (not one-to-one).
    """

    student_ids: tuple[int, ...]
    teacher_ids: tuple[int, ...]
    student_size: int
    teacher_size: int
    identical: bool = False
    ambiguous: int = 0

    def __len__(self) -> int:
        return len(self.student_ids)

    @functools.cached_property
    def _t2s(self) -> dict[int, int]:
        return dict(zip(self.teacher_ids, self.student_ids, strict=True))

    def teacher_to_student(self) -> dict[int, int]:
        """``teacher id -> student id`` (cached; do not modify it)."""
        return self._t2s

    def pairs(self, student_width: int, teacher_width: int) -> tuple[list[int], list[int]]:
        """The pairs as columns of logits ``[*, student_width]`` / ``[*, teacher_width]``: ids
        beyond a width are dropped; with ``identical``, padding rows ``size .. min(widths)`` pair
        with themselves. Cached per widths (the loss asks every step); do not modify the lists."""
        cache = self.__dict__.setdefault("_pairs_cache", {})
        key = (student_width, teacher_width)
        if key not in cache:
            s, t = [], []
            for si, ti in zip(self.student_ids, self.teacher_ids, strict=True):
                if si < student_width and ti < teacher_width:
                    s.append(si)
                    t.append(ti)
            if self.identical:
                extra = range(self.student_size, min(student_width, teacher_width))
                s.extend(extra)
                t.extend(extra)
            cache[key] = (s, t)
        return cache[key]


def _one_to_one_keys(table: TokenTable) -> tuple[dict[tuple[bool, bytes], int], int]:
    """``(special, bytes) -> id`` for byte strings that one id spells; byte-fallback tokens give way
    to a regular token spelling the same byte (the one encoding produces)."""
    groups: dict[tuple[bool, bytes], list[int]] = {}
    for i, piece in enumerate(table.pieces):
        groups.setdefault((i in table.special, piece), []).append(i)
    out: dict[tuple[bool, bytes], int] = {}
    ambiguous = 0
    for key, ids in groups.items():
        regular = [i for i in ids if i not in table.fallback] or ids
        if len(regular) == 1:
            out[key] = regular[0]
        else:
            ambiguous += 1
    return out, ambiguous


def vocab_mapping(student: Any, teacher: Any) -> VocabMapping:
    """The one-to-one map between the two vocabularies by identical bytes (see :class:`VocabMapping`).

    GOLD maps tokens whose vocabulary *strings* are equal, so ``Ġthe`` (byte-level) and ``▁the``
    (SentencePiece) never meet; comparing the bytes they spell maps them.
    """
    st, tt = token_table(student), token_table(teacher)
    if st.fingerprint == tt.fingerprint:
        ids = tuple(range(st.size))
        return VocabMapping(ids, ids, st.size, tt.size, identical=True)
    skeys, s_amb = _one_to_one_keys(st)
    tkeys, t_amb = _one_to_one_keys(tt)
    common = sorted(set(skeys) & set(tkeys), key=lambda k: skeys[k])
    return VocabMapping(
        student_ids=tuple(skeys[k] for k in common),
        teacher_ids=tuple(tkeys[k] for k in common),
        student_size=st.size,
        teacher_size=tt.size,
        identical=False,
        ambiguous=s_amb + t_amb,
    )


# ------------------------------------------------------------------------------------- alignment


@dataclass(frozen=True)
class AlignedGroup:
    """One aligned span: the student's and the teacher's token positions (indices into each side's
    completion ids) that spell the same bytes. ``text`` is the student's bytes of the span;
    ``special`` marks a pair of special tokens (paired by order, not by text)."""

    student: tuple[int, ...]
    teacher: tuple[int, ...]
    text: bytes
    special: bool = False


@dataclass(frozen=True)
class TokenAlignment:
    """The byte alignment of one completion: ``groups`` partition both sides' positions in order."""

    student_ids: tuple[int, ...]
    teacher_ids: tuple[int, ...]
    groups: tuple[AlignedGroup, ...]

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def student_group_index(self) -> list[int]:
        """For each student position, the index of its group."""
        out = [0] * len(self.student_ids)
        for g, group in enumerate(self.groups):
            for p in group.student:
                out[p] = g
        return out

    def teacher_group_index(self) -> list[int]:
        out = [0] * len(self.teacher_ids)
        for g, group in enumerate(self.groups):
            for p in group.teacher:
                out[p] = g
        return out

    def one_to_one(self, vocab: VocabMapping | None) -> list[bool]:
        """Per group: one student token and one teacher token that ``vocab`` pairs (the groups whose
        distributions are compared token to token). ``vocab=None``: none."""
        if vocab is None:
            return [False] * len(self.groups)
        t2s = None if vocab.identical else vocab.teacher_to_student()
        out = []
        for group in self.groups:
            if len(group.student) != 1 or len(group.teacher) != 1:
                out.append(False)
                continue
            s, t = self.student_ids[group.student[0]], self.teacher_ids[group.teacher[0]]
            out.append(s == t if t2s is None else t2s.get(t) == s)
        return out


@dataclass
class _Run:
    """A maximal run of non-special tokens (``positions``) or one special token."""

    positions: list[int]
    special: bool


def _runs(table: TokenTable, ids: Sequence[int]) -> tuple[list[_Run], list[int]]:
    """Text runs between special tokens (``len(specials) + 1`` runs, possibly empty) and the
    positions of the special tokens."""
    runs: list[_Run] = [_Run([], False)]
    specials: list[int] = []
    for p, i in enumerate(ids):
        if i in table.special:
            specials.append(p)
            runs.append(_Run([], False))
        else:
            runs[-1].positions.append(p)
    return runs, specials


def _show(text: bytes, at: int) -> str:
    lo = max(0, at - 20)
    return repr(text[lo : at + 20].decode("utf-8", errors="backslashreplace"))


_WHITESPACE = b" \t\r\n"


def _common_suffix(a: bytes, b: bytes) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return n


def _common_prefix(a: bytes, b: bytes) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _extras(s: bytes, t: bytes, trailing: bool) -> tuple[int, int, int, int] | None:
    """``(lead_s, lead_t, trail_s, trail_t)``: whitespace bytes at the start (and, when ``trailing``,
    at the end) that one side has and the other not, around a core both spell identically; ``None``
    when the cores differ. Whitespace both sides share next to the core stays in the core."""
    s_ws, t_ws = len(s) - len(s.lstrip(_WHITESPACE)), len(t) - len(t.lstrip(_WHITESPACE))
    keep = _common_suffix(s[:s_ws], t[:t_ws])
    lead_s, lead_t = s_ws - keep, t_ws - keep
    s_rest, t_rest = s[lead_s:], t[lead_t:]
    trail_s = trail_t = 0
    if trailing:
        s_tw = len(s_rest) - len(s_rest.rstrip(_WHITESPACE))
        t_tw = len(t_rest) - len(t_rest.rstrip(_WHITESPACE))
        keep = _common_prefix(s_rest[len(s_rest) - s_tw :], t_rest[len(t_rest) - t_tw :])
        trail_s, trail_t = s_tw - keep, t_tw - keep
    if s_rest[: len(s_rest) - trail_s] != t_rest[: len(t_rest) - trail_t]:
        return None
    return lead_s, lead_t, trail_s, trail_t


def _mismatch(s_text: bytes, t_text: bytes, run: int) -> AlignmentError:
    at = next(
        (k for k, (x, y) in enumerate(zip(s_text, t_text, strict=False)) if x != y),
        min(len(s_text), len(t_text)),
    )
    where = "before the first special token" if run == 0 else f"after special token {run}"
    return AlignmentError(
        f"the student's and the teacher's completions spell different text {where}: first difference at "
        f"byte {at}: student {_show(s_text, at)} vs teacher {_show(t_text, at)}. Both sides must encode the "
        "same completion (decode the student's completion and encode that text with the teacher's "
        "tokenizer and template; check both templates' response prefixes)"
    )


@dataclass
class _Split:
    """One side of a text run: tokens in the leading extra, the core (with their core end offsets),
    and the trailing extra."""

    lead: list[int]
    core: list[tuple[int, int]]  # (position, end offset in the core text)
    trail: list[int]


def _split(pieces: list[bytes], positions: list[int], lead: int, trail: int) -> _Split:
    total = sum(map(len, pieces))
    core_end = total - trail
    out = _Split([], [], [])
    acc = 0
    for p, piece in zip(positions, pieces, strict=True):
        start, acc = acc, acc + len(piece)
        if acc <= lead:
            out.lead.append(p)
        elif start >= core_end and acc > core_end:
            out.trail.append(p)
        else:
            out.core.append((p, min(acc, core_end) - lead))
    return out


@dataclass
class _Slot:
    """Token positions of one group under construction."""

    student: list[int]
    teacher: list[int]
    special: bool


def _align_run(
    st: TokenTable,
    s_ids: Sequence[int],
    s_pos: list[int],
    tt: TokenTable,
    t_ids: Sequence[int],
    t_pos: list[int],
    run: int,
    before: _Slot | None,
    after: _Slot | None,
) -> list[_Slot]:
    """Groups of one text run; whitespace one side has next to a special token joins that token's
    group (``before``/``after``); at the completion's start it joins the first group."""
    s_pieces = [st.pieces[s_ids[p]] for p in s_pos]
    t_pieces = [tt.pieces[t_ids[p]] for p in t_pos]
    s_text, t_text = b"".join(s_pieces), b"".join(t_pieces)
    extras = _extras(s_text, t_text, trailing=after is not None)
    if extras is None:
        raise _mismatch(s_text, t_text, run)
    lead_s, lead_t, trail_s, trail_t = extras
    core_len = len(s_text) - lead_s - trail_s
    if core_len == 0 and before is None and after is None and (s_pos or t_pos):
        raise _mismatch(s_text, t_text, run)
    s_split = _split(s_pieces, s_pos, lead_s, trail_s)
    t_split = _split(t_pieces, t_pos, lead_t, trail_t)
    boundaries = sorted({e for _, e in s_split.core} & {e for _, e in t_split.core} - {0})
    slots = [_Slot([], [], False) for _ in boundaries]
    for split, side in ((s_split, "student"), (t_split, "teacher")):
        if not slots:  # an empty core: only zero-length tokens can be left in it
            split.lead.extend(p for p, _ in split.core)
            split.core.clear()
        for p, end in split.core:
            getattr(slots[bisect.bisect_left(boundaries, end)], side).append(p)
        lead_to = before if before is not None else (slots[0] if slots else after)
        trail_to = after if after is not None else (slots[-1] if slots else before)
        for extra, to in ((split.lead, lead_to), (split.trail, trail_to)):
            if extra:
                assert to is not None  # an empty core with neither neighbour was refused above
                getattr(to, side).extend(extra)
    return slots


def align_token_ids(
    student_tokenizer: Any,
    student_ids: Sequence[int],
    teacher_tokenizer: Any,
    teacher_ids: Sequence[int],
) -> TokenAlignment:
    """Group the two tokenizations of one completion where they reach the same byte boundary.

    Args:
        student_tokenizer / teacher_tokenizer: fast tokenizers (or processors holding one), or
            their :class:`TokenTable` (build it once per run: about a second for 150k tokens).
        student_ids / teacher_ids: each side's token ids of the *completion only* (the tokens the
            loss is computed on, in order), each from its own tokenizer and template.

    Returns:
        A :class:`TokenAlignment`; every position of each side is in exactly one group, in order.

    Raises:
        AlignmentError: the two sides spell different text, or have different numbers of special
            tokens (the message names the first difference and the fix).
    """
    st, tt = token_table(student_tokenizer), token_table(teacher_tokenizer)
    s_ids = tuple(int(i) for i in student_ids)
    t_ids = tuple(int(i) for i in teacher_ids)
    st.check_ids(s_ids, "student completion")
    tt.check_ids(t_ids, "teacher completion")
    s_runs, s_specials = _runs(st, s_ids)
    t_runs, t_specials = _runs(tt, t_ids)
    if len(s_specials) != len(t_specials):
        names_s = [st.names[s_ids[p]] for p in s_specials]
        names_t = [tt.names[t_ids[p]] for p in t_specials]
        raise AlignmentError(
            f"the student's completion has {len(s_specials)} special token(s) {names_s} and the teacher's "
            f"{len(t_specials)} {names_t}; special tokens are aligned by order, so both completions need the "
            "same number (e.g. both end with their own end-of-turn token, or neither does)"
        )
    specials = [_Slot([sp], [tp], True) for sp, tp in zip(s_specials, t_specials, strict=True)]
    slots: list[_Slot] = []
    for k, (s_run, t_run) in enumerate(zip(s_runs, t_runs, strict=True)):
        before = specials[k - 1] if k > 0 else None
        after = specials[k] if k < len(specials) else None
        if before is not None:
            slots.append(before)
        slots.extend(_align_run(st, s_ids, s_run.positions, tt, t_ids, t_run.positions, k, before, after))
    groups = []
    for slot in slots:
        sp, tp = tuple(sorted(slot.student)), tuple(sorted(slot.teacher))
        groups.append(AlignedGroup(sp, tp, b"".join(st.pieces[s_ids[p]] for p in sp), slot.special))
    return TokenAlignment(s_ids, t_ids, tuple(groups))


def align_text(student_tokenizer: Any, teacher_tokenizer: Any, text: str) -> TokenAlignment:
    """Encode ``text`` with both tokenizers (no BOS/EOS added) and align the two encodings."""
    s_ids = _backend(student_tokenizer).encode(text, add_special_tokens=False).ids
    t_ids = _backend(teacher_tokenizer).encode(text, add_special_tokens=False).ids
    return align_token_ids(student_tokenizer, s_ids, teacher_tokenizer, t_ids)
