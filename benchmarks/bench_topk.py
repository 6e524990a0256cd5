"""Top-K teacher JSD benchmark: time and extra peak memory of forward + backward, side by side.

Usage (from the repository root)::

    python benchmarks/bench_topk.py                  # 2048 tokens x 151,936 vocab, K = 64, fp32, CPU
    python benchmarks/bench_topk.py --quick          # 512 tokens
    python benchmarks/bench_topk.py --device cuda --dtype bf16 --tokens 2048 8192

Methods (beta = 0.5, temperature = 1, every position valid, teacher top-K given as inputs --
the cache / server case; the teacher's full logits exist only for ``full``):

* ``full``             -- ``generalized_jsd(student_logits, teacher_logits)``: the full-vocabulary baseline.
* ``topk-renorm``      -- ``topk_generalized_jsd(student_logits, lp, ids, missing_mass="renorm")``.
* ``topk-tail``        -- the same with ``missing_mass="tail"`` (full-vocabulary student softmax).
* ``head+topk-renorm`` -- student LM head as a plain matmul feeding ``topk-renorm`` (unfused).
* ``fused-topk-renorm`` -- ``fused_linear_topk_generalized_jsd`` from hidden states (renorm: the
                         student's logits are only built at the K ids).
* ``head+topk-tail`` / ``fused-topk-tail`` -- the same pair for ``tail``.

Each case runs in a fresh Python process and memory is measured as in ``bench_loss.py`` (see
``_memory.py``): "extra peak" is the peak minus the memory held after the inputs were built,
gradients included (the logits' ``.grad`` for logits-level methods; hidden-state and
``[V, H]`` weight gradients for head methods, whose table column also shows the figure without
the weight gradient, which any training step produces for the LM head). Time is the minimum
over the runs. The ratio columns compare each method with its baseline *measured in this run*:
logits-level methods with ``full``, ``fused-*`` with its ``head+*`` counterpart.
"""

from __future__ import annotations

import argparse
import json
import math
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

