"""Two *different* tiny tokenizers (and tiny text models for them) for cross-tokenizer distillation.

Why: cross-tokenizer KD must be exercised where the two tokenizations really disagree -- other
merges, other digit splitting, other special tokens, other vocabulary sizes -- without downloading a
real Llama or Qwen tokenizer. Both are byte-level BPEs trained here with ``tokenizers`` on different
small corpora, laid out like the two families a user most often pairs (a Qwen student, a Llama-3
teacher):

=========  ======================  ===========================  ================================
role       family (ms-swift)       pre-tokenizer                special tokens / template
=========  ======================  ===========================  ================================
student    ``qwen2`` / ``qwen2_5``  Qwen2: one digit per token  ChatML ``<|im_start|>``/``<|im_end|>``
teacher    ``llama`` / ``llama3``   Llama 3: digits in 1-3s     ``<|begin_of_text|>``, ``<|eot_id|>``
=========  ======================  ===========================  ================================

The student trains on the caption corpus of :mod:`kdcompose.testing.tokenizer` (vocabulary
:data:`STUDENT_BPE_SIZE`), the teacher on a different corpus of arithmetic and prose with a little
non-ASCII text (:data:`TEACHER_BPE_SIZE`), so many words split differently and numbers always do.
The student model's embedding is padded to a multiple of 64 rows (like Qwen's), the teacher's is
exactly its tokenizer's size (like Llama 3's), so padding rows are exercised too.

Everything is deterministic and built on this machine; models are cached by content like
:mod:`kdcompose.testing.tiny_models` (``$KDCOMPOSE_CACHE``, default ``~/.cache/kdcompose``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcompose.testing._cache import atomic_build, cache_root, content_key
from kdcompose.testing.tokenizer import _PRETOKENIZE_REGEX as QWEN_PRETOKENIZE_REGEX
from kdcompose.testing.tokenizer import COLORS, POSITIONS, SHAPES, SIZES, _training_corpus

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

#: Bump when what a build writes changes, so caches rebuild.
PAIR_FORMAT_VERSION = 1

#: Llama 3's pre-tokenizer split (numbers in runs of 1-3 digits; Qwen2 splits every digit).
LLAMA3_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

STUDENT_BPE_SIZE = 600
TEACHER_BPE_SIZE = 900

#: ChatML as in Qwen2.5-Instruct (text only); ms-swift's ``qwen2_5`` template renders the same text.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: Llama 3 Instruct's layout (without the date preamble); ms-swift's ``llama3`` template renders it.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@dataclass(frozen=True)
class TokenizerRecipe:
    """Everything that determines one tiny tokenizer (and thus part of its models' cache key)."""

    role: str
    regex: str
    bpe_size: int
    corpus: str  # name of a corpus function below
    special_tokens: tuple[str, ...]
    bos_token: str | None
    eos_token: str
    pad_token: str
    chat_template: str
    add_bos: bool  # the post-processor prepends bos_token when add_special_tokens=True (Llama 3)
    swift_model_type: str
    swift_template: str
    architecture: str  # transformers model class
    pad_rows_to: int  # embedding rows rounded up to a multiple of this (1: exactly the tokenizer)


def _teacher_corpus() -> list[str]:
    """Arithmetic, prose and a little non-ASCII text: a different corpus from the student's."""
    lines = [
        "Let us think step by step. First add the numbers, then check the result.",
        "The answer is the sum of both numbers. Therefore the result is correct.",
        "A teacher explains; a student listens and learns from the teacher's answer.",
        "Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 25 42 99 100 128 256 512 1024 2048 4096 65536",
        "Prices: 3.50 euros, 12.99 dollars, 1,000,000 yen; 50% off, 7/8 of a cake.",
        "Café crème, naïve façade, déjà vu, Straße, Ærø, smörgåsbord, piñata, jalapeño.",
        "東京 is a city. 日本語 text. Emoji: 😀 🚀 ✨. Symbols: € £ ¥ © ® ™ ± × ÷ ≤ ≥.",
        "The picture shows a shape. The colour of the shape is described in the answer.",
        "Describe what you see in one sentence, please.",
    ]
    for a in range(0, 200, 7):
        b = (a * 37) % 1000
        lines.append(f"What is {a} plus {b}? {a} + {b} = {a + b}.")
        lines.append(f"Compute {b} minus {a}: the result is {b - a}.")
    # Only a few of the caption words, in other contexts: captions split differently than for the student.
    lines.append(f"Colours such as {', '.join(COLORS[:4])} and shapes such as {', '.join(SHAPES[:2])}.")
    lines.append(f"Sizes: {', '.join(SIZES)}; places: {', '.join(POSITIONS[:2])}.")
    return lines


_CORPORA = {"captions": _training_corpus, "arithmetic_prose": _teacher_corpus}

STUDENT_RECIPE = TokenizerRecipe(
    role="student",
    regex=QWEN_PRETOKENIZE_REGEX,
    bpe_size=STUDENT_BPE_SIZE,
    corpus="captions",
    special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    bos_token=None,
    eos_token="<|im_end|>",
    pad_token="<|endoftext|>",
    chat_template=CHATML_TEMPLATE,
    add_bos=False,
    swift_model_type="qwen2",
    swift_template="qwen2_5",
    architecture="Qwen2ForCausalLM",
    pad_rows_to=64,
)
TEACHER_RECIPE = TokenizerRecipe(
    role="teacher",
    regex=LLAMA3_PRETOKENIZE_REGEX,
    bpe_size=TEACHER_BPE_SIZE,
    corpus="arithmetic_prose",
    special_tokens=(
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ),
    bos_token="<|begin_of_text|>",
    eos_token="<|eot_id|>",
    pad_token="<|end_of_text|>",
    chat_template=LLAMA3_TEMPLATE,
    add_bos=True,
    swift_model_type="llama",
    swift_template="llama3",
    architecture="LlamaForCausalLM",
    pad_rows_to=1,
)
RECIPES: dict[str, TokenizerRecipe] = {"student": STUDENT_RECIPE, "teacher": TEACHER_RECIPE}


def recipe(role: str) -> TokenizerRecipe:
    if role not in RECIPES:
        raise ValueError(f"unknown role {role!r}; choose from {sorted(RECIPES)}")
    return RECIPES[role]


@functools.lru_cache(maxsize=4)
def _trained_json(role: str) -> str:
    """The ``tokenizers`` JSON of the trained tokenizer for ``role`` (specials included)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    r = recipe(role)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r.regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=r.bpe_size,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(_CORPORA[r.corpus]() * 4, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in r.special_tokens])
    if r.add_bos and r.bos_token is not None:
        bos_id = tok.token_to_id(r.bos_token)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{r.bos_token} $A",
            pair=f"{r.bos_token} $A {r.bos_token} $B",
            special_tokens=[(r.bos_token, bos_id)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


def build_pair_tokenizer(role: str) -> PreTrainedTokenizerFast:
    """The tiny ``role`` tokenizer as a transformers fast tokenizer (a new object each call)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    r = recipe(role)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_json(role)),
        bos_token=r.bos_token,
        eos_token=r.eos_token,
        pad_token=r.pad_token,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = r.chat_template
    return tokenizer


