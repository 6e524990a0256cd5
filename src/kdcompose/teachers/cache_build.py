"""Build a teacher top-K cache: ``kdcompose teacher-cache CONFIG.yaml --out DIR``.

The cache is only useful if its rows are found again at training time, so every step that
decides what the teacher sees is ms-swift's own, taken from the same places a GKD run takes it:

- arguments: the config goes through kdcompose's loader and ``swift_kwargs`` /
  ``build_arguments`` exactly as ``kdcompose train`` does (kdcompose-only keys such as
  ``loss_terms``, ``teacher_cache`` and the ``gkd_logits_topk`` K are read here and stripped);
- models and template: ms-swift's ``SwiftRLHF`` pipeline loads the teacher like a run does
  (``_prepare_single_model('teacher', ...)``), but only the student's *processor* (no student
  weights); the template comes from that processor in ``train`` mode, as in a run;
- data: ``SwiftRLHF._prepare_dataset`` (loading, preprocessing, the train / val split);
- encoding: the GKD trainer's own ``to_samples``, ``encode_gkd_samples`` and
  ``template.data_collator`` inside the trainer's ``_template_context``;
- the teacher forward: the batch minus ``labels``, with the template's post-encode hook on the
  teacher (images become embeddings inside the call, as in training).

Then, for each sample, the top-K of ``log_softmax(logits)`` (T = 1) at each labelled position
is stored under the sample's content key. Samples already in ``DIR`` are skipped, so an
interrupted build resumes, and a deleted shard is rebuilt alone. ``NPROC_PER_NODE=N`` runs N
processes on disjoint slices of the data (one GPU each when there are GPUs); each writes its own
shards and the launcher writes the merged manifest.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdcompose.errors import ConfigError, ConfigIssue
from kdcompose.teachers.cache import (
    CHECKSUM,
    DTYPES,
    FORMAT,
    SampleRows,
    TeacherCache,
    cache_identity,
    model_fingerprint,
    read_manifest,
    summarize_records,
    template_fingerprint,
    template_name,
    tokenizer_fingerprint,
    write_manifest,
    write_shard,
)
from kdcompose.teachers.cache_integrity import stamp_written
from kdcompose.teachers.cache_keys import labelled_positions, sample_keys, unpadded_positions
from kdcompose.teachers.cache_repair import RepairPlan, apply_repair, plan_repair, repair_summary

RANK_ENV = "KDCOMPOSE_CACHE_RANK"
WORLD_ENV = "KDCOMPOSE_CACHE_WORLD"
DEFAULT_SAMPLES_PER_SHARD = 256
TOPK_CHUNK_ROWS = 1024
"""Rows of ``[rows, vocab]`` float32 log-softmax computed at once (bounds peak memory)."""
_STRIPPED_OWN_KEYS = {
    "rlhf": ("loss_terms", "llm_kd_weight", "teacher_cache", "teachers"),
    "custom": ("visual_kd",),
}


def _find(data: Mapping[str, Any], key: str) -> tuple[str, Any] | None:
    for section, body in data.items():
        if isinstance(body, Mapping) and key in body:
            return f"{section}.{key}", body[key]
    return None


def config_topk(data: Mapping[str, Any]) -> tuple[str, int] | None:
    """The K a config trains with: ``rlhf.loss_terms.lm_jsd.topk`` or ms-swift's ``gkd_logits_topk``."""
    rlhf = data.get("rlhf") if isinstance(data.get("rlhf"), Mapping) else {}
    terms = rlhf.get("loss_terms") if isinstance(rlhf.get("loss_terms"), Mapping) else {}
    lm_jsd = terms.get("lm_jsd") if isinstance(terms.get("lm_jsd"), Mapping) else {}
    if lm_jsd.get("topk") is not None:
        return "rlhf.loss_terms.lm_jsd.topk", lm_jsd["topk"]
    found = _find(data, "gkd_logits_topk")
    if found is not None and found[1] is not None:
        return found
    return None


