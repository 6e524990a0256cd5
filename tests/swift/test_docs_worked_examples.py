"""The docs' worked examples run as written, on the tiny models.

The models the docs name (Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct) resolve, offline, from
a local Hugging Face cache: to tiny Qwen2.5-VL models with weights for the run, to stand-ins with
the published config.json shapes for the checks that only read files (tests/model_standins.py).
The YAML and the commands are read from the Markdown itself, so a doc edit that breaks an
example breaks this test.

* docs/teacher_cache.md, "Worked example": `kdcompose teacher-cache train.yaml --out ...`, then
  `kdcompose train train.yaml` with the `rlhf.teacher_cache` lines added -- one cache build and
  one 2-step training run (`--set` keeps it short and saves a checkpoint), checking what `train`
  prints at the end: the run folder, its logging.jsonl and the checkpoint.
* every YAML example of the docs that names a model passes the model preflight against the
  stand-ins of the published checkpoints (widths, vocabularies, model types, templates).
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import forked_cli
import pytest
import yaml
from model_standins import hub_cache, hub_env, standin_hub
from swift_support import subprocess_env
from test_docs_yaml import BLOCKS, _registered_from

from kdcompose.testing import build_caption_dataset, build_tiny_pair

pytestmark = pytest.mark.swift

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "teacher_cache.md"
SHORT = [
    "--set",
    "training.max_steps=2",
    "--set",
    "training.save_steps=2",
    "--set",
    "training.logging_steps=1",
]
"""Only to keep the run short: two steps, each logged, and a checkpoint at the second."""
QUICK = ["--set", "training.gradient_accumulation_steps=1", "--set", "training.check_model=false"]
"""ms-swift's defaults would group 16 samples per step (the 8-sample set has 7 for training) and ask
the ModelScope hub whether the model is the latest (~7 s of retries without network)."""


def worked_example(doc: Path) -> dict[str, Any]:
    """The worked example's pieces, as the reader sees them."""
    text = doc.read_text(encoding="utf-8")
    section = text.split("## Worked example", 1)[1].split("\n## ", 1)[0]
    yamls = re.findall(r"```yaml\n(.*?)\n\s*```", section, flags=re.S)
    bashes = re.findall(r"```bash\n(.*?)\n\s*```", section, flags=re.S)
    config = next(y for y in yamls if y.startswith("# train.yaml"))
    addition = next(y for y in yamls if "teacher_cache:" in y)
    build = next(
        line.strip()
        for b in bashes
        for line in b.splitlines()
        if line.strip().startswith("kdcompose teacher-cache")
    )
    train = next(
        line.strip() for b in bashes for line in b.splitlines() if line.strip().startswith("kdcompose train")
    )
    return {"config": config, "addition": _dedent(addition), "build": build, "train": train}


def _dedent(text: str) -> str:
    lines = text.splitlines()
    indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
    return "\n".join(line[indent:] for line in lines)


def merged(base: dict[str, Any], addition: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in addition.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def command(line: str) -> list[str]:
    words = shlex.split(line.split("#", 1)[0])
    assert words[0] == "kdcompose"
    return [sys.executable, "-m", "kdcompose.cli", *words[1:]]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("worked")
    teacher, student = build_tiny_pair("qwen2_5_vl")
    cache = hub_cache(
        root / "hub",
        {"Qwen/Qwen2.5-VL-7B-Instruct": teacher, "Qwen/Qwen2.5-VL-3B-Instruct": student},
        link=True,
    )
    work = root / "work"
    (work / "data").mkdir(parents=True)
    shutil.copyfile(build_caption_dataset(n=8, seed=0, image=True), work / "data" / "train.jsonl")
    return work, {**subprocess_env(root), **hub_env(cache)}


def run(args: list[str], cwd: Path, env: dict[str, str]):
    """`python -m kdcompose.cli ...` forked from a server started with this hub environment
    (`tests/support/forked_cli.py`), with what it starts (the cache's worker processes)."""
    import subprocess

    assert args[0] == sys.executable, args
    python, env = forked_cli.python(env)
    return subprocess.run([python, *args[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_teacher_cache_worked_example_runs_as_written(workspace):
    work, env = workspace
    example = worked_example(DOC)
    (work / "train.yaml").write_text(example["config"] + "\n")

    built = run(command(example["build"]), work, env)
    assert built.returncode == 0, built.stderr[-4000:]
    out_dir = shlex.split(example["build"])[shlex.split(example["build"]).index("--out") + 1]
    manifest = json.loads((work / out_dir / "manifest.json").read_text())
    assert manifest["topk"] == 64

    config = merged(yaml.safe_load(example["config"]), yaml.safe_load(example["addition"]))
    (work / "train.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    trained = run(command(example["train"]) + SHORT + QUICK, work, env)
    assert trained.returncode == 0, trained.stderr[-4000:]
    assert "Traceback" not in trained.stderr
    printed = dict(
        line.removeprefix("kdcompose: ").split(":", 1)
        for line in trained.stdout.splitlines()
        if line.startswith("kdcompose: ")
        and line.split(":")[1].strip() in ("run folder", "logging", "checkpoint")
    )
    folder, log, checkpoint = (Path(printed[k].strip()) for k in ("run folder", "logging", "checkpoint"))
    assert folder.parent == work / "output" / "Qwen2.5-VL-3B-Instruct"  # ms-swift's default output_dir
    assert log == folder / "logging.jsonl" and log.is_file()
    assert checkpoint == folder / "checkpoint-2" and checkpoint.is_dir()
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [row for row in rows if "loss" in row and "global_step/max_steps" in row]
    assert [row["global_step/max_steps"] for row in steps] == ["1/2", "2/2"]
    assert all(row["llm_kd_loss"] > 0 for row in steps), "the loss came from the cached teacher"


@pytest.fixture(scope="module")
def standins(tmp_path_factory, monkeypatch_module) -> None:
    from huggingface_hub import constants

    cache = standin_hub(tmp_path_factory.mktemp("standin-hub"))
    for key, value in hub_env(cache).items():
        monkeypatch_module.setenv(key, value)
    monkeypatch_module.setattr(constants, "HF_HUB_CACHE", str(cache))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


NAMED = [
    b
    for b in BLOCKS
    if "invalid" not in b.markers
    and "swift-flat" not in b.markers
    and re.search(r"^\s*(teacher_)?model:", b.body, re.M)
]


@pytest.mark.parametrize("index", range(len(NAMED)), ids=[b.id for b in NAMED])
def test_docs_examples_fit_the_models_they_name(standins, index):
    from kdcompose import parse_config_text
    from kdcompose.integrations.swift.launch.model_preflight import inspect_models

    block = NAMED[index]
    with _registered_from(block):
        report = inspect_models(parse_config_text(block.body, source=str(block.doc)))
    assert report.issues == [], block.id
    assert report.notes == [], f"{block.id}: every model it names should be found (offline) and checked"


def test_the_examples_that_name_models_are_checked():
    assert len(NAMED) >= 10
    assert any("Qwen2.5-VL-3B-Instruct" in b.body and "visual_kd" in b.body for b in NAMED)
