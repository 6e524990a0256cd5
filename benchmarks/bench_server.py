"""Teacher-server throughput: N concurrent ``/infer/`` calls against the same calls one at a time.

Usage (from the repository root)::

    python benchmarks/bench_server.py                    # N = 1, 4, 8 concurrent callers, 5 rounds
    python benchmarks/bench_server.py --callers 2 8 16 --samples 2 --rounds 7 --k 8

Starts ``kdcompose serve-teacher`` on the tiny Qwen2-VL teacher of ``kdcompose.testing`` as a real
process on 127.0.0.1 (``kdcompose.serve.process.ServerProcess``), then for each N starts N caller
processes (``--callers-as threads``: N threads of this process instead), each with its own
client: ``serial`` has them send their call one after another (each waits for its answer, as one
trainer does); ``concurrent`` has all N send at once (as N trainer ranks or N jobs sharing one
teacher would), so the server's queue can gather them into shared padded forwards. Each call
carries ``--samples`` image-caption samples, exactly as ms-swift's GKD trainer sends them
(``prompt_logprobs=K``, ``max_tokens=1``, ``temperature=0``). Callers are processes by default
because trainer ranks are: N threads of one Python process also compete for its GIL while they
decode answers, which is the benchmark's cost, not the server's.

Side by side: each round runs both modes twice, back to back, in ABBA order (serial, concurrent,
concurrent, serial; BAAB on odd rounds), so a change in the machine's load hits both alike; the
speed-up is the median over rounds of that round's ``serial wall / concurrent wall`` (sums of its
two runs of each). Throughput columns = prompt positions scored (tokens - 1 per sample) / median
wall time of a run. Client time (JSON decode, checks) is included: it is what a trainer waits
for. ``server CPU s`` is the server process's user + system CPU time for one run of that mode
(median), read from ``/proc``: the work the server did, apart from the clients.
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kdcompose.serve.process import ServerProcess
from kdcompose.teachers.server_client import TeacherServerClient
from kdcompose.testing import SWIFT_MODEL_TYPE, SWIFT_TEMPLATE, tiny_gkd_args, tiny_run_env


def _env(server_src: str | None = None) -> dict[str, str]:
    from kdcompose.compat.torchvision_ops import PTH_LINE, startup_hook_installed

    env = {**os.environ, **tiny_run_env()}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    src = server_src or str(Path(__file__).resolve().parents[1] / "src")
    paths = [src]
    if not startup_hook_installed():
        import tempfile

        site = Path(tempfile.mkdtemp(prefix="kdcompose-bench-site-"))
        (site / "sitecustomize.py").write_text(PTH_LINE, encoding="utf-8")
        paths.append(str(site))
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _caller(url: str, batch: list[dict], k: int, conn: Any) -> None:
    """A caller process: one call per message, answers the number of positions scored."""
    client = TeacherServerClient(url, wait_s=30)
    while conn.recv() is not None:
        parsed = client.topk_logprobs(batch, k)
        conn.send(sum(len(lps) for lps, _ in parsed))


class _Callers:
    """N callers (processes or threads) that each send their call when told to."""

    def __init__(self, n: int, url: str, batch: list[dict], k: int, as_processes: bool) -> None:
        self.as_processes = as_processes
        if as_processes:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            self.pipes = [ctx.Pipe() for _ in range(n)]
            self.procs = [ctx.Process(target=_caller, args=(url, batch, k, child)) for _, child in self.pipes]
            for proc in self.procs:
                proc.start()
        else:
            self.clients = [TeacherServerClient(url, wait_s=30) for _ in range(n)]
            self.batch, self.k = batch, k

    def _one(self, i: int) -> int:
        if self.as_processes:
            self.pipes[i][0].send(True)
            return int(self.pipes[i][0].recv())
        parsed = self.clients[i].topk_logprobs(self.batch, self.k)
        return sum(len(lps) for lps, _ in parsed)

    def run(self, concurrent: bool, pid: int) -> tuple[float, int, float]:
        """Wall seconds, positions scored and server CPU seconds of one round."""
        n = len(self.pipes) if self.as_processes else len(self.clients)
        positions = [0] * n
        cpu = _cpu_seconds(pid)
        start = time.perf_counter()
        if not concurrent:
            for i in range(n):
                positions[i] = self._one(i)
        elif self.as_processes:
            for parent, _ in self.pipes:
                parent.send(True)
            positions = [int(parent.recv()) for parent, _ in self.pipes]
        else:

            def call(i: int) -> None:
                positions[i] = self._one(i)

            threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        return time.perf_counter() - start, sum(positions), _cpu_seconds(pid) - cpu

    def close(self) -> None:
        if self.as_processes:
            for (parent, _), proc in zip(self.pipes, self.procs, strict=True):
                parent.send(None)
                proc.join(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--callers", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--samples", type=int, default=2, help="samples per call (a trainer's micro-batch)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--batch-window-ms", type=float, default=5.0)
    ap.add_argument("--device", default=None, help="server device (default: cuda if available, else cpu)")
    ap.add_argument("--callers-as", choices=("processes", "threads"), default="processes")
    ap.add_argument(
        "--server-src",
        default=None,
        metavar="DIR",
        help="the `src` folder whose kdcompose the server runs (default: this checkout's; e.g. an "
        "older checkout's, to compare versions with the same benchmark)",
    )
    args = ap.parse_args()

    import tempfile

    tiny = tiny_gkd_args("qwen2_vl", tempfile.mkdtemp(prefix="kdcompose-bench-"))
    rows = [json.loads(line) for line in Path(tiny["dataset"][0]).read_text().splitlines()]
    batch = [{**r, "add_eos": "auto"} for r in rows[: args.samples]]
    extra = ["--torch-dtype", "float32", "--batch-window-ms", str(args.batch_window_ms)]
    if args.device:
        extra += ["--device", args.device]
    table = []
    started = time.perf_counter()
    with ServerProcess(
        model=tiny["teacher_model"],
        model_type=SWIFT_MODEL_TYPE["qwen2_vl"],
        template=SWIFT_TEMPLATE["qwen2_vl"],
        extra_args=extra,
        env=_env(args.server_src),
    ) as server:
        assert server.proc is not None
        pid = server.proc.pid
        for n in args.callers:
            callers = _Callers(n, server.url, batch, args.k, args.callers_as == "processes")
            try:
                callers.run(True, pid)  # warm-up (connections, allocator)
                callers.run(False, pid)
                walls: dict[str, list[float]] = {"serial": [], "concurrent": []}
                cpus: dict[str, list[float]] = {"serial": [], "concurrent": []}
                ratios, positions = [], 0
                for r in range(args.rounds):
                    pair = ("serial", "concurrent") if r % 2 == 0 else ("concurrent", "serial")
                    spent = {"serial": 0.0, "concurrent": 0.0}
                    for mode in (*pair, *reversed(pair)):  # ABBA: a steady drift in load cancels
                        wall, positions, cpu = callers.run(mode == "concurrent", pid)
                        walls[mode].append(wall)
                        cpus[mode].append(cpu)
                        spent[mode] += wall
                    ratios.append(spent["serial"] / spent["concurrent"])
            finally:
                callers.close()
            table.append((n, n * args.samples, positions, walls, cpus, ratios))
    print(
        f"\nTeacher server throughput (tiny Qwen2-VL teacher, K={args.k}, {args.samples} samples a call, "
        f"callers as {args.callers_as}, server from {args.server_src or 'this checkout'}, "
        f"{args.rounds} rounds, cpus={os.cpu_count()}, load average at the end "
        f"{os.getloadavg()[0]:.1f}; wall {time.perf_counter() - started:.0f} s)\n"
    )
    print(
        "| callers N | samples | one-at-a-time pos/s | concurrent pos/s | speed-up (median of rounds) "
        "| rounds >= 1.0x | server CPU s 1-by-1 / conc. |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, samples, positions, walls, cpus, ratios in table:
        s_wall, c_wall = statistics.median(walls["serial"]), statistics.median(walls["concurrent"])
        print(
            f"| {n} | {samples} | {positions / s_wall:,.0f} | {positions / c_wall:,.0f} "
            f"| {statistics.median(ratios):.2f}x | {sum(r >= 1.0 for r in ratios)}/{len(ratios)} "
            f"| {statistics.median(cpus['serial']):.2f} / {statistics.median(cpus['concurrent']):.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
