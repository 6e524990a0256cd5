"""A tiny, locally trained tokenizer laid out like Qwen's (same special-token ids, same vocab size).

Why not a real Qwen tokenizer: nothing may be downloaded. Why Qwen's layout: ms-swift's Qwen-VL
templates hard-code ``image_token_id = 151655`` and ``video_token_id = 151656`` and the model
configs carry ``vision_start_token_id = 151652`` etc., so the vocabulary must place Qwen's special
tokens at their real ids. Everything below id 151643 is a small byte-level BPE (a few hundred
tokens, enough for short English captions) followed by unreachable filler tokens.

Layout (identical for Qwen2-VL, Qwen2.5-VL, Qwen3-VL and the text-only Qwen2 model):

====================  ===========================================================
ids                   content
====================  ===========================================================
0 .. n-1              byte-level BPE trained here (256 byte symbols + merges)
n .. 151642           ``<|kd_filler_{i}|>`` placeholders, never produced by encoding
151643 .. 151668      Qwen's 26 added tokens (``<|endoftext|>`` ... ``</think>``)
151669 .. 151935      no token; rows of the embedding exist (``vocab_size=151936``)
====================  ===========================================================
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import Qwen2Tokenizer

#: Embedding rows of every Qwen2/2.5/3(-VL) model (the tokenizer itself has 151669 tokens).
VOCAB_SIZE = 151936
#: First id of Qwen's added tokens.
FIRST_SPECIAL_ID = 151643

#: Qwen's added tokens in id order, with whether each is a "special" token (skipped on decode).
#: Qwen2/2.5(-VL) ship the first 22; Qwen3(-VL) add the last four. Including all 26 everywhere is
#: harmless and keeps one tokenizer for all families.
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),  # 151643: pad / document end
    ("<|im_start|>", True),  # 151644
    ("<|im_end|>", True),  # 151645: eos of the chat models
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),  # 151652
    ("<|vision_end|>", True),  # 151653
    ("<|vision_pad|>", True),  # 151654
    ("<|image_pad|>", True),  # 151655: ms-swift's image_token_id
    ("<|video_pad|>", True),  # 151656: ms-swift's video_token_id
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),  # 151668
)

SPECIAL_TOKEN_IDS: dict[str, int] = {
    tok: FIRST_SPECIAL_ID + i for i, (tok, _) in enumerate(QWEN_ADDED_TOKENS)
}
IMAGE_TOKEN_ID = SPECIAL_TOKEN_IDS["<|image_pad|>"]
VIDEO_TOKEN_ID = SPECIAL_TOKEN_IDS["<|video_pad|>"]
VISION_START_TOKEN_ID = SPECIAL_TOKEN_IDS["<|vision_start|>"]
VISION_END_TOKEN_ID = SPECIAL_TOKEN_IDS["<|vision_end|>"]
PAD_TOKEN_ID = SPECIAL_TOKEN_IDS["<|endoftext|>"]
EOS_TOKEN_ID = SPECIAL_TOKEN_IDS["<|im_end|>"]

#: Qwen2-VL's chat template (as shipped with Qwen2-VL-Instruct). ms-swift encodes with its own
#: ``qwen2_vl`` template, which produces the same text; this one serves ``apply_chat_template``.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Words the synthetic datasets and ms-swift's templates use; the BPE learns whole-word merges for
#: them, so sequences stay short (a caption is ~10 tokens) and training steps stay cheap.
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray", "pink")
SHAPES = ("square", "circle", "triangle", "cross", "diamond")
SIZES = ("small", "medium", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")

_BASE_CORPUS = """\
system
You are a helpful assistant.
You are Qwen, created by Alibaba Cloud. You are a helpful assistant.
user
assistant
Describe the image.
What is in the picture? What color is the shape? Where is the shape?
The image shows a shape on a plain background. There is one object in the picture.
Please answer the question in one short sentence. Thank you!
The quick brown fox jumps over the lazy dog. A student learns from a teacher.
Knowledge distillation trains a small model to match a large model.
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 32 64 100 112 128 256
yes no true false and or not the a an is are was of on in at to with for by from
"""


#: Qwen2Tokenizer's pre-tokenizer split (``transformers.models.qwen2.tokenization_qwen2``), copied so
#: that training (and the cache key) does not need to import transformers; a test checks they match.
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _training_corpus() -> list[str]:
    lines = _BASE_CORPUS.splitlines()
    for color in COLORS:
        for shape in SHAPES:
            for size in SIZES:
                lines.append(f"a {size} {color} {shape}.")
            lines.append(f"The {shape} is {color}.")
            lines.append(f"What color is the {shape}? It is {color}.")
    for pos in POSITIONS:
        lines.append(f"It is in the {pos} of the image.")
    for color in COLORS:
        lines.append(f"on a {color} background.")
    return lines


@functools.lru_cache(maxsize=1)
def bpe_vocab_and_merges(vocab_size: int = 640) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train the small byte-level BPE; deterministic (same corpus, same trainer settings).

    Returns the vocabulary (ids ``0 .. n-1``) and the merges as tuples, the form
    ``Qwen2Tokenizer(vocab=..., merges=...)`` accepts.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    # Repeat the corpus so frequent words win merges over rare character pairs.
    corpus = _training_corpus()
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return vocab, merges  # type: ignore[return-value]


def build_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Full vocabulary (BPE + fillers + Qwen's added tokens at their real ids) and merges."""
    bpe_vocab, merges = bpe_vocab_and_merges()
    vocab = dict(bpe_vocab)
    n = len(vocab)
    assert sorted(vocab.values()) == list(range(n)), "BPE ids must be dense"
    for i in range(n, FIRST_SPECIAL_ID):
        vocab[f"<|kd_filler_{i}|>"] = i
    for tok, idx in SPECIAL_TOKEN_IDS.items():
        vocab[tok] = idx
    return vocab, list(merges)


