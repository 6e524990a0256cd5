"""Teacher cache without ms-swift: sample keys, the shard format and the training reader.

Batches are built the way ms-swift's Qwen-VL collator lays them out (padded input_ids / labels /
attention_mask, all images' patches concatenated in sample order, one grid row per image), so
the keys and the reader are tested on the same shapes the trainer hands them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcompose.functional import teacher_topk
from kdcompose.teachers.cache import (
    FORMAT,
    SampleRows,
    TeacherCache,
    TeacherCacheError,
    cache_identity,
    summarize_records,
    write_manifest,
    write_shard,
)
from kdcompose.teachers.cache_keys import (
    QWEN_IMAGE_TOKEN_ID,
    SampleKeyError,
    labelled_positions,
    sample_keys,
)

PATCH_DIM = 12
MERGE = 4


def make_sample(seed: int, n_text: int = 6, n_answer: int = 4, images: tuple[int, ...] = (2,)) -> dict:
    """One encoded sample: `images` gives each image's grid height (width 2), so an image has
    2*h patches and 2*h/4 placeholder tokens... (h even)."""
    g = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    grids, pixels = [], []
    for h in images:
        grid = torch.tensor([1, h, 2])
        patches = int(grid.prod())
        ids += [QWEN_IMAGE_TOKEN_ID] * (patches // MERGE)
        grids.append(grid)
        pixels.append(torch.randn(patches, PATCH_DIM, generator=g))
    ids += torch.randint(10, 1000, (n_text + n_answer,), generator=g).tolist()
    labels = [-100] * (len(ids) - n_answer) + ids[-n_answer:]
    return {"input_ids": ids, "labels": labels, "grids": grids, "pixels": pixels}


def collate(samples: list[dict], side: str = "left", pad_to: int | None = None) -> dict[str, torch.Tensor]:
    width = max(pad_to or 0, max(len(s["input_ids"]) for s in samples))
    ids, labels, mask = [], [], []
    for s in samples:
        pad = width - len(s["input_ids"])
        row_ids, row_labels, row_mask = s["input_ids"], s["labels"], [1] * len(s["input_ids"])
        if side == "left":
            ids.append([0] * pad + row_ids)
            labels.append([-100] * pad + row_labels)
            mask.append([0] * pad + row_mask)
        else:
            ids.append(row_ids + [0] * pad)
            labels.append(row_labels + [-100] * pad)
            mask.append(row_mask + [0] * pad)
    batch = {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "attention_mask": torch.tensor(mask),
    }
    grids = [g for s in samples for g in s["grids"]]
    if grids:
        batch["image_grid_thw"] = torch.stack(grids)
        batch["pixel_values"] = torch.cat([p for s in samples for p in s["pixels"]])
    return batch


# --------------------------------------------------------------------------- keys


@pytest.mark.parametrize("side", ["left", "right"])
def test_key_of_a_sample_is_the_same_alone_and_in_a_padded_batch_of_three(side: str) -> None:
    a = make_sample(1, images=(2,))
    b = make_sample(2, n_text=15, images=(4, 2))
    c = make_sample(3, n_text=3, images=())
    alone = sample_keys(collate([a]))
    batch = sample_keys(collate([b, a, c], side=side))
    assert len(batch) == 3 and len(set(batch)) == 3
    assert batch[1] == alone[0]
    assert batch[0] == sample_keys(collate([b], pad_to=40, side=side))[0]
    assert batch[2] == sample_keys(collate([c]))[0]


def test_key_changes_with_one_token_or_one_pixel() -> None:
    a = make_sample(1)
    base = sample_keys(collate([a]))[0]
    token = {**a, "input_ids": [*a["input_ids"][:-1], a["input_ids"][-1] + 1]}
    assert sample_keys(collate([token]))[0] != base
    pixels = [p.clone() for p in a["pixels"]]
    pixels[0][3, 5] += 1e-3
    assert sample_keys(collate([{**a, "pixels": pixels}]))[0] != base
    grids = [torch.tensor([1, 1, 4])]  # same patch count, other layout
    assert sample_keys(collate([{**a, "grids": grids}]))[0] != base


def test_labels_do_not_change_the_key() -> None:
    a = make_sample(1)
    other = {**a, "labels": [-100] * len(a["labels"])}
    assert sample_keys(collate([a])) == sample_keys(collate([other]))


@settings(deadline=None)
@given(
    order=st.permutations([0, 1, 2, 3]),
    side=st.sampled_from(["left", "right"]),
    extra=st.integers(0, 5),
)
def test_keys_follow_their_samples_under_any_order_and_padding(
    order: list[int], side: str, extra: int
) -> None:
    samples = [
        make_sample(10, images=(2,)),
        make_sample(11, n_text=9, images=()),
        make_sample(12, n_text=2, images=(2, 2)),
        make_sample(13, images=(6,)),
    ]
    reference = [sample_keys(collate([s]))[0] for s in samples]
    width = max(len(s["input_ids"]) for s in samples) + extra
    keys = sample_keys(collate([samples[i] for i in order], side=side, pad_to=width))
    assert keys == [reference[i] for i in order]


def test_images_that_do_not_match_the_placeholders_are_an_error() -> None:
    batch = collate([make_sample(1, images=(2,))])
    batch["image_grid_thw"] = torch.tensor([[1, 2, 2], [1, 1, 4]])
    batch["pixel_values"] = torch.randn(8, PATCH_DIM)
    with pytest.raises(SampleKeyError, match="image"):
        sample_keys(batch)
    batch["image_grid_thw"] = torch.tensor([[1, 2, 2], [1, 2, 2]])  # one image too many for 1 placeholder x 4
    batch["input_ids"][0, -1] = QWEN_IMAGE_TOKEN_ID  # now 2 placeholders: merge 4, two images fit
    assert len(sample_keys(batch)) == 1
    batch["image_grid_thw"] = torch.tensor([[1, 2, 2]])
    with pytest.raises(SampleKeyError, match="patches"):
        sample_keys(batch)


def test_labelled_positions_are_the_shifted_labels() -> None:
    labels = torch.tensor([-100, -100, 5, 6, -100, 7])
    assert labelled_positions(labels).tolist() == [1, 2, 4]
    shifted = torch.roll(labels, -1) != -100
    assert torch.nonzero(shifted[:-1]).flatten().tolist() == [1, 2, 4]


# --------------------------------------------------------------------------- storage + reader

VOCAB = 50


def _fake_teacher_logits(sample: dict, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(sample["input_ids"]), VOCAB, generator=g) * 3


def sample_rows(sample: dict, seed: int, k: int) -> SampleRows:
    """What the builder stores for one sample, from its fake teacher logits (seeded by `seed`)."""
    key = sample_keys(collate([sample]))[0]
    positions = labelled_positions(torch.tensor(sample["labels"]))
    logprobs = torch.log_softmax(_fake_teacher_logits(sample, seed)[positions], dim=-1)
    values, ids = teacher_topk(_fake_teacher_logits(sample, seed)[positions], k)
    tokens = torch.tensor(sample["input_ids"])[positions + 1]
    scored = logprobs.gather(-1, tokens[:, None] % VOCAB).squeeze(-1)  # fake logits: a small vocabulary
    return SampleRows(key, len(sample["input_ids"]), positions, values, ids, tokens, scored)


STORE_MANIFEST = {"format": FORMAT, "config": "/cfg.yaml", "tokenizer": {}, "template": {}}


def build_store(
    tmp_path: Path,
    samples: list[dict],
    k: int,
    dtype: str = "float32",
    per_shard: int = 2,
    rows: list[SampleRows] | None = None,
) -> Path:
    """What the builder stores, from fake per-sample teacher logits (seeded by sample index);
    `rows` replaces the computed rows (a store that holds something else)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    rows = rows if rows is not None else [sample_rows(s, i, k) for i, s in enumerate(samples)]
    manifest = {**STORE_MANIFEST, "topk": k, "dtype": dtype}
    manifest["cache_id"] = cache_identity(manifest)
    records = {}
    for n in range(0, len(rows), per_shard):
        name = f"shard-r0-{n:05d}.safetensors"
        records[name] = write_shard(
            tmp_path / name,
            rows[n : n + per_shard],
            topk=k,
            dtype=dtype,
            split="train",
            cache_id=manifest["cache_id"],
        )
    write_manifest(tmp_path, {**manifest, **summarize_records(records)})
    return tmp_path


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_topk_puts_each_samples_rows_at_its_logits_positions(tmp_path: Path, side: str) -> None:
    samples = [
        make_sample(i, n_text=3 + 2 * i, n_answer=2 + i, images=((2,) if i % 2 else ())) for i in range(5)
    ]
    cache = TeacherCache.open(build_store(tmp_path, samples, k=6))
    assert len(cache) == 5
    order = [3, 0, 4]
    batch = collate([samples[i] for i in order], side=side, pad_to=30)
    logprobs, ids = cache.batch_topk(batch)
    assert (
        logprobs.shape == ids.shape == (3, 30, 6)
        and logprobs.dtype == torch.float32
        and ids.dtype == torch.int64
    )
    shifted = torch.roll(batch["labels"], -1, dims=1) != -100
    for b, i in enumerate(order):
        real = torch.nonzero(batch["attention_mask"][b]).flatten()
        want_v, want_i = teacher_topk(_fake_teacher_logits(samples[i], i), 6)
        assert torch.equal(
            logprobs[b, real][shifted[b, real]],
            want_v[labelled_positions(torch.tensor(samples[i]["labels"]))],
        )
        assert torch.equal(
            ids[b, real][shifted[b, real]], want_i[labelled_positions(torch.tensor(samples[i]["labels"]))]
        )
    assert torch.isneginf(logprobs[~shifted]).all() and (ids[~shifted] == 0).all()
    small_v, small_i = cache.batch_topk(batch, topk=2)
    assert torch.equal(small_v, logprobs[..., :2]) and torch.equal(small_i, ids[..., :2])


