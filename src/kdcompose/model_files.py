"""A model's files read without loading it: where it is, its config.json, tokenizer and widths.

Why: distilling 7B into 3B costs minutes of loading before a trainer can notice that a path
is wrong, that a feature pair compares 3584-wide features with 2048-wide ones, or that the
vocabularies differ. Everything those checks need is in a few small JSON files next to the
weights, so `kdcompose validate` and the start of `kdcompose train` read those instead, in
milliseconds, and no framework is imported. Nothing here is ms-swift specific (the ms-swift
model registry is read in `integrations/swift/model_preflight.py`).

* **Where a model is** (`locate_model`): a local folder (relative paths are relative to the
  working directory, as the training framework reads them), a hub id already in the local
  Hugging Face or ModelScope cache, a hub id that would be downloaded, or nothing at all.
  With offline mode on (`HF_HUB_OFFLINE`, `TRANSFORMERS_OFFLINE` or `MODELSCOPE_OFFLINE`) a
  hub id that is not cached cannot be found.
* **Its shape** (`ModelShape`): from config.json, in both layouts checkpoints use (text fields
  at the top, as transformers 4.x saved Qwen2-VL / Qwen2.5-VL, or under `text_config`).
* **The width of a tapped module** (`tap_width`): for the module paths of the Qwen2-VL,
  Qwen2.5-VL and Qwen3-VL families (`model.visual`, `model.visual.merger`,
  `model.visual.deepstack_merger_list`, `model.language_model.layers.N`, `lm_head`, ...) and of
  decoder-only LMs in the Llama / Qwen layout, the width the framework would find in the loaded
  module (kdcompose.training.projectors.module_width), or a structural problem (layer 5 of a 3-layer
  model). Any other path or family is "unknown": left to the trainer, never guessed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MODELSCOPE_OFFLINE")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelFileError(ValueError):
    """A model's file exists but cannot be read as what it should be."""


def offline_mode() -> bool:
    """Whether the user asked for no downloads (any of the hubs' offline switches)."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_ENV)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------------- where a model is

Hub = Literal["huggingface", "modelscope"]


@dataclass(frozen=True)
class ModelLocation:
    """Where `name` (a path or hub id, as written in the config) was found.

    `kind`: `local` (a folder), `cached` (a hub id in the local hub cache), `remote` (a hub id
    the framework will download), `missing` (neither). `folder`: the folder holding config.json
    (local or cached). `looked_at`: the absolute path tried as a local folder.
    """

    name: str
    kind: Literal["local", "cached", "remote", "missing"]
    folder: Path | None
    looked_at: Path
    hub: Hub

    @property
    def readable(self) -> bool:
        return self.folder is not None


def looks_like_hub_id(name: str) -> bool:
    """`owner/name`, as hub ids are written (a relative path of two parts looks the same)."""
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "~"))


def locate_model(name: str, *, hub: Hub = "modelscope", revision: str | None = None) -> ModelLocation:
    """Find `name` as a local folder, else in the local cache of `hub` (ModelScope unless the
    config asks for Hugging Face, as ms-swift), else say whether it can be downloaded."""
    expanded = os.path.expanduser(name)
    looked_at = Path(expanded).resolve()
    candidates = [Path(expanded)]
    if ":" in name and not os.path.isabs(expanded):  # ms-swift's `id:subfolder`
        candidates.append(Path("/".join(expanded.split(":", 1))))
    for candidate in candidates:
        if candidate.exists():
            return ModelLocation(name, "local", candidate.resolve(), looked_at, hub)
    if not looks_like_hub_id(name):
        return ModelLocation(name, "missing", None, looked_at, hub)
    cached = hf_cached_folder(name, revision) if hub == "huggingface" else modelscope_cached_folder(name)
    if cached is not None:
        return ModelLocation(name, "cached", cached, looked_at, hub)
    return ModelLocation(name, "missing" if offline_mode() else "remote", None, looked_at, hub)


def hf_cached_folder(repo_id: str, revision: str | None = None) -> Path | None:
    """The snapshot folder of `repo_id` in the Hugging Face cache (`HF_HUB_CACHE` / `HF_HOME`),
    when its config.json is there."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, CONFIG_FILE, revision=revision)
    except Exception:  # a malformed id or cache: treat as not cached
        return None
    return Path(found).parent if isinstance(found, str) else None


def modelscope_cache_root() -> Path:
    return Path(os.path.expanduser(os.environ.get("MODELSCOPE_CACHE", "~/.cache/modelscope/hub")))


