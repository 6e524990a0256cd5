"""Tiny local models and synthetic data for tests, benchmarks and ``kdcompose demo``.

Everything is built on this machine (no model hub): a Qwen-layout tokenizer, random-weight
Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen2 teacher-student pairs that ms-swift loads like real
checkpoints, and deterministic image-caption / text datasets in ms-swift's JSONL format. Builds are
cached by content under ``$KDCOMPOSE_CACHE`` (default ``~/.cache/kdcompose``).

Importing this package is cheap; torch/transformers are imported only when something is built.

Typical use::

    from kdcompose.testing import tiny_gkd_args, tiny_run_env
    os.environ.update(tiny_run_env())
    kwargs = tiny_gkd_args("qwen2_vl", "out/", max_steps=3)
    rlhf_main(RLHFArguments(**kwargs))   # after kdcompose.compat.ensure_torchvision_importable()
"""

from kdcompose.testing._cache import CACHE_ENV, cache_root
from kdcompose.testing.datasets import build_caption_dataset, load_rows
from kdcompose.testing.tiny_models import (
    FAMILIES,
    ROLES,
    SWIFT_MODEL_TYPE,
    SWIFT_TEMPLATE,
    VISION_MODULES,
    VL_FAMILIES,
    TinySpec,
    build_config,
    build_processor,
    build_tiny_model,
    build_tiny_pair,
    model_spec,
    tiny_gkd_args,
    tiny_run_env,
    tiny_spec,
    to_cli_args,
)
from kdcompose.testing.tokenizer import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, VOCAB_SIZE, build_tokenizer
from kdcompose.testing.tokenizer_pair import (
    build_cross_tokenizer_pair,
    build_pair_tokenizer,
    build_tiny_text_model,
    build_tokenizer_pair,
)

__all__ = [
    "CACHE_ENV",
    "FAMILIES",
    "IMAGE_TOKEN_ID",
    "ROLES",
    "SWIFT_MODEL_TYPE",
    "SWIFT_TEMPLATE",
    "VIDEO_TOKEN_ID",
    "VISION_MODULES",
    "VL_FAMILIES",
    "VOCAB_SIZE",
    "TinySpec",
    "build_caption_dataset",
    "build_config",
    "build_cross_tokenizer_pair",
    "build_pair_tokenizer",
    "build_processor",
    "build_tiny_model",
    "build_tiny_pair",
    "build_tiny_text_model",
    "build_tokenizer",
    "build_tokenizer_pair",
    "cache_root",
    "load_rows",
    "model_spec",
    "tiny_gkd_args",
    "tiny_run_env",
    "tiny_spec",
    "to_cli_args",
]