def test_float16_storage_rounds_only(tmp_path: Path) -> None:
    samples = [make_sample(i) for i in range(3)]
    exact = TeacherCache.open(build_store(tmp_path / "a", samples, k=4, dtype="float32"))
    half = TeacherCache.open(build_store(tmp_path / "b", samples, k=4, dtype="float16"))
    batch = collate(samples)
    v32, i32 = exact.batch_topk(batch)
    v16, i16 = half.batch_topk(batch)
    finite = torch.isfinite(v32)
    assert torch.equal(i32, i16) and torch.equal(finite, torch.isfinite(v16))
    assert torch.equal(v16[finite], v32[finite].half().float())


def test_missing_sample_names_it_and_the_rebuild_command(tmp_path: Path) -> None:
    samples = [make_sample(i) for i in range(3)]
    cache = TeacherCache.open(build_store(tmp_path, samples[:2], k=4))
    key = sample_keys(collate([samples[2]]))[0]
    with pytest.raises(TeacherCacheError) as info:
        cache.batch_topk(collate([samples[0], samples[2]]))
    message = str(info.value)
    assert "sample 1 of the batch" in message and key in message
    assert f"kdcompose teacher-cache /cfg.yaml --out {tmp_path} --topk 4" in message


def test_changed_labels_are_refused(tmp_path: Path) -> None:
    sample = make_sample(0)
    cache = TeacherCache.open(build_store(tmp_path, [sample], k=4))
    labels = list(sample["labels"])
    labels[2] = sample["input_ids"][2]
    with pytest.raises(TeacherCacheError, match="labels changed"):
        cache.batch_topk(collate([{**sample, "labels": labels}]))


