"""FastAPI app of ``kdcompose serve-teacher``: ms-swift's teacher-server protocol on transformers.

Endpoints (the shapes ms-swift's ``VLLMInferClient`` and ``swift deploy`` use):

- ``GET /health``: 200 once the teacher is loaded, 503 while it loads, 500 with the reason when
  loading failed (never needs the API key, like ``swift deploy``'s exempt paths). A failed load
  also calls ``on_load_failure`` (``kdcompose serve-teacher`` then exits with status 1 and the
  reason, so a launcher waiting for health is not left waiting).
- ``POST /infer/``: body ``{"infer_requests": [RolloutInferRequest...], "request_config":
  {"prompt_logprobs": K, "max_tokens": 1, "temperature": 0, ...}}``; answer: a JSON list, one
  ``ChatCompletionResponse`` per request, in order, with ``prompt_logprobs`` (see
  :mod:`kdcompose.serve.scorer`) and ``prompt_token_ids``.

Errors: 401 (API key missing or wrong), 400 (malformed request, K above ``--max-logprobs``,
unsupported options), 413 (body, request count or tokens above the limits), 503 (still loading).
Every error body is ``{"object": "error", "message": ...}`` as in ``swift deploy``.

Batching: each ``/infer/`` call is parsed and encoded, then queued; the worker takes what is
queued, waits up to ``batch_window_ms`` for more, and runs padded forwards of at most
``max_batch_tokens`` (rows x longest row), then formats and serializes each call's answer. Calls
that arrived before a round started and are still being encoded join it (their encoding is queued
ahead of the forward on the same thread, so waiting for them costs nothing). Concurrent callers
therefore share forwards; one call's samples never get split across answers.

One thread does all of that CPU work (parsing a body, encoding, forwards, formatting, JSON); the
event loop only moves bytes. Why: the forward is a long chain of small torch operations, each
taking the GIL back from whatever Python runs meanwhile, and JSON encoding or decoding is C code
that holds the GIL for its whole call. Measured here, a forward ran 2.5-3x slower next to a
thread serializing answers than alone, which is what made concurrent calls slower than the same
calls one at a time (docs/performance.md, teacher server). With one CPU thread nothing competes
with the forward inside the server; concurrent calls still gain the shared forwards and overlap
with the callers' own work.
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations (Request)
# at run time, and they name classes imported inside create_app.

import asyncio
import json
import secrets
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kdcompose.serve.scorer import EncodedRequest, RequestError, TeacherLoadError, TeacherScorer, load_failure

__all__ = ["ServerLimits", "create_app"]

_EXEMPT_PATHS = frozenset({"/health", "/health/"})


@dataclass(frozen=True)
class ServerLimits:
    """Bounds that keep one caller from exhausting the server (each violation: 413 with a message)."""

    max_logprobs: int = 20
    max_body_bytes: int = 64 * 2**20
    max_requests: int = 512
    max_tokens_per_request: int = 32768
    max_batch_tokens: int = 16384
    batch_window_ms: float = 5.0


@dataclass
class _Job:
    items: list[EncodedRequest]
    k: int
    future: asyncio.Future
    tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = sum(item.length for item in self.items)


def _error(status: int, message: str) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"object": "error", "message": message}, status_code=status)


def _dumps(content: Any) -> bytes:
    """JSON as starlette's JSONResponse renders it (compact; NaN/inf refused)."""
    return json.dumps(
        content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode()


def _prepare(scorer: TeacherScorer, limits: ServerLimits, raw: bytes) -> tuple[list[EncodedRequest], int]:
    """Parse one ``/infer/`` body and encode its requests (on the worker thread); RequestError
    (400 / 413) naming what is wrong."""
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise RequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict) or not isinstance(body.get("infer_requests"), list):
        raise RequestError("expected a JSON object with an 'infer_requests' list")
    infer_requests = body["infer_requests"]
    if len(infer_requests) > limits.max_requests:
        raise RequestError(
            f"{len(infer_requests)} infer_requests exceed the limit of {limits.max_requests} per call; "
            "send smaller batches or raise --max-requests",
            status=413,
        )
    k = _parse_k(body.get("request_config"), limits)
    encoded = [scorer.encode(r, i) for i, r in enumerate(infer_requests)]
    bound = min(limits.max_tokens_per_request, limits.max_batch_tokens)
    for i, item in enumerate(encoded):
        if item.length > bound:
            raise RequestError(
                f"infer_requests[{i}] encodes to {item.length} tokens, above the server's limit of "
                f"{bound} tokens per request",
                status=413,
            )
    return encoded, k