def modelscope_cached_folder(repo_id: str) -> Path | None:
    """The folder of `repo_id` in the ModelScope cache (`MODELSCOPE_CACHE`), in the layouts
    its SDK writes: `models/OWNER/NAME` (dots as `___`), `models/OWNER--NAME/snapshots/REV`,
    and the older `OWNER/NAME`."""
    root = modelscope_cache_root()
    owner, name = repo_id.split("/", 1)
    safe = name.replace(".", "___")
    folders = [
        root / "models" / owner / safe,
        root / "models" / owner / name,
        root / owner / safe,
        root / owner / name,
        root / "hub" / owner / name,
    ]
    snapshots = root / "models" / f"{owner}--{name}" / "snapshots"
    if snapshots.is_dir():
        folders += sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    return next((folder for folder in folders if (folder / CONFIG_FILE).is_file()), None)


# ---------------------------------------------------------------------- config.json and tokenizer


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelFileError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path} is not a JSON object")
    return data


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ModelFileError(f"{folder} has no {CONFIG_FILE}: not a model checkpoint folder")
    return read_json(path)


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def has_processor(folder: Path) -> bool:
    return any((folder / name).is_file() for name in PROCESSOR_FILES)


def tokenizer_size(folder: Path) -> int | None:
    """`len(tokenizer)`: the distinct ids of the base vocabulary and the added tokens, read
    from tokenizer.json (or vocab.json + tokenizer_config.json); None when unreadable."""
    try:
        if (folder / "tokenizer.json").is_file():
            data = read_json(folder / "tokenizer.json")
            vocab = (data.get("model") or {}).get("vocab")
            ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab or [])))
            ids |= {t["id"] for t in data.get("added_tokens") or () if isinstance(t, dict) and "id" in t}
            return len(ids) or None
        if (folder / "vocab.json").is_file():
            ids = set(read_json(folder / "vocab.json").values())
            if (folder / "tokenizer_config.json").is_file():
                added = read_json(folder / "tokenizer_config.json").get("added_tokens_decoder") or {}
                ids |= {int(key) for key in added if str(key).isdigit()}
            return len(ids) or None
    except (ModelFileError, TypeError, ValueError):
        return None
    return None


def read_args_json(folder: Path) -> dict[str, Any]:
    """ms-swift's `args.json` of a checkpoint it trained (empty when absent or unreadable)."""
    try:
        return read_json(folder / "args.json") if (folder / "args.json").is_file() else {}
    except ModelFileError:
        return {}


# ---------------------------------------------------------------------- shapes and widths

