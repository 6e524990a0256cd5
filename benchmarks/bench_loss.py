"""LM-head JSD benchmark: time and extra peak memory of forward + backward, side by side.

Usage (from the repository root)::

    python benchmarks/bench_loss.py                 # 512/1024/2048 tokens x 151,936 vocab, fp32, CPU
    python benchmarks/bench_loss.py --quick         # 512 tokens only, fewer repetitions
    python benchmarks/bench_loss.py --device cuda --dtype bf16 --tokens 2048 8192

Methods (beta = 0.5, temperature = 1, every position valid):

* ``textbook``   -- ``kdcompose.functional.generalized_jsd_reference``: TRL's formula with autograd.
* ``ms-swift``   -- ms-swift 4.6 ``swift.rlhf_trainers.gkd_loss.jsd_loss(s, t, beta) / N`` (chunked
                    forward, but autograd keeps every chunk's intermediates for backward).
* ``chunked``    -- ``generalized_jsd`` (gradient computed in forward, chunk by chunk).
* ``head+chunked`` -- LM heads as plain matmuls (``hidden @ W.T``) feeding ``generalized_jsd``:
                    the unfused end-to-end baseline for ``fused``.
* ``fused``      -- ``fused_linear_generalized_jsd`` from hidden states and LM-head weights.

Every case runs in a fresh Python process (see ``_memory.py`` for why and how memory is
measured). "Extra peak" is the peak minus the memory held after the inputs were built, so it
includes the gradients the call produces: the logits' ``.grad`` (1 logits tensor) for the
logits-level methods, the hidden-state and LM-head weight gradients for the hidden-level ones.
For those two, the table also shows the extra peak without the ``[V, H]`` weight gradient,
which any training step produces for the LM head whatever the loss implementation.
Time: minimum over all runs (the first one also measures memory; on a CPU every run allocates
afresh, so the first is not special); the minimum is the estimate least disturbed by other
processes on a shared machine. Workers run with ``OMP_WAIT_POLICY=PASSIVE`` unless the variable
is already set (see ``_worker_env``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT / "benchmarks"))
try:
    import kdcompose  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(_ROOT / "src"))

import torch  # noqa: E402

from _memory import measure_step  # noqa: E402

METHODS = ("textbook", "ms-swift", "chunked", "head+chunked", "fused")
HEAD_METHODS = ("head+chunked", "fused")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Rough extra peak in logits tensors, only used to skip a case that cannot fit in free memory.
_EXPECTED_MULTIPLE = {"textbook": 12, "ms-swift": 12, "chunked": 1.5, "head+chunked": 4, "fused": 1}


# ---------------------------------------------------------------------------------------------
# Worker: one method, one size, one fresh process
# ---------------------------------------------------------------------------------------------


def _build(method: str, tokens: int, vocab: int, hidden: int, dtype: torch.dtype, device: str):
    """Inputs and a closure running forward + backward once."""
    from kdcompose.functional import fused_linear_generalized_jsd, generalized_jsd, generalized_jsd_reference

    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int, scale: float = 1.0, grad: bool = False) -> torch.Tensor:
        x = (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)
        return x.requires_grad_(grad)

    if method in HEAD_METHODS:
        s_hidden = randn(tokens, hidden, grad=True)
        t_hidden = randn(tokens, hidden)
        s_weight = randn(vocab, hidden, scale=hidden**-0.5 * 3, grad=True)
        t_weight = randn(vocab, hidden, scale=hidden**-0.5 * 3)
        grads = (s_hidden, s_weight)

        if method == "fused":

            def step() -> None:
                fused_linear_generalized_jsd(s_hidden, s_weight, t_hidden, t_weight, beta=0.5).backward()
        else:

            def step() -> None:
                with torch.no_grad():
                    t_logits = t_hidden @ t_weight.t()
                generalized_jsd(s_hidden @ s_weight.t(), t_logits, beta=0.5).backward()

        return step, grads

    s_logits = randn(tokens, vocab, scale=3.0, grad=True)
    t_logits = randn(tokens, vocab, scale=3.0)
    grads = (s_logits,)
    if method == "textbook":

        def step() -> None:
            generalized_jsd_reference(s_logits, t_logits, beta=0.5).backward()
    elif method == "ms-swift":
        from swift.rlhf_trainers.gkd_loss import jsd_loss

        def step() -> None:
            (jsd_loss(s_logits, t_logits, beta=0.5) / tokens).backward()
    elif method == "chunked":

        def step() -> None:
            generalized_jsd(s_logits, t_logits, beta=0.5).backward()
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return step, grads


def run_worker(spec: dict) -> dict:
    method, tokens, vocab, hidden = spec["method"], spec["tokens"], spec["vocab"], spec["hidden"]
    dtype, device, reps = DTYPES[spec["dtype"]], spec["device"], spec["reps"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])

    # Warm-up on a tiny problem: thread pools, kernels and lazy imports, without leaving large
    # freed blocks in the heap that would hide the measured run's allocations.
    tiny_step, tiny_grads = _build(method, 4, vocab, 8, dtype, device)
    tiny_step()
    del tiny_step, tiny_grads

    step, grads = _build(method, tokens, vocab, hidden, dtype, device)
    measured = measure_step(step, grads, device, reps)
    return {
        "method": method,
        "tokens": tokens,
        "extra_bytes": measured.extra_bytes,
        "memory_method": measured.memory_method,
        "cold_s": measured.cold_s,
        "time_s": measured.time_s,
        "times": measured.times,
    }


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


def _spawn(spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_worker_env())
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {
        "method": spec["method"],
        "tokens": spec["tokens"],
        "error": " | ".join(tail) or f"exit {proc.returncode}",
    }


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="512 tokens only, one timed repetition")
    parser.add_argument(
        "--tokens", type=int, nargs="+", default=None, help="token counts (default 512 1024 2048)"
    )
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=896, help="hidden size of both LM heads (fused rows)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--reps",
        type=int,
        default=None,
        help="runs after the first (default 2; 1 for head methods and --quick)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in workers")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._worker:
        print("RESULT " + json.dumps(run_worker(json.loads(args._worker))), flush=True)
        return 0

    tokens_list = args.tokens or ([512] if args.quick else [512, 1024, 2048])
    elem = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    print(
        f"# bench_loss: vocab={args.vocab} hidden={args.hidden} dtype={args.dtype} device={args.device} "
        f"torch={torch.__version__} threads={args.threads or torch.get_num_threads()} "
        f"cpus={os.cpu_count()} python={platform.python_version()} "
        f"OMP_WAIT_POLICY={_worker_env()['OMP_WAIT_POLICY']} (workers)"
    )
    print(
        "# extra peak = peak during forward+backward minus memory after inputs; 1 logits = tokens x vocab x "
        f"{elem} bytes; time = min over runs (s)"
    )
    header = (
        f"{'tokens':>6}  {'method':<13} {'time s':>7} {'vs textbook':>11} {'extra GiB':>9} "
        f"{'x logits':>8} {'x logits excl. W grad':>21}"
    )
    print(header)
    print("-" * len(header))
    results = []
    for tokens in tokens_list:
        logits_bytes = tokens * args.vocab * elem
        weight_grad_bytes = args.vocab * args.hidden * elem
        textbook_time = None
        for method in args.methods:
            reps = args.reps if args.reps is not None else (1 if args.quick or method in HEAD_METHODS else 2)
            spec = {
                "method": method,
                "tokens": tokens,
                "vocab": args.vocab,
                "hidden": args.hidden,
                "dtype": args.dtype,
                "device": args.device,
                "reps": reps,
                "threads": args.threads,
            }
            available = _mem_available() if args.device == "cpu" else None
            need = (_EXPECTED_MULTIPLE[method] + 2.5) * logits_bytes
            if available is not None and need > available:
                res = {
                    "method": method,
                    "tokens": tokens,
                    "error": f"skipped: needs ~{need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available",
                }
            else:
                res = _spawn(spec)
            results.append(res)
            if "error" in res:
                print(f"{tokens:>6}  {method:<13} {res['error']}", flush=True)
                continue
            if method == "textbook":
                textbook_time = res["time_s"]
            extra = res["extra_bytes"]
            excl = f"{(extra - weight_grad_bytes) / logits_bytes:.3f}" if method in HEAD_METHODS else "-"
            vs = (
                _fmt_ratio(res["time_s"] / textbook_time)
                if textbook_time and method not in HEAD_METHODS
                else "-"
            )
            print(
                f"{tokens:>6}  {method:<13} {res['time_s']:>7.2f} {vs:>11} {extra / 2**30:>9.2f} "
                f"{extra / logits_bytes:>8.3f} {excl:>21}",
                flush=True,
            )
    methods_used = {r.get("memory_method") for r in results if "memory_method" in r}
    print(f"# memory measured with: {', '.join(sorted(m for m in methods_used if m))}")
    print(
        "# head+chunked/fused include 4 LM-head GEMMs (2 forward, 2 backward); compare them with each other, "
        "not with textbook"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
