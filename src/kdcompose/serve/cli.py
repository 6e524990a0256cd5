"""``kdcompose serve-teacher``: argument parsing and the uvicorn run (see docs/teacher_server.md)."""

from __future__ import annotations

import argparse
import sys

from kdcompose.serve.app import ServerLimits

__all__ = ["add_arguments", "run"]

_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``serve-teacher`` flags (``kdcompose.cli`` registers the subcommand and calls :func:`run`)."""
    d = ServerLimits()
    p.add_argument("--model", required=True, help="teacher checkpoint directory (or hub id)")
    p.add_argument("--model-type", required=True, help="ms-swift model_type, as given to teacher_model_type")
    p.add_argument(
        "--template",
        default=None,
        help="ms-swift template (use the trainer's `template`; default: ms-swift's choice for the model, "
        "the model type's own where it finds several)",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--max-logprobs", type=int, default=d.max_logprobs, help="largest K a request may ask")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /infer/")
    p.add_argument(
        "--torch-dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: the model's"
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--max-pixels", type=int, default=None, help="ms-swift max_pixels (as the trainer)")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="largest request body")
    p.add_argument("--max-requests", type=int, default=d.max_requests, help="infer_requests per call")
    p.add_argument(
        "--max-tokens-per-request", type=int, default=d.max_tokens_per_request, help="tokens a request"
    )
    p.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens, help="padded tokens a forward")
    p.add_argument("--batch-window-ms", type=float, default=d.batch_window_ms, help="wait to gather requests")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (default warning)")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from kdcompose.serve.app import create_app
    from kdcompose.serve.scorer import TeacherScorer

    if args.max_logprobs < 0:
        print("--max-logprobs: expected an integer >= 0", file=sys.stderr)
        return 2
    missing = _missing_local_model(args.model)
    if missing is not None:  # said at once, before ms-swift and uvicorn start
        print(f"kdcompose serve-teacher: {missing}", file=sys.stderr)
        return 1
    if args.host not in _LOCAL_HOSTS and not args.api_key:
        print(
            f"warning: serving on {args.host}:{args.port} without --api-key: anyone who can reach the port "
            "can use the teacher",
            file=sys.stderr,
        )
    limits = ServerLimits(
        max_logprobs=args.max_logprobs,
        max_body_bytes=args.max_body_bytes,
        max_requests=args.max_requests,
        max_tokens_per_request=args.max_tokens_per_request,
        max_batch_tokens=args.max_batch_tokens,
        batch_window_ms=args.batch_window_ms,
    )
    scorer = TeacherScorer(
        args.model,
        args.model_type,
        args.template,
        torch_dtype=args.torch_dtype,
        device=args.device,
        max_pixels=args.max_pixels,
    )
    failures: list[Exception] = []

    def stop(error: Exception) -> None:
        """The teacher cannot load: say why and end the process (not a server that never gets ready)."""
        failures.append(error)
        print(f"kdcompose serve-teacher: {error}", file=sys.stderr, flush=True)
        server.should_exit = True

    app = create_app(scorer, limits=limits, api_key=args.api_key, on_load_failure=stop)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
    print(
        f"kdcompose teacher server on http://{args.host}:{args.port} (GET /health, POST /infer/)", flush=True
    )
    server.run()
    return 1 if failures else 0


def _missing_local_model(model: str) -> str | None:
    """Why ``--model`` cannot be a checkpoint, when it is written as a local path (absolute,
    ``./``, ``../`` or ``~``) that does not exist; None otherwise (a hub id is ms-swift's to find)."""
    from pathlib import Path

    if not model.startswith(("/", "./", "../", "~")):
        return None
    path = Path(model).expanduser()
    if path.exists():
        return None
    return (
        f"--model {model!r}: no such directory (give the teacher's checkpoint folder, the trainer's "
        "teacher_model)"
    )