LOGITS_METHODS = ("full", "topk-renorm", "topk-tail")
HEAD_METHODS = ("head+topk-renorm", "fused-topk-renorm", "head+topk-tail", "fused-topk-tail")
METHODS = LOGITS_METHODS + HEAD_METHODS
BASELINE = {
    "topk-renorm": "full",
    "topk-tail": "full",
    "fused-topk-renorm": "head+topk-renorm",
    "fused-topk-tail": "head+topk-tail",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Rough extra peak in logits tensors, only used to skip a case that cannot fit in free memory.
_EXPECTED_MULTIPLE = {"full": 1.5, "topk-renorm": 1.2, "topk-tail": 1.5, "head+topk-renorm": 3.0}


def _given_topk(tokens: int, vocab: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Cheap synthetic top-K: distinct ids per row, log-probs covering 90% of the mass."""
    base = torch.randperm(vocab, generator=gen)[:k]
    ids = (base.unsqueeze(0) + torch.randint(0, vocab, (tokens, 1), generator=gen)) % vocab
    lp = torch.log_softmax(torch.randn(tokens, k, generator=gen) * 2.0, dim=-1) + math.log(0.9)
    lp, order = lp.sort(dim=-1, descending=True)
    return lp, torch.gather(ids, 1, order)


def _build(method: str, tokens: int, vocab: int, hidden: int, k: int, dtype: torch.dtype, device: str):
    """Inputs and a closure running forward + backward once."""
    from kdcompose.functional import fused_linear_topk_generalized_jsd, generalized_jsd, topk_generalized_jsd

    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int, scale: float = 1.0, grad: bool = False) -> torch.Tensor:
        x = (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)
        return x.requires_grad_(grad)

    lp, ids = _given_topk(tokens, vocab, k, gen)
    lp, ids = lp.to(device=device, dtype=dtype), ids.to(device)
    mode = "tail" if method.endswith("tail") else "renorm"

    if method in HEAD_METHODS:
        s_hidden = randn(tokens, hidden, grad=True)
        s_weight = randn(vocab, hidden, scale=hidden**-0.5 * 3, grad=True)
        grads = (s_hidden, s_weight)
        if method.startswith("fused"):

            def step() -> None:
                fused_linear_topk_generalized_jsd(
                    s_hidden, s_weight, teacher_topk_logprobs=lp, teacher_topk_ids=ids,
                    beta=0.5, missing_mass=mode,
                ).backward()  # fmt: skip
        else:

            def step() -> None:
                logits = s_hidden @ s_weight.t()
                topk_generalized_jsd(logits, lp, ids, beta=0.5, missing_mass=mode).backward()

        return step, grads

    s_logits = randn(tokens, vocab, scale=3.0, grad=True)
    grads = (s_logits,)
    if method == "full":
        t_logits = randn(tokens, vocab, scale=3.0)

        def step() -> None:
            generalized_jsd(s_logits, t_logits, beta=0.5).backward()
    elif method in LOGITS_METHODS:

        def step() -> None:
            topk_generalized_jsd(s_logits, lp, ids, beta=0.5, missing_mass=mode).backward()
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return step, grads


def run_worker(spec: dict) -> dict:
    method, tokens, vocab = spec["method"], spec["tokens"], spec["vocab"]
    hidden, k = spec["hidden"], spec["k"]
    dtype, device, reps = DTYPES[spec["dtype"]], spec["device"], spec["reps"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    # Warm-up on a tiny problem (thread pools, kernels, lazy imports) without leaving large
    # freed blocks in the heap that would hide the measured run's allocations.
    tiny_step, tiny_grads = _build(method, 4, vocab, 8, k, dtype, device)
    tiny_step()
    del tiny_step, tiny_grads

    step, grads = _build(method, tokens, vocab, hidden, k, dtype, device)
    measured = measure_step(step, grads, device, reps)
    return {
        "method": method,
        "tokens": tokens,
        "extra_bytes": measured.extra_bytes,
        "memory_method": measured.memory_method,
        "time_s": measured.time_s,
    }


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
    """Workers sleep instead of spinning between parallel regions (see bench_loss.py)."""
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
    return {"method": spec["method"], "tokens": spec["tokens"], "error": " | ".join(tail) or "failed"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="512 tokens, no repeated runs")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts (default 2048)")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=896, help="student hidden size (head/fused rows)")
    parser.add_argument("--k", type=int, default=64, help="teacher top-K")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--reps", type=int, default=None, help="runs after the first (default: 1 logits methods, 0 head)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in workers")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._worker:
        print("RESULT " + json.dumps(run_worker(json.loads(args._worker))), flush=True)
        return 0

    tokens_list = args.tokens or ([512] if args.quick else [2048])
    elem = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    print(
        f"# bench_topk: vocab={args.vocab} K={args.k} hidden={args.hidden} dtype={args.dtype} "
        f"device={args.device} torch={torch.__version__} threads={args.threads or torch.get_num_threads()} "
        f"cpus={os.cpu_count()} python={platform.python_version()} "
        f"OMP_WAIT_POLICY={_worker_env()['OMP_WAIT_POLICY']} (workers)"
    )
    print(
        "# forward+backward, beta=0.5, T=1; extra peak = peak minus memory after inputs; "
        f"1 logits = tokens x vocab x {elem} bytes; time = min over runs; ratios vs the baseline in this run"
    )
    print()
    print(
        "| tokens | method | time s | extra GiB | x logits | x logits excl. W grad | baseline "
        "| time vs baseline | extra peak vs baseline |"
    )
    print("|---:|---|---:|---:|---:|---:|---|---:|---:|")
    methods_used: set[str] = set()
    for tokens in tokens_list:
        logits_bytes = tokens * args.vocab * elem
        weight_grad_bytes = args.vocab * args.hidden * elem
        done: dict[str, dict] = {}
        for method in args.methods:
            head = method in HEAD_METHODS
            reps = args.reps if args.reps is not None else (0 if args.quick or head else 1)
            spec = {
                "method": method, "tokens": tokens, "vocab": args.vocab, "hidden": args.hidden, "k": args.k,
                "dtype": args.dtype, "device": args.device, "reps": reps, "threads": args.threads,
            }  # fmt: skip
            available = _mem_available() if args.device == "cpu" else None
            need = (_EXPECTED_MULTIPLE.get(method, 1.0) + 2.5) * logits_bytes
            if available is not None and need > available:
                res = {"error": f"skipped: needs ~{need / 2**30:.1f} GiB, {available / 2**30:.1f} available"}
            else:
                res = _spawn(spec)
            if "error" in res:
                print(f"| {tokens} | {method} | {res['error']} | | | | | | |", flush=True)
                continue
            done[method] = res
            methods_used.add(res["memory_method"])
            extra = res["extra_bytes"]
            excl = f"{(extra - weight_grad_bytes) / logits_bytes:.3f}" if head else "-"
            base_name = BASELINE.get(method)
            base = done.get(base_name) if base_name else None
            t_ratio = f"{res['time_s'] / base['time_s']:.3f}x" if base else "-"
            if base and head:  # compare what the loss itself adds: both make the same W gradient
                num, den = extra - weight_grad_bytes, base["extra_bytes"] - weight_grad_bytes
            elif base:
                num, den = extra, base["extra_bytes"]
            m_ratio = f"{num / den:.3f}x" if base and den > 0 else "-"
            print(
                f"| {tokens} | {method} | {res['time_s']:.3f} | {extra / 2**30:.3f} "
                f"| {extra / logits_bytes:.3f} | {excl} | {base_name or '-'} | {t_ratio} | {m_ratio} |",
                flush=True,
            )
    print()
    print(f"# memory measured with: {', '.join(sorted(methods_used))}")
    print(
        "# head/fused extra-peak ratio excludes the [V, H] LM-head weight gradient (made by any training "
        "step); logits methods include the logits' own .grad (1.0x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