def build_tokenizer_pair() -> tuple[PreTrainedTokenizerFast, PreTrainedTokenizerFast]:
    """``(student_tokenizer, teacher_tokenizer)``: two different byte-level BPEs (see module doc)."""
    return build_pair_tokenizer("student"), build_pair_tokenizer("teacher")


def pair_tokenizer_fingerprint(role: str) -> str:
    """Hash of the tokenizer files' content for ``role`` (part of the models' cache key)."""
    r = recipe(role)
    blob = json.dumps([_trained_json(role), dataclasses.asdict(r)], sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def embedding_rows(role: str) -> int:
    """The model's vocabulary size: the tokenizer's size rounded up to ``pad_rows_to``."""
    from tokenizers import Tokenizer

    n = Tokenizer.from_str(_trained_json(role)).get_vocab_size(with_added_tokens=True)
    step = recipe(role).pad_rows_to
    return -(-n // step) * step


# --------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class TextModelSpec:
    """Sizes of a tiny text model (defaults per role in :data:`_TEXT_DEFAULTS`)."""

    role: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    seed: int = 0


_TEXT_DEFAULTS: dict[str, dict[str, int]] = {
    "teacher": {
        "hidden_size": 96,
        "num_layers": 3,
        "num_heads": 6,
        "num_kv_heads": 2,
        "intermediate_size": 192,
    },
    "student": {
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "intermediate_size": 128,
    },
}


def text_model_spec(role: str, **overrides: Any) -> TextModelSpec:
    recipe(role)
    fields = {f.name for f in dataclasses.fields(TextModelSpec)} - {"role"}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"unknown tiny text model option(s) {sorted(unknown)}; known: {sorted(fields)}")
    values = {**_TEXT_DEFAULTS[role], **{k: v for k, v in overrides.items() if v is not None}}
    spec = TextModelSpec(role=role, **values)
    if spec.hidden_size % spec.num_heads or spec.num_heads % spec.num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads and num_heads by num_kv_heads")
    return spec


def _config(spec: TextModelSpec):  # -> transformers.PreTrainedConfig
    import transformers as tf

    r = recipe(spec.role)
    tok = build_pair_tokenizer(spec.role)
    common = {
        "vocab_size": embedding_rows(spec.role),
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id if tok.bos_token_id is not None else tok.pad_token_id,
        "tie_word_embeddings": False,
        "architectures": [r.architecture],
        "dtype": "float32",
    }
    if r.architecture == "Qwen2ForCausalLM":
        return tf.Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    return tf.LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})