def build_tokenizer() -> Qwen2Tokenizer:
    """A ``Qwen2Tokenizer`` with Qwen's special-token layout and Qwen2-VL's chat template.

    eos is ``<|im_end|>`` and pad ``<|endoftext|>``, as in the Qwen2-VL / Qwen2.5-VL / Qwen3-VL
    instruct checkpoints. A new object each call (tokenizers are mutable); the BPE training is cached.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = build_vocab_and_merges()
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        errors="replace",
        split_special_tokens=False,
    )
    tokenizer.add_tokens(
        [AddedToken(tok, special=special, normalized=False) for tok, special in QWEN_ADDED_TOKENS]
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [tok for tok, special in QWEN_ADDED_TOKENS if special][1:]},
        replace_extra_special_tokens=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    _check_layout(tokenizer)
    return tokenizer


def _check_layout(tokenizer: Qwen2Tokenizer) -> None:
    """Fail loudly if a transformers/tokenizers change ever shifts the ids ms-swift hard-codes."""
    for tok, idx in SPECIAL_TOKEN_IDS.items():
        got = tokenizer.convert_tokens_to_ids(tok)
        if got != idx:
            raise RuntimeError(f"tiny tokenizer layout broken: {tok!r} has id {got}, expected {idx}")
    if len(tokenizer) != FIRST_SPECIAL_ID + len(QWEN_ADDED_TOKENS):
        raise RuntimeError(f"tiny tokenizer has {len(tokenizer)} tokens, expected {FIRST_SPECIAL_ID + 26}")


def tokenizer_fingerprint() -> str:
    """Hash of everything that determines the tokenizer files (part of the tiny models' cache key)."""
    import hashlib

    vocab, merges = bpe_vocab_and_merges()
    blob = json.dumps([sorted(vocab.items()), merges, QWEN_ADDED_TOKENS, CHAT_TEMPLATE], sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
