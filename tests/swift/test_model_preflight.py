"""The model preflight (integrations/swift/model_preflight.py) on real checkpoint folders.

The tiny Qwen2-VL pair of `kdcompose.testing` (real files ms-swift trains) and weightless
stand-ins with the published config.json shapes of Qwen2.5-VL-3B/7B (tests/model_standins.py)
are checked against ms-swift 4.6's real registry; every failure the issue lists must come out
as one issue at the right dotted key, and good configs must come out clean. The CLI side (exit
2, no traceback, the time it takes) is in test_validate_models_cli.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from model_standins import REAL_CONFIGS, tiny_files_source, write_standin

from kdcompose import parse_config
from kdcompose.integrations.swift.launch.model_preflight import inspect_models, swift_model_name
from kdcompose.testing import build_tiny_pair

pytestmark = pytest.mark.swift


@pytest.fixture(scope="module")
def tiny() -> dict[str, str]:
    teacher, student = build_tiny_pair("qwen2_vl")
    return {"teacher": str(teacher), "student": str(student)}


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> dict[str, str]:
    """Local stand-in folders of the 3B and 7B checkpoints, and a 7B-shaped teacher whose
    vocabulary (32000 rows) cannot be padding of the student's."""
    root = tmp_path_factory.mktemp("standins")
    source = tiny_files_source()
    small_vocab = {**REAL_CONFIGS["Qwen/Qwen2.5-VL-7B-Instruct"], "vocab_size": 32000}
    return {
        "3b": str(
            write_standin(
                root / "Qwen2.5-VL-3B-Instruct", REAL_CONFIGS["Qwen/Qwen2.5-VL-3B-Instruct"], source
            )
        ),
        "7b": str(
            write_standin(
                root / "Qwen2.5-VL-7B-Instruct", REAL_CONFIGS["Qwen/Qwen2.5-VL-7B-Instruct"], source
            )
        ),
        "small_vocab": str(write_standin(root / "small-vocab-teacher", small_vocab, source)),
    }


def config(
    student: str,
    teacher: str | None,
    *,
    model: dict[str, Any] | None = None,
    rlhf: dict[str, Any] | None = None,
    template: str | None = "qwen2_vl",
) -> Any:
    data: dict[str, Any] = {
        "model": {"model": student, "model_type": "qwen2_vl", **(model or {})},
        "rlhf": {"rlhf_type": "gkd", **(rlhf or {})},
    }
    if teacher is not None:
        data["rlhf"].setdefault("teacher_model", teacher)
        data["rlhf"].setdefault("teacher_model_type", "qwen2_vl")
    if template is not None:
        data["template"] = {"template": template}
    data["model"] = {k: v for k, v in data["model"].items() if v is not None}
    data["rlhf"] = {k: v for k, v in data["rlhf"].items() if v is not None}
    return parse_config(data)


def issues_of(cfg: Any) -> dict[str, str]:
    found = inspect_models(cfg).issues
    by_path = {issue.path: issue.message for issue in found}
    assert len(by_path) == len(found), f"two issues at one key: {found}"
    return by_path


ALIGNER = {"loss_terms": {"visual_kd": {"aligner": {"distance": "mse"}}}}


def test_a_good_tiny_config_is_clean(tiny):
    assert issues_of(config(tiny["student"], tiny["teacher"])) == {}
    projected = {"loss_terms": {"visual_kd": {"aligner": {"projector": "linear"}, "vit": {}}}}
    assert issues_of(config(tiny["student"], tiny["teacher"], rlhf=projected)) == {}


def test_the_failures_of_the_issue_are_each_named_at_their_key(tiny):
    bad = config(
        tiny["student"],
        tiny["teacher"],
        model={"model_type": "qwen2-vl"},
        rlhf={"teacher_model_type": "qwen2_5_vl", **ALIGNER},
        template="qwen2-vl",
    )
    found = issues_of(bad)
    assert set(found) == {
        "model.model_type",
        "rlhf.teacher_model_type",
        "template.template",
        "rlhf.loss_terms.visual_kd.aligner",
    }
    assert "did you mean 'qwen2_vl'" in found["model.model_type"]
    assert "Qwen2_5_VLForConditionalGeneration" in found["rlhf.teacher_model_type"]
    assert "says Qwen2VLForConditionalGeneration" in found["rlhf.teacher_model_type"]
    assert "did you mean 'qwen2_vl'" in found["template.template"]
    aligner = found["rlhf.loss_terms.visual_kd.aligner"]
    assert "64 wide" in aligner and "96 wide" in aligner
    assert "rlhf.loss_terms.visual_kd.aligner.projector: linear" in aligner


