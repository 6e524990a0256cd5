"""Training step with the teacher elsewhere: live teacher vs top-K cache vs served teacher.

Usage (from the repository root)::

    python benchmarks/bench_teacher_sources.py            # 12 timed rounds; a few minutes on 2 cores
    python benchmarks/bench_teacher_sources.py --rounds 4 # a smoke test
    python benchmarks/bench_teacher_sources.py --teacher-scale 3  # a teacher 3x deeper and wider

One process builds the tiny Qwen2-VL pair through ms-swift 4.6's RLHF pipeline with the top-8
`lm_jsd` (`gkd_logits_topk: 8`, dataset completions), builds a float16 top-8 cache of its teacher
with `kdcompose teacher-cache`, and starts `kdcompose serve-teacher` on 127.0.0.1. The same
trainer, student and batches then run three variants of one training step:

* ``live``   -- the local teacher model's forward, top-8 from its logits;
* ``cache``  -- the default teacher is the cache (`rlhf.teacher_cache`): rows read by content key;
* ``served`` -- ms-swift's `teacher_model_server` path against the served teacher (HTTP on
  127.0.0.1, kdcompose's vLLM-free client), fetched while the generation batch is prepared.

Two timings per step: ``train`` = ``compute_loss`` + ``backward`` + ``AdamW.step`` (the step of
``bench_step.py``; where the live teacher's forward and the cache read happen), and ``whole`` =
``_prepare_inputs`` (batch encoding -- the same for all three -- and the served teacher's fetch) +
``train``. After warm-up, each
round runs every variant once in a rotated order; a ratio is the median over rounds of the
per-round ratio. Memory: the teacher's parameter bytes, which a run from a cache or a server does
not hold at all (its trainer loads no teacher: ``rlhf.teacher_cache`` drops ``teacher_model``),
and the step's extra peak resident set (``_memory.PeakMemory``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT / "benchmarks"))
try:
    import kdcompose  # noqa: F401
except ImportError:
    sys.path.insert(0, str(_ROOT / "src"))

import torch  # noqa: E402
import yaml  # noqa: E402

from _memory import PeakMemory  # noqa: E402

VARIANTS = ("live", "cache", "served")


def _teacher_spec(args: argparse.Namespace) -> dict[str, int] | None:
    """`--teacher-scale N`: a teacher N times the default tiny teacher's depth and width (real
    KD pairs a teacher many times the student's size; the default pair is 96 vs 64 wide)."""
    if args.teacher_scale == 1:
        return None
    n = args.teacher_scale
    return {"hidden_size": 96 * n, "num_layers": 3 * n, "num_heads": 6 * n, "intermediate_size": 192 * n}


def _config(out: Path, teacher_spec: dict[str, int] | None) -> dict[str, Any]:
    from kdcompose.testing import tiny_gkd_args

    flat = tiny_gkd_args("qwen2_vl", str(out), teacher_spec=teacher_spec, gkd_logits_topk=8)
    return {
        "rlhf": {k: flat.pop(k) for k in ("rlhf_type", "lmbda", "beta", "temperature", "gkd_logits_topk")},
        "training": flat,
    }


def _switch(trainer: Any, variant: str, cache_dir: Path, url: str) -> None:
    """Point the trainer's default teacher at `variant` (outside the timed region)."""
    from swift.rlhf_trainers.gkd_helpers import parse_teacher_model_server

    from kdcompose.teachers.server_client import VLLMFreeInferClient
    from kdcompose.teachers.sources import TeacherSource

    teachers = {}
    if variant == "cache":
        teachers = {"": TeacherSource("", "cache", str(cache_dir), "rlhf.teacher_cache")}
    served = variant == "served"
    trainer.use_teacher_api = served
    trainer.teacher_model_server = url if served else None
    trainer.teacher_configs = parse_teacher_model_server(url) if served else []
    trainer.teacher_clients = [VLLMFreeInferClient(base_urls=[url])] if served else []
    trainer.use_composer(trainer.kd_composer, teachers)


