"""Tiny random-weight Qwen-VL (and Qwen2 text) teacher/student pairs that ms-swift can load and train.

Why: distillation code has to be exercised end to end (ms-swift's loader, template, collator, GKD
trainer, on-policy generation, hooks on the vision tower) on machines with no GPU and no model hub.
These models are built from transformers' own config classes with random weights, saved with
``save_pretrained`` next to a Qwen-layout tokenizer and processor (:mod:`.tokenizer`), so ms-swift
treats a directory exactly like a downloaded checkpoint of the real family. They are not trained:
losses start near ``ln(151936)`` and only the plumbing, not the quality, is being tested.

Sizes (defaults; every field can be overridden, see :func:`tiny_spec`)::

    role      text hidden  layers  heads  kv  head_dim  vision depth  vision width
    teacher   96           3       6      2   16        2             32
    student   64           2       4      2   16        2             32

The vision tower has the same shape for both roles by default, so vision-tower ("vit") feature KD
works without a projection; pass ``vision_width=48`` (e.g. for the teacher) to get different
feature widths. The aligner ("merger") always maps to the role's own text hidden size.

Module paths in the built models (transformers 5.x, all three VL families)::

    vision tower   model.visual                       (pre-merger patches: last_hidden_state)
    aligner        model.visual.merger                ([vision tokens, text hidden])
    deepstack      model.visual.deepstack_merger_list.{i}   (qwen3_vl only)
    LM head        lm_head

Under PEFT/LoRA the student's are prefixed with ``base_model.model.``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kdcompose.compat import ensure_torchvision_importable
from kdcompose.testing._cache import atomic_build, cache_root, content_key
from kdcompose.testing.tokenizer import (
    EOS_TOKEN_ID,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    VIDEO_TOKEN_ID,
    VISION_END_TOKEN_ID,
    VISION_START_TOKEN_ID,
    VOCAB_SIZE,
    build_tokenizer,
    tokenizer_fingerprint,
)

Family = Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen2"]
Role = Literal["teacher", "student"]

VL_FAMILIES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
FAMILIES: tuple[str, ...] = (*VL_FAMILIES, "qwen2")
ROLES: tuple[str, ...] = ("teacher", "student")

#: Bump when what a build writes changes, so caches rebuild.
MODEL_FORMAT_VERSION = 1

#: ms-swift ``model_type`` and ``template`` per family (4.6.0 names).
SWIFT_MODEL_TYPE: dict[str, str] = {
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
    "qwen2": "qwen2",
}
SWIFT_TEMPLATE: dict[str, str] = {
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
    "qwen2": "qwen2_5",
}

#: Dotted module names of the feature-KD targets in the built models (see module docstring).
VISION_MODULES: dict[str, str] = {
    "vit": "model.visual",
    "aligner": "model.visual.merger",
    "deepstack": "model.visual.deepstack_merger_list",
}

#: Real checkpoints' multimodal-RoPE sections (sum = head_dim / 2 = 64); scaled down for tiny heads.
_MROPE_SECTION = {"qwen2_vl": (16, 24, 24), "qwen2_5_vl": (16, 24, 24), "qwen3_vl": (24, 20, 20)}
_PATCH_SIZE = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16}


@dataclass(frozen=True)
class TinySpec:
    """Everything that determines a tiny model's bytes (and thus its cache key)."""

    family: str
    role: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vision_depth: int
    vision_width: int
    vision_heads: int
    vision_mlp_ratio: int = 2
    tie_word_embeddings: bool = False
    seed: int = 0
    rope_theta: float | None = None
    """The language model's RoPE base; None: the family's own (1e6, Qwen3-VL 5e6). With a tiny
    head (16 dims) those bases leave the multimodal-RoPE height/width sections only frequencies
    below 0.03 rad per position, so a model cannot tell a 3x3 grid of vision tokens apart; a base
    of 10 can (`kdcompose demo` needs positions)."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def is_vl(self) -> bool:
        return self.family in VL_FAMILIES


_ROLE_DEFAULTS: dict[str, dict[str, int]] = {
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
_VISION_DEFAULTS: dict[str, int] = {"vision_depth": 2, "vision_width": 32, "vision_heads": 2}


def tiny_spec(family: str, role: str, **overrides: Any) -> TinySpec:
    """The default :class:`TinySpec` for ``family``/``role`` with ``overrides`` applied.

    Both head dims (``hidden_size / num_heads`` and ``vision_width / vision_heads``) must be multiples
    of 4: the text one is split into three mRoPE sections, the vision one into 2-D rotary halves.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose from {FAMILIES}")
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; choose from {ROLES}")
    fields = {f.name for f in dataclasses.fields(TinySpec)} - {"family", "role"}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"unknown tiny model option(s) {sorted(unknown)}; known: {sorted(fields)}")
    values: dict[str, Any] = {**_ROLE_DEFAULTS[role], **_VISION_DEFAULTS}
    values.update({k: v for k, v in overrides.items() if v is not None})
    spec = TinySpec(family=family, role=role, **values)
    if spec.hidden_size % spec.num_heads or spec.head_dim % 4:
        raise ValueError(
            f"hidden_size/num_heads must be a multiple of 4, got {spec.hidden_size}/{spec.num_heads}"
        )
    if spec.num_heads % spec.num_kv_heads:
        raise ValueError("num_heads must be a multiple of num_kv_heads")
    if spec.vision_width % spec.vision_heads or (spec.vision_width // spec.vision_heads) % 4:
        raise ValueError("vision_width/vision_heads must be a multiple of 4")
    return spec


def _mrope_section(family: str, head_dim: int) -> list[int]:
    """Scale the real mRoPE sections (sum 64) to ``head_dim / 2``, keeping their proportions."""
    real = _MROPE_SECTION[family]
    half = head_dim // 2
    sec = [max(1, round(s * half / sum(real))) for s in real]
    sec[0] += half - sum(sec)
    if family == "qwen3_vl":
        # Interleaved mRoPE indexes frequencies [offset : section*3 : 3] for the h and w sections.
        sec = [half - 2 * max(1, half // 4), max(1, half // 4), max(1, half // 4)]
    return sec


def _text_kwargs(spec: TinySpec) -> dict[str, Any]:
    return {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "pad_token_id": PAD_TOKEN_ID,
    }


def build_config(spec: TinySpec):  # -> transformers.PreTrainedConfig
    """The transformers config for ``spec`` (real config classes, tiny sizes)."""
    ensure_torchvision_importable()
    import transformers as tf

    text = _text_kwargs(spec)
    ids = {
        "image_token_id": IMAGE_TOKEN_ID,
        "video_token_id": VIDEO_TOKEN_ID,
        "vision_start_token_id": VISION_START_TOKEN_ID,
        "vision_end_token_id": VISION_END_TOKEN_ID,
    }
    tie = spec.tie_word_embeddings
    if spec.family == "qwen2":
        return tf.Qwen2Config(
            **text,
            bos_token_id=PAD_TOKEN_ID,
            eos_token_id=EOS_TOKEN_ID,
            tie_word_embeddings=tie,
            rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta or 1000000.0},
            architectures=["Qwen2ForCausalLM"],
            dtype="float32",
        )
    mrope = _mrope_section(spec.family, spec.head_dim)
    theta = {"qwen2_vl": 1000000.0, "qwen2_5_vl": 1000000.0, "qwen3_vl": 5000000.0}[spec.family]
    if spec.rope_theta is not None:
        theta = spec.rope_theta
    vision_intermediate = spec.vision_width * spec.vision_mlp_ratio
    if spec.family == "qwen2_vl":
        rope = {"rope_type": "default", "rope_theta": theta, "mrope_section": mrope}
        vision = {
            "depth": spec.vision_depth,
            "embed_dim": spec.vision_width,
            "hidden_size": spec.hidden_size,
            "mlp_ratio": spec.vision_mlp_ratio,
            "num_heads": spec.vision_heads,
            "patch_size": 14,
        }
        cls, arch = tf.Qwen2VLConfig, "Qwen2VLForConditionalGeneration"
    elif spec.family == "qwen2_5_vl":
        rope = {"rope_type": "default", "rope_theta": theta, "mrope_section": mrope}
        vision = {
            "depth": spec.vision_depth,
            "hidden_size": spec.vision_width,
            "intermediate_size": vision_intermediate,
            "num_heads": spec.vision_heads,
            "out_hidden_size": spec.hidden_size,
            "patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": [spec.vision_depth - 1],
        }
        cls, arch = tf.Qwen2_5_VLConfig, "Qwen2_5_VLForConditionalGeneration"
    else:  # qwen3_vl
        rope = {
            "rope_type": "default",
            "rope_theta": theta,
            "mrope_section": mrope,
            "mrope_interleaved": True,
        }
        text["head_dim"] = spec.head_dim
        n_deep = min(spec.vision_depth, spec.num_layers, 3)
        vision = {
            "depth": spec.vision_depth,
            "hidden_size": spec.vision_width,
            "intermediate_size": vision_intermediate,
            "num_heads": spec.vision_heads,
            "out_hidden_size": spec.hidden_size,
            "patch_size": 16,
            "num_position_embeddings": 256,
            "deepstack_visual_indexes": list(range(n_deep)),
        }
        cls, arch = tf.Qwen3VLConfig, "Qwen3VLForConditionalGeneration"
    config = cls(
        text_config={**text, "rope_parameters": rope},
        vision_config=vision,
        tie_word_embeddings=tie,
        architectures=[arch],
        dtype="float32",
        **ids,
    )
    # Mirror the real checkpoints' top-level fields (some ms-swift code paths read them there).
    config.pad_token_id = PAD_TOKEN_ID
    config.eos_token_id = EOS_TOKEN_ID
    return config


def build_processor(family: str):  # -> transformers.ProcessorMixin | PreTrainedTokenizerBase
    """Tokenizer (``qwen2``) or the family's processor with tiny image limits.

    Images are capped at ``max_pixels`` (112*112 for patch 14, 128*128 for Qwen3-VL's patch 16), i.e.
    4-16 merged vision tokens per image.
    """
    ensure_torchvision_importable()
    import transformers as tf

    tokenizer = build_tokenizer()
    if family == "qwen2":
        return tokenizer
    patch = _PATCH_SIZE[family]
    factor = patch * 2
    image_kwargs: dict[str, Any] = {
        "patch_size": patch,
        "min_pixels": (2 * factor) ** 2,
        "max_pixels": (4 * factor) ** 2,
    }
    if family == "qwen3_vl":
        image_kwargs.update(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        image_processor = tf.Qwen2VLImageProcessor(**image_kwargs)
        video_processor = tf.Qwen3VLVideoProcessor(
            patch_size=patch,
            size={"shortest_edge": (2 * factor) ** 2 * 2, "longest_edge": (4 * factor) ** 2 * 8},
        )
        return tf.Qwen3VLProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            chat_template=tokenizer.chat_template,
        )
    image_processor = tf.Qwen2VLImageProcessor(**image_kwargs)
    video_processor = tf.Qwen2VLVideoProcessor(
        patch_size=patch, size={"shortest_edge": (2 * factor) ** 2, "longest_edge": (4 * factor) ** 2 * 8}
    )
    proc_cls = tf.Qwen2VLProcessor if family == "qwen2_vl" else tf.Qwen2_5_VLProcessor
    return proc_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=tokenizer.chat_template,
    )


def _model_class(family: str):
    import transformers as tf

    return {
        "qwen2_vl": tf.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": tf.Qwen2_5_VLForConditionalGeneration,
        "qwen3_vl": tf.Qwen3VLForConditionalGeneration,
        "qwen2": tf.Qwen2ForCausalLM,
    }[family]


def _versions() -> dict[str, str]:
    """Versions that can change the saved bytes; read from metadata so a cache hit imports nothing."""
    from importlib.metadata import version

    return {name: version(name).split("+")[0] for name in ("torch", "transformers", "tokenizers")}


def save_greedy_model(model: Any, out: Path) -> None:
    """Save a tiny model of the test tokenizer in eval mode, with greedy generation that stops at
    EOS or PAD (what every model built here, random or trained, is saved with)."""
    from transformers import GenerationConfig

    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=PAD_TOKEN_ID,
        eos_token_id=[EOS_TOKEN_ID, PAD_TOKEN_ID],
        pad_token_id=PAD_TOKEN_ID,
        do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)