def test_check_reports_topk_above_the_cached_k(tmp_path: Path) -> None:
    cache = TeacherCache.open(build_store(tmp_path, [make_sample(0)], k=4))
    assert cache.check(topk=4) == []
    [(path, message)] = cache.check(topk=8)
    assert path == "rlhf.loss_terms.lm_jsd.topk" and "K = 4" in message and "--topk 8" in message
    with pytest.raises(TeacherCacheError, match=r"topk must be in 1\.\.4"):
        cache.batch_topk(collate([make_sample(0)]), topk=5)


def test_not_a_cache_says_how_to_build_one(tmp_path: Path) -> None:
    with pytest.raises(TeacherCacheError, match=r"kdcompose teacher-cache CONFIG\.yaml --out"):
        TeacherCache.open(tmp_path)


def test_size_per_position_is_within_6k_plus_32_bytes(tmp_path: Path) -> None:
    """K = 64, float16, 256 samples of 40 labelled positions in one shard (the default shard size),
    with the scored token and its log-probability per position (6K + 10 bytes of payload)."""
    k, n_samples, n_pos = 64, 256, 40
    g = torch.Generator().manual_seed(0)
    rows = [
        SampleRows(
            f"{i:032x}",
            100,
            torch.arange(50, 50 + n_pos),
            -torch.rand(n_pos, k, generator=g).sort(dim=-1).values,
            torch.randint(0, 151936, (n_pos, k), generator=g),
            torch.randint(0, 151936, (n_pos,), generator=g),
            -torch.rand(n_pos, generator=g),
        )
        for i in range(n_samples)
    ]
    path = tmp_path / "shard-r0-00000.safetensors"
    write_shard(path, rows, topk=k, dtype="float16", split="train", cache_id="0" * 32)
    per_position = path.stat().st_size / (n_samples * n_pos)
    assert per_position <= 6 * k + 32
    assert per_position >= 6 * k  # the payload itself is stored, not compressed away
    json.dumps({"bytes_per_position": per_position})
