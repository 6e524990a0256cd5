"""kdcompose.model_files: a model's location, shape and tapped widths from its files alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from model_standins import REAL_CONFIGS, hub_cache

from kdcompose.model_files import (
    ModelFileError,
    locate_model,
    model_shape,
    read_config,
    tap_width,
    tokenizer_size,
)

QWEN25_3B = model_shape(REAL_CONFIGS["Qwen/Qwen2.5-VL-3B-Instruct"])
QWEN25_7B = model_shape(REAL_CONFIGS["Qwen/Qwen2.5-VL-7B-Instruct"])
QWEN3_4B = model_shape(REAL_CONFIGS["Qwen/Qwen3-VL-4B-Instruct"])
QWEN2_VL_7B = model_shape(
    {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "hidden_size": 3584,
        "num_hidden_layers": 28,
        "vocab_size": 152064,
        "vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "mlp_ratio": 4},
    }
)
QWEN2_TEXT = model_shape(
    {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 896,
        "num_hidden_layers": 24,
    }
)


def test_both_config_layouts_give_the_same_fields():
    assert (QWEN25_3B.hidden_size, QWEN25_3B.num_layers, QWEN25_3B.vocab_size) == (2048, 36, 151936)
    assert (QWEN3_4B.hidden_size, QWEN3_4B.num_layers, QWEN3_4B.vocab_size) == (2560, 36, 151936)
    assert QWEN3_4B.deepstack == 3 and QWEN25_3B.deepstack == 0
    assert QWEN25_7B.architecture == "Qwen2_5_VLForConditionalGeneration"


@pytest.mark.parametrize(
    ("shape", "path", "io", "children", "width"),
    [
        (QWEN25_3B, "model.visual", "output", False, 1280),
        (QWEN25_3B, "model.visual.merger", "output", False, 2048),
        (QWEN25_7B, "model.visual.merger", "output", False, 3584),
        (QWEN2_VL_7B, "model.visual", "output", False, 1280),  # Qwen2-VL: embed_dim is the ViT
        (QWEN2_VL_7B, "model.visual.merger", "output", False, 3584),  # ... hidden_size the merger
        (QWEN3_4B, "model.visual.deepstack_merger_list", "output", True, 2560),
        (QWEN3_4B, "model.visual.deepstack_merger_list.2", "output", False, 2560),
        (QWEN3_4B, "model.visual.blocks.23", "output", False, 1024),
        (QWEN25_3B, "model.language_model.layers.35", "output", False, 2048),
        (QWEN25_3B, "model.language_model.layers.1", "input", False, 2048),
        (QWEN25_3B, "model.language_model", "output", False, 2048),
        (QWEN25_3B, "lm_head", "input", False, 2048),
        (QWEN25_7B, "lm_head", "output", False, 152064),
        (QWEN2_TEXT, "model.layers.3", "output", False, 896),
        (QWEN2_TEXT, "model.embed_tokens", "output", False, 896),
        # not known up front: left to the trainer, never guessed
        (QWEN25_3B, "model.visual", "input", False, None),
        (QWEN25_3B, "model.visual.merger.mlp.0", "output", False, None),
        (QWEN25_3B, "model.visual", "output", True, None),
        (
            model_shape({"model_type": "internvl_chat", "hidden_size": 8}),
            "model.visual",
            "output",
            False,
            None,
        ),
    ],
)
def test_widths_of_known_module_paths(shape, path, io, children, width):
    found = tap_width(shape, path, io, children)
    assert found.problem is None
    assert found.width == width


@pytest.mark.parametrize(
    ("shape", "path", "children", "says"),
    [
        (QWEN25_3B, "model.language_model.layers.36", False, "36 decoder layers"),
        (QWEN25_3B, "model.language_model.layers.-1", False, "count from 0 (the model's last is 35)"),
        (QWEN25_3B, "model.visual.deepstack_merger_list", True, "no deepstack mergers"),
        (QWEN3_4B, "model.visual.deepstack_merger_list.3", False, "3 deepstack mergers"),
        (QWEN3_4B, "model.visual.blocks.24", False, "24 vision blocks"),
        (QWEN25_3B, "model.layers.3", False, "model.language_model.layers"),
        (QWEN2_TEXT, "model.visual.merger", False, "text-only"),
        (QWEN2_TEXT, "model.layers.24", False, "24 decoder layers"),
    ],
)
def test_modules_a_model_cannot_have_are_problems(shape, path, children, says):
    found = tap_width(shape, path, "output", children)
    assert found.width is None
    assert found.problem is not None and says in found.problem


def test_a_local_folder_and_a_missing_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    found = locate_model("ckpt")
    assert (found.kind, found.folder) == ("local", tmp_path / "ckpt")
    missing = locate_model("./nope/model")
    assert (missing.kind, missing.looked_at) == ("missing", tmp_path / "nope" / "model")


def test_a_hub_id_is_found_in_the_hugging_face_cache_or_downloaded_unless_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MODELSCOPE_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    model = tmp_path / "files"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cache = hub_cache(tmp_path / "hub", {"Org/Model-1.5B": model})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    cached = locate_model("Org/Model-1.5B", hub="huggingface")
    assert cached.kind == "cached" and (cached.folder / "config.json").is_file()
    assert locate_model("Org/Other", hub="huggingface").kind == "remote"
    assert locate_model("Org/Model-1.5B", hub="modelscope").kind == "remote"  # another hub's cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert locate_model("Org/Other", hub="huggingface").kind == "missing"
    assert locate_model("Org/Model-1.5B", hub="huggingface").kind == "cached"


@pytest.mark.parametrize(
    "layout", ["models/Org/Model-1___5B", "models/Org--Model-1.5B/snapshots/abc", "Org/Model-1.5B"]
)
def test_a_hub_id_is_found_in_the_modelscope_cache_layouts(tmp_path, monkeypatch, layout):
    folder = tmp_path / "ms" / layout
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    monkeypatch.chdir(tmp_path)
    found = locate_model("Org/Model-1.5B", hub="modelscope")
    assert (found.kind, found.folder) == ("cached", folder)


def test_config_and_tokenizer_files(tmp_path):
    with pytest.raises(ModelFileError, match=r"no config\.json"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelFileError, match="not a JSON object"):
        read_config(tmp_path)
    vocab = {f"t{i}": i for i in range(100)}
    added = [{"id": 99, "content": "t99"}, {"id": 100, "content": "<a>"}, {"id": 105, "content": "<b>"}]
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}, "added_tokens": added}))
    assert tokenizer_size(tmp_path) == 102  # ids 0..99, 100 and 105: len(tokenizer) counts tokens, not max id
    other = Path(tmp_path / "slow")
    other.mkdir()
    (other / "vocab.json").write_text(json.dumps(vocab))
    (other / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"100": {}, "101": {}}}))
    assert tokenizer_size(other) == 102