VL_LAYOUT_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"})
"""config.json `model_type`s whose module layout `tap_width` knows (transformers 5.x)."""
TEXT_LAYOUT_TYPES = frozenset({"qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "llama", "mistral"})
"""Decoder-only families with `model.layers.N`, `model.embed_tokens`, `model.norm`, `lm_head`."""


@dataclass(frozen=True)
class ModelShape:
    """What config.json says about a model's structure (None: not stated)."""

    model_type: str | None
    architectures: tuple[str, ...]
    hidden_size: int | None
    num_layers: int | None
    vocab_size: int | None
    vision_width: int | None = None
    """The vision tower's output before the merger (`last_hidden_state`)."""
    vision_depth: int | None = None
    aligner_width: int | None = None
    """The merger's output: what the language model receives."""
    deepstack: int = 0
    """Number of deepstack mergers (Qwen3-VL); each outputs `aligner_width`."""
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_vision_language(self) -> bool:
        return self.vision_width is not None or self.model_type in VL_LAYOUT_TYPES

    @property
    def layout(self) -> Literal["vl", "text", "unknown"]:
        if self.model_type in VL_LAYOUT_TYPES:
            return "vl"
        if self.model_type in TEXT_LAYOUT_TYPES:
            return "text"
        return "unknown"

    @property
    def architecture(self) -> str | None:
        return self.architectures[0] if self.architectures else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def model_shape(config: Mapping[str, Any]) -> ModelShape:
    """The shape of a model from its config.json (both the flat and the `text_config` layout)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else {}
    vision = config.get("vision_config") if isinstance(config.get("vision_config"), Mapping) else {}

    def text_field(name: str) -> int | None:
        return _int(text.get(name)) or _int(config.get(name))

    model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    architectures = tuple(a for a in config.get("architectures") or () if isinstance(a, str))
    hidden = text_field("hidden_size")
    vision_width = aligner = None
    deepstack = 0
    if vision:
        if model_type == "qwen2_vl":  # embed_dim: the ViT; hidden_size: the merger's output
            vision_width, aligner = _int(vision.get("embed_dim")), _int(vision.get("hidden_size"))
        else:  # Qwen2.5-VL, Qwen3-VL: hidden_size is the ViT, out_hidden_size the merger
            vision_width = _int(vision.get("hidden_size"))
            aligner = _int(vision.get("out_hidden_size"))
        indexes = vision.get("deepstack_visual_indexes")
        deepstack = len(indexes) if isinstance(indexes, list) else 0
    return ModelShape(
        model_type=model_type,
        architectures=architectures,
        hidden_size=hidden,
        num_layers=text_field("num_hidden_layers"),
        vocab_size=text_field("vocab_size"),
        vision_width=vision_width,
        vision_depth=_int(vision.get("depth")),
        aligner_width=aligner,
        deepstack=deepstack,
        raw=config,
    )


@dataclass(frozen=True)
class TapWidth:
    """The width of a tapped module read from a shape: `width` (None: unknown, left to the
    trainer), or `problem`: the module cannot exist in this model (the message says why)."""

    width: int | None = None
    problem: str | None = None


_UNKNOWN = TapWidth()


def tap_width(shape: ModelShape, path: str, io: str = "output", children: bool = False) -> TapWidth:
    """The last-dimension width of what module `path` outputs (or takes as input), as
    kdcompose.training.projectors.module_width finds it in the loaded model; `children`: of its first
    child (a list of mergers). Only known layouts are answered; everything else is unknown."""
    parts = path.split(".")
    if shape.layout == "vl":
        return _vl_width(shape, parts, io, children)
    if shape.layout == "text":
        if parts[:2] in (["model", "language_model"], ["model", "visual"]):
            return TapWidth(
                problem=f"is a text-only model: it has no {'.'.join(parts[:2])} (its decoder layers are "
                "model.layers.N)"
            )
        return _decoder_width(shape, parts, io, children, prefix=("model",))
    return _UNKNOWN


def _index(text: str, count: int | None, what: str) -> TapWidth | None:
    """A problem when `text` is not an index below `count`. A module path names a child by its
    registered name ("0", "1", ...), so a negative index names nothing."""
    if not text.lstrip("-").isdigit():
        return None
    index = int(text)
    if index < 0:
        last = f"model's last is {count - 1}" if count else "count from 0"
        return TapWidth(problem=f"has no {what} named {index}: module paths count from 0 (the {last})")
    if count is None or index < count:
        return None
    return TapWidth(problem=f"has {count} {what} (indexes 0..{count - 1}), so there is no index {index}")


def _vl_width(shape: ModelShape, parts: list[str], io: str, children: bool) -> TapWidth:
    if parts[:2] == ["model", "visual"]:
        if not shape.is_vision_language:
            return TapWidth(problem="has no vision tower (model.visual): it is a text-only model")
        rest = parts[2:]
        if not rest:  # the vision tower itself: its pre-merger features
            return TapWidth(shape.vision_width) if io == "output" and not children else _UNKNOWN
        if rest == ["merger"]:
            return TapWidth(shape.aligner_width) if io == "output" and not children else _UNKNOWN
        if rest[0] == "deepstack_merger_list":
            if shape.deepstack == 0:
                return TapWidth(
                    problem="has no deepstack mergers (model.visual.deepstack_merger_list: Qwen3-VL only)"
                )
            if len(rest) == 1 and children and io == "output":
                return TapWidth(shape.aligner_width)
            if len(rest) == 2 and not children and io == "output":
                problem = _index(rest[1], shape.deepstack, "deepstack mergers")
                return problem or TapWidth(shape.aligner_width)
            return _UNKNOWN
        if rest[0] == "blocks" and len(rest) >= 2:
            problem = _index(rest[1], shape.vision_depth, "vision blocks")
            if problem is not None:
                return problem
            return TapWidth(shape.vision_width) if len(rest) == 2 and io == "output" else _UNKNOWN
        return _UNKNOWN
    if parts[:2] == ["model", "language_model"]:
        return _decoder_width(shape, parts, io, children, prefix=("model", "language_model"))
    if parts[:2] == ["model", "layers"]:
        return TapWidth(
            problem="has no model.layers: a vision-language model keeps its decoder layers under "
            f"model.language_model.layers (e.g. model.language_model.{'.'.join(parts[1:])})"
        )
    if parts == ["lm_head"]:
        return _lm_head_width(shape, io)
    return _UNKNOWN


def _lm_head_width(shape: ModelShape, io: str) -> TapWidth:
    return TapWidth(shape.hidden_size if io == "input" else shape.vocab_size)


def _decoder_width(
    shape: ModelShape, parts: list[str], io: str, children: bool, prefix: tuple[str, ...]
) -> TapWidth:
    """Paths of a decoder stack under `prefix` (`model.layers.N` or `model.language_model.layers.N`)."""
    if parts == ["lm_head"]:
        return _lm_head_width(shape, io)
    if tuple(parts[: len(prefix)]) != prefix:
        return _UNKNOWN
    rest = parts[len(prefix) :]
    hidden = TapWidth(shape.hidden_size)
    if not rest:
        return hidden if io == "output" and not children else _UNKNOWN
    if rest[0] == "layers":
        if len(rest) == 1:
            return hidden if children else _UNKNOWN
        problem = _index(rest[1], shape.num_layers, "decoder layers")
        if problem is not None:
            return problem
        return hidden if len(rest) == 2 and not children else _UNKNOWN
    if rest in (["embed_tokens"], ["norm"]) and not children:
        return hidden if io == "output" else _UNKNOWN
    return _UNKNOWN
