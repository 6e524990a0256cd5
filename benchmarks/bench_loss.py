"""LM-head divergence benchmark: time and extra peak memory of forward + backward, side by side.

Usage (from the repository root)::

    python benchmarks/bench_loss.py                  # every divergence, 2048 tokens x 151,936 vocab, fp32
    python benchmarks/bench_loss.py --quick          # the same table at 256 tokens (~5 minutes on 2 cores)
    python benchmarks/bench_loss.py --tokens 512 --cases chunked/jsd chunked/fkl floor
    python benchmarks/bench_loss.py --baselines      # JSD: textbook, ms-swift, chunked, head+chunked, fused
    python benchmarks/bench_loss.py --device cuda --dtype bf16 --tokens 8192

Cases (``MODE/DIVERGENCE``; beta, alpha, mu at their defaults, temperature 1, every position valid):

* ``floor`` -- the least any chunked divergence with a gradient must do: per chunk (the engine's
  chunk size), log-softmax of both inputs and one elementwise pass into a fresh gradient tensor.
* ``floor/whole`` -- the same read literally on whole tensors: ``log_softmax`` of both logits and one
  elementwise pass (three logits-sized results), no chunking.
* ``chunked/D`` -- ``divergence_loss`` from logits (the engine, closed form).
* ``fused/D`` -- ``fused_linear_divergence_loss`` from hidden states (896) and LM-head weights.
* ``topk/D`` -- ``topk_divergence_loss`` against the teacher's top-64 (``missing_mass: renorm``);
  the teacher's full logits are gone before the measurement: only ``[tokens, 64]`` values and ids.
* ``tokens/D`` -- ``divergence_loss`` with ``tokens=TokenSelection("divergence", 0.5)``: a scoring pass
  without gradient, then the differentiable pass on half the tokens.
* ``autograd/D`` -- the engine's autograd fallback on ``D``'s own ``value`` (``AutogradOnly``): what
  a value-only plugin divergence costs.
* ``compiled/D`` -- ``divergence_loss(..., compile=True)``: the chunk body (both log-softmaxes,
  ``D``'s value and its gradient by ``torch.func.grad``) through ``torch.compile``, compiled before
  the timing; compared with ``chunked/D`` for time and for exactness (relative difference of the
  value, max relative difference of the gradient against the eager engine).
* ``parallel/D`` -- ``divergence_loss`` with ``VocabParallel`` on 2 gloo ranks (two processes on
  this machine), each holding half the vocabulary: per-rank extra peak, max over ranks.

Ratios: ``chunked/jsd`` against ``floor``; ``fused/jsd`` and ``topk/jsd`` against ``chunked/jsd``;
every other divergence against JSD in the same mode; ``autograd``, ``tokens``, ``compiled`` and
``parallel`` against ``chunked`` of the same divergence. Every case runs in a fresh process (see
``_memory.py`` for why and how memory is measured). "Extra peak" is the peak minus the memory held
after the inputs were built, so it includes the gradients the call produces (the logits'
``.grad``, 1 logits tensor; the hidden-state and LM-head weight gradients for ``fused``, whose last
column subtracts the ``[V, H]`` weight gradient any training step produces). Time: minimum over the
runs (the least disturbed by other processes on a shared machine), both wall-clock and the
process's CPU time (all its threads), which other jobs on the same cores inflate much less: the
ratios use CPU time (on an accelerator, use the wall column). Workers run with
``OMP_WAIT_POLICY=PASSIVE`` unless the variable is set (see ``_worker_env``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT / "benchmarks"))
try:
    import kdcompose  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(_ROOT / "src"))

import torch  # noqa: E402

from _memory import PeakMemory, measure_step  # noqa: E402

DIVERGENCES: dict[str, object] = {
    "jsd": {"kind": "jsd", "beta": 0.5},
    "fkl": "fkl",
    "rkl": "rkl",
    "skew_fkl": "skew_fkl",
    "skew_rkl": "skew_rkl",
    "tvd": "tvd",
    "akl": "akl",
    "ab": "ab",
}
MODES = ("chunked", "fused", "topk")
BASELINES = ("textbook", "ms-swift", "baseline/chunked", "head+chunked", "baseline/fused")
TOPK = 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Rough extra peak in logits tensors, only used to skip a case that cannot fit in free memory.
_EXPECTED = {"textbook": 12, "ms-swift": 12, "autograd": 1.5, "head+chunked": 4}


def default_cases() -> list[str]:
    cases = ["floor", "floor/whole"]
    for mode in MODES:
        cases += [f"{mode}/{name}" for name in DIVERGENCES]
    cases += ["tokens/jsd", "autograd/jsd", "autograd/akl", "compiled/jsd", "compiled/ab", "compiled/tvd"]
    cases += ["parallel/jsd", "parallel/akl"]
    return cases


# ---------------------------------------------------------------------------------------------
# Worker: one case, one size, one fresh process
# ---------------------------------------------------------------------------------------------


def _divergence(name: str):
    from kdcompose.functional import get_divergence

    return get_divergence(DIVERGENCES[name])


def _randn(gen, shape, dtype, device, scale=1.0, grad=False):
    x = (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)
    return x.requires_grad_(grad)


def _build(
    case: str, tokens: int, vocab: int, hidden: int, dtype: torch.dtype, device: str, chunk: int | None
):
    """Inputs and a closure running forward + backward once; ``(step, grads, extra)``."""
    from kdcompose.functional import (
        TokenSelection,
        divergence_loss,
        fused_linear_divergence_loss,
        fused_linear_generalized_jsd,
        generalized_jsd,
        generalized_jsd_reference,
        topk_divergence_loss,
    )
    from kdcompose.functional.divergences import AutogradOnly

    gen = torch.Generator(device="cpu").manual_seed(0)
    mode, _, name = case.partition("/")

    if mode == "fused" or case in ("head+chunked", "baseline/fused"):
        s_hidden = _randn(gen, (tokens, hidden), dtype, device, grad=True)
        t_hidden = _randn(gen, (tokens, hidden), dtype, device)
        s_weight = _randn(gen, (vocab, hidden), dtype, device, scale=hidden**-0.5 * 3, grad=True)
        t_weight = _randn(gen, (vocab, hidden), dtype, device, scale=hidden**-0.5 * 3)
        grads = [s_hidden, s_weight]
        if case == "head+chunked":

            def step() -> None:
                with torch.no_grad():
                    t_logits = t_hidden @ t_weight.t()
                generalized_jsd(s_hidden @ s_weight.t(), t_logits, beta=0.5).backward()
        elif case == "baseline/fused":

            def step() -> None:
                fused_linear_generalized_jsd(s_hidden, s_weight, t_hidden, t_weight, beta=0.5).backward()
        else:
            div = _divergence(name)

            def step() -> None:
                fused_linear_divergence_loss(
                    s_hidden, s_weight, t_hidden, t_weight, divergence=div, chunk_size=chunk
                ).backward()

        return step, grads, {}

    s_logits = _randn(gen, (tokens, vocab), dtype, device, scale=3.0, grad=True)
    t_logits = _randn(gen, (tokens, vocab), dtype, device, scale=3.0)
    grads = [s_logits]
    if case == "floor":
        return _floor_step(s_logits, t_logits, chunk), [], {}
    if case == "floor/whole":

        def whole() -> None:
            with torch.no_grad():
                torch.log_softmax(s_logits, -1) - torch.log_softmax(t_logits, -1)

        return whole, [], {}
    if case == "textbook":
        return lambda: generalized_jsd_reference(s_logits, t_logits, beta=0.5).backward(), grads, {}
    if case == "ms-swift":
        from swift.rlhf_trainers.gkd_loss import jsd_loss

        return lambda: (jsd_loss(s_logits, t_logits, beta=0.5) / tokens).backward(), grads, {}
    if case == "baseline/chunked":
        return lambda: generalized_jsd(s_logits, t_logits, beta=0.5).backward(), grads, {}
    if mode == "topk":
        with torch.no_grad():
            lp, ids = torch.log_softmax(t_logits.float(), -1).topk(TOPK, -1)
        del t_logits  # no [tokens, vocab] teacher tensor from here on
        div = _divergence(name)
        return (
            lambda: topk_divergence_loss(s_logits, lp, ids, divergence=div, chunk_size=chunk).backward(),
            grads,
            {},
        )
    div = _divergence(name)
    if mode == "autograd":
        div = AutogradOnly(div)
    if mode == "tokens":
        keep = TokenSelection("divergence", 0.5)
        return (
            lambda: divergence_loss(
                s_logits, t_logits, divergence=div, chunk_size=chunk, tokens=keep
            ).backward(),
            grads,
            {},
        )
    if mode == "compiled":
        return _compiled_step(s_logits, t_logits, name, chunk)
    return lambda: divergence_loss(s_logits, t_logits, divergence=div, chunk_size=chunk).backward(), grads, {}


def _engine_chunk(vocab: int, dtype: torch.dtype, device: str, chunk: int | None) -> int:
    from kdcompose.functional.engine import WORK_ROWS, auto_chunk

    return chunk or auto_chunk(
        vocab, torch.float32 if dtype != torch.float64 else dtype, torch.device(device), WORK_ROWS
    )


def _floor_step(s_logits: torch.Tensor, t_logits: torch.Tensor, chunk: int | None):
    n, vocab = s_logits.shape
    rows = _engine_chunk(vocab, s_logits.dtype, str(s_logits.device), chunk)
    work = [s_logits.new_empty((rows, vocab), dtype=torch.float32) for _ in range(2)]

    def step() -> None:
        grad = torch.empty_like(s_logits)  # a fresh gradient each step, as every real divergence writes
        with torch.no_grad():
            for start in range(0, n, rows):
                end = min(start + rows, n)
                a, b = work[0][: end - start], work[1][: end - start]
                torch.log_softmax(s_logits[start:end], -1, dtype=torch.float32, out=a)
                torch.log_softmax(t_logits[start:end], -1, dtype=torch.float32, out=b)
                torch.sub(a, b, out=grad[start:end])

    return step


def _compiled_step(s_logits: torch.Tensor, t_logits: torch.Tensor, name: str, chunk: int | None):
    """``divergence_loss(..., compile=True)``: the chunk body through ``torch.compile``
    (kdcompose.functional.compiled), compiled before the timing; exactness against the eager engine."""
    from kdcompose.functional import divergence_loss

    div = _divergence(name)
    eager = divergence_loss(s_logits, t_logits, divergence=div, chunk_size=chunk)
    eager.backward()
    ref, s_logits.grad = s_logits.grad, None
    compiled = divergence_loss(s_logits, t_logits, divergence=div, chunk_size=chunk, compile=True)
    compiled.backward()
    exact = {
        "value_rel_diff": abs(compiled.item() - eager.item()) / abs(eager.item()),
        "grad_max_rel_diff": ((s_logits.grad - ref).abs().max() / ref.abs().max()).item(),
    }
    s_logits.grad = None
    del ref

    def step() -> None:
        divergence_loss(s_logits, t_logits, divergence=div, chunk_size=chunk, compile=True).backward()

    return step, [s_logits], exact


def run_worker(spec: dict) -> dict:
    case, tokens, vocab, hidden = spec["case"], spec["tokens"], spec["vocab"], spec["hidden"]
    dtype, device, reps = DTYPES[spec["dtype"]], spec["device"], spec["reps"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec.get("world"):
        return _run_parallel_rank(spec)
    # Warm-up on a tiny problem: thread pools, kernels and lazy imports, without leaving large
    # freed blocks in the heap that would hide the measured run's allocations.
    if not case.startswith("compiled"):
        tiny_step, *_ = _build(case, 4, vocab, 8, dtype, device, spec.get("chunk"))
        tiny_step()
        del tiny_step
    step, grads, extra = _build(case, tokens, vocab, hidden, dtype, device, spec.get("chunk"))
    cpu: list[float] = []

    def timed() -> None:  # process CPU time beside wall time: what other jobs on the cores cannot inflate
        start = time.process_time()
        step()
        cpu.append(time.process_time() - start)

    measured = measure_step(timed, grads, device, reps)
    return {
        "case": case,
        "tokens": tokens,
        "extra_bytes": measured.extra_bytes,
        "memory_method": measured.memory_method,
        "time_s": measured.time_s,
        "times": [measured.cold_s, *measured.times],
        "cpu_s": min(cpu),
        **extra,
    }


def _run_parallel_rank(spec: dict) -> dict:
    """One rank of ``parallel/D``: its half of both models' logits, the engine with VocabParallel."""
    import torch.distributed as dist

    from kdcompose.functional import VocabParallel, divergence_loss

    rank, world = spec["rank"], spec["world"]
    dist.init_process_group("gloo", init_method=f"file://{spec['store']}", rank=rank, world_size=world)
    try:
        _, _, name = spec["case"].partition("/")
        div, parallel = _divergence(name), VocabParallel(dist.group.WORLD)
        dtype, device = DTYPES[spec["dtype"]], spec["device"]
        lo, hi = spec["vocab"] * rank // world, spec["vocab"] * (rank + 1) // world
        gen = torch.Generator().manual_seed(rank)
        tiny_s = _randn(gen, (4, hi - lo), dtype, device, grad=True)
        divergence_loss(
            tiny_s, _randn(gen, (4, hi - lo), dtype, device), divergence=div, vocab_parallel=parallel
        ).backward()
        s_logits = _randn(gen, (spec["tokens"], hi - lo), dtype, device, scale=3.0, grad=True)
        t_logits = _randn(gen, (spec["tokens"], hi - lo), dtype, device, scale=3.0)

        def step() -> None:
            divergence_loss(s_logits, t_logits, divergence=div, vocab_parallel=parallel).backward()

        dist.barrier()
        with PeakMemory(device) as memory:
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            times, cpu = [time.perf_counter() - start], [time.process_time() - cpu_start]
        for _ in range(spec["reps"]):
            s_logits.grad = None
            dist.barrier()
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
        return {"case": spec["case"], "rank": rank, "extra_bytes": memory.extra_bytes, "time_s": min(times),
                "cpu_s": min(cpu), "memory_method": memory.method}  # fmt: skip
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _worker_env() -> dict:
    """Workers sleep instead of spinning between parallel regions (unless the caller chose).

    With libgomp's default spin-waiting, a CPU shared with other processes stalls every small
    parallel op while a spinning thread holds the core; that noise is the machine's, not the
    method's, and hits methods with many small ops (chunked) hardest.
    """
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def _command(spec: dict) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(spec)]