def prepare_config(config_path: str | Path, topk: int | None) -> tuple[Any, int]:
    """Load the config for caching: returns ``(KDConfig, K)``; ConfigError naming keys otherwise.

    The cache needs the run's data, template and teacher, not its loss composition, so the
    composition keys are dropped before validation (their top-k settings are read first).
    """
    from kdcompose.config import parse_config
    from kdcompose.yaml_io import load_yaml_file

    source = str(config_path)
    raw = load_yaml_file(config_path)
    if not isinstance(raw, Mapping):
        raise ConfigError.single("", "the config must be a mapping of sections", source)
    issues: list[ConfigIssue] = []
    found = config_topk(raw)
    k = topk
    if k is None:
        if found is None:
            raise ConfigError.single(
                "rlhf.loss_terms.lm_jsd.topk",
                "the cache needs K, the number of teacher tokens kept per position: pass `--topk K` or set "
                "`rlhf.loss_terms.lm_jsd.topk` (or ms-swift's `rlhf.gkd_logits_topk`) in the config",
                source,
            )
        k = found[1]
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        where = "--topk" if topk is not None else found[0]  # type: ignore[index]
        issues.append(ConfigIssue(where, f"K must be a whole number >= 1, got {k!r}"))
    data = copy.deepcopy(dict(raw))
    for section, body in data.items():
        if isinstance(body, dict):
            body.pop("gkd_logits_topk", None)
            for key in _STRIPPED_OWN_KEYS.get(section, ()):
                body.pop(key, None)
    teacher = _find(data, "teacher_model")
    if teacher is None or teacher[1] in (None, ""):
        issues.append(
            ConfigIssue(
                teacher[0] if teacher else "model.teacher_model",
                "the cache runs the config's teacher: set `teacher_model: <model id or path>` "
                "(with `teacher_model_type` if needed)",
            )
        )
    lmbda = _find(data, "lmbda")
    if lmbda is not None and isinstance(lmbda[1], (int, float)) and lmbda[1] > 0:
        issues.append(
            ConfigIssue(
                lmbda[0],
                f"lmbda {lmbda[1]} > 0: student-generated completions cannot be cached (they do not exist "
                "before training); set `lmbda: 0` to train from a cache",
            )
        )
    if issues:
        raise ConfigError(issues, source=source)
    return parse_config(data, source=source), int(k)


