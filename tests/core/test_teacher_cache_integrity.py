"""Teacher-cache integrity and the alignment audit, without ms-swift: checksums find every kind of
damage (cut short, changed bytes even with the modification time put back, missing, another
cache's shard, an unlisted one), the fast path hashes only what changed, a repair removes exactly
the damaged shards, and a cache whose scored tokens differ from the sample's stops with the
position and both tokens (the audit itself: test_teacher_audit.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from test_teacher_cache_store import build_store, collate, make_sample, sample_rows

from kdcompose.errors import ConfigError
from kdcompose.teachers import cache_integrity
from kdcompose.teachers.audit import TeacherAlignmentError
from kdcompose.teachers.cache import (
    FORMAT,
    SampleRows,
    TeacherCache,
    TeacherCacheError,
    integrity_problem,
    read_manifest,
    write_manifest,
    write_shard,
)
from kdcompose.teachers.cache_integrity import STAMPS_NAME, read_header, verify_cache
from kdcompose.teachers.cache_repair import apply_repair, plan_repair

K = 4
N_SAMPLES = 8  # 4 shards of 2


@pytest.fixture
def store(tmp_path: Path) -> Path:
    samples = [make_sample(i, n_text=3 + i, images=()) for i in range(N_SAMPLES)]
    return build_store(tmp_path / "cache", samples, k=K)


def shard(store: Path, i: int) -> Path:
    return store / f"shard-r0-{2 * i:05d}.safetensors"


def flip_byte_in_data(path: Path, keep_mtime: bool = False) -> None:
    """Flip one bit in the middle of the shard's data area (a log-probability or id byte)."""
    stat = path.stat()
    start = read_header(path).data_start
    with path.open("r+b") as f:
        f.seek((start + stat.st_size) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    if keep_mtime:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def count_hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = cache_integrity.file_checksum

    def counting(path, start=0):
        calls.append(Path(path).name)
        return real(path, start)

    monkeypatch.setattr(cache_integrity, "file_checksum", counting)
    return calls


def foreign_shard(store: Path, name: str) -> None:
    """A shard of another cache (same layout, other identity), copied in under `name`."""
    other = build_store(store.parent / "other", [make_sample(100)], k=K, dtype="float16")
    shutil.copy(next(other.glob("shard-*.safetensors")), store / name)


# --------------------------------------------------------------------------- detection


def test_a_whole_cache_has_no_issues_and_the_manifest_records_each_shard(store: Path) -> None:
    manifest = read_manifest(store)
    assert manifest["format"] == FORMAT == "kdcompose-teacher-cache/2"
    assert len(manifest["shards"]) == 4 and manifest["checksum"] == "xxh3_128"
    for name, record in manifest["shards"].items():
        assert record["bytes"] == (store / name).stat().st_size
        assert record["xxh3_128"] == cache_integrity.file_checksum(store / name)
        assert record["samples"] == 2
    assert verify_cache(store, manifest, full=True) == []
    assert integrity_problem(store, manifest) is None
    assert len(TeacherCache.open(store)) == N_SAMPLES


def test_every_kind_of_damage_is_named_with_its_fix(store: Path) -> None:
    with shard(store, 0).open("r+b") as f:  # cut short, as an interrupted copy leaves it
        f.truncate(shard(store, 0).stat().st_size - 100)
    flip_byte_in_data(shard(store, 1))
    shard(store, 2).unlink()
    foreign_shard(store, "shard-r1-00000.safetensors")
    manifest = read_manifest(store)
    issues = {i.name: i for i in verify_cache(store, manifest)}
    assert {n: i.kind for n, i in issues.items()} == {
        shard(store, 0).name: "damaged",
        shard(store, 1).name: "damaged",
        shard(store, 2).name: "missing",
        "shard-r1-00000.safetensors": "foreign",
    }
    assert "cut short" in issues[shard(store, 0).name].reason
    assert "checksum differs" in issues[shard(store, 1).name].reason
    assert issues[shard(store, 1).name].samples == 2
    problem = integrity_problem(store, manifest)
    assert problem is not None
    assert (
        "kdcompose teacher-cache /cfg.yaml --out" in problem
        and "recomputes only their samples (6 here)" in problem
    )
    assert "move shard-r1-00000.safetensors out of" in problem
    with pytest.raises(TeacherCacheError) as info:
        TeacherCache.open(store)
    assert str(info.value) == problem


def test_bytes_appended_or_a_broken_header_are_damage(store: Path) -> None:
    with shard(store, 0).open("ab") as f:
        f.write(b"\0" * 8)
    raw = bytearray(shard(store, 1).read_bytes())
    raw[9] ^= 0x01  # inside the header's JSON
    shard(store, 1).write_bytes(bytes(raw))
    issues = {i.name: i for i in verify_cache(store, read_manifest(store))}
    assert "longer than its tensors" in issues[shard(store, 0).name].reason
    assert issues[shard(store, 1).name].kind == "damaged"


def test_an_old_format_says_to_rebuild(store: Path) -> None:
    manifest = read_manifest(store)
    write_manifest(store, {**manifest, "format": "kdcompose-teacher-cache/1"})
    problem = integrity_problem(store, read_manifest(store))
    assert problem is not None and "'kdcompose-teacher-cache/1'" in problem
    assert "no checksums" in problem and "build it again with `kdcompose teacher-cache" in problem
    with pytest.raises(TeacherCacheError, match="format"):
        TeacherCache.open(store)


# --------------------------------------------------------------------------- fast path


def test_unchanged_shards_are_not_hashed_again_changed_ones_are(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = read_manifest(store)
    (store / STAMPS_NAME).unlink(missing_ok=True)  # as after copying a cache: nothing verified yet
    hashed = count_hashes(monkeypatch)
    assert verify_cache(store, manifest) == [] and len(hashed) == 4
    hashed.clear()
    assert verify_cache(store, manifest) == [] and hashed == []  # stat and header only
    os.utime(shard(store, 3))  # touched: hashed again, still whole
    assert verify_cache(store, manifest) == [] and hashed == [shard(store, 3).name]
    hashed.clear()
    # changed bytes with the modification time put back: the change time (ctime) still moved
    flip_byte_in_data(shard(store, 2), keep_mtime=True)
    issues = verify_cache(store, manifest)
    assert [(i.name, i.kind) for i in issues] == [(shard(store, 2).name, "damaged")]
    assert hashed == [shard(store, 2).name]
    hashed.clear()
    assert len(verify_cache(store, manifest, full=True)) == 1 and len(hashed) == 4


def test_builder_stamps_count_as_verified(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A freshly written shard is stamped by its writer (its bytes were hashed in memory)."""
    from kdcompose.teachers.cache_integrity import stamp_written

    manifest = read_manifest(store)
    for name, record in manifest["shards"].items():
        stamp_written(store, name, record["xxh3_128"])
    hashed = count_hashes(monkeypatch)
    assert verify_cache(store, manifest) == [] and hashed == []


# --------------------------------------------------------------------------- repair


def test_repair_removes_exactly_the_damaged_and_adopts_an_intact_unlisted_shard(store: Path) -> None:
    flip_byte_in_data(shard(store, 1))
    shard(store, 2).unlink()
    manifest = read_manifest(store)
    extra = sample_rows(make_sample(50), 50, K)
    unlisted = store / "shard-r0-00099.safetensors"
    write_shard(unlisted, [extra], topk=K, dtype="float32", split="train", cache_id=manifest["cache_id"])
    kept = {p.name: p.read_bytes() for p in (shard(store, 0), shard(store, 3))}
    plan = plan_repair(store)
    assert [i.name for i in plan.damaged] == [shard(store, 1).name]
    assert [i.name for i in plan.missing] == [shard(store, 2).name] and plan.lost_samples == 4
    records, report = apply_repair(store, plan)
    assert report["removed"] == [shard(store, 1).name] and report["adopted"] == [unlisted.name]
    assert not shard(store, 1).exists()
    assert sorted(records) == sorted([*kept, unlisted.name])
    assert {name: (store / name).read_bytes() for name in kept} == kept
    repaired = read_manifest(store)
    assert repaired["complete"] is False and repaired["num_samples"] == 5
    assert verify_cache(store, repaired, full=True) == []
    assert extra.key in TeacherCache.open(store)


def test_repair_refuses_another_caches_shard_and_removes_nothing(store: Path) -> None:
    foreign_shard(store, "shard-r3-00000.safetensors")
    flip_byte_in_data(shard(store, 0))
    with pytest.raises(ConfigError) as info:
        plan_repair(store)
    assert info.value.issues[0].path == "--out" and "shard-r3-00000.safetensors" in str(info.value)
    assert shard(store, 0).exists()


def test_an_unlisted_shard_with_changed_data_is_removed_not_adopted(store: Path) -> None:
    manifest = read_manifest(store)
    unlisted = store / "shard-r0-00099.safetensors"
    rows = [sample_rows(make_sample(60), 60, K)]
    write_shard(unlisted, rows, topk=K, dtype="float32", split="train", cache_id=manifest["cache_id"])
    flip_byte_in_data(unlisted)
    records, report = apply_repair(store, plan_repair(store))
    assert report["removed"] == [unlisted.name] and not unlisted.exists() and len(records) == 4


def test_shards_without_a_manifest_are_refused(tmp_path: Path, store: Path) -> None:
    (store / "manifest.json").unlink()
    with pytest.raises(ConfigError, match="no manifest"):
        plan_repair(store)
    assert plan_repair(tmp_path / "new-dir-does-not-matter").manifest is None


# --------------------------------------------------------------------------- the audit


class CharTokenizer:
    """Decodes id n as the character chr(n) (enough to render tokens in a message)."""

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


def test_cached_tokens_that_differ_from_the_sample_stop_with_the_position_and_both_tokens(
    tmp_path: Path,
) -> None:
    samples = [make_sample(i) for i in range(2)]
    rows = [sample_rows(s, i, K) for i, s in enumerate(samples)]
    bad = rows[1]
    tokens = bad.tokens.clone()
    tokens[2] = 65  # 'A'
    rows[1] = SampleRows(
        bad.key, bad.length, bad.positions, bad.logprobs, bad.ids, tokens, bad.token_logprobs
    )
    cache = TeacherCache.open(build_store(tmp_path, samples, k=K, rows=rows))
    cache._tokenizer = CharTokenizer()
    cache.batch_topk(collate(samples[:1]))  # the whole sample passes
    with pytest.raises(TeacherAlignmentError) as info:
        cache.batch_topk(collate(samples))
    error = info.value
    position = int(bad.positions[2]) + 1
    want = samples[1]["input_ids"][position]
    assert error.position == position and error.student == want and error.teacher == 65
    message = str(error)
    assert f"sample 1 of the batch (key {bad.key})" in message and f"position {position}" in message
    assert f"student {chr(want)!r} (id {want}) vs teacher 'A' (id 65)" in message


def test_a_sample_whose_prompt_changed_is_named_with_where_its_cached_completion_starts(
    tmp_path: Path,
) -> None:
    sample = make_sample(3, images=())
    cache = TeacherCache.open(build_store(tmp_path, [sample], k=K))
    longer = {
        **sample,
        "input_ids": [7, 7, *sample["input_ids"]],  # two more prompt tokens, same completion
        "labels": [-100, -100, *sample["labels"]],
    }
    with pytest.raises(TeacherCacheError) as info:
        cache.batch_topk(collate([longer]))
    message = str(info.value)
    key = sample_rows(sample, 0, K).key
    first = int(sample_rows(sample, 0, K).positions[0]) + 1
    assert f"the same completion (4 tokens) is, under key {key}" in message
    assert f"starts at token {first} of {len(sample['input_ids'])}, here at token {first + 2}" in message


def test_manifest_json_is_plain(store: Path) -> None:
    """The manifest stays readable by any JSON tool (no NaN, no custom types)."""
    json.loads((store / "manifest.json").read_text(), parse_constant=lambda c: pytest.fail(c))
