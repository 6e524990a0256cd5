"""Training-step benchmark: kdcompose's trainer against ms-swift's stock GKD and SFT steps.

Usage (from the repository root)::

    python benchmarks/bench_step.py                        # batch 2, 20 timed rounds; about 2 minutes here
    python benchmarks/bench_step.py --response-repeat 8    # 8x longer completions (~400 labelled tokens)
    python benchmarks/bench_step.py --quick                # 6 timed rounds, a smoke test
    python benchmarks/bench_step.py --only lm-kd-0         # one comparison (and its baseline)

One process builds the tiny Qwen2-VL teacher/student pair of ``kdcompose.testing`` through
ms-swift 4.6's own RLHF pipeline (``kdcompose.integrations.swift.launch.pipeline.build_trainer``) and
takes real micro-batches from its dataloader and ``_prepare_inputs`` (dataset batches,
``lmbda 0``). Every variant runs on that same trainer, models and batches; a step is
``compute_loss`` + ``backward`` + ``AdamW.step`` + ``zero_grad``. Variants:

* ``stock-gkd``   -- ms-swift's ``GKDTrainer.compute_loss(trainer, ...)`` called unbound on the
                     trainer: the stock GKD step, the oracle of the default composition.
* ``default``     -- ``KDComposeGKDTrainer.compute_loss`` with no kdcompose field (= ``lm_jsd``).
* ``fused``       -- the same with ``lm_jsd: {fused: true}``.
* ``sft``         -- plain SFT: exactly what ms-swift's SFT trainer runs for a loss with default
                     settings (``prepare_logits_to_keep``, then ``template.compute_sft_loss``: the
                     student's forward with ``labels``, transformers' causal-LM cross-entropy).
                     No teacher exists in that step, which is the point of the comparison.
* ``lm-kd-0``     -- ``llm_kd_weight: 0`` with ``ce`` weight 1 and no visual KD: must not run the
                     teacher at all, so it should cost what SFT costs.
* ``visual-only`` -- ``llm_kd_weight: 0`` + ``visual_kd`` on the ViT (teacher vision tower only).
* ``full``        -- ``lm_jsd`` + ``ce`` (0.2) + ``visual_kd`` (0.5, ViT).

Fairness on a noisy shared machine: after warm-up rounds, each timed round runs every variant
once, in an order rotated every round, and a ratio is the median over rounds of the per-round
ratio (adjacent steps see similar load). ``OMP_WAIT_POLICY=PASSIVE`` is set unless already set
(libgomp's spin-waiting makes a loaded 2-core machine several times slower, see
docs/performance.md). Composition switches, batch copies and metric resets happen outside the
timed region. Memory: extra peak resident set of the step over the resident set before it
(``_memory.PeakMemory``: garbage collected and ``malloc_trim``-ed first), median over rounds;
on one shared process it is a lower bound of what a fresh process would need, but every
variant is measured the same way. Teacher forwards are counted with forward hooks on the
teacher model, its LM head and its vision tower.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp

import argparse
import copy
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT / "benchmarks"))
try:
    import kdcompose  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(_ROOT / "src"))

import torch  # noqa: E402

from _memory import PeakMemory  # noqa: E402

VISUAL = {"weight": 0.5, "vit": {"enabled": True, "weight": 1.0, "distance": "mse"}}


@dataclass(frozen=True)
class Variant:
    name: str
    what: str
    kind: str  # "ours" | "stock" | "sft"
    config: Mapping[str, Any] = field(default_factory=dict)


_FUSED = {"rlhf": {"loss_terms": {"lm_jsd": {"fused": True}}}}
_CE_ONLY = {"rlhf": {"llm_kd_weight": 0, "sft_alpha": 1}}
_VISUAL_ONLY = {"rlhf": {"llm_kd_weight": 0}, "custom": {"visual_kd": VISUAL}}
_FULL = {"rlhf": {"sft_alpha": 0.2}, "custom": {"visual_kd": VISUAL}}

VARIANTS: tuple[Variant, ...] = (
    Variant("stock-gkd", "ms-swift GKDTrainer.compute_loss (sft_alpha 0)", "stock"),
    Variant("default", "kdcompose, no new field: 1*lm_jsd", "ours"),
    Variant("fused", "kdcompose, lm_jsd {fused: true}", "ours", _FUSED),
    Variant("sft", "ms-swift SFT loss: student forward + CE", "sft"),
    Variant("lm-kd-0", "kdcompose, llm_kd_weight 0, ce 1", "ours", _CE_ONLY),
    Variant("visual-only", "kdcompose, llm_kd_weight 0, visual_kd vit", "ours", _VISUAL_ONLY),
    Variant("full", "kdcompose, lm_jsd + 0.2 ce + 0.5 visual_kd", "ours", _FULL),
)

COMPARISONS: tuple[tuple[str, str, float | None], ...] = (
    ("default", "stock-gkd", 1.0),
    ("fused", "stock-gkd", None),
    ("lm-kd-0", "sft", 1.05),
    ("visual-only", "full", None),
)
"""(variant, baseline, target ratio or None): printed as variant / baseline."""


# ---------------------------------------------------------------------------------------------
# Set-up: one ms-swift-prepared trainer and real batches
# ---------------------------------------------------------------------------------------------


def longer_responses(out_dir: Path, repeat: int) -> Path:
    """The tiny caption dataset with every answer repeated `repeat` times (longer completions)."""
    import json

    from kdcompose.testing import build_caption_dataset, load_rows

    path = out_dir / "long.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for row in load_rows(build_caption_dataset(n=32, seed=0, image=True)):
            answer = row["messages"][-1]
            answer["content"] = " ".join([answer["content"]] * repeat)
            f.write(json.dumps(row) + "\n")
    return path


def build_trainer(batch_size: int, repeat: int, out_dir: Path) -> Any:
    from kdcompose import parse_config
    from kdcompose.integrations.swift.launch.pipeline import build_trainer as build
    from kdcompose.integrations.swift.runtime import prepare_swift_import
    from kdcompose.testing import tiny_gkd_args, tiny_run_env

    os.environ.update(tiny_run_env())
    prepare_swift_import()
    # freeze_vit false: ms-swift freezes the vision tower by default, and then visual KD on it
    # would train nothing; every variant gets the same trainable parameters.
    flat = tiny_gkd_args("qwen2_vl", str(out_dir), per_device_train_batch_size=batch_size, freeze_vit=False)
    if repeat > 1:
        flat.update(dataset=[str(longer_responses(out_dir, repeat))], max_length=256 + 16 * repeat)
    trainer = build(parse_config({"training": flat}))
    trainer.model.train()
    return trainer


def real_batches(trainer: Any, n: int) -> list[dict[str, Any]]:
    """`n` micro-batches exactly as ms-swift hands them to `compute_loss` (dataset completions)."""
    batches, loader = [], iter(trainer.get_train_dataloader())
    trainer.lmbda = 0.0
    for _ in range(n):
        trainer._buffered_inputs = None
        batches.append(trainer._prepare_inputs(next(loader)))
    return batches


def fresh(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """A copy `compute_loss` may trim (`prepare_logits_to_keep` replaces dict entries)."""
    return {
        "model_inputs": dict(inputs["model_inputs"]),
        "gkd_batch": inputs["gkd_batch"],
        "teacher_model_inputs": dict(inputs["teacher_model_inputs"]),
    }


def sft_loss(trainer: Any, inputs: Mapping[str, Any]) -> torch.Tensor:
    """ms-swift's SFT loss with default settings (Seq2SeqTrainer: `_prepare_inputs` trims with
    `prepare_logits_to_keep`, `compute_loss` calls `template.compute_sft_loss`)."""
    model_inputs = inputs["model_inputs"]
    if trainer.get_use_logits_to_keep(trainer.template.sequence_parallel_size == 1):
        trainer.prepare_logits_to_keep(model_inputs)
    return trainer.template.compute_sft_loss(trainer.model, model_inputs)["loss"]


class Counter:
    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.calls += 1


# ---------------------------------------------------------------------------------------------
# The timed loop
# ---------------------------------------------------------------------------------------------


def selected(only: list[str] | None) -> tuple[Variant, ...]:
    """The variants to run: all, or `only` plus the baselines they are compared with."""
    if not only:
        return VARIANTS
    names = set(only) | {base for name, base, _ in COMPARISONS if name in only}
    return tuple(v for v in VARIANTS if v.name in names)


def run(args: argparse.Namespace) -> None:
    from swift.rlhf_trainers.gkd_trainer import GKDTrainer

    from kdcompose import build_composer, parse_config

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdcompose-bench-step-") as tmp:
        trainer = build_trainer(args.batch_size, args.response_repeat, Path(tmp))
        batches = real_batches(trainer, args.batches)
    model, teacher = trainer.model, trainer.teacher_model
    composers = {
        v.name: build_composer(parse_config(copy.deepcopy(dict(v.config))).composition) for v in VARIANTS
    }
    counters = {"lm": Counter(teacher.lm_head), "vision": Counter(teacher.model.visual)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    tokens = [int(b["model_inputs"]["input_ids"].numel()) for b in batches]
    labelled = [int((b["model_inputs"]["labels"] != -100).sum()) for b in batches]

    def loss_of(variant: Variant, inputs: dict[str, Any]) -> torch.Tensor:
        if variant.kind == "stock":
            return GKDTrainer.compute_loss(trainer, model, inputs)
        if variant.kind == "sft":
            return sft_loss(trainer, inputs)
        return trainer.compute_loss(model, inputs)

    variants = selected(args.only)
    times: dict[str, list[float]] = {v.name: [] for v in VARIANTS}
    peaks: dict[str, list[int]] = {v.name: [] for v in VARIANTS}
    teacher_calls: dict[str, dict[str, int]] = {v.name: {"lm": 0, "vision": 0} for v in VARIANTS}
    rounds = args.warmup + args.rounds
    for r in range(rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for variant in order:
            if variant.kind == "ours":
                trainer.use_composer(composers[variant.name])
            inputs = fresh(batches[r % len(batches)])
            before = {k: c.calls for k, c in counters.items()}
            with PeakMemory("cpu") as memory:
                t0 = time.perf_counter()
                loss_of(variant, inputs).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                elapsed = time.perf_counter() - t0
            for mode in ("train", "eval"):
                trainer.custom_metrics[mode].clear()
            if r >= args.warmup:
                times[variant.name].append(elapsed)
                peaks[variant.name].append(memory.extra_bytes)
                for k, c in counters.items():
                    teacher_calls[variant.name][k] += c.calls - before[k]

    _report(args, times, peaks, teacher_calls, tokens, labelled, time.perf_counter() - started, memory.method)


def _report(args, times, peaks, teacher_calls, tokens, labelled, wall, memory_method) -> None:
    import swift
    import transformers

    n = args.rounds
    print(
        f"# bench_step: tiny qwen2_vl (student hidden 64 x2 layers, teacher 96 x3, vocab 151936), fp32, "
        f"cpu, batch {args.batch_size}, answers x{args.response_repeat}, "
        f"{statistics.mean(tokens):.0f} tokens/micro-batch ({statistics.mean(labelled):.0f} labelled), "
        f"{args.batches} batches"
    )
    print(
        f"# torch={torch.__version__} ms-swift={swift.__version__} transformers={transformers.__version__} "
        f"threads={torch.get_num_threads()} cpus={os.cpu_count()} python={platform.python_version()} "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
    )
    print(f"# step = compute_loss + backward + AdamW step; {args.warmup} warm-up + {n} timed rounds")
    print(f"# extra peak = peak RSS during the step minus RSS before it, median ({memory_method})")
    rows = []
    for v in (v for v in VARIANTS if times[v.name]):
        calls = teacher_calls[v.name]
        rows.append(
            (
                v.name,
                v.what,
                f"{statistics.median(times[v.name]):.3f}",
                f"{statistics.median(peaks[v.name]) / 2**20:.0f}",
                f"{calls['lm'] / n:.2f}",
                f"{calls['vision'] / n:.2f}",
            )
        )
    _table(("variant", "what", "median s", "extra MiB", "teacher LM", "teacher ViT"), rows)
    print("# teacher LM / ViT = forwards of the teacher's LM head / vision tower per step")
    print()
    rows = []
    for name, base, target in COMPARISONS:
        if not (times[name] and times[base]):
            continue
        paired = statistics.median(a / b for a, b in zip(times[name], times[base], strict=True))
        of_medians = statistics.median(times[name]) / statistics.median(times[base])
        memory = statistics.median(peaks[name]) / max(1, statistics.median(peaks[base]))
        goal = f"<={target:.2f}x" if target is not None else "-"
        met = ("yes" if paired <= target else "no") if target is not None else "-"
        row = (f"{name} / {base}", f"{paired:.2f}x", f"{of_medians:.2f}x", f"{memory:.2f}x", goal, met)
        rows.append(row)
    _table(("comparison", "time ratio", "ratio of medians", "memory ratio", "target", "met"), rows)
    print("# time ratio = median over rounds of the per-round ratio (adjacent steps)")
    print(f"# wall time {wall:.0f} s")


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Left-aligned first two columns, right-aligned numbers."""
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        cells = tuple(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return " ".join(cells)

    print(line(header))
    print("-" * len(line(header)))
    for row in rows:
        print(line(row))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=2, help="per-device micro-batch size (default 2)")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (each runs every variant once)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--batches", type=int, default=4, help="distinct real micro-batches, cycled")
    parser.add_argument(
        "--response-repeat", type=int, default=1, help="repeat every answer N times: longer completions"
    )
    parser.add_argument("--quick", action="store_true", help="6 timed rounds, 1 warm-up")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[v.name for v in VARIANTS],
        help="run only these variants (and their baselines)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup = 6, 1
    run(args)


if __name__ == "__main__":
    main()