class _Batcher:
    """Gathers queued jobs for a few ms and scores them in shared padded forwards (one worker thread);
    each job's result is its serialized answer."""

    def __init__(
        self, scorer: TeacherScorer, limits: ServerLimits, executor: ThreadPoolExecutor, model_name: str
    ) -> None:
        self.scorer = scorer
        self.limits = limits
        self.executor = executor
        self.model_name = model_name
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.forwards = 0
        self._issued = 0
        self._preparing: set[int] = set()
        self._prepared = asyncio.Event()

    def preparing(self) -> int:
        """A call's body is about to be parsed and encoded: its ticket."""
        self._issued += 1
        self._preparing.add(self._issued)
        return self._issued

    def prepared(self, ticket: int) -> None:
        """That call is queued as a job (or failed): call after ``queue.put``."""
        self._preparing.discard(ticket)
        self._prepared.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            earlier = self._issued
            deadline = loop.time() + self.limits.batch_window_ms / 1000
            while (timeout := deadline - loop.time()) > 0:
                try:
                    jobs.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            # Calls that arrived before this round started are being encoded on the worker thread,
            # ahead of this round's forward in its queue anyway: waiting for them costs nothing and
            # lets them share the forward (later arrivals go to the next round: no starvation).
            while any(ticket <= earlier for ticket in self._preparing):
                self._prepared.clear()
                await self._prepared.wait()
            while not self.queue.empty():  # everything already waiting joins this round
                jobs.append(self.queue.get_nowait())
            jobs = [job for job in jobs if not job.future.done()]  # a caller gone: nothing to score
            if not jobs:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self._score_jobs, jobs)
            except Exception as exc:  # a forward failure fails the jobs of this round, not the server
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            for job, result in zip(jobs, results, strict=True):
                if not job.future.done():
                    job.future.set_result(result)

    def _score_jobs(self, jobs: Sequence[_Job]) -> list[bytes]:
        """Score all samples of ``jobs`` in forwards bounded by ``max_batch_tokens`` (padded); each
        job's answer serialized (JSON bytes)."""
        flat = [(j, i, item) for j, job in enumerate(jobs) for i, item in enumerate(job.items)]
        flat.sort(key=lambda t: t[2].length)  # similar lengths share a forward: less padding
        k = max(job.k for job in jobs)
        out: list[list[Any]] = [[None] * len(job.items) for job in jobs]
        chunk: list[tuple[int, int, EncodedRequest]] = []
        for entry in [*flat, None]:
            if entry is not None:
                longest = max([entry[2].length] + [c[2].length for c in chunk])
                if not chunk or longest * (len(chunk) + 1) <= self.limits.max_batch_tokens:
                    chunk.append(entry)
                    continue
            scored = self.scorer.score([c[2] for c in chunk], k)
            self.forwards += 1
            for (j, i, _), result in zip(chunk, scored, strict=True):
                out[j][i] = _trim_k(result, jobs[j].k)
            chunk = [entry] if entry is not None else []
        return [_dumps([_response(self.model_name, r) for r in results]) for results in out]


def _trim_k(result: dict[str, Any], k: int) -> dict[str, Any]:
    """Keep the top ``k`` entries (+ the actual token) of a result scored with a larger K."""
    trimmed: list[Any] = [None]
    for entry, token in zip(result["prompt_logprobs"][1:], result["prompt_token_ids"][1:], strict=True):
        keep = {tid: info for tid, info in entry.items() if info["rank"] <= k or tid == str(token)}
        trimmed.append(keep)
    return {**result, "prompt_logprobs": trimmed}


def _response(model_name: str, result: dict[str, Any]) -> dict[str, Any]:
    """One ``ChatCompletionResponse`` (ms-swift's dataclass fields) carrying the prompt log-probs."""
    n = len(result["prompt_token_ids"])
    return {
        "model": model_name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": ""},
                "finish_reason": "length",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n},
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "prompt_token_ids": result["prompt_token_ids"],
        "prompt_logprobs": result["prompt_logprobs"],
    }