def _write_model(spec: TinySpec, out: Path) -> None:
    import torch

    config = build_config(spec)
    with torch.random.fork_rng(devices=[]):  # seed locally; leave the caller's RNG state alone
        # Distinct streams per role: with one seed, same-shaped vision towers would start identical
        # and vision-feature KD would begin at exactly zero.
        torch.manual_seed(2 * spec.seed + (1 if spec.role == "teacher" else 0))
        model = _model_class(spec.family)(config)
    save_greedy_model(model, out)
    build_processor(spec.family).save_pretrained(out)


_KEY_OPTIONAL: tuple[str, ...] = ("rope_theta",)
"""Fields added after the first release: left out of the cache key while unset, so the models
built before they existed keep their keys (and their cache entries)."""


def spec_key(spec: TinySpec) -> dict[str, Any]:
    """The spec's fields as they enter a cache key."""
    fields = dataclasses.asdict(spec)
    return {k: v for k, v in fields.items() if not (k in _KEY_OPTIONAL and v is None)}


def build_tiny_model(
    family: str,
    role: str,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    vision_width: int | None = None,
    vision_depth: int | None = None,
    **overrides: Any,
) -> Path:
    """Build (once) a tiny random ``family`` model for ``role`` and return its directory.

    The directory loads with ``from_pretrained`` and with ms-swift (``model_type`` /
    ``template`` from :data:`SWIFT_MODEL_TYPE` / :data:`SWIFT_TEMPLATE`). Weights are seeded, so the
    same arguments always give the same weights. ``out_dir``: where to put it; default a
    content-keyed directory under ``$KDCOMPOSE_CACHE`` (``~/.cache/kdcompose``)/``models``. A second
    call with the same arguments returns at once. Builds are atomic, so concurrent callers are safe.
    """
    spec = tiny_spec(
        family, role, seed=seed, vision_width=vision_width, vision_depth=vision_depth, **overrides
    )
    desc = {
        "kind": "tiny_model",
        "spec": spec_key(spec),
        "format": MODEL_FORMAT_VERSION,
        "versions": _versions(),
        "tokenizer": tokenizer_fingerprint(),
    }
    key = content_key(desc)
    final = Path(out_dir) if out_dir is not None else cache_root() / "models" / f"{family}-{role}-{key}"
    return atomic_build(final, key, lambda tmp, _final: _write_model(spec, tmp), desc)