def run(args: argparse.Namespace) -> None:
    from kdcompose import parse_config
    from kdcompose.integrations.swift.launch.pipeline import build_trainer
    from kdcompose.integrations.swift.runtime import prepare_swift_import
    from kdcompose.serve.process import ServerProcess
    from kdcompose.testing import SWIFT_MODEL_TYPE, SWIFT_TEMPLATE, tiny_run_env

    os.environ.update(tiny_run_env())
    prepare_swift_import()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdcompose-bench-teachers-") as tmp_name:
        tmp = Path(tmp_name)
        data = _config(tmp / "out", _teacher_spec(args))
        (tmp / "live.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
        cache_dir = tmp / "cache"
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "kdcompose.cli",
                "teacher-cache",
                str(tmp / "live.yaml"),
                "--out",
                str(cache_dir),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        build_s = time.perf_counter() - t0
        trainer = build_trainer(parse_config(data))
        trainer.model.train()
        teacher_bytes = sum(p.numel() * p.element_size() for p in trainer.teacher_model.parameters())
        raw = next(iter(trainer.get_train_dataloader()))
        optimizer = torch.optim.AdamW([p for p in trainer.model.parameters() if p.requires_grad], lr=1e-6)
        teacher = data["training"]["teacher_model"]
        with ServerProcess(
            model=teacher,
            model_type=SWIFT_MODEL_TYPE["qwen2_vl"],
            template=SWIFT_TEMPLATE["qwen2_vl"],
            extra_args=["--torch-dtype", "float32"],
        ) as server:
            times: dict[str, list[float]] = {v: [] for v in VARIANTS}
            train_times: dict[str, list[float]] = {v: [] for v in VARIANTS}
            peaks: dict[str, list[int]] = {v: [] for v in VARIANTS}
            losses: dict[str, float] = {}
            for round_index in range(args.warmup + args.rounds):
                order = VARIANTS[round_index % 3 :] + VARIANTS[: round_index % 3]
                for variant in order:
                    _switch(trainer, variant, cache_dir, server.url)
                    batch = copy.deepcopy(raw)
                    trainer._buffered_inputs, trainer._step = None, 0
                    with PeakMemory("cpu") as peak:
                        t0 = time.perf_counter()
                        inputs = trainer._prepare_inputs(batch)
                        t1 = time.perf_counter()
                        loss = trainer.compute_loss(trainer.model, inputs)
                        loss.backward()
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        t2 = time.perf_counter()
                    if round_index >= args.warmup:
                        times[variant].append(t2 - t0)
                        train_times[variant].append(t2 - t1)
                        peaks[variant].append(peak.extra_bytes)
                    losses[variant] = float(loss.detach())
        wall = time.perf_counter() - started

    def ratio(series: dict[str, list[float]], a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(series[a], series[b], strict=True))

    mib = 2**20
    print(
        "# bench_teacher_sources: tiny qwen2_vl, top-8 lm_jsd (renorm), fp32, cpu, batch 2, dataset "
        "completions"
    )
    print(
        f"# torch={torch.__version__} threads={torch.get_num_threads()} rounds={args.rounds} "
        f"(+{args.warmup} warm-up)"
    )
    print(
        "# train = compute_loss + backward + AdamW step (bench_step.py's step); whole = _prepare_inputs + "
        "train"
    )
    print(
        "# (_prepare_inputs encodes the batch -- images, template -- and is where a served teacher is asked)"
    )
    print("# ratios = median of per-round ratios against live")
    print(f"# teacher: {args.teacher_scale}x the default tiny teacher's depth and width (--teacher-scale)")
    print(f"# teacher parameters a cache/server run does not hold: {teacher_bytes / mib:.1f} MiB")
    print(f"# cache build (kdcompose teacher-cache, float16, 32 samples incl. start-up): {build_s:.1f} s")
    print(
        "| variant | train s | train vs live | whole step s | whole vs live | extra peak RSS MiB | teacher "
        "params held | loss |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for v in VARIANTS:
        held = f"{teacher_bytes / mib:.1f} MiB" if v == "live" else "0 (not loaded)"
        print(
            f"| {v} | {statistics.median(train_times[v]):.3f} | {ratio(train_times, v, 'live'):.2f}x | "
            f"{statistics.median(times[v]):.3f} | {ratio(times, v, 'live'):.2f}x | "
            f"{statistics.median(peaks[v]) / mib:.1f} | {held} | {losses[v]:.6f} |"
        )
    print(f"# wall time {wall:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--teacher-scale", type=int, default=1, help="teacher depth and width multiplier (default 1)"
    )
    run(parser.parse_args())


if __name__ == "__main__":
    main()