def test_a_path_that_does_not_exist_is_named_absolutely(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    found = issues_of(config(tiny["student"], "./models/teacher-7b"))
    assert set(found) == {"rlhf.teacher_model"}
    assert f"{tmp_path / 'models' / 'teacher-7b'} does not exist" in found["rlhf.teacher_model"]
    # `models/teacher-7b` could also be a hub id: offline that is an error naming both readings
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    found = issues_of(config(tiny["student"], "models/teacher-7b"))
    assert (
        f"neither a local folder ({tmp_path / 'models' / 'teacher-7b'} does not exist)"
        in found["rlhf.teacher_model"]
    )


def test_ambiguous_model_type_and_template_list_the_choices(tiny):
    no_type = config(tiny["student"], None, model={"model_type": None}, template="qwen2_vl")
    assert "fits qwen2_vl, qwen2_gme" in issues_of(no_type)["model.model_type"]
    no_template = config(tiny["student"], None, template=None)
    message = issues_of(no_template)["template.template"]
    assert "qwen2_vl, qvq" in message and "`template: qwen2_vl`" in message


def test_a_folder_named_like_a_hub_model_is_typed_by_its_name_as_ms_swift_does(standins):
    three_b = standins["3b"]
    assert swift_model_name(three_b) == "Qwen2.5-VL-3B-Instruct"
    cfg = config(three_b, None, model={"model_type": None}, template=None)
    assert issues_of(cfg) == {}  # ms-swift matches the name: qwen2_5_vl, template qwen2_5_vl


def test_widths_come_from_the_real_shapes(standins):
    kwargs = {"model": {"model_type": "qwen2_5_vl"}, "template": "qwen2_5_vl"}
    rlhf = {"teacher_model_type": "qwen2_5_vl", "loss_terms": {"visual_kd": {"vit": {}, "aligner": {}}}}
    found = issues_of(config(standins["3b"], standins["7b"], rlhf=rlhf, **kwargs))
    assert set(found) == {"rlhf.loss_terms.visual_kd.aligner"}  # the ViTs are both 1280 wide
    assert "2048 wide" in found["rlhf.loss_terms.visual_kd.aligner"]
    assert "3584 wide" in found["rlhf.loss_terms.visual_kd.aligner"]
    rlhf["loss_terms"]["visual_kd"]["aligner"] = {"projector": "linear"}
    rlhf["loss_terms"]["hidden_kd"] = {
        "pairs": [
            {
                "student": "model.language_model.layers.35",
                "teacher": "model.language_model.layers.27",
                "projector": "linear",
            },
            {"student": "model.language_model.layers.36", "teacher": "model.language_model.layers.27"},
        ]
    }
    found = issues_of(config(standins["3b"], standins["7b"], rlhf=rlhf, **kwargs))
    assert set(found) == {"rlhf.loss_terms.hidden_kd.pairs.1.student"}
    assert "36 decoder layers" in found["rlhf.loss_terms.hidden_kd.pairs.1.student"]


def test_vocabularies_are_compared_when_a_term_reads_both_heads(standins):
    kwargs = {"model": {"model_type": "qwen2_5_vl"}, "template": "qwen2_5_vl"}
    padded = config(standins["3b"], standins["7b"], rlhf={"teacher_model_type": "qwen2_5_vl"}, **kwargs)
    assert issues_of(padded) == {}  # 151936 vs 152064 rows: padding of one 151669-token tokenizer
    rlhf = {"teacher_model_type": "qwen2_5_vl"}
    found = issues_of(config(standins["3b"], standins["small_vocab"], rlhf=rlhf, **kwargs))
    assert set(found) == {"rlhf.teacher_model"}
    assert "151936" in found["rlhf.teacher_model"] and "32000" in found["rlhf.teacher_model"]
    no_logits = {**rlhf, "llm_kd_weight": 0, "sft_alpha": 1.0}
    assert issues_of(config(standins["3b"], standins["small_vocab"], rlhf=no_logits, **kwargs)) == {}


def test_missing_tokenizer_and_processor_files(tiny, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(
        tiny["student"], broken, ignore=shutil.ignore_patterns("*.safetensors", "tokenizer*", "processor*")
    )
    found = inspect_models(config(str(broken), tiny["teacher"])).issues
    assert [issue.path for issue in found] == ["model.model", "model.model"]
    assert "no tokenizer files" in found[0].message and "no image processor file" in found[1].message
    (broken / "config.json").unlink()
    assert "no config.json" in issues_of(config(str(broken), tiny["teacher"]))["model.model"]


def test_a_cached_default_teacher_is_not_read(tiny, tmp_path):
    cfg = config(
        tiny["student"],
        str(tmp_path / "no-such-teacher"),
        rlhf={"teacher_cache": str(tmp_path / "cache"), "loss_terms": {"lm_jsd": {"topk": 8}}},
    )
    assert issues_of(cfg) == {}


def test_a_hub_id_offline_is_an_error_online_a_note(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("USE_HF", raising=False)
    cfg = config(tiny["student"], "Qwen/Qwen2.5-VL-7B-Instruct", rlhf={"teacher_model_type": "qwen2_5_vl"})
    monkeypatch.setenv("MODELSCOPE_OFFLINE", "1")
    found = issues_of(cfg)
    assert set(found) == {"rlhf.teacher_model"} and "offline mode is on" in found["rlhf.teacher_model"]
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MODELSCOPE_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    report = inspect_models(cfg)
    assert report.issues == []
    (note,) = report.notes
    assert note.startswith("rlhf.teacher_model: Qwen/Qwen2.5-VL-7B-Instruct is not in the ModelScope cache")
    assert "nor a local folder" in note and "will download" in note


def test_the_registry_cache_round_trips(tmp_path, monkeypatch):
    """A fresh cache folder: the first read imports ms-swift and writes the table; the second
    reads it back equal."""
    from kdcompose.integrations.swift.launch import model_registry

    monkeypatch.setenv("KDCOMPOSE_CACHE", str(tmp_path))
    model_registry.swift_registry.cache_clear()
    try:
        first = model_registry.swift_registry()
        files = list((tmp_path / model_registry.FOLDER).glob("*.json"))
        assert len(files) == 1 and json.loads(files[0].read_text())["model_types"]["qwen2_vl"]
        model_registry.swift_registry.cache_clear()
        assert model_registry.swift_registry() == first
        assert "qwen2_5_vl" in first.model_types and "qvq" in first.templates
    finally:
        model_registry.swift_registry.cache_clear()


def test_the_tiny_models_match_what_the_registry_says(tiny):
    from kdcompose.integrations.swift.launch.model_registry import swift_registry

    registry = swift_registry()
    arch = json.loads((Path(tiny["student"]) / "config.json").read_text())["architectures"][0]
    assert registry.types_for_architecture(arch) == ["qwen2_vl", "qwen2_gme"]