def _result(proc_stdout: str, stderr: str, returncode: int, spec: dict) -> dict:
    for line in proc_stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (stderr or proc_stdout).strip().splitlines()[-3:]
    return {"case": spec["case"], "error": " | ".join(tail) or f"exit {returncode}"}


def _spawn(spec: dict) -> dict:
    if spec["case"].startswith("parallel/"):
        return _spawn_parallel(spec)
    proc = subprocess.run(_command(spec), capture_output=True, text=True, env=_worker_env())
    return _result(proc.stdout, proc.stderr, proc.returncode, spec)


def _spawn_parallel(spec: dict, world: int = 2) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            subprocess.Popen(
                _command({**spec, "world": world, "rank": rank, "store": str(Path(tmp) / "store")}),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=_worker_env(),
            )
            for rank in range(world)
        ]
        outs = [(p, *p.communicate()) for p in procs]
    ranks = [_result(out, err, p.returncode, spec) for p, out, err in outs]
    failed = [r for r in ranks if "error" in r]
    if failed:
        return failed[0]
    return {
        "case": spec["case"],
        "extra_bytes": max(r["extra_bytes"] for r in ranks),
        "time_s": max(r["time_s"] for r in ranks),
        "cpu_s": max(r["cpu_s"] for r in ranks),
        "memory_method": ranks[0]["memory_method"],
        "ranks": world,
    }