def build_tiny_pair(
    family: str,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    teacher: Mapping[str, Any] | None = None,
    student: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> tuple[Path, Path]:
    """``(teacher_dir, student_dir)``; ``teacher``/``student`` are per-role overrides."""
    sub = (lambda r: Path(out_dir) / r) if out_dir is not None else (lambda r: None)
    t = build_tiny_model(family, "teacher", sub("teacher"), seed=seed, **dict(teacher or {}))
    s = build_tiny_model(family, "student", sub("student"), seed=seed, **dict(student or {}))
    return t, s


def model_spec(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The :class:`TinySpec` fields a directory was built from (read from its build manifest)."""
    from kdcompose.testing._cache import read_manifest

    manifest = read_manifest(Path(model_dir))
    if manifest is None or manifest.get("kind") != "tiny_model":
        raise ValueError(f"{model_dir} is not a kdcompose tiny model")
    return dict(manifest["spec"])


def tiny_gkd_args(
    family: str,
    output_dir: str | os.PathLike[str],
    *,
    teacher_spec: Mapping[str, Any] | None = None,
    student_spec: Mapping[str, Any] | None = None,
    dataset_size: int = 32,
    **overrides: Any,
) -> dict[str, Any]:
    """``RLHFArguments`` keyword arguments for a tiny stock-GKD run on CPU; ``overrides`` win.

    Builds (or reuses) the tiny teacher/student pair (``teacher_spec`` / ``student_spec``: per-role
    :func:`tiny_spec` overrides, e.g. ``{"vision_width": 48}``) and the synthetic dataset (images for
    the VL families, text for ``qwen2``). Pass e.g. ``max_steps=3`` or ``lmbda=1.0`` (on-policy) as
    overrides. Use with ``rlhf_main(RLHFArguments(**kwargs))`` after
    :func:`kdcompose.compat.ensure_torchvision_importable` and with :func:`tiny_run_env` in the
    environment, or turn it into ``swift rlhf`` flags with :func:`to_cli_args`.

    Choices that matter: ``check_model=False`` (otherwise ms-swift asks the ModelScope hub and retries
    for seconds), explicit ``model_type``/``template`` (auto-detection sees both ``qwen2_vl`` and
    ``qvq``), ``gradient_checkpointing=False`` (ms-swift defaults to True, which makes tiny CPU steps
    ~4x slower; set it back to exercise hooks under checkpointing), ``split_dataset_ratio=0`` and
    ``eval_strategy="no"`` (no eval pass), ``save_strategy="no"``.
    """
    from kdcompose.testing.datasets import build_caption_dataset

    teacher_dir, student_dir = build_tiny_pair(family, teacher=teacher_spec, student=student_spec)
    dataset = build_caption_dataset(n=dataset_size, seed=0, image=family in VL_FAMILIES)
    args: dict[str, Any] = {
        "rlhf_type": "gkd",
        "model": str(student_dir),
        "model_type": SWIFT_MODEL_TYPE[family],
        "teacher_model": str(teacher_dir),
        "teacher_model_type": SWIFT_MODEL_TYPE[family],
        "template": SWIFT_TEMPLATE[family],
        "check_model": False,
        "dataset": [str(dataset)],
        "split_dataset_ratio": 0.0,
        "dataset_num_proc": 1,
        "load_from_cache_file": False,
        "tuner_type": "full",
        "torch_dtype": "float32",
        "max_length": 256,
        "max_completion_length": 16,
        "lmbda": 0.0,
        "beta": 0.5,
        "temperature": 0.9,
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "gradient_checkpointing": False,
        "learning_rate": 1e-4,
        "max_steps": 3,
        "num_train_epochs": 1,
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "save_only_model": True,
        "report_to": ["none"],
        "dataloader_num_workers": 0,
        "seed": 42,
        "output_dir": str(output_dir),
        "add_version": True,
    }
    args.update(overrides)
    return args


def tiny_run_env() -> dict[str, str]:
    """Environment variables a tiny run needs (offline hub, no telemetry, CPU-friendly threads)."""
    return {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MODELSCOPE_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    }


def to_cli_args(kwargs: Mapping[str, Any]) -> list[str]:
    """``swift rlhf`` flags for RLHFArguments kwargs (lists become repeated values, dicts JSON)."""
    argv: list[str] = []
    for key, value in kwargs.items():
        argv.append(f"--{key}")
        if isinstance(value, (list, tuple)):
            argv.extend(str(v) for v in value)
        elif isinstance(value, dict):
            argv.append(json.dumps(value))
        elif isinstance(value, bool):
            argv.append("true" if value else "false")
        else:
            argv.append(str(value))
    return argv