class _Encoder:
    """Borrows the GKD trainer's encoding methods (``to_samples``, ``_template_context``) without
    a trainer, so the cache encodes rows with ms-swift's code, not a copy of it."""

    def __init__(self, template: Any) -> None:
        from swift.rlhf_trainers.gkd_trainer import GKDTrainer

        self.template = template
        self.model = None
        self.sample_cls = GKDTrainer.sample_cls
        self._trainer_cls = GKDTrainer

    def encode(self, rows: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        from swift.rlhf_trainers.gkd_helpers import encode_gkd_samples

        samples = self._trainer_cls.to_samples(self, rows)
        with self._trainer_cls._template_context(self, self.template):
            encoded, _, has_opsd = encode_gkd_samples(samples, self.template)
        if has_opsd:
            raise ConfigError.single(
                "data.dataset",
                "the dataset gives the teacher its own view of samples (OPSD: teacher_messages / "
                "teacher_images); "
                "the teacher cache keys rows by the student's encoding and does not support that",
            )
        return encoded

    def collate(self, encoded: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
        from swift.utils import to_device

        with self._trainer_cls._template_context(self, self.template):
            # the collator pops entries from the encoded dicts: give it copies
            return to_device(self.template.data_collator([dict(e) for e in encoded]), device)


def _load_pipeline(config: Any, output_dir: str) -> Any:
    """ms-swift's RLHF pipeline with the teacher loaded and the student's processor only."""
    from swift.pipelines.train.rlhf import SwiftRLHF

    from kdcompose.integrations.swift.launch.command import build_arguments, swift_kwargs

    class _CachePipeline(SwiftRLHF):
        def _prepare_model_tokenizer(self) -> None:
            args = self.args
            self.ref_model = self.value_model = self.reward_model = None
            self.teacher_model = None
            result = self._prepare_single_model(
                "teacher", None, args.teacher_model_type, args.teacher_model_revision
            )
            if result is None:
                raise ConfigError.single("model.teacher_model", "no teacher_model to run")
            self.teacher_model = result[0]
            self.model, self.processor = args.get_model_processor(load_model=False)

        def _prepare_template(self) -> None:
            super()._prepare_template()
            template = self.template
            if template.model is None and getattr(template, "dummy_model", None) is None:
                # Collators that need the model's config (Qwen-VL's rope index) build a meta-device
                # copy of the *student* from its folder, as in a run; its model_type is given
                # because auto-detection can be ambiguous (qwen2_vl vs qwen2_gme).
                from swift.model import get_model_processor

                with torch.device("meta"):
                    template.dummy_model = get_model_processor(
                        template.model_info.model_dir,
                        model_type=self.args.model_type,
                        return_dummy_model=True,
                    )[0]

        def _save_val_dataset(self, val_dataset: Any) -> None:
            return None  # a run writes val_dataset.jsonl into its output_dir; the cache does not

    kwargs = {**swift_kwargs(config), "output_dir": output_dir, "report_to": ["none"]}
    return _CachePipeline(build_arguments(config, kwargs))


def _existing_keys(directory: Path, manifest: dict[str, Any]) -> set[str]:
    """Keys of the samples in the shards the manifest lists (their bytes were checked before)."""
    return set(TeacherCache(directory, manifest).keys()) if manifest.get("shards") else set()


def _check_compatible(directory: Path, manifest: Mapping[str, Any]) -> None:
    """Refuse to add rows to a cache built with other settings (the rows would not mix). A
    directory without a manifest has nothing to mix with (:func:`plan_repair` refused shards
    without one already)."""
    try:
        old = read_manifest(directory)
    except Exception:
        return
    for field in ("topk", "dtype", "vocab_size"):
        if old.get(field) != manifest.get(field):
            raise ConfigError.single(
                "--out",
                f"{directory} holds a cache with {field} = {old.get(field)!r}, this build asks for "
                f"{manifest.get(field)!r}: delete it or choose another --out",
            )
    for part in ("teacher", "tokenizer", "template"):
        if old.get(part, {}).get("fingerprint") != manifest.get(part, {}).get("fingerprint"):
            raise ConfigError.single(
                "--out",
                f"{directory} was built with another {part} (fingerprint "
                f"{old.get(part, {}).get('fingerprint')}, "
                f"now {manifest.get(part, {}).get('fingerprint')}): delete it or choose another --out",
            )


def _next_shard_seq(directory: Path, rank: int) -> int:
    seqs = [
        int(m.group(1))
        for p in directory.glob(f"shard-r{rank}-*.safetensors")
        if (m := re.fullmatch(rf"shard-r{rank}-(\d+)\.safetensors", p.name))
    ]
    return max(seqs, default=-1) + 1


def _topk_rows(
    logits: torch.Tensor, tokens: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-K of ``log_softmax`` of rows ``[N, V]`` and the log-probability of each row's scored
    token, in chunks (the float32 log-softmax of all rows may not fit). The same operations as
    :func:`kdcompose.functional.teacher_topk` (float32, float64 kept), so the values are identical."""
    values, ids, scored = [], [], []
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    for start in range(0, logits.shape[0], TOPK_CHUNK_ROWS):
        logprobs = torch.log_softmax(logits[start : start + TOPK_CHUNK_ROWS].to(dtype), dim=-1)
        v, i = torch.topk(logprobs, k, dim=-1)
        values.append(v)
        ids.append(i)
        chunk_tokens = tokens[start : start + TOPK_CHUNK_ROWS].to(logprobs.device, torch.int64)
        scored.append(logprobs.gather(-1, chunk_tokens[:, None]).squeeze(-1))
    if not values:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.int64), torch.zeros(0)
    return torch.cat(values), torch.cat(ids), torch.cat(scored)


@dataclass
class CachePipeline:
    """What a build needs, loaded once: the teacher, the template, the datasets and the encoder.

    Reusable across builds (the benchmark times several builds on one pipeline)."""

    config_path: str
    topk: int
    args: Any
    teacher: Any
    template: Any
    train_dataset: Any
    val_dataset: Any
    encoder: _Encoder
    device: torch.device
    multimodal: bool

    def hook_on(self) -> None:
        """The template's post-encode hook on the teacher, as training registers it (pixels become
        embeddings inside the forward)."""
        if self.multimodal:
            self.template.register_post_encode_hook([self.teacher])

    def hook_off(self) -> None:
        if self.multimodal:
            self.template.remove_post_encode_hook()


def open_pipeline(config_path: str | Path, topk: int | None = None) -> CachePipeline:
    """Load the config's teacher, template and data through ms-swift (see the module docstring)."""
    from kdcompose.integrations.swift.runtime import prepare_swift_import

    config, k = prepare_config(config_path, topk)
    prepare_swift_import()
    scratch = tempfile.mkdtemp(prefix="kdcompose-teacher-cache-")
    try:
        swift = _load_pipeline(config, scratch)
        train_dataset, val_dataset = swift._prepare_dataset()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    teacher = swift.teacher_model
    return CachePipeline(
        config_path=str(config_path),
        topk=k,
        args=swift.args,
        teacher=teacher,
        template=swift.template,
        train_dataset=train_dataset,
        val_dataset=val_dataset,
        encoder=_Encoder(swift.template),
        device=next(teacher.parameters()).device,
        multimodal=bool(swift.args.model_meta.is_multimodal),
    )


def build_cache(
    config_path: str | Path,
    out: str | Path,
    *,
    topk: int | None = None,
    dtype: str = "float16",
    batch_size: int | None = None,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    write_final_manifest: bool = True,
    pipeline: CachePipeline | None = None,
) -> dict[str, Any]:
    """Cache the config's teacher top-K for its train (and val) data in ``out``; returns the manifest.

    ``rank`` / ``world_size`` take every ``world_size``-th batch (the launcher sets them).
    Samples already cached are skipped. On an existing cache, every shard is checked in full
    first and the damaged or missing ones are recomputed (:mod:`kdcompose.teachers.cache_repair`;
    with several ranks the launcher does that before they start). Returns the manifest written
    (or, without ``write_final_manifest``, the manifest this process would write). ``pipeline``
    reuses an :func:`open_pipeline` (its config must be ``config_path``).
    """
    from tqdm.auto import tqdm

    from kdcompose import __version__

    if dtype not in DTYPES:
        raise ConfigError.single("--dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if samples_per_shard < 1:
        raise ConfigError.single("--samples-per-shard", f"must be >= 1, got {samples_per_shard}")
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    alone = world_size == 1
    plan = plan_repair(directory) if alone else RepairPlan()  # before the teacher loads
    if pipeline is None:
        pipeline = open_pipeline(config_path, topk)
    k = int(topk) if topk is not None else pipeline.topk
    train_dataset, val_dataset = pipeline.train_dataset, pipeline.val_dataset
    args = pipeline.args
    teacher = pipeline.teacher
    template = pipeline.template
    device = pipeline.device
    vocab_size = int(teacher.get_output_embeddings().weight.shape[0])
    model_dir = getattr(getattr(teacher, "model_info", None), "model_dir", None) or args.teacher_model
    teacher_adapters = list(getattr(args, "teacher_adapters", None) or [])
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "kdcompose_version": __version__,
        "config": str(Path(config_path).resolve()),
        "teacher": {
            "path": str(args.teacher_model),
            "model_type": args.teacher_model_type,
            "adapters": teacher_adapters,
            "fingerprint": model_fingerprint(model_dir)
            if not teacher_adapters
            else model_fingerprint(model_dir)
            + "+"
            + "+".join(model_fingerprint(a) for a in teacher_adapters),
        },
        "tokenizer": {
            "fingerprint": tokenizer_fingerprint(template.tokenizer),
            "size": len(template.tokenizer),
        },
        "template": {"name": template_name(template), "fingerprint": template_fingerprint(template)},
        "vocab_size": vocab_size,
        "topk": k,
        "dtype": dtype,
        "temperature": 1.0,
        "image_token_id": getattr(template, "image_token_id", None),
        "video_token_id": getattr(template, "video_token_id", None),
    }
    cache_id = cache_identity(manifest)
    manifest["cache_id"] = cache_id
    _check_compatible(directory, manifest)
    if alone:
        records, repaired = apply_repair(directory, plan)
    else:  # the launcher repaired the directory; this rank adds to what its manifest lists
        records, repaired = _listed_records(directory), {}
    key_ids = {
        name: int(manifest[name])
        for name in ("image_token_id", "video_token_id")
        if manifest[name] is not None
    }
    done = _existing_keys(directory, {**manifest, "shards": records})
    encoder = pipeline.encoder
    batch_size = batch_size or int(args.per_device_train_batch_size)
    pipeline.hook_on()
    seq = _next_shard_seq(directory, rank)
    added = {"samples": 0, "positions": 0}
    started = time.perf_counter()

    def flush(buffer: list[SampleRows], split: str) -> None:
        nonlocal seq
        name = f"shard-r{rank}-{seq:05d}.safetensors"
        record = write_shard(directory / name, buffer, topk=k, dtype=dtype, split=split, cache_id=cache_id)
        records[name] = record
        stamp_written(directory, name, record[CHECKSUM])
        added["samples"] += record["samples"]
        added["positions"] += record["positions"]
        seq += 1
        if alone:
            write_manifest(directory, {**manifest, **summarize_records(records), "complete": False})

    try:
        for split, dataset in (("train", train_dataset), ("val", val_dataset)):
            if dataset is None or len(dataset) == 0:
                continue
            buffer: list[SampleRows] = []
            batches = range(0, len(dataset), batch_size)
            mine = [s for i, s in enumerate(batches) if i % world_size == rank]
            bar = tqdm(
                total=sum(min(batch_size, len(dataset) - s) for s in mine),
                desc=f"teacher-cache {split}" + (f" [rank {rank}]" if world_size > 1 else ""),
                unit="sample",
                disable=not progress,
            )
            for start in mine:
                rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
                encoded = encoder.encode(rows)
                collated = encoder.collate(encoded, device)
                keys = sample_keys(collated, **key_ids)
                todo = [i for i, key in enumerate(keys) if key not in done]
                todo = [i for n, i in enumerate(todo) if keys[i] not in {keys[j] for j in todo[:n]}]
                if todo:
                    # a partly cached batch is re-collated without its cached samples
                    batch = (
                        collated
                        if len(todo) == len(rows)
                        else encoder.collate([encoded[i] for i in todo], device)
                    )
                    buffer += _teacher_rows(teacher, batch, [keys[i] for i in todo], k)
                    done.update(keys[i] for i in todo)
                bar.update(len(rows))
                if len(buffer) >= samples_per_shard:
                    flush(buffer, split)
                    buffer = []
            if buffer:
                flush(buffer, split)
            bar.close()
    finally:
        pipeline.hook_off()
    manifest["last_build"] = {
        "added_samples": added["samples"],
        "added_positions": added["positions"],
        "seconds": round(time.perf_counter() - started, 3),
        "world_size": world_size,
        **({"repaired": repaired} if repaired else {}),
    }
    manifest = {**manifest, **summarize_records(records)}
    if write_final_manifest:
        manifest["complete"] = True
        write_manifest(directory, manifest)
    return manifest


def _listed_records(directory: Path) -> dict[str, dict[str, Any]]:
    from kdcompose.teachers.cache_integrity import shard_records

    try:
        return shard_records(read_manifest(directory))
    except Exception:  # no manifest yet: a new cache
        return {}


@torch.no_grad()
def _teacher_rows(teacher: Any, batch: Mapping[str, Any], keys: list[str], k: int) -> list[SampleRows]:
    """Run the teacher on one collated batch (as GKD's compute_loss does: all inputs but labels)
    and cut each sample's top-K rows at its labelled positions, with the token each row scored."""
    forward = {name: value for name, value in batch.items() if name != "labels"}
    logits = teacher(**forward).logits
    labels = batch["labels"]
    input_ids = batch["input_ids"]
    out = []
    for b, (key, real) in enumerate(zip(keys, unpadded_positions(batch), strict=True)):
        positions = labelled_positions(labels[b, real])
        tokens = input_ids[b, real[positions + 1]]
        values, ids, scored = _topk_rows(logits[b, real[positions]], tokens, k)
        out.append(
            SampleRows(
                key=key,
                length=int(real.numel()),
                positions=positions.cpu(),
                logprobs=values.cpu(),
                ids=ids.cpu(),
                tokens=tokens.cpu(),
                token_logprobs=scored.cpu(),
            )
        )
    return out


def run_cli(
    config_path: str,
    out: str,
    *,
    topk: int | None,
    dtype: str,
    batch_size: int | None,
    samples_per_shard: int,
) -> int:
    """The ``kdcompose teacher-cache`` command; returns the exit code (2: invalid config)."""
    try:
        nproc = int(os.environ.get("NPROC_PER_NODE", "1"))
    except ValueError:
        print(
            f"kdcompose teacher-cache: NPROC_PER_NODE must be a whole number, got "
            f"{os.environ['NPROC_PER_NODE']!r}",
            file=sys.stderr,
        )
        return 2
    rank = int(os.environ.get(RANK_ENV, "0"))
    world = int(os.environ.get(WORLD_ENV, "1"))
    try:
        if nproc > 1 and RANK_ENV not in os.environ:
            return _launch(
                config_path,
                out,
                nproc,
                topk=topk,
                dtype=dtype,
                batch_size=batch_size,
                samples_per_shard=samples_per_shard,
            )
        manifest = build_cache(
            config_path,
            out,
            topk=topk,
            dtype=dtype,
            batch_size=batch_size,
            samples_per_shard=samples_per_shard,
            rank=rank,
            world_size=world,
            write_final_manifest=world == 1,
        )
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 2
    if world > 1:
        _write_rank_manifest(Path(out), rank, manifest)
        return 0
    _report(manifest, out)
    return 0


def _write_rank_manifest(directory: Path, rank: int, manifest: Mapping[str, Any]) -> None:
    import json

    path = directory / f".rank{rank}.json"
    path.write_text(json.dumps(dict(manifest)), encoding="utf-8")


def _report(manifest: Mapping[str, Any], out: str) -> None:
    last = manifest.get("last_build", {})
    per_pos = manifest["bytes"] / max(1, manifest["num_positions"])
    print(
        f"kdcompose teacher-cache: {out}: {manifest['num_samples']} samples, "
        f"{manifest['num_positions']} positions "
        f"(K = {manifest['topk']}, {manifest['dtype']}, {per_pos:.1f} bytes/position); this run added "
        f"{last.get('added_samples', 0)} samples in {last.get('seconds', 0):.1f} s"
    )
    repaired = repair_summary(last.get("repaired") or {})
    if repaired:
        print(f"kdcompose teacher-cache: {out}: {repaired}")


def _launch(config_path: str, out: str, nproc: int, **options: Any) -> int:
    """Run ``nproc`` builder processes on disjoint slices (one GPU each if there are GPUs), then
    merge: the manifest's counts come from the shards every rank wrote."""
    import json

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    command = [sys.executable, "-m", "kdcompose.cli", "teacher-cache", config_path, "--out", out]
    if options["topk"] is not None:
        command += ["--topk", str(options["topk"])]
    command += ["--dtype", options["dtype"], "--samples-per-shard", str(options["samples_per_shard"])]
    if options["batch_size"] is not None:
        command += ["--batch-size", str(options["batch_size"])]
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    _, repaired = apply_repair(directory, plan_repair(directory))  # once, before the ranks start
    processes = []
    for rank in range(nproc):
        env = {**os.environ, RANK_ENV: str(rank), WORLD_ENV: str(nproc)}
        env.pop("NPROC_PER_NODE", None)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[rank % len(gpus)]
        (directory / f".rank{rank}.json").unlink(missing_ok=True)
        processes.append(subprocess.Popen(command, env=env))
    codes = [p.wait() for p in processes]
    if any(codes):
        print(
            f"kdcompose teacher-cache: rank exit codes {codes}; re-run the same command to resume",
            file=sys.stderr,
        )
        return max(codes)
    ranks = [json.loads((directory / f".rank{r}.json").read_text(encoding="utf-8")) for r in range(nproc)]
    records = {name: record for r in ranks for name, record in r["shards"].items()}
    manifest = {**ranks[0], **summarize_records(records), "complete": True}
    manifest["last_build"] = {
        "added_samples": sum(r["last_build"]["added_samples"] for r in ranks),
        "added_positions": sum(r["last_build"]["added_positions"] for r in ranks),
        "seconds": max(r["last_build"]["seconds"] for r in ranks),
        "world_size": nproc,
        **({"repaired": repaired} if repaired else {}),
    }
    write_manifest(directory, manifest)
    for r in range(nproc):
        (directory / f".rank{r}.json").unlink(missing_ok=True)
    _report(manifest, out)
    return 0
