"""Offline teacher top-K cache: storage format, manifest, fingerprints and the training reader.

Layout of a cache directory (written by ``kdcompose teacher-cache``, see
:mod:`kdcompose.teachers.cache_build`)::

    DIR/manifest.json                      what was cached, from what, and how much
    DIR/shard-r<rank>-<seq>.safetensors    rows of a few hundred samples each

A shard is a plain safetensors file (memory-mapped on read, no pickle) holding

- ``keys``      uint8 ``[n, 16]``  sample keys (:func:`kdcompose.teachers.cache_keys.sample_keys`)
- ``offsets``   int64 ``[n + 1]``  the sample's rows are ``offsets[i]:offsets[i + 1]``
- ``lengths``   int32 ``[n]``      unpadded sequence length (a cheap consistency check)
- ``positions`` int32 ``[N]``      logits position of each row inside the unpadded sequence
- ``ids``       int32 ``[N, K]``   the teacher's top-K token ids, by descending probability
- ``logprobs``  ``[N, K]``         their log-probabilities at temperature 1 (float16 by default)

so a cached position costs ``6K + 4`` bytes with float16 plus ``28`` bytes per sample, well
under the ``6K + 32`` budget. Temperature is applied at training time by the loss, which is why
log-probabilities at T = 1 are stored (``log_softmax(z / T)`` is not recoverable from the
top-K of another temperature, but the top-K *set* is the same for every T, and the loss
renormalises over it).

Shards are written to a temporary name and renamed, so a shard either exists whole or not at
all; the manifest is rewritten (also atomically) after every shard. Every shard is self-describing,
so the reader indexes whatever shards exist, from any number of ranks.
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

from kdcompose.teachers.cache_keys import KEY_BYTES, labelled_positions, sample_keys, unpadded_positions

FORMAT = "kdcompose-teacher-cache/1"
MANIFEST_NAME = "manifest.json"
SHARD_GLOB = "shard-*.safetensors"
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
    path: str | os.PathLike[str], samples: Sequence[SampleRows], *, topk: int, dtype: str, split: str
) -> int:
    """Write one shard atomically; returns the number of rows (cached positions) in it."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    keys = torch.tensor([list(bytes.fromhex(s.key)) for s in samples], dtype=torch.uint8).reshape(
        -1, KEY_BYTES
    )
    counts = torch.tensor([int(s.positions.numel()) for s in samples], dtype=torch.int64)
    offsets = torch.zeros(len(samples) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    empty_rows = torch.zeros(0, topk)
    tensors = {
        "keys": keys,
        "offsets": offsets,
        "lengths": torch.tensor([s.length for s in samples], dtype=torch.int32),
        "positions": torch.cat([s.positions.reshape(-1).to(torch.int32).cpu() for s in samples])
        if samples
        else torch.zeros(0, dtype=torch.int32),
        "ids": torch.cat([s.ids.to(torch.int32).cpu() for s in samples] or [empty_rows.int()]),
        "logprobs": torch.cat([s.logprobs.to(DTYPES[dtype]).cpu() for s in samples] or [empty_rows]).to(
            DTYPES[dtype]
        ),
    }
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    metadata = {"format": FORMAT, "topk": str(topk), "dtype": dtype, "split": split}
    target = Path(path)
    _atomic_write_bytes(target, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return int(offsets[-1])


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
        from safetensors import safe_open

        self.directory = directory
        self.manifest = manifest
        self._tokenizer: Any = None
        self._shards: list[Any] = []
        self._index: dict[str, _Entry] = {}
        self.shard_paths = sorted(directory.glob(SHARD_GLOB))
        for number, path in enumerate(self.shard_paths):
            handle = safe_open(str(path), framework="pt")
            meta = handle.metadata() or {}
            if meta.get("format") != FORMAT or int(meta.get("topk", -1)) != self.topk:
                raise TeacherCacheError(
                    f"{path} is not a shard of this cache (format {meta.get('format')!r}, K "
                    f"{meta.get('topk')}, "
                    f"manifest K {self.topk}); delete it or rebuild the cache"
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
    def open(cls, directory: str | os.PathLike[str]) -> TeacherCache:
        """Open a cache directory (raises :class:`TeacherCacheError` naming the fix if it is not one)."""
        path = Path(directory)
        manifest = read_manifest(path)
        if manifest.get("format") != FORMAT:
            raise TeacherCacheError(
                f"{path} was written in format {manifest.get('format')!r}, this kdcompose reads {FORMAT!r}; "
                f"rebuild it with `{rebuild_command(manifest, path)}`"
            )
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
        return SampleRows(
            key=key,
            length=entry.length,
            positions=shard.get_slice("positions")[entry.start : entry.end],
            logprobs=shard.get_slice("logprobs")[entry.start : entry.end],
            ids=shard.get_slice("ids")[entry.start : entry.end],
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
        sample is not cached or its labelled positions differ from the cached ones.
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
            if key not in self._index:
                raise TeacherCacheError(
                    self._missing_message(b, key, input_ids[b, real.to(input_ids.device)])
                )
            rows = self.rows(key)
            expected = labelled_positions(labels[b, real.to(labels.device)].to("cpu"))
            stored = rows.positions.to(torch.int64)
            if rows.length != real.numel() or not torch.equal(expected, stored):
                raise TeacherCacheError(
                    f"sample {b} of the batch (key {key}) has {expected.numel()} labelled positions "
                    f"but the cache "
                    f"holds {stored.numel()} (length {rows.length} vs {real.numel()}): its labels "
                    f"changed since "
                    f"the cache was built; rebuild with `{rebuild_command(self.manifest, self.directory)}`"
                )
            target = real[stored]
            logprobs[b, target] = rows.logprobs[:, :k].float()
            ids[b, target] = rows.ids[:, :k].to(torch.int64)
        return logprobs.to(device), ids.to(device)

    def _missing_message(self, row: int, key: str, tokens: torch.Tensor) -> str:
        prefix = ""
        if self._tokenizer is not None:
            try:
                text = self._tokenizer.decode(tokens[:48].tolist())
                prefix = f", starting {text[:80]!r}"
            except Exception:  # decoding is a courtesy; the key and row still identify the sample
                prefix = ""
        if not prefix:
            prefix = f", first token ids {tokens[:12].tolist()}"
        return (
            f"sample {row} of the batch (key {key}, {tokens.numel()} tokens{prefix}) is not in the teacher "
            f"cache {self.directory} ({len(self)} samples): the data, template or tokenizer changed since "
            f"it was built. Rebuild (it resumes, adding only missing samples) with "
            f"`{rebuild_command(self.manifest, self.directory)}`"
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
