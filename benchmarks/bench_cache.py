"""Teacher-cache benchmark: bytes per cached position and build throughput vs the live teacher.

Usage (from the repository root)::

    python benchmarks/bench_cache.py              # K = 64, float16, the tiny Qwen2-VL pair, 32 samples
    python benchmarks/bench_cache.py --topk 8 --dtype float32 --samples 64

One process loads the config's teacher and data once through ms-swift's RLHF pipeline
(``kdcompose.teachers.cache_build.open_pipeline``, the same path ``kdcompose teacher-cache``
takes), then measures on the same batches:

* ``build``   -- ``build_cache`` into an empty directory: encode + collate + teacher forward +
                 top-K + safetensors writes (pipeline loading excluded);
* ``forward`` -- the live teacher's forward alone on the same collated batches (what a training
                 step pays for the teacher when it is loaded; encoding excluded).

Throughput is cached (labelled) positions per second; the size is the shard bytes on disk
divided by the cached positions, against the ``6K + 32`` bound of issue 11. Each is the best
of ``--rounds`` rounds (a shared machine only ever slows a round down).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml


def _config(tmp: Path, samples: int) -> Path:
    from kdcompose.testing import tiny_gkd_args, tiny_run_env

    os.environ.update(tiny_run_env())
    args = tiny_gkd_args("qwen2_vl", str(tmp / "run"), dataset_size=samples)
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump({"rlhf": args}, sort_keys=False), encoding="utf-8")
    return path


@torch.no_grad()
def _forward_only(pipeline, batch_size: int) -> tuple[float, int]:
    """Seconds of the teacher's forward over the train set, and the labelled positions it covers."""
    from kdcompose.teachers.cache_keys import labelled_positions, unpadded_positions

    teacher, dataset = pipeline.teacher, pipeline.train_dataset
    batches = []
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batches.append(pipeline.encoder.collate(pipeline.encoder.encode(rows), pipeline.device))
    positions = sum(
        int(labelled_positions(b["labels"][i, real]).numel())
        for b in batches
        for i, real in enumerate(unpadded_positions(b))
    )
    pipeline.hook_on()
    try:
        started = time.perf_counter()
        for batch in batches:
            teacher(**{k: v for k, v in batch.items() if k != "labels"})
        return time.perf_counter() - started, positions
    finally:
        pipeline.hook_off()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    from kdcompose.integrations.swift.runtime import prepare_swift_import

    prepare_swift_import()
    from kdcompose.teachers.cache_build import build_cache, open_pipeline

    tmp = Path(tempfile.mkdtemp(prefix="kdcompose-bench-cache-"))
    try:
        config = _config(tmp, args.samples)
        pipeline = open_pipeline(config, args.topk)
        builds, forwards = [], []
        manifest = None
        for r in range(args.rounds):
            out = tmp / f"cache{r}"
            manifest = build_cache(
                config,
                out,
                topk=args.topk,
                dtype=args.dtype,
                batch_size=args.batch_size,
                progress=False,
                pipeline=pipeline,
            )
            builds.append(manifest["last_build"]["seconds"])
            seconds, positions = _forward_only(pipeline, args.batch_size)
            forwards.append(seconds)
            assert positions == manifest["num_positions"], (positions, manifest["num_positions"])
        assert manifest is not None
        n = manifest["num_positions"]
        per_position = manifest["bytes"] / n
        bound = 6 * args.topk + 32
        build_rate, forward_rate = n / min(builds), n / min(forwards)
        print(
            f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"device {pipeline.device}; tiny Qwen2-VL teacher, {args.samples} samples, batch "
            f"{args.batch_size}, "
            f"K = {args.topk}, {args.dtype}, best of {args.rounds}\n"
        )
        print("| measure | value | reference | ratio |")
        print("|---|---|---|---|")
        print(
            f"| cache size per cached position | {per_position:.1f} B | bound 6K+32 = {bound} B "
            f"| {per_position / bound:.2f}x |"
        )
        print(
            f"| cache build throughput | {build_rate:,.0f} positions/s | live teacher forward "
            f"{forward_rate:,.0f} positions/s | {build_rate / forward_rate:.2f}x |"
        )
        print(
            f"\n{n} cached positions in {manifest['num_samples']} samples; shard bytes {manifest['bytes']:,}"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
