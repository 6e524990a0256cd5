"""Offline teacher top-K cache: storage format, manifest, fingerprints and the training reader.

Layout of a cache directory (written by ``kdcompose teacher-cache``, see
:mod:`kdcompose.teachers.cache_build`)::

    DIR/manifest.json                      what was cached, from what, and each shard's checksum
    DIR/shard-r<rank>-<seq>.safetensors    rows of a few hundred samples each
    DIR/.verified.json                     which shards were checked when (see cache_integrity)

A shard is a plain safetensors file (memory-mapped on read, no pickle) holding

- ``keys``           uint8 ``[n, 16]``  sample keys (:func:`kdcompose.teachers.cache_keys.sample_keys`)
- ``offsets``        int64 ``[n + 1]``  the sample's rows are ``offsets[i]:offsets[i + 1]``
- ``lengths``        int32 ``[n]``      unpadded sequence length (a cheap consistency check)
- ``positions``      int32 ``[N]``      logits position of each row inside the unpadded sequence
- ``ids``            int32 ``[N, K]``   the teacher's top-K token ids, by descending probability
- ``logprobs``       ``[N, K]``         their log-probabilities at temperature 1 (float16 by default)
- ``tokens``         int32 ``[N]``      the token each row's distribution was scored for (the
  sequence's token at ``position + 1``): what the alignment audit compares with the student's
- ``token_logprobs`` ``[N]``            its log-probability at temperature 1 (same dtype)

so a cached position costs ``6K + 10`` bytes with float16 plus 28 bytes per sample, under the
``6K + 32`` budget. Temperature is applied at training time by the loss, which is why
log-probabilities at T = 1 are stored (``log_softmax(z / T)`` is not recoverable from the
top-K of another temperature, but the top-K *set* is the same for every T, and the loss
renormalises over it).

Shards are written to a temporary name and renamed, so a shard either exists whole or not at
all; the manifest (rewritten atomically after every shard) lists each shard with its size and
checksum, and only listed shards are read. Each shard's header also names the cache it belongs
to and the checksum of its data (:mod:`kdcompose.teachers.cache_integrity`).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdcompose.teachers.audit import check_same_tokens
from kdcompose.teachers.cache_integrity import (
    CACHE_ID_KEY,
    CHECKSUM,
    DATA_CHECKSUM_KEY,
    bytes_checksum,
    issues_message,
    shard_records,
    verify_cache,
)
from kdcompose.teachers.cache_keys import KEY_BYTES, labelled_positions, sample_keys, unpadded_positions

FORMAT = "kdcompose-teacher-cache/2"
OLD_FORMATS = {
    "kdcompose-teacher-cache/1": "it records no checksums and not the tokens it scored",
}
"""Formats this kdcompose cannot read, with what they lack (said in the rebuild message)."""
MANIFEST_NAME = "manifest.json"
SHARD_TENSORS = ("keys", "offsets", "lengths", "positions", "ids", "logprobs", "tokens", "token_logprobs")
_IDENTITY_FIELDS = ("format", "topk", "dtype", "vocab_size")
_IDENTITY_PARTS = ("teacher", "tokenizer", "template")
DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
TOPK_PATH = "rlhf.loss_terms.lm_jsd.topk"
CACHE_PATH = "rlhf.teacher_cache"


class TeacherCacheError(RuntimeError):
    """A cache that cannot serve a request (missing sample, mismatched batch, broken directory)."""


# --------------------------------------------------------------------------- fingerprints


def _digest(payload: Any) -> str:
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def _plain(value: Any, depth: int = 0) -> Any:
    """JSON-able primitives only, so a fingerprint never depends on object addresses."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if depth > 6:
        return None
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    return None


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of a tokenizer's vocabulary, added tokens and special tokens (a processor's tokenizer
    is used when given a processor): two tokenizers with the same fingerprint map text and ids alike."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    added = sorted((str(k), int(v)) for k, v in getattr(tokenizer, "added_tokens_encoder", {}).items())
    special = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []))
    return _digest({"vocab": vocab, "added": added, "special": special})


_TEMPLATE_ATTRS = (
    "truncation_strategy",
    "norm_bbox",
    "response_prefix",
    "enable_thinking",
    "add_non_thinking_prefix",
    "use_chat_template",
    "image_token_id",
    "video_token_id",
    "padding_free",
)


