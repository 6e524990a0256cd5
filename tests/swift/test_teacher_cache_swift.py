"""The teacher cache against real ms-swift on the tiny Qwen2-VL pair.

The oracle is the live teacher: for real training micro-batches (ms-swift's dataloader and the
GKD trainer's `_prepare_inputs`, exactly what `compute_loss` receives), `cache.batch_topk`
must equal the top-K of the teacher's own logits on that batch. That can only hold if the
builder encoded every sample exactly as training does (template, images, labels) and the keys
found the rows whatever the batch composition.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from swift_support import kdcompose_command, run_command, sections, shared_trainer, write_config

from kdcompose.functional import teacher_topk
from kdcompose.teachers.cache import TeacherCache

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


def test_cli_builds_a_cache_with_its_manifest(built: dict[str, Any]) -> None:
    manifest = json.loads((built["out"] / "manifest.json").read_text())
    assert manifest["format"] == "kdcompose-teacher-cache/1" and manifest["complete"] is True
    assert manifest["topk"] == K and manifest["dtype"] == "float32" and manifest["vocab_size"] == 151936
    assert manifest["num_samples"] == N_SAMPLES and manifest["splits"]["train"]["samples"] == N_SAMPLES
    assert manifest["config"] == str(built["config"].resolve())
    assert manifest["template"]["name"] == "qwen2_vl"
    for part in ("teacher", "tokenizer", "template"):
        assert len(manifest[part]["fingerprint"]) == 32
    assert len(manifest["shards"]) == N_SAMPLES // PER_SHARD
    assert manifest["bytes"] == sum(p.stat().st_size for p in built["out"].glob("shard-*.safetensors"))
    cache = TeacherCache.open(built["out"])
    assert len(cache) == N_SAMPLES and cache.positions() == manifest["num_positions"] > N_SAMPLES
    assert f"{N_SAMPLES} samples" in built["stdout"]


def test_rerun_resumes_and_rebuilds_only_a_deleted_shard(built: dict[str, Any]) -> None:
    from kdcompose.teachers.cache_build import build_cache

    out: Path = built["out"]
    options = {"dtype": "float32", "samples_per_shard": PER_SHARD, "progress": False}
    again = build_cache(built["config"], out, **options)
    assert again["last_build"]["added_samples"] == 0 and again["num_samples"] == N_SAMPLES

    shards = sorted(out.glob("shard-*.safetensors"))
    kept = {p.name: p.read_bytes() for p in shards if p != shards[1]}
    lost = set(TeacherCache.open(out).keys())
    shards[1].unlink()
    lost -= set(TeacherCache.open(out).keys())
    assert len(lost) == PER_SHARD
    rebuilt = build_cache(built["config"], out, **options)
    assert rebuilt["last_build"]["added_samples"] == PER_SHARD and rebuilt["num_samples"] == N_SAMPLES
    assert {name: (out / name).read_bytes() for name in kept} == kept  # untouched
    new = [p for p in out.glob("shard-*.safetensors") if p.name not in kept]
    assert len(new) == 1
    cache = TeacherCache.open(out)
    assert lost <= set(cache.keys()) and len(cache) == N_SAMPLES


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
    built: dict[str, Any], trainer_batches: tuple[Any, list[dict[str, Any]]]
) -> None:
    from kdcompose.teachers.cache_build import build_cache

    out = built["tmp"] / "cache16"
    manifest = build_cache(built["config"], out, dtype="float16", progress=False)
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
    for name in ("manifest.json", "shard-r0-00000.safetensors"):
        (partial / name).write_bytes((built["out"] / name).read_bytes())
    cache = TeacherCache.open(partial)
    cache.check(tokenizer=trainer.template.tokenizer)
    missing = next(b for b in batches if any(k not in cache for k in _keys(b)))
    with pytest.raises(Exception, match="is not in the teacher cache") as info:
        cache.batch_topk(missing)
    assert "kdcompose teacher-cache" in str(info.value) and "starting" in str(info.value)


def _keys(model_inputs: dict[str, Any]) -> list[str]:
    from kdcompose.teachers.cache_keys import sample_keys

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