def _reference_case(case: str) -> str | None:
    mode, _, name = case.partition("/")
    if mode == "floor" or case == "textbook":
        return None
    if case == "chunked/jsd":
        return "floor"
    if case in ("fused/jsd", "topk/jsd"):
        return "chunked/jsd"
    if mode in MODES:
        return f"{mode}/jsd"
    if mode in ("autograd", "parallel", "tokens"):
        return f"chunked/{name}"
    if case in ("ms-swift", "baseline/chunked"):
        return "textbook"
    if mode == "compiled":
        return f"chunked/{name}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="256 tokens")
    parser.add_argument("--tokens", type=int, default=None, help="token count (default 2048; --quick 256)")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=896, help="hidden size of both LM heads (fused rows)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--cases", nargs="+", default=None, help="cases to run (default: the full table)")
    parser.add_argument(
        "--baselines", action="store_true", help="the JSD-only comparison with textbook / ms-swift"
    )
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: automatic)")
    parser.add_argument("--reps", type=int, default=2, help="timed runs after the first (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in workers")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._worker:
        print("RESULT " + json.dumps(run_worker(json.loads(args._worker))), flush=True)
        return 0

    tokens = args.tokens or (256 if args.quick else 2048)
    cases = args.cases or (list(BASELINES) if args.baselines else default_cases())
    elem = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    logits_bytes = tokens * args.vocab * elem
    weight_grad_bytes = args.vocab * args.hidden * elem
    print(
        f"# bench_loss: tokens={tokens} vocab={args.vocab} hidden={args.hidden} dtype={args.dtype} "
        f"device={args.device} torch={torch.__version__} threads={args.threads or torch.get_num_threads()} "
        f"cpus={os.cpu_count()} python={platform.python_version()} "
        f"OMP_WAIT_POLICY={_worker_env()['OMP_WAIT_POLICY']} (workers) load={_load()}"
    )
    print(
        "# extra peak = peak during forward+backward minus memory after inputs; "
        f"1 logits = {tokens} x {args.vocab} x {elem} bytes = {logits_bytes / 2**30:.2f} GiB; "
        f"time = min over {args.reps + 1} runs (s), wall and process CPU (all threads); ratios use CPU time"
    )
    header = (
        f"{'case':<16} {'wall s':>7} {'cpu s':>7} {'ratio (cpu)':>16} {'extra GiB':>9} {'x logits':>8} "
        f"{'excl. W grad':>12}"
    )
    print(header)
    print("-" * len(header))
    results: dict[str, dict] = {}
    for case in cases:
        spec = {
            "case": case,
            "tokens": tokens,
            "vocab": args.vocab,
            "hidden": args.hidden,
            "dtype": args.dtype,
            "device": args.device,
            "reps": args.reps,
            "threads": args.threads,
            "chunk": args.chunk_size,
        }
        available = _mem_available() if args.device == "cpu" else None
        need = (_EXPECTED.get(case.partition("/")[0], _EXPECTED.get(case, 1.5)) + 2.5) * logits_bytes
        if available is not None and need > available:
            res = {
                "case": case,
                "error": f"skipped: needs ~{need / 2**30:.1f} GiB, {available / 2**30:.1f} available",
            }
        else:
            res = _spawn(spec)
        results[case] = res
        if "error" in res:
            print(f"{case:<16} {res['error']}", flush=True)
            continue
        ref_case = _reference_case(case)
        ratio = "-"
        if ref_case in results and "cpu_s" in results[ref_case]:
            ratio = f"{res['cpu_s'] / results[ref_case]['cpu_s']:.2f}x {ref_case}"
        extra = res["extra_bytes"]
        fused = case.startswith(("fused/", "head+chunked", "baseline/fused"))
        excl = f"{(extra - weight_grad_bytes) / logits_bytes:.3f}" if fused else "-"
        print(
            f"{case:<16} {res['time_s']:>7.2f} {res['cpu_s']:>7.2f} {ratio:>16} {extra / 2**30:>9.2f} "
            f"{extra / logits_bytes:>8.3f} {excl:>12}",
            flush=True,
        )
        if case == "chunked/jsd" and "cpu_s" in results.get("floor/whole", {}):
            whole = res["cpu_s"] / results["floor/whole"]["cpu_s"]
            print(f"{'':<16} {'':>7} {'':>7} {whole:>11.2f}x floor/whole", flush=True)
        if "grad_max_rel_diff" in res:
            print(
                f"{'':<16} compiled vs engine: value rel diff {res['value_rel_diff']:.1e}, "
                f"gradient max rel diff {res['grad_max_rel_diff']:.1e}",
                flush=True,
            )
    methods = {r.get("memory_method") for r in results.values() if r.get("memory_method")}
    print(
        f"# memory measured with: {', '.join(sorted(methods))}; "
        "parallel: max over 2 ranks of per-rank extra peak"
    )
    if args.json:
        args.json.write_text(
            json.dumps({"tokens": tokens, "vocab": args.vocab, "results": results}, indent=2)
        )
    return 0


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


if __name__ == "__main__":
    raise SystemExit(main())