def template_name(template: Any) -> str:
    meta = getattr(template, "template_meta", None)
    return str(getattr(meta, "template_type", None) or type(template).__name__)


def template_fingerprint(template: Any) -> str:
    """Hash of what decides how a template turns a conversation into tokens and pixels: its class,
    its template_meta (prefixes, separators, default system, stop words), its encoding options and
    the image/video processor's settings (resolution bounds change the pixels and token counts)."""
    meta = getattr(template, "template_meta", None)
    meta_fields = {k: _plain(v) for k, v in sorted(vars(meta).items())} if meta is not None else {}
    attrs = {name: _plain(getattr(template, name, None)) for name in _TEMPLATE_ATTRS}
    loss_scale = getattr(template, "loss_scale", None)
    attrs["loss_scale"] = type(loss_scale).__name__ if loss_scale is not None else None
    processors = {}
    processor = getattr(template, "processor", None)
    for name in ("image_processor", "video_processor"):
        sub = getattr(processor, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            processors[name] = _plain(sub.to_dict())
    cls = type(template)
    return _digest(
        {"class": f"{cls.__module__}.{cls.__qualname__}", "meta": meta_fields, "attrs": attrs, **processors}
    )


def _safetensors_header(path: Path) -> bytes:
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(min(n, 100_000_000))


def model_fingerprint(model_dir: str | os.PathLike[str]) -> str:
    """Hash of a checkpoint folder without reading its weights: ``config.json``, and for each
    weight file its name, size and (safetensors) header, which lists every tensor's name, dtype,
    shape and byte range. Copies of a checkpoint share a fingerprint; retrained weights of the same
    shapes usually change the header's offsets only if shapes change, so other weight files
    (``.bin``) add their modification time too."""
    root = Path(model_dir)
    if not root.is_dir():
        return _digest({"path": str(model_dir)})
    parts: dict[str, Any] = {}
    config = root / "config.json"
    if config.is_file():
        parts["config.json"] = hashlib.sha256(config.read_bytes()).hexdigest()
    for path in sorted(root.iterdir()):
        if path.suffix == ".safetensors":
            header = hashlib.sha256(_safetensors_header(path)).hexdigest()
            parts[path.name] = [path.stat().st_size, header]
        elif path.suffix in {".bin", ".pt", ".pth"}:
            stat = path.stat()
            parts[path.name] = [stat.st_size, int(stat.st_mtime)]
    return _digest(parts)


# --------------------------------------------------------------------------- manifest


@dataclass
class SampleRows:
    """The cached rows of one sample (what a builder appends, what a reader returns)."""

    key: str
    length: int
    positions: torch.Tensor  # int32/int64 [n]
    logprobs: torch.Tensor  # [n, K]
    ids: torch.Tensor  # [n, K]
    tokens: torch.Tensor  # int32/int64 [n]: the token each row was scored for (sequence[position + 1])
    token_logprobs: torch.Tensor  # [n]: its log-probability


def cache_identity(manifest: Mapping[str, Any]) -> str:
    """What makes rows of two builds interchangeable: format, K, dtype, vocabulary size and the
    teacher, tokenizer and template fingerprints. Stored in the manifest and every shard's header,
    so a shard of another cache is recognised as foreign."""
    return _digest(
        {
            **{f: manifest.get(f) for f in _IDENTITY_FIELDS},
            **{part: (manifest.get(part) or {}).get("fingerprint") for part in _IDENTITY_PARTS},
        }
    )


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(directory) / MANIFEST_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TeacherCacheError(
            f"{directory} is not a teacher cache (no {MANIFEST_NAME}); build one with "
            f"`kdcompose teacher-cache CONFIG.yaml --out {directory}`"
        ) from None
    except ValueError as exc:
        raise TeacherCacheError(f"{path} is not valid JSON ({exc}); rebuild the cache") from None


def _atomic_write_bytes(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a cache is shared like any data file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest(directory: str | os.PathLike[str], manifest: Mapping[str, Any]) -> None:
    """Write ``manifest.json`` atomically (a reader never sees half a manifest)."""
    text = json.dumps(dict(manifest), indent=2, sort_keys=False) + "\n"
    _atomic_write_bytes(
        Path(directory) / MANIFEST_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8")
    )


# --------------------------------------------------------------------------- shards


def write_shard(
    path: str | os.PathLike[str],
    samples: Sequence[SampleRows],
    *,
    topk: int,
    dtype: str,
    split: str,
    cache_id: str,
) -> dict[str, Any]:
    """Write one shard atomically; returns its manifest record (bytes, checksum, counts).

    The checksum of the data area goes into the header itself (a placeholder of the same width
    is replaced once the data bytes exist, so no offset moves)."""
    from safetensors.torch import save

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    keys = torch.tensor([list(bytes.fromhex(s.key)) for s in samples], dtype=torch.uint8).reshape(
        -1, KEY_BYTES
    )
    counts = torch.tensor([int(s.positions.numel()) for s in samples], dtype=torch.int64)
    offsets = torch.zeros(len(samples) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    store = DTYPES[dtype]

    def cat(parts: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.cpu() for p in parts]) if parts else empty

    tensors = {
        "keys": keys,
        "offsets": offsets,
        "lengths": torch.tensor([s.length for s in samples], dtype=torch.int32),
        "positions": cat(
            [s.positions.reshape(-1).to(torch.int32) for s in samples], torch.zeros(0, dtype=torch.int32)
        ),
        "ids": cat([s.ids.to(torch.int32) for s in samples], torch.zeros(0, topk, dtype=torch.int32)),
        "logprobs": cat([s.logprobs.to(store) for s in samples], torch.zeros(0, topk, dtype=store)),
        "tokens": cat(
            [s.tokens.reshape(-1).to(torch.int32) for s in samples], torch.zeros(0, dtype=torch.int32)
        ),
        "token_logprobs": cat(
            [s.token_logprobs.reshape(-1).to(store) for s in samples], torch.zeros(0, dtype=store)
        ),
    }
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    placeholder = "0" * 32
    metadata = {
        "format": FORMAT,
        "topk": str(topk),
        "dtype": dtype,
        "split": split,
        CACHE_ID_KEY: cache_id,
        DATA_CHECKSUM_KEY: placeholder,
    }
    blob = bytearray(save(tensors, metadata=metadata))
    (header_bytes,) = struct.unpack("<Q", bytes(blob[:8]))
    data_start = 8 + header_bytes
    marker = f'"{DATA_CHECKSUM_KEY}":"{placeholder}"'.encode()
    at = bytes(blob[8:data_start]).index(marker) + 8 + len(marker) - 33
    blob[at : at + 32] = bytes_checksum(memoryview(blob)[data_start:]).encode()
    target = Path(path)
    _atomic_write_bytes(target, lambda tmp: Path(tmp).write_bytes(blob))
    return {
        "bytes": len(blob),
        CHECKSUM: bytes_checksum(blob),
        "samples": len(samples),
        "positions": int(offsets[-1]),
        "split": split,
    }


def shard_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A shard's manifest record read back from its file (bytes, checksum, counts, split)."""
    from safetensors import safe_open

    from kdcompose.teachers.cache_integrity import file_checksum

    with safe_open(str(path), framework="pt") as handle:
        split = (handle.metadata() or {}).get("split", "train")
        offsets = handle.get_tensor("offsets")
    return {
        "bytes": Path(path).stat().st_size,
        CHECKSUM: file_checksum(path),
        "samples": int(offsets.numel() - 1),
        "positions": int(offsets[-1]),
        "split": split,
    }


def summarize_records(records: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The manifest's counts from its shard records: samples and positions (in all and per split),
    the shards (by name, each with its record) and their bytes."""
    splits: dict[str, dict[str, int]] = {}
    for record in records.values():
        entry = splits.setdefault(str(record["split"]), {"samples": 0, "positions": 0})
        entry["samples"] += int(record["samples"])
        entry["positions"] += int(record["positions"])
    return {
        "num_samples": sum(s["samples"] for s in splits.values()),
        "num_positions": sum(s["positions"] for s in splits.values()),
        "splits": splits,
        "checksum": CHECKSUM,
        "shards": {name: dict(records[name]) for name in sorted(records)},
        "bytes": sum(int(r["bytes"]) for r in records.values()),
    }


@dataclass(frozen=True)
class _Entry:
    shard: int
    start: int
    end: int
    length: int


class TeacherCache:
    """Read access to a teacher cache for training: ``cache.batch_topk(model_inputs)``.

    Opening indexes every shard's sample keys (small) and keeps the shards open memory-mapped; a
    batch reads only its own rows. Use :meth:`check` before training to refuse a cache that does
    not fit the run (K too small, other tokenizer or template).
    """

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        """Index the shards the manifest lists (no checks of their bytes: :meth:`open` does those)."""
        from safetensors import safe_open

        self.directory = directory
        self.manifest = manifest
        self._tokenizer: Any = None
        self._shards: list[Any] = []
        self._index: dict[str, _Entry] = {}
        self._by_completion: dict[bytes, str] | None = None
        self.shard_paths = [directory / name for name in sorted(shard_records(manifest))]
        cache_id = manifest.get(CACHE_ID_KEY)
        for number, path in enumerate(self.shard_paths):
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as exc:  # safetensors raises its own error type for a damaged file
                raise TeacherCacheError(
                    f"{path} cannot be opened ({exc}); rebuild it with "
                    f"`{rebuild_command(manifest, directory)}`"
                ) from None
            meta = handle.metadata() or {}
            if meta.get("format") != FORMAT or meta.get(CACHE_ID_KEY) != cache_id:
                raise TeacherCacheError(
                    f"{path} is not a shard of this cache (format {meta.get('format')!r}, cache id "
                    f"{meta.get(CACHE_ID_KEY)}, the manifest's {cache_id}); move it out of {directory} or "
                    f"rebuild with `{rebuild_command(manifest, directory)}`"
                )
            self._shards.append(handle)
            keys = handle.get_tensor("keys")
            offsets = handle.get_tensor("offsets").tolist()
            lengths = handle.get_tensor("lengths").tolist()
            for i, raw in enumerate(keys):
                self._index[bytes(raw.tolist()).hex()] = _Entry(
                    number, offsets[i], offsets[i + 1], lengths[i]
                )

    @classmethod
    def open(cls, directory: str | os.PathLike[str], *, verify: bool = True) -> TeacherCache:
        """Open a cache directory; raises :class:`TeacherCacheError` naming the fix if it is not one,
        is in an old format, or (``verify``) has a missing, damaged or foreign shard
        (:func:`integrity_problem`: shards unchanged since their last check are not hashed again)."""
        path = Path(directory)
        manifest = read_manifest(path)
        problem = integrity_problem(path, manifest, shards=verify)
        if problem is not None:
            raise TeacherCacheError(problem)
        return cls(path, manifest)

    # -- facts --------------------------------------------------------------------------
    @property
    def topk(self) -> int:
        return int(self.manifest["topk"])

    @property
    def dtype(self) -> str:
        return str(self.manifest["dtype"])

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def keys(self) -> Iterable[str]:
        return self._index.keys()

    def positions(self) -> int:
        """Number of cached positions (rows) over all shards."""
        return sum(e.end - e.start for e in self._index.values())

    # -- checks -------------------------------------------------------------------------
    def check(
        self,
        *,
        tokenizer: Any = None,
        template: Any = None,
        topk: int | None = None,
        topk_path: str = TOPK_PATH,
        cache_path: str = CACHE_PATH,
    ) -> list[tuple[str, str]]:
        """Problems that make this cache unfit for a run, as ``(dotted_key, message)`` pairs.

        Checked: ``topk`` above the cached K; a tokenizer or template whose fingerprint differs
        from the one the cache was built with (the cached ids / positions would mean other tokens).
        The tokenizer given here is also used to decode sample prefixes in missing-sample errors.
        """
        problems: list[tuple[str, str]] = []
        rebuild = rebuild_command(self.manifest, self.directory)
        if topk is not None and topk > self.topk:
            problems.append(
                (
                    topk_path,
                    f"topk {topk} is above the cache's K = {self.topk} ({self.directory}); lower it to "
                    f"<= {self.topk} or rebuild with `{rebuild} --topk {topk}`",
                )
            )
        if tokenizer is not None:
            self._tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
            want = self.manifest.get("tokenizer", {}).get("fingerprint")
            have = tokenizer_fingerprint(tokenizer)
            if want != have:
                problems.append(
                    (
                        cache_path,
                        f"the run's tokenizer (fingerprint {have}) is not the one the cache "
                        f"{self.directory} was "
                        f"built with ({want}): its token ids would mean other tokens; rebuild with "
                        f"`{rebuild}`",
                    )
                )
        if template is not None:
            want_t = self.manifest.get("template", {})
            have_fp = template_fingerprint(template)
            if want_t.get("fingerprint") != have_fp:
                problems.append(
                    (
                        cache_path,
                        f"the run's template {template_name(template)!r} (fingerprint {have_fp}) is "
                        f"not the one "
                        f"the cache {self.directory} was built with ({want_t.get('name')!r}, "
                        f"{want_t.get('fingerprint')}): samples would encode differently; rebuild with "
                        f"`{rebuild}`",
                    )
                )
        return problems

    # -- reading ------------------------------------------------------------------------
    def rows(self, key: str) -> SampleRows:
        """The cached rows of one sample (raises :class:`KeyError` if absent)."""
        entry = self._index[key]
        shard = self._shards[entry.shard]

        def part(name: str) -> torch.Tensor:
            return shard.get_slice(name)[entry.start : entry.end]

        return SampleRows(
            key=key,
            length=entry.length,
            positions=part("positions"),
            logprobs=part("logprobs"),
            ids=part("ids"),
            tokens=part("tokens"),
            token_logprobs=part("token_logprobs"),
        )

    def batch_topk(
        self,
        model_inputs: Mapping[str, Any],
        *,
        topk: int | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher top-K of a collated (untrimmed) batch, aligned with its logits positions.

        Returns ``(logprobs [B, S, K] float32, ids [B, S, K] int64)``: row ``[b, s]`` is the
        teacher's top-K at the logits position ``s`` of sample ``b`` (predicting
        ``labels[b, s + 1]``); positions without a cached row (prompt, padding) hold
        ``-inf`` / ``0``. ``topk`` below the cached K truncates (rows are sorted descending).
        Raises :class:`TeacherCacheError` naming the sample and the rebuild command when a
        sample is not cached or its labelled positions differ from the cached ones, and
        :class:`~kdcompose.teachers.audit.TeacherAlignmentError` when the tokens the cache scored
        differ from the sample's at any cached position (the audit).
        """
        k = self.topk if topk is None else int(topk)
        if not 1 <= k <= self.topk:
            raise TeacherCacheError(f"topk must be in 1..{self.topk} (the cache's K), got {topk}")
        input_ids = model_inputs["input_ids"]
        labels = model_inputs.get("labels")
        if labels is None:
            raise TeacherCacheError("batch_topk needs the batch's `labels` (to find its labelled positions)")
        device = torch.device(device) if device is not None else input_ids.device
        batch, seq = input_ids.shape
        logprobs = torch.full((batch, seq, k), float("-inf"), dtype=torch.float32)
        ids = torch.zeros((batch, seq, k), dtype=torch.int64)
        keys = sample_keys(
            model_inputs,
            **{
                name: int(self.manifest[name])
                for name in ("image_token_id", "video_token_id")
                if self.manifest.get(name) is not None
            },
        )
        for b, (key, real) in enumerate(zip(keys, unpadded_positions(model_inputs), strict=True)):
            real = real.to("cpu")
            sample_ids = input_ids[b, real.to(input_ids.device)].to("cpu")
            expected = labelled_positions(labels[b, real.to(labels.device)].to("cpu"))
            if key not in self._index:
                raise TeacherCacheError(self._missing_message(b, key, sample_ids, expected))
            rows = self.rows(key)
            stored = rows.positions.to(torch.int64)
            if rows.length != real.numel() or not torch.equal(expected, stored):
                raise TeacherCacheError(
                    f"sample {b} of the batch (key {key}) has {expected.numel()} labelled positions "
                    f"but the cache "
                    f"holds {stored.numel()} (length {rows.length} vs {real.numel()}): its labels "
                    f"changed since "
                    f"the cache was built; rebuild with `{rebuild_command(self.manifest, self.directory)}`"
                )
            check_same_tokens(
                sample_ids[stored + 1].tolist(),
                rows.tokens.tolist(),
                source=f"the teacher cache {self.directory}",
                sample=f"sample {b} of the batch (key {key})",
                positions=(stored + 1).tolist(),
                tokenizer=self._tokenizer,
                fix=f"the cache does not hold this sample's teacher; rebuild it with "
                f"`{rebuild_command(self.manifest, self.directory)}`",
            )
            target = real[stored]
            logprobs[b, target] = rows.logprobs[:, :k].float()
            ids[b, target] = rows.ids[:, :k].to(torch.int64)
        return logprobs.to(device), ids.to(device)

    def _completion_owner(self, tokens: torch.Tensor) -> str | None:
        """The key of a cached sample whose scored tokens (its completion) equal ``tokens``; the
        index is built on the first miss only (it reads every shard's ``tokens``)."""
        if self._by_completion is None:
            self._by_completion = {}
            for key, entry in self._index.items():
                cached = self._shards[entry.shard].get_slice("tokens")[entry.start : entry.end]
                self._by_completion.setdefault(cached.to(torch.int32).numpy().tobytes(), key)
        return self._by_completion.get(tokens.to(torch.int32).numpy().tobytes())

    def _missing_message(self, row: int, key: str, tokens: torch.Tensor, labelled: torch.Tensor) -> str:
        prefix = ""
        if self._tokenizer is not None:
            try:
                text = self._tokenizer.decode(tokens[:48].tolist())
                prefix = f", starting {text[:80]!r}"
            except Exception:  # decoding is a courtesy; the key and row still identify the sample
                prefix = ""
        if not prefix:
            prefix = f", first token ids {tokens[:12].tolist()}"
        rebuild = rebuild_command(self.manifest, self.directory)
        owner = self._completion_owner(tokens[labelled + 1]) if labelled.numel() else None
        if owner is not None:
            cached = self.rows(owner)
            first, here = int(cached.positions[0]) + 1, int(labelled[0]) + 1
            return (
                f"sample {row} of the batch (key {key}, {tokens.numel()} tokens{prefix}) is not in the "
                f"teacher cache {self.directory}, but the same completion ({labelled.numel()} tokens) is, "
                f"under key {owner}: there it starts at token {first} of {cached.length}, here at token "
                f"{here} of {tokens.numel()}. What comes before it encodes differently (the template, "
                f"system prompt, images or tokenizer changed since the build), so the cached teacher saw "
                f"another text. Train with the build's settings, or rebuild with `{rebuild}`"
            )
        return (
            f"sample {row} of the batch (key {key}, {tokens.numel()} tokens{prefix}) is not in the teacher "
            f"cache {self.directory} ({len(self)} samples): the data, template or tokenizer changed since "
            f"it was built. Rebuild (it resumes, adding only missing samples) with `{rebuild}`"
        )


def rebuild_command(manifest: Mapping[str, Any], directory: str | os.PathLike[str]) -> str:
    """The exact command that (re)builds a cache, from what the manifest recorded."""
    config = manifest.get("config") or "CONFIG.yaml"
    parts = ["kdcompose", "teacher-cache", str(config), "--out", str(directory)]
    if manifest.get("topk") is not None:
        parts += ["--topk", str(manifest["topk"])]
    if manifest.get("dtype") not in (None, "float16"):
        parts += ["--dtype", str(manifest["dtype"])]
    return " ".join(parts)


def integrity_problem(
    directory: str | os.PathLike[str], manifest: Mapping[str, Any], *, shards: bool = True, full: bool = False
) -> str | None:
    """Why a cache cannot be used as it is (None: it can): a format this kdcompose does not read,
    or (``shards``) missing, damaged, foreign or unlisted shards
    (:func:`kdcompose.teachers.cache_integrity.verify_cache`; ``full`` hashes every shard).
    What ``kdcompose validate`` and train's preflight report before any model loads."""
    found = manifest.get("format")
    rebuild = rebuild_command(manifest, directory)
    if found != FORMAT:
        lacks = OLD_FORMATS.get(str(found))
        why = f" ({lacks})" if lacks else ""
        return (
            f"{directory} was written in format {found!r}{why}; this kdcompose reads {FORMAT!r}: delete it "
            f"(or choose another --out) and build it again with `{rebuild}`"
        )
    if not shards:
        return None
    issues = verify_cache(directory, manifest, full=full)
    return issues_message(directory, issues, rebuild) if issues else None