def _write_text_model(spec: TextModelSpec, out: Path) -> None:
    import torch
    import transformers as tf

    config = _config(spec)
    tok = build_pair_tokenizer(spec.role)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2 * spec.seed + (1 if spec.role == "teacher" else 0))
        model = getattr(tf, recipe(spec.role).architecture)(config)
    model.eval()
    model.generation_config = tf.GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[tok.eos_token_id, tok.pad_token_id],
        pad_token_id=tok.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name).split("+")[0] for name in ("torch", "transformers", "tokenizers")}


def build_tiny_text_model(
    role: str, out_dir: str | os.PathLike[str] | None = None, *, seed: int = 0, **overrides: Any
) -> Path:
    """Build (once) the tiny random text model for ``role`` with its own tokenizer; return its dir.

    ``student``: ``Qwen2ForCausalLM`` on the student tokenizer (ms-swift ``--model_type qwen2
    --template qwen2_5``); ``teacher``: ``LlamaForCausalLM`` on the teacher tokenizer (``--model_type
    llama --template llama3``). Seeded weights; content-keyed under ``$KDCOMPOSE_CACHE``/``models``
    unless ``out_dir`` is given; atomic, so concurrent callers are safe.
    """
    spec = text_model_spec(role, seed=seed, **overrides)
    desc = {
        "kind": "tiny_text_model",
        "spec": dataclasses.asdict(spec),
        "format": PAIR_FORMAT_VERSION,
        "versions": _versions(),
        "tokenizer": pair_tokenizer_fingerprint(role),
    }
    key = content_key(desc)
    final = Path(out_dir) if out_dir is not None else cache_root() / "models" / f"xtok-{role}-{key}"
    return atomic_build(final, key, lambda tmp, _final: _write_text_model(spec, tmp), desc)


def _train_on_conversations(
    model_dir: Path, dataset: Path, steps: int, lr: float, seed: int, out: Path
) -> None:
    """Causal-LM training of a saved tiny model on a messages JSONL rendered with its own chat template."""
    import shutil

    import torch

    from kdcompose.compat import ensure_torchvision_importable

    ensure_torchvision_importable()  # transformers' auto classes import torchvision
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(str(model_dir))
    rows = [json.loads(line) for line in dataset.read_text(encoding="utf-8").splitlines() if line.strip()]
    encoded = [tok.apply_chat_template(r["messages"], tokenize=True, return_dict=False) for r in rows]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.tensor(e)
        labels[i, : len(e)] = torch.tensor(e)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tf.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        for _ in range(steps):
            loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    for name in os.listdir(model_dir):  # tokenizer, chat template, generation config
        if not name.endswith(".safetensors") and name != "kdcompose_build.json":
            shutil.copy(model_dir / name, out / name)
    model.save_pretrained(out, safe_serialization=True)


def build_trained_text_model(
    role: str, dataset: str | os.PathLike[str], *, steps: int = 24, lr: float = 1e-2, seed: int = 0
) -> Path:
    """The tiny model of ``role`` after ``steps`` of causal-LM training on a messages JSONL
    (``kdcompose.testing.build_caption_dataset(image=False)``) rendered with its own chat template.

    Why: a randomly initialized teacher is close to uniform and has nothing to teach (distilling
    towards it cannot lower a cross-tokenizer divergence much: ULD between near-uniform
    distributions of different widths has a floor); a teacher that has seen the data is peaked on
    it, so a student visibly learns from it. Deterministic; content-keyed like the other builds
    (about a second on a CPU for the default sizes).
    """
    base = build_tiny_text_model(role, seed=seed)
    data = Path(dataset)
    desc = {
        "kind": "trained_tiny_text_model",
        "base": base.name,
        "dataset": hashlib.sha256(data.read_bytes()).hexdigest()[:16],
        "steps": steps,
        "lr": lr,
        "seed": seed,
        "format": PAIR_FORMAT_VERSION,
        "versions": _versions(),
    }
    key = content_key(desc)
    final = cache_root() / "models" / f"xtok-{role}-trained-{key}"
    return atomic_build(
        final, key, lambda tmp, _final: _train_on_conversations(base, data, steps, lr, seed, tmp), desc
    )


def build_cross_tokenizer_pair(seed: int = 0) -> tuple[Path, Path]:
    """``(teacher_dir, student_dir)``: a Llama-3-layout teacher and a Qwen2-layout student."""
    return build_tiny_text_model("teacher", seed=seed), build_tiny_text_model("student", seed=seed)


def swift_model_args(role: str, model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ms-swift arguments that load ``model_dir`` for ``role`` (``model``, ``model_type``,
    ``template``, ``check_model``); prefix them with ``teacher_`` for a GKD teacher (the template is
    then the teacher's own, which ms-swift 4.6 GKD does not use -- see docs/cross_tokenizer.md)."""
    r = recipe(role)
    return {
        "model": str(model_dir),
        "model_type": r.swift_model_type,
        "template": r.swift_template,
        "check_model": False,
    }
