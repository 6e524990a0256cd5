"""Cost of ZeRO-3 for fused `lm_jsd` against ZeRO-2 (CPU, one process, gloo).

Usage (from the repository root)::

    python benchmarks/bench_engines.py              # loss level (151,936-row head) + tiny training steps
    python benchmarks/bench_engines.py --loss-only  # only the loss-level comparison (~1 minute)

* **Loss level.** A model whose LM head is `Linear(896 -> 151,936)`, wrapped by a real DeepSpeed
  engine at ZeRO-2 and at ZeRO-3 (one process): forward + fused JSD + backward on 2048 tokens, with
  the loss run as the head's own forward (`kdcompose.sharding.call_through_head`: ZeRO-3 gathers
  the head for it and again for backward, then reduce-scatters its gradient). Time (median of
  repeats, alternating) and extra peak resident memory. With one process the "shard" is the whole
  weight, so ZeRO-3's cost here is the gather/release traffic and the extra full copy, not the
  memory a multi-rank run saves.
* **Training steps.** `kdcompose train` on the tiny Qwen2-VL pair with fused lm_jsd + ce +
  visual_kd (linear projector), `deepspeed: zero2` vs `zero3`, one process each: seconds per step
  (ms-swift's `train_speed(s/it)`) and the child process's peak resident memory.
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

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT / "benchmarks"))
sys.path.insert(0, str(_ROOT / "tests"))
try:
    import kdcompose  # noqa: F401
except ImportError:
    sys.path.insert(0, str(_ROOT / "src"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from _memory import PeakMemory  # noqa: E402

VOCAB, HIDDEN, TOKENS = 151_936, 896, 2048


class HeadModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def loss_level(repeats: int) -> list[str]:
    import deepspeed

    from kdcompose.functional import fused_linear_generalized_jsd
    from kdcompose.sharding import call_through_head
    from kdcompose.training.engines import single_process_env

    os.environ.update(single_process_env())
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    base = HeadModel()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(TOKENS, HIDDEN, generator=g)
    teacher_hidden = torch.randn(TOKENS, HIDDEN, generator=g)
    teacher_weight = torch.randn(VOCAB, HIDDEN, generator=g) * 0.02
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    engines = {}
    for stage in (2, 3):
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": stage},
            "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
            "zero_allow_untested_optimizer": True,
        }
        model = copy.deepcopy(base)
        engines[stage], *_ = deepspeed.initialize(
            model=model, config=config, model_parameters=model.parameters()
        )
    times: dict[int, list[float]] = {2: [], 3: []}
    peaks: dict[int, list[int]] = {2: [], 3: []}
    for _ in range(repeats):
        for stage, engine in engines.items():
            with PeakMemory("cpu") as peak:
                t0 = time.perf_counter()
                loss = call_through_head(
                    engine.module.head,
                    lambda head, h: fused_linear_generalized_jsd(
                        h, head.weight, teacher_hidden, teacher_weight, labels
                    ),
                    engine(x),
                )
                engine.backward(loss)
                engine.step()
                times[stage].append(time.perf_counter() - t0)
            peaks[stage].append(peak.extra_bytes)
    gib, logits = 2**30, TOKENS * VOCAB * 4
    rows = [
        f"# loss level: head {VOCAB} x {HIDDEN} fp32, {TOKENS} tokens, fused lm_jsd, 1 process (gloo), "
        f"{repeats} repeats; 1 logits tensor = {logits / gib:.2f} GiB",
        "| stage | time (median s) | vs ZeRO-2 | extra peak (median GiB) | x logits |",
        "|---|---:|---:|---:|---:|",
    ]
    for stage in (2, 3):
        t, p = statistics.median(times[stage]), statistics.median(peaks[stage])
        ratio = t / statistics.median(times[2])
        rows.append(f"| ZeRO-{stage} | {t:.2f} | {ratio:.2f}x | {p / gib:.2f} | {p / logits:.2f}x |")
    return rows


def _train(tmp: Path, stage: str) -> tuple[float, float]:
    from swift_support import kdcompose_command, sections, step_logs, subprocess_env, write_config

    terms = {
        "lm_jsd": {"fused": True},
        "ce": {"weight": 0.3},
        "visual_kd": {"weight": 0.5, "aligner": {"distance": "mse", "projector": "linear"}},
    }
    out = tmp / stage
    data = sections(out, rlhf={"loss_terms": terms}, max_steps=8, freeze_vit=False, freeze_aligner=False)
    data["training"]["deepspeed"] = stage
    config = write_config(tmp / f"{stage}.yaml", data)
    launcher = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print('MAXRSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
    )
    env = {k: v for k, v in subprocess_env(tmp).items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    result = subprocess.run(
        [sys.executable, "-c", launcher, *kdcompose_command("train", str(config))],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    maxrss = int(result.stdout.rsplit("MAXRSS_KIB", 1)[1].split()[0]) * 1024
    rows = step_logs(out)
    speed = statistics.median(float(str(r["train_speed(s/it)"])) for r in rows[2:])
    return speed, maxrss


def steps() -> list[str]:
    rows = [
        "# training: tiny qwen2_vl, fused lm_jsd + ce + visual_kd (linear projector), 8 steps, 1 process; "
        "s/step = median of ms-swift's train_speed(s/it) after 2 steps",
        "| stage | s / step | vs ZeRO-2 | peak RSS of the run (GiB) |",
        "|---|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory(prefix="kdcompose-bench-engines-") as tmp:
        results = {stage: _train(Path(tmp), stage) for stage in ("zero2", "zero3")}
    for stage, (speed, rss) in results.items():
        rows.append(f"| {stage} | {speed:.3f} | {speed / results['zero2'][0]:.2f}x | {rss / 2**30:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--loss-only", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"# bench_engines: torch={torch.__version__} threads={torch.get_num_threads()}")
    lines = []
    if not args.loss_only:
        lines += steps()  # subprocesses first: the loss level initialises distributed in this process
    lines += loss_level(args.repeats)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
