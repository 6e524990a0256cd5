"""Stand-ins for the real checkpoints the configs and docs name, in a local Hugging Face cache.

The hub models (Qwen2.5-VL-3B/7B-Instruct, Qwen3-VL-4B-Instruct) cannot be downloaded here, but
`kdcompose validate` reads only their small files: config.json (widths, depth, vocabulary,
architecture), tokenizer and processor files. `REAL_CONFIGS` copies the shapes of those models'
published config.json (the flat transformers-4.x layout of the Qwen2.5-VL checkpoints, the
`text_config` layout of Qwen3-VL); the tokenizer and processor files are the tiny models'
(`kdcompose.testing`), laid out with Qwen's real special-token ids. No weights: a stand-in is
for checks that read files, not for training.

`hub_cache(root, {repo_id: folder})` lays folders out as the Hugging Face cache does
(`models--OWNER--NAME/refs/main`, `snapshots/REV/`), so with `HF_HUB_CACHE=root`, `USE_HF=1` and
`HF_HUB_OFFLINE=1` a config naming `Qwen/Qwen2.5-VL-3B-Instruct` resolves to the stand-in
exactly as it would to a downloaded copy -- ms-swift too, when the folder holds a tiny model
with weights.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REVISION = "0" * 40

_QWEN25_VL_VISION = {
    "depth": 32,
    "hidden_act": "silu",
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "in_chans": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "spatial_patch_size": 14,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
    "temporal_patch_size": 2,
}
_QWEN_IDS = {
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
}


def _qwen25_vl(
    hidden: int, intermediate: int, heads: int, kv: int, layers: int, vocab: int, tie: bool
) -> dict:
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        **_QWEN_IDS,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "max_position_embeddings": 128000,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": tie,
        "torch_dtype": "bfloat16",
        "vision_config": {**_QWEN25_VL_VISION, "out_hidden_size": hidden},
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": vocab,
    }


REAL_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-VL-3B-Instruct": _qwen25_vl(2048, 11008, 16, 2, 36, 151936, True),
    "Qwen/Qwen2.5-VL-7B-Instruct": _qwen25_vl(3584, 18944, 28, 4, 28, 152064, False),
    "Qwen/Qwen3-VL-4B-Instruct": {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "tie_word_embeddings": True,
        "text_config": {
            "model_type": "qwen3_vl_text",
            "hidden_size": 2560,
            "intermediate_size": 9728,
            "num_attention_heads": 32,
            "num_hidden_layers": 36,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 151936,
            "rope_scaling": {
                "mrope_interleaved": True,
                "mrope_section": [24, 20, 20],
                "rope_type": "default",
            },
        },
        "vision_config": {
            "model_type": "qwen3_vl",
            "deepstack_visual_indexes": [5, 11, 17],
            "depth": 24,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_heads": 16,
            "out_hidden_size": 2560,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
    },
}
"""Shapes of the published config.json of the models `configs/` and the docs name."""

FILES_FROM_TINY = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def tiny_files_source() -> Path:
    """A tiny model folder whose tokenizer and processor files the stand-ins reuse."""
    from kdcompose.testing import build_tiny_model

    return build_tiny_model("qwen2_vl", "student")


def write_standin(folder: Path, config: Mapping[str, Any], source: Path | None = None) -> Path:
    """A checkpoint folder without weights: `config`, plus the tiny model's tokenizer files and
    its image processor settings as `preprocessor_config.json` (as the hub checkpoints ship it)."""
    source = source or tiny_files_source()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in FILES_FROM_TINY:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
    processor = json.loads((source / "processor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps(processor["image_processor"], indent=2))
    return folder


def hub_cache(root: Path, models: Mapping[str, Path], *, link: bool = False) -> Path:
    """Lay `models` (repo id -> a folder of files) out as a Hugging Face hub cache under `root`
    (one snapshot per repo, `refs/main` pointing at it); `link`: symlink the files instead of
    copying them (for weights)."""
    for repo_id, folder in models.items():
        repo = root / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / REVISION
        snapshot.mkdir(parents=True, exist_ok=True)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(REVISION)
        for path in Path(folder).iterdir():
            if path.is_file():
                target = snapshot / path.name
                if link:
                    os.symlink(path.resolve(), target)
                else:
                    shutil.copyfile(path, target)
    return root


def standin_hub(root: Path) -> Path:
    """A hub cache with a stand-in of every model in `REAL_CONFIGS`."""
    source = tiny_files_source()
    folders = {
        repo_id: write_standin(root / "standins" / repo_id.replace("/", "--"), config, source)
        for repo_id, config in REAL_CONFIGS.items()
    }
    return hub_cache(root / "hub", folders)


def hub_env(cache: Path) -> dict[str, str]:
    """Environment of a process that finds models only in `cache` (Hugging Face layout, offline)."""
    return {
        "HF_HUB_CACHE": str(cache),
        "USE_HF": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MODELSCOPE_OFFLINE": "1",
    }