def _parse_k(request_config: Any, limits: ServerLimits) -> int:
    if request_config is None:
        request_config = {}
    if not isinstance(request_config, dict):
        raise RequestError("request_config: expected an object")
    if request_config.get("stream"):
        raise RequestError("request_config.stream: `/infer/` does not support streaming requests")
    k = request_config.get("prompt_logprobs")
    if k is None:
        raise RequestError(
            "request_config.prompt_logprobs: required; this server only scores prompts "
            "(send prompt_logprobs=K, max_tokens=1, temperature=0 as ms-swift's GKD trainer does)"
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise RequestError(f"request_config.prompt_logprobs: expected an integer >= 0, got {k!r}")
    if k > limits.max_logprobs:
        raise RequestError(
            f"request_config.prompt_logprobs={k} is greater than the server's max_logprobs "
            f"({limits.max_logprobs}); lower gkd_logits_topk or restart the server with --max-logprobs {k}"
        )
    return k


def create_app(
    scorer: TeacherScorer,
    *,
    limits: ServerLimits | None = None,
    api_key: str | None = None,
    model_name: str | None = None,
    load_in_background: bool = True,
    on_load_failure: Callable[[TeacherLoadError], None] | None = None,
) -> Any:
    """The FastAPI app; loads ``scorer`` at start-up (in a thread, so ``/health`` answers 503 meanwhile).

    A load that fails is kept (``app.state.load_error``, ``/health`` 500) and handed to
    ``on_load_failure``; without a background load it raises instead."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    limits = limits or ServerLimits()
    name = model_name or scorer.model_path
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcompose-teacher")
    state: dict[str, Any] = {"load_error": None}
    batcher = _Batcher(scorer, limits, executor, name)

    def _load() -> None:
        try:
            if not scorer.loaded:
                scorer.load()
        except Exception as exc:  # reported, not raised: a dying thread would print a traceback
            error = load_failure(exc, scorer.model_path, scorer.model_type)
            state["load_error"] = error
            if on_load_failure is not None:
                on_load_failure(error)
            return
        print(f"kdcompose serve-teacher: ready ({scorer.describe()})", file=sys.stdout, flush=True)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        worker = asyncio.create_task(batcher.run())
        if load_in_background:
            threading.Thread(target=_load, name="kdcompose-teacher-load", daemon=True).start()
        else:
            _load()
            if state["load_error"] is not None:
                raise state["load_error"]
        try:
            yield
        finally:
            worker.cancel()
            executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(lifespan=lifespan, title="kdcompose teacher server")
    app.state.batcher = batcher
    app.state.limits = limits
    app.state.load_state = state

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        if api_key and request.url.path not in _EXEMPT_PATHS:
            header = request.headers.get("authorization") or ""
            given = header[7:] if header.startswith("Bearer ") else None
            if given is None or not secrets.compare_digest(given.encode(), api_key.encode()):
                return _error(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'")
        return await call_next(request)

    async def health() -> Response:
        if state["load_error"] is not None:
            return _error(500, f"the teacher failed to load: {state['load_error']}")
        return Response(status_code=200 if scorer.loaded else 503)

    app.get("/health")(health)
    app.get("/health/")(health)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "kdcompose"}]}

    @app.post("/infer/")
    async def infer(request: Request) -> Any:
        if not scorer.loaded:
            return _error(503, "the teacher is still loading; poll GET /health until it answers 200")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            return _error(
                413, f"request body of {declared} bytes exceeds the limit of {limits.max_body_bytes} bytes"
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                return _error(413, f"request body exceeds the limit of {limits.max_body_bytes} bytes")
            chunks.append(chunk)
        loop = asyncio.get_running_loop()
        ticket = batcher.preparing()
        try:
            encoded, k = await loop.run_in_executor(executor, _prepare, scorer, limits, b"".join(chunks))
            if not encoded:
                return JSONResponse([])
            job = _Job(encoded, k, loop.create_future())
            await batcher.queue.put(job)
        except RequestError as exc:
            return _error(exc.status, str(exc))
        finally:
            batcher.prepared(ticket)
        try:
            answer = await job.future
        except Exception as exc:
            return _error(500, f"the teacher forward failed: {type(exc).__name__}: {exc}")
        return Response(content=answer, media_type="application/json")

    return app
