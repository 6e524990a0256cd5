"""Tests for kdcompose.testing: Qwen-layout tokenizer, tiny models, synthetic data, stock ms-swift GKD."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import forked_cli
import pytest

import kdcompose.testing as kt
from kdcompose.compat import ensure_torchvision_importable
from kdcompose.testing import tokenizer as ktok
from kdcompose.testing._cache import MANIFEST, read_manifest

pytestmark = pytest.mark.swift

SRC = Path(kt.__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return kt.build_tokenizer()


def test_tokenizer_layout_matches_qwen(tokenizer) -> None:
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655 == kt.IMAGE_TOKEN_ID
    assert tokenizer.convert_tokens_to_ids("<|video_pad|>") == 151656 == kt.VIDEO_TOKEN_ID
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == 151643
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 151644
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645
    assert tokenizer.convert_tokens_to_ids("<|vision_start|>") == 151652
    assert tokenizer.convert_tokens_to_ids("</think>") == 151668
    assert [tokenizer.convert_tokens_to_ids(t) for t, _ in ktok.QWEN_ADDED_TOKENS] == list(
        range(151643, 151669)
    )
    assert len(tokenizer) == 151669 and kt.VOCAB_SIZE == 151936
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == 151643


def test_tokenizer_encodes_chat_compactly_and_round_trips(tokenizer) -> None:
    text = (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>"
        "Describe the image.<|im_end|>\n"
        "<|im_start|>assistant\na large red square in the center on a white background.<|im_end|>"
    )
    ids = tokenizer(text)["input_ids"]
    assert ids.count(151655) == 2 and ids[0] == 151644 and ids[-1] == 151645
    assert len(ids) < 40  # captions are a handful of BPE tokens, not bytes
    assert max(i for i in ids if i < ktok.FIRST_SPECIAL_ID) < 1000  # never a filler token
    assert tokenizer.decode(ids) == text
    assert "<|im_start|>" not in tokenizer.decode(ids, skip_special_tokens=True)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered.startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi"
    )


def test_tokenizer_is_deterministic_and_matches_qwen_pretokenizer() -> None:
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    assert ktok._PRETOKENIZE_REGEX == PRETOKENIZE_REGEX
    first = ktok.bpe_vocab_and_merges.__wrapped__()
    second = ktok.bpe_vocab_and_merges.__wrapped__()
    assert first == second


# --------------------------------------------------------------------------------------------- datasets


def test_caption_dataset_is_deterministic_cached_and_well_formed(tmp_path: Path) -> None:
    from PIL import Image

    a = kt.build_caption_dataset(tmp_path / "a", n=12, seed=3)
    b = kt.build_caption_dataset(tmp_path / "b", n=12, seed=3)
    rows_a, rows_b = kt.load_rows(a), kt.load_rows(b)
    assert len(rows_a) == 12
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra["messages"] == rb["messages"]
        assert Path(ra["images"][0]).read_bytes() == Path(rb["images"][0]).read_bytes()
    row = rows_a[0]
    assert row["messages"][0] == {"role": "user", "content": "<image>Describe the image."}
    assert row["messages"][1]["role"] == "assistant" and row["messages"][1]["content"].startswith("a ")
    for r in rows_a:
        path = Path(r["images"][0])
        assert path.is_absolute() and path.parent == a.parent
        with Image.open(path) as img:
            assert 56 <= img.width <= 112 and 56 <= img.height <= 112 and img.mode == "RGB"

    mtime = a.stat().st_mtime_ns
    assert kt.build_caption_dataset(tmp_path / "a", n=12, seed=3) == a
    assert a.stat().st_mtime_ns == mtime  # reused, not rewritten
    assert kt.load_rows(kt.build_caption_dataset(tmp_path / "c", n=12, seed=4)) != rows_a

    text = kt.load_rows(kt.build_caption_dataset(tmp_path / "t", n=6, image=False))
    assert all("images" not in r and "<image>" not in r["messages"][0]["content"] for r in text)


def test_build_refuses_to_clobber_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        kt.build_caption_dataset(tmp_path, n=2)
    assert (tmp_path / "mine.txt").read_text() == "user data"


def test_concurrent_builders_agree(tmp_path: Path) -> None:
    """Several processes racing to build the same artefact all get one complete copy, no debris."""
    target = tmp_path / "ds"
    code = (
        "from kdcompose.testing.datasets import build_caption_dataset as b; "
        f"print(b({str(target)!r}, n=16, seed=5))"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    python, env = forked_cli.python(env)  # processes of their own, forked: tests/support/forked_cli.py
    procs = [
        subprocess.Popen([python, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert {o[0].decode().strip() for o in outs} == {str(target / "data.jsonl")}
    assert len(kt.load_rows(target / "data.jsonl")) == 16
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


# --------------------------------------------------------------------------------------------- models


def test_model_build_is_cached_deterministic_and_keyed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(kt.CACHE_ENV, str(tmp_path / "cache"))
    t0 = time.perf_counter()
    path = kt.build_tiny_model("qwen2_vl", "student")
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = kt.build_tiny_model("qwen2_vl", "student")
    second = time.perf_counter() - t0
    assert again == path and path.parent == tmp_path / "cache" / "models"
    assert second < 0.5 and second < first
    assert read_manifest(path)["spec"]["hidden_size"] == 64 == kt.model_spec(path)["hidden_size"]
    expected = {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", MANIFEST}
    assert expected <= {p.name for p in path.iterdir()}
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left behind

    # Same spec elsewhere -> identical weights; another seed -> another cache entry.
    elsewhere = kt.build_tiny_model("qwen2_vl", "student", tmp_path / "explicit")
    assert elsewhere == tmp_path / "explicit"
    assert (elsewhere / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()
    assert kt.build_tiny_model("qwen2_vl", "student", seed=1) != path


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="unknown tiny family"):
        kt.tiny_spec("llama", "student")
    with pytest.raises(ValueError, match="unknown role"):
        kt.tiny_spec("qwen2_vl", "assistant")
    with pytest.raises(TypeError, match="unknown tiny model option"):
        kt.tiny_spec("qwen2_vl", "student", hidden=3)
    assert kt.tiny_spec("qwen2_vl", "teacher", vision_width=48).vision_width == 48


@pytest.mark.parametrize("family", kt.VL_FAMILIES)
def test_vl_models_expose_feature_modules_with_expected_widths(family: str) -> None:
    """The module paths visual-KD relies on exist, and vision widths follow the spec."""
    ensure_torchvision_importable()
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from kdcompose.testing.datasets import render_shape, sample_shapes

    teacher_dir, student_dir = kt.build_tiny_pair(family, teacher={"vision_width": 48})
    image = render_shape(sample_shapes(1, seed=0)[0])
    widths = {}
    for role, model_dir in (("teacher", teacher_dir), ("student", student_dir)):
        model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
        processor = AutoProcessor.from_pretrained(model_dir)
        spec = kt.model_spec(model_dir)
        modules = dict(model.named_modules())
        assert kt.VISION_MODULES["vit"] in modules and kt.VISION_MODULES["aligner"] in modules
        if family == "qwen3_vl":
            assert f"{kt.VISION_MODULES['deepstack']}.0" in modules
        else:
            assert kt.VISION_MODULES["deepstack"] not in modules
        assert model.get_output_embeddings().weight.shape == (kt.VOCAB_SIZE, spec["hidden_size"])
        inputs = processor.image_processor(images=[image], return_tensors="pt")
        with torch.no_grad():
            out = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        n_merged = int(inputs["image_grid_thw"].prod()) // 4
        assert 4 <= n_merged <= 16
        assert out.last_hidden_state.shape[-1] == spec["vision_width"]
        assert out.pooler_output.shape == (n_merged, spec["hidden_size"])
        widths[role] = spec["vision_width"]
    assert widths == {"teacher": 48, "student": 32}


def test_default_pair_shares_vision_shape_but_not_weights() -> None:
    import safetensors.torch

    teacher_dir, student_dir = kt.build_tiny_pair("qwen2_vl")
    t = safetensors.torch.load_file(teacher_dir / "model.safetensors")
    s = safetensors.torch.load_file(student_dir / "model.safetensors")
    (key,) = [k for k in t if k.endswith("visual.blocks.0.attn.qkv.weight")]  # saved names may drop "model."
    assert t[key].shape == s[key].shape
    assert not (t[key] == s[key]).all()


def test_gkd_args_and_cli_flags(tmp_path: Path) -> None:
    args = kt.tiny_gkd_args("qwen2_vl", tmp_path, max_steps=2, lmbda=1.0)
    assert args["max_steps"] == 2 and args["lmbda"] == 1.0 and args["rlhf_type"] == "gkd"
    assert args["model_type"] == args["teacher_model_type"] == args["template"] == "qwen2_vl"
    assert Path(args["model"]).is_dir() and Path(args["teacher_model"]).is_dir()
    assert Path(args["dataset"][0]).is_file() and args["check_model"] is False
    flags = kt.to_cli_args({"a": True, "b": [1, 2], "c": {"x": 1}, "d": 0.5})
    assert flags == ["--a", "true", "--b", "1", "2", "--c", '{"x": 1}', "--d", "0.5"]


# --------------------------------------------------------------------------------------------- ms-swift


STOCK_RUNS = {"qwen2_vl": {"max_steps": 3}, "qwen2": {"max_steps": 2}}


@pytest.fixture(scope="module")
def stock_runs(tmp_path_factory) -> dict[str, list[dict]]:
    """Stock ms-swift GKD on each tiny family: one fresh interpreter (importing ms-swift patches TRL
    process-wide, so not this one) imports ms-swift once and runs each family in a child forked
    from it, one after the other; the logged rows per family."""
    tmp = tmp_path_factory.mktemp("stock")
    runs = [[family, str(tmp / family), overrides] for family, overrides in STOCK_RUNS.items()]
    code = textwrap.dedent(
        """
        import json, os, sys, traceback
        from kdcompose.compat import ensure_torchvision_importable
        ensure_torchvision_importable()
        from kdcompose.testing import tiny_gkd_args, tiny_run_env
        os.environ.update(tiny_run_env())
        from swift import RLHFArguments, rlhf_main
        for family, out, overrides in json.loads(sys.argv[1]):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    rlhf_main(RLHFArguments(**tiny_gkd_args(family, out, **overrides)))
                    code = 0
                except BaseException:
                    traceback.print_exc()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
            if os.waitpid(pid, 0)[1] != 0:
                sys.exit(f"stock ms-swift GKD failed on {family}")
        """
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(kt.tiny_run_env())
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(runs)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = {}
    for family, out, _ in runs:
        logs = list(Path(out).glob("v*/logging.jsonl"))
        assert len(logs) == 1, logs
        rows[family] = [json.loads(line) for line in logs[0].read_text().splitlines() if line.strip()]
    return rows


def test_stock_swift_gkd_runs_on_tiny_qwen2_vl(stock_runs) -> None:
    rows = stock_runs["qwen2_vl"]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3
    assert all(math.isfinite(x) and x > 0 for x in losses)
    assert rows[-1].get("model_parameter_info", "").startswith("Qwen2VLForConditionalGeneration")


def test_stock_swift_gkd_runs_on_tiny_text_model(stock_runs) -> None:
    rows = stock_runs["qwen2"]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
