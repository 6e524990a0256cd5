"""The teacher cache against real ms-swift on the tiny Qwen2-VL pair.

The oracle is the live teacher: for real training micro-batches (ms-swift's dataloader and the
GKD trainer's `_prepare_inputs`, exactly what `compute_loss` receives), `cache.batch_topk`
must equal the top-K of the teacher's own logits on that batch. That can only hold if the
builder encoded every sample exactly as training does (template, images, labels) and the keys
found the rows whatever the batch composition.

The same build also serves the integrity checks: a copy of it with a shard cut short, one with
flipped bytes, one deleted and another cache's shard added must be refused by `kdcompose
validate` and by `kdcompose train` before any model loads, and a re-run of the builder must
recompute exactly the damaged shards' samples (counted at the teacher's forward).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from swift_support import (
    ForwardCounter,
    kdcompose_command,
    run_command,
    sections,
    shared_trainer,
    write_config,
)

from kdcompose.functional import teacher_topk
from kdcompose.teachers.cache import TeacherCache, summarize_records, write_manifest
from kdcompose.teachers.cache_keys import sample_keys, unpadded_positions

pytestmark = [
    pytest.mark.swift,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning"),
]

K = 8
PER_SHARD = 8
N_SAMPLES = 32  # tiny_gkd_args' dataset


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A float32 cache built by the CLI, as a user runs it (K from the config's gkd_logits_topk)."""
    tmp = tmp_path_factory.mktemp("teacher-cache")
    config = write_config(tmp / "cfg.yaml", sections(tmp / "run", rlhf={"gkd_logits_topk": K}))
    out = tmp / "cache32"
    result = run_command(
        kdcompose_command(
            "teacher-cache",
            str(config),
            "--out",
            str(out),
            "--dtype",
            "float32",
            "--samples-per-shard",
            str(PER_SHARD),
        ),
        tmp,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return {"config": config, "out": out, "stdout": result.stdout, "tmp": tmp}


@pytest.fixture(scope="module")
def pipeline(built: dict[str, Any]) -> Any:
    """The config's teacher, template and data loaded once for every in-process build below."""
    from kdcompose.teachers.cache_build import open_pipeline

    return open_pipeline(built["config"])


def test_cli_builds_a_cache_with_its_manifest(built: dict[str, Any]) -> None:
    from kdcompose.teachers.cache_integrity import file_checksum, read_stamps

    manifest = json.loads((built["out"] / "manifest.json").read_text())
    assert manifest["format"] == "kdcompose-teacher-cache/2" and manifest["complete"] is True
    assert manifest["topk"] == K and manifest["dtype"] == "float32" and manifest["vocab_size"] == 151936
    assert manifest["num_samples"] == N_SAMPLES and manifest["splits"]["train"]["samples"] == N_SAMPLES
    assert manifest["config"] == str(built["config"].resolve())
    assert manifest["template"]["name"] == "qwen2_vl"
    for part in ("teacher", "tokenizer", "template"):
        assert len(manifest[part]["fingerprint"]) == 32
    assert len(manifest["shards"]) == N_SAMPLES // PER_SHARD
    assert manifest["bytes"] == sum(p.stat().st_size for p in built["out"].glob("shard-*.safetensors"))
    stamps = read_stamps(built["out"])  # the builder marked what it wrote as verified
    for name, record in manifest["shards"].items():
        assert record["xxh3_128"] == file_checksum(built["out"] / name) == stamps[name][-1]
        assert record["samples"] == PER_SHARD
    cache = TeacherCache.open(built["out"])
    assert len(cache) == N_SAMPLES and cache.positions() == manifest["num_positions"] > N_SAMPLES
    assert f"{N_SAMPLES} samples" in built["stdout"]


def _damage(out: Path, foreign: Path) -> dict[str, str]:
    """Cut shard 0 short, flip a byte in shard 1's data (modification time put back), delete
    shard 2 and copy in a shard of another cache; returns what each one became."""
    from kdcompose.teachers.cache_integrity import read_header

    shards = sorted(out.glob("shard-*.safetensors"))
    with shards[0].open("r+b") as f:
        f.truncate(shards[0].stat().st_size // 2)
    stat = shards[1].stat()
    at = (read_header(shards[1]).data_start + stat.st_size) // 2
    raw = bytearray(shards[1].read_bytes())
    raw[at] ^= 0x04
    shards[1].write_bytes(bytes(raw))
    os.utime(shards[1], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    shards[2].unlink()
    shutil.copy(next(foreign.glob("shard-*.safetensors")), out / "shard-r7-00000.safetensors")
    return {
        shards[0].name: "damaged",
        shards[1].name: "damaged",
        shards[2].name: "missing",
        "shard-r7-00000.safetensors": "foreign",
    }


@pytest.fixture(scope="module")
def cache16(built: dict[str, Any], pipeline: Any) -> Path:
    """A float16 build of the same config (another cache: its shards are foreign to the float32 one)."""
    from kdcompose.teachers.cache_build import build_cache

    out = built["tmp"] / "cache16"
    build_cache(built["config"], out, dtype="float16", progress=False, pipeline=pipeline)
    return out


@pytest.fixture(scope="module")
def damaged(built: dict[str, Any], cache16: Path) -> dict[str, Any]:
    out = built["tmp"] / "damaged"
    shutil.copytree(built["out"], out)
    return {"out": out, "kinds": _damage(out, cache16)}


def test_validate_and_train_refuse_a_damaged_cache_before_any_model_loads(
    built: dict[str, Any],
    damaged: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from transformers import PreTrainedModel

    from kdcompose.cli import main

    loaded: list[str] = []

    def no_model(cls: Any, *args: Any, **kwargs: Any) -> Any:
        loaded.append(cls.__name__)
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(no_model))
    rlhf = {"gkd_logits_topk": K, "teacher_cache": str(damaged["out"])}
    config = write_config(
        built["tmp"] / "damaged.yaml",
        sections(built["tmp"] / "damaged-run", rlhf=rlhf, teacher_model="/nonexistent/teacher", max_steps=1),
    )
    for command in ("validate", "train"):
        assert main([command, str(config)]) == 2, command
        err = capsys.readouterr().err
        assert "rlhf.teacher_cache" in err and "Traceback" not in err
        for name, kind in damaged["kinds"].items():
            assert f"{name}" in err and kind in err.split(name, 1)[1].split("\n", 1)[0], (name, err)
        assert "cut short" in err and "checksum differs" in err
        assert (
            f"fix: re-run `kdcompose teacher-cache {built['config'].resolve()} --out {damaged['out']}" in err
        )
        assert "recomputes only their samples (24 here)" in err
        assert f"move shard-r7-00000.safetensors out of {damaged['out']}" in err
    assert loaded == []


def test_rerun_repairs_exactly_the_damaged_shards(
    built: dict[str, Any], damaged: dict[str, Any], pipeline: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Runs after the refusal test (it repairs the `damaged` copy)."""
    from kdcompose.cli import main
    from kdcompose.errors import ConfigError
    from kdcompose.teachers.cache_build import build_cache

    out: Path = damaged["out"]
    options = {"dtype": "float32", "samples_per_shard": PER_SHARD, "progress": False, "pipeline": pipeline}
    with pytest.raises(ConfigError, match=r"shard-r7-00000\.safetensors") as info:
        build_cache(built["config"], out, **options)
    assert info.value.issues[0].path == "--out" and "another cache" in str(info.value)
    assert len(list(out.glob("shard-*.safetensors"))) == 4  # nothing removed while refusing
    (out / "shard-r7-00000.safetensors").unlink()  # the user moves the foreign shard out

    intact = sorted(built["out"].glob("shard-*.safetensors"))[3].name
    kept = (out / intact).read_bytes()
    with ForwardCounter(pipeline.teacher) as forwards:
        repaired = build_cache(built["config"], out, **options)
    last = repaired["last_build"]
    lost = [n for n, kind in damaged["kinds"].items() if kind != "foreign"]
    assert last["added_samples"] == 3 * PER_SHARD and repaired["num_samples"] == N_SAMPLES
    assert last["repaired"]["removed"] == sorted(lost[:2]) and last["repaired"]["missing"] == [lost[2]]
    batch = int(pipeline.args.per_device_train_batch_size)
    assert forwards.calls == 3 * PER_SHARD // batch  # the teacher ran for those samples only
    assert (out / intact).read_bytes() == kept
    again = build_cache(built["config"], out, **options)
    assert again["last_build"]["added_samples"] == 0 and "repaired" not in again["last_build"]
    one, two = TeacherCache.open(built["out"]), TeacherCache.open(out)
    assert set(one.keys()) == set(two.keys())
    for key in one:
        a, b = one.rows(key), two.rows(key)
        assert torch.equal(a.positions, b.positions) and torch.equal(a.tokens, b.tokens)
        assert torch.allclose(a.logprobs, b.logprobs, atol=1e-6, rtol=0)
    config = write_config(
        built["tmp"] / "repaired.yaml",
        sections(built["tmp"] / "run", rlhf={"gkd_logits_topk": K, "teacher_cache": str(out)}),
    )
    assert main(["validate", str(config)]) == 0, capsys.readouterr().err


def _training_batches(trainer: Any, n: int) -> list[dict[str, Any]]:
    """`n` micro-batches exactly as ms-swift hands them to compute_loss (dataset completions)."""
    saved = trainer.lmbda, trainer._buffered_inputs, trainer._step
    trainer.lmbda = 0.0
    out = []
    try:
        for i, rows in enumerate(trainer.get_train_dataloader()):
            if i == n:
                break
            trainer._buffered_inputs = None
            out.append(trainer._prepare_inputs(copy.deepcopy(rows))["model_inputs"])
    finally:
        trainer.lmbda, trainer._buffered_inputs, trainer._step = saved
    return out


@torch.no_grad()
def _live_teacher_logprobs(trainer: Any, model_inputs: dict[str, Any]) -> torch.Tensor:
    """The teacher's log-softmax on a batch, run as in training (the template's post-encode hook
    turns pixels into embeddings inside the call)."""
    teacher = trainer.teacher_model
    trainer.template.register_post_encode_hook([teacher])
    try:
        logits = teacher(**{k: v for k, v in model_inputs.items() if k != "labels"}).logits
    finally:
        trainer.template.remove_post_encode_hook()
    return torch.log_softmax(logits.float(), dim=-1)


def _assert_matches_live(
    cache: TeacherCache, trainer: Any, batches: list[dict[str, Any]], atol: float
) -> None:
    for model_inputs in batches:
        cached_v, cached_i = cache.batch_topk(model_inputs)
        live = _live_teacher_logprobs(trainer, model_inputs)
        labels = model_inputs["labels"]
        trained = torch.roll(labels, -1, dims=1) != -100
        assert trained.any()
        assert torch.isneginf(cached_v[~trained]).all() and (cached_i[~trained] == 0).all()
        want_v, want_i = teacher_topk(live, K)
        # the cached values are the live log-probs of the cached ids (robust to near-ties in order)
        assert torch.allclose(live.gather(-1, cached_i)[trained], cached_v[trained], atol=atol, rtol=0)
        assert torch.allclose(cached_v[trained], want_v[trained], atol=atol, rtol=0)
        ties = (want_v[..., 1:] - want_v[..., :-1]).abs().min(dim=-1).values < 1e-4
        clear = trained & ~ties
        assert torch.equal(cached_i[clear], want_i[clear])
        # the audit passed (batch_topk compares them); the stored scored tokens and their log-probs
        keys = sample_keys(model_inputs)
        for b, real in enumerate(unpadded_positions(model_inputs)):
            rows = cache.rows(keys[b])
            at = real[rows.positions.long()]
            assert torch.equal(
                rows.tokens.long(), model_inputs["input_ids"][b, real[rows.positions.long() + 1]]
            )
            scored = live[b, at].gather(-1, rows.tokens.long()[:, None]).squeeze(-1)
            assert torch.allclose(rows.token_logprobs.float(), scored, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def trainer_batches(built: dict[str, Any]) -> tuple[Any, list[dict[str, Any]]]:
    trainer = shared_trainer()
    return trainer, _training_batches(trainer, 4)


def test_batch_topk_equals_the_live_teacher_on_training_batches(
    built: dict[str, Any], trainer_batches: tuple[Any, list[dict[str, Any]]]
) -> None:
    trainer, batches = trainer_batches
    cache = TeacherCache.open(built["out"])
    assert cache.check(tokenizer=trainer.template.tokenizer, template=trainer.template, topk=K) == []
    _assert_matches_live(cache, trainer, batches, atol=1e-6)
    v, i = cache.batch_topk(batches[0], topk=3)
    full_v, full_i = cache.batch_topk(batches[0])
    assert torch.equal(v, full_v[..., :3]) and torch.equal(i, full_i[..., :3])


def test_float16_cache_within_rounding_and_size_bound(
    cache16: Path, trainer_batches: tuple[Any, list[dict[str, Any]]]
) -> None:
    out = cache16
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "float16" and manifest["num_samples"] == N_SAMPLES
    assert manifest["bytes"] / manifest["num_positions"] <= 6 * K + 32
    trainer, batches = trainer_batches
    # float16 keeps 11 significant bits: |error| <= |value| * 2**-11 (log-probs here are > -20)
    _assert_matches_live(TeacherCache.open(out), trainer, batches, atol=20 * 2**-11)


def test_check_refuses_another_tokenizer_and_a_larger_topk(
    built: dict[str, Any], trainer_batches: tuple[Any, list[dict[str, Any]]]
) -> None:
    trainer, _ = trainer_batches
    cache = TeacherCache.open(built["out"])
    other = copy.deepcopy(trainer.template.tokenizer)
    other.add_tokens(["<kdcompose-extra-token>"])
    problems = dict(cache.check(tokenizer=other, topk=K + 1))
    assert "rlhf.teacher_cache" in problems and "tokenizer" in problems["rlhf.teacher_cache"]
    assert "rlhf.loss_terms.lm_jsd.topk" in problems
    assert (
        f"kdcompose teacher-cache {built['config'].resolve()} --out {built['out']}"
        in problems["rlhf.teacher_cache"]
    )


def test_missing_sample_error_names_it_and_the_command(
    built: dict[str, Any], trainer_batches: tuple[Any, list[dict[str, Any]]], tmp_path: Path
) -> None:
    trainer, batches = trainer_batches
    partial = tmp_path / "partial"
    partial.mkdir()
    first = "shard-r0-00000.safetensors"
    (partial / first).write_bytes((built["out"] / first).read_bytes())
    manifest = json.loads((built["out"] / "manifest.json").read_text())
    write_manifest(partial, {**manifest, **summarize_records({first: manifest["shards"][first]})})
    cache = TeacherCache.open(partial)
    cache.check(tokenizer=trainer.template.tokenizer)
    missing = next(b for b in batches if any(k not in cache for k in _keys(b)))
    with pytest.raises(Exception, match="is not in the teacher cache") as info:
        cache.batch_topk(missing)
    assert "kdcompose teacher-cache" in str(info.value) and "starting" in str(info.value)


def _keys(model_inputs: dict[str, Any]) -> list[str]:
    return sample_keys(model_inputs)


def test_cli_refuses_a_missing_k_and_on_policy_configs(
    built: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from kdcompose.cli import main

    config = write_config(built["tmp"] / "nok.yaml", sections(built["tmp"] / "run"))
    assert main(["teacher-cache", str(config), "--out", str(built["tmp"] / "nok")]) == 2
    err = capsys.readouterr().err
    assert "rlhf.loss_terms.lm_jsd.topk" in err and "--topk K" in err
    config = write_config(built["tmp"] / "onpolicy.yaml", sections(built["tmp"] / "run", lmbda=0.5))
    assert main(["teacher-cache", str(config), "--out", str(built["tmp"] / "nok"), "--topk", "4"]) == 2
    assert "rlhf.lmbda" in capsys.readouterr().err


def test_two_processes_split_the_work_and_store_the_same_rows(built: dict[str, Any]) -> None:
    """`NPROC_PER_NODE=2`: each process writes its own shards, the launcher merges the manifest;
    the rows equal the single-process build's (same batches, so bit-identical in float32)."""
    import os

    out = built["tmp"] / "cache-2proc"
    command = kdcompose_command(
        "teacher-cache", str(built["config"]), "--out", str(out), "--dtype", "float32",
        "--samples-per-shard", str(PER_SHARD),
    )  # fmt: skip
    os.environ["NPROC_PER_NODE"] = "2"
    try:
        result = run_command(command, built["tmp"])
    finally:
        del os.environ["NPROC_PER_NODE"]
    assert result.returncode == 0, result.stderr[-4000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == N_SAMPLES and manifest["last_build"]["world_size"] == 2
    assert {name.split("-")[1] for name in manifest["shards"]} == {"r0", "r1"}
    assert not list(out.glob(".rank*.json"))
    one, two = TeacherCache.open(built["out"]), TeacherCache.open(out)
    assert set(one.keys()) == set(two.keys())
    for key in one:
        a, b = one.rows(key), two.rows(key)
        assert torch.equal(a.positions, b.positions) and torch.equal(a.ids, b.ids)
        assert torch.equal(a.logprobs, b.logprobs)
