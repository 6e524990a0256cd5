"""Where teacher distributions come from besides the live teacher model.

- :mod:`kdcompose.teachers.cache` — an offline top-K cache (``kdcompose teacher-cache``) and its
  training-time reader :class:`TeacherCache` (``cache.batch_topk(model_inputs)``).
- :mod:`kdcompose.teachers.cache_keys` — :func:`sample_keys`, the content key shared by the
  cache builder and the reader.
- :mod:`kdcompose.teachers.cache_build` — the builder (imports ms-swift).
- :mod:`kdcompose.teachers.alignment` — byte alignment of two tokenizations of one completion,
  tokenizer identity and the vocabulary map, for teachers with another tokenizer.

Importing this package is cheap (no torch): names are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AlignmentError": "kdcompose.teachers.alignment",
    "TokenAlignment": "kdcompose.teachers.alignment",
    "VocabMapping": "kdcompose.teachers.alignment",
    "align_text": "kdcompose.teachers.alignment",
    "align_token_ids": "kdcompose.teachers.alignment",
    "same_tokenizer": "kdcompose.teachers.alignment",
    "token_table": "kdcompose.teachers.alignment",
    "tokenizer_difference": "kdcompose.teachers.alignment",
    "vocab_mapping": "kdcompose.teachers.alignment",
    "TeacherCache": "kdcompose.teachers.cache",
    "TeacherCacheError": "kdcompose.teachers.cache",
    "model_fingerprint": "kdcompose.teachers.cache",
    "rebuild_command": "kdcompose.teachers.cache",
    "template_fingerprint": "kdcompose.teachers.cache",
    "tokenizer_fingerprint": "kdcompose.teachers.cache",
    "SampleKeyError": "kdcompose.teachers.cache_keys",
    "labelled_positions": "kdcompose.teachers.cache_keys",
    "sample_keys": "kdcompose.teachers.cache_keys",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
