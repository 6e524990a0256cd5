"""Teacher-server throughput: N concurrent ``/infer/`` calls against the same calls one at a time.

Usage (from the repository root)::

    python benchmarks/bench_server.py                    # N = 1, 4, 8 concurrent callers, 3 rounds
    python benchmarks/bench_server.py --callers 2 8 16 --samples 2 --rounds 5 --k 8

Starts ``kdcompose serve-teacher`` on the tiny Qwen2-VL teacher of ``kdcompose.testing`` as a real
process on 127.0.0.1 (``kdcompose.serve.process.ServerProcess``), then for each N: ``serial`` sends
N calls one after another (each waits for its answer, as one trainer does); ``concurrent`` sends
the same N calls from N threads at once (as N trainer ranks or N jobs sharing one teacher would),
so the server's queue can gather them into shared padded forwards. Each call carries
``--samples`` image-caption samples, exactly as ms-swift's GKD trainer sends them
(``prompt_logprobs=K``, ``max_tokens=1``, ``temperature=0``). Throughput = prompt positions scored
(tokens - 1 per sample) / wall time, median over rounds, after one warm-up round. Client time
(JSON decode, checks) is included: it is what a trainer waits for.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kdcompose.serve.process import ServerProcess
from kdcompose.teachers.server_client import TeacherServerClient
from kdcompose.testing import SWIFT_MODEL_TYPE, SWIFT_TEMPLATE, tiny_gkd_args, tiny_run_env


def _env() -> dict[str, str]:
    from kdcompose.compat.torchvision_ops import PTH_LINE, startup_hook_installed

    env = {**os.environ, **tiny_run_env()}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    src = str(Path(__file__).resolve().parents[1] / "src")
    paths = [src]
    if not startup_hook_installed():
        import tempfile

        site = Path(tempfile.mkdtemp(prefix="kdcompose-bench-site-"))
        (site / "sitecustomize.py").write_text(PTH_LINE, encoding="utf-8")
        paths.append(str(site))
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _time_calls(
    clients: list[TeacherServerClient], batch: list[dict], k: int, concurrent: bool
) -> tuple[float, int]:
    positions = [0] * len(clients)

    def call(i: int) -> None:
        parsed = clients[i].topk_logprobs(batch, k)
        positions[i] = sum(len(lps) for lps, _ in parsed)

    start = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(clients))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(len(clients)):
            call(i)
    return time.perf_counter() - start, sum(positions)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--callers", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--samples", type=int, default=2, help="samples per call (a trainer's micro-batch)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--batch-window-ms", type=float, default=5.0)
    ap.add_argument("--device", default=None, help="server device (default: cuda if available, else cpu)")
    args = ap.parse_args()

    import tempfile

    tiny = tiny_gkd_args("qwen2_vl", tempfile.mkdtemp(prefix="kdcompose-bench-"))
    rows = [json.loads(line) for line in Path(tiny["dataset"][0]).read_text().splitlines()]
    batch = [{**r, "add_eos": "auto"} for r in rows[: args.samples]]
    extra = ["--torch-dtype", "float32", "--batch-window-ms", str(args.batch_window_ms)]
    if args.device:
        extra += ["--device", args.device]
    table = []
    with ServerProcess(
        model=tiny["teacher_model"],
        model_type=SWIFT_MODEL_TYPE["qwen2_vl"],
        template=SWIFT_TEMPLATE["qwen2_vl"],
        extra_args=extra,
        env=_env(),
    ) as server:
        for n in args.callers:
            clients = [TeacherServerClient(server.url, wait_s=30) for _ in range(n)]
            _time_calls(clients, batch, args.k, concurrent=True)  # warm-up (connections, allocator)
            result = {}
            for mode in ("serial", "concurrent"):
                times, positions = [], 0
                for _ in range(args.rounds):
                    wall, positions = _time_calls(clients, batch, args.k, concurrent=(mode == "concurrent"))
                    times.append(wall)
                result[mode] = (positions / statistics.median(times), statistics.median(times))
            table.append((n, n * args.samples, result))
    print(f"\nTeacher server throughput (tiny Qwen2-VL teacher, K={args.k}, {args.samples} samples a call)\n")
    print("| callers N | samples | one-at-a-time pos/s | concurrent pos/s | speed-up | wall 1-by-1/conc. s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, samples, r in table:
        (s_rate, s_wall), (c_rate, c_wall) = r["serial"], r["concurrent"]
        speedup = c_rate / s_rate
        print(
            f"| {n} | {samples} | {s_rate:,.0f} | {c_rate:,.0f} | {speedup:.2f}x "
            f"| {s_wall:.2f} / {c_wall:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
