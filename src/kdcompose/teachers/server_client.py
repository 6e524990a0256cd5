"""A client for ms-swift's teacher-server protocol that does not need vLLM.

ms-swift 4.6's GKD/GRPO trainers talk to ``teacher_model_server`` through
``swift.rlhf_trainers.vllm_client.VLLMInferClient``, whose constructor raises ``ImportError`` unless
vLLM is importable — although the teacher path only POSTs JSON. vLLM has no wheel for CPU-only
and many non-NVIDIA machines, so kdcompose speaks the same protocol itself:

- ``GET {url}/health`` until 200 (the teacher may still be loading);
- ``POST {url}/infer/`` with ``{"infer_requests": [...], "request_config": {...}}``; the answer is a
  JSON list with one ``ChatCompletionResponse`` per request, in order, whose ``prompt_logprobs``
  has one entry per prompt token (entry 0 ``None``; entry ``i``: ``{token_id: {"logprob", ...}}``).

Two ways in:

- Standalone: ``TeacherServerClient(url, api_key=None).topk_logprobs(infer_requests, k)`` returns,
  per request, ``(logprobs, token_ids)``: ``[positions][k]`` lists, exactly what ms-swift's
  ``parse_prompt_logprobs`` returns (top-k by log-prob; vLLM's extra actual-token entry dropped),
  as a :class:`ScoredPrompt` whose ``prompt_token_ids`` are the tokens the server scored (what
  the alignment audit, :func:`kdcompose.teachers.audit.check_served_tokens`, compares with the
  student's; ``kdcompose serve-teacher``, vLLM and ``swift deploy`` send them when asked with
  ``return_details``, which this client always does).
- Inside ms-swift's stock trainer: ``kdcompose.compat.swift_teacher_client``'s
  ``install_vllm_free_teacher_client`` (only when vLLM is not importable) makes
  ``RolloutTrainerMixin._setup_teacher`` construct :class:`VLLMFreeInferClient`, which has
  the constructor and ``infer`` signature the trainer uses of ``VLLMInferClient``.

Faults (all bounded; every error names the URL):

- start: ``/health`` is polled for ``KDCOMPOSE_TEACHER_SERVER_WAIT_S`` seconds (default 120), then
  :class:`TeacherServerUnavailable`.
- mid-run: connection errors, timeouts (``KDCOMPOSE_TEACHER_SERVER_TIMEOUT_S`` a request, default
  300) and 5xx answers are retried ``KDCOMPOSE_TEACHER_SERVER_RETRIES`` times in all (default 4) with
  exponential backoff from ``KDCOMPOSE_TEACHER_SERVER_BACKOFF_S`` (default 1 s: 1, 2, 4 s), then
  :class:`TeacherServerUnavailable` suggesting a resume from the last checkpoint. 4xx answers are
  not retried (:class:`TeacherServerError` with the server's message).
- a malformed or short answer: :class:`TeacherResponseError` naming the URL and the sample index.

Retries never double count: one ``infer`` call returns exactly the answer of one successful
POST (one response per request, checked), whatever failed before it; nothing of a failed attempt
is kept.

HTTP library: ``requests`` — what ms-swift's own client uses (so it is always installed with
ms-swift), synchronous like the trainer's call site (``_infer_teacher_requests`` runs on the main
process and blocks until the teacher answers), and its ``Session`` keeps connections alive between
steps. ``httpx``'s async API would buy nothing here.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlparse

__all__ = [
    "DEFAULT_BACKOFF_S",
    "DEFAULT_RETRIES",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_WAIT_S",
    "ScoredPrompt",
    "TeacherResponseError",
    "TeacherServerClient",
    "TeacherServerError",
    "TeacherServerUnavailable",
    "VLLMFreeInferClient",
    "parse_prompt_logprobs",
]

DEFAULT_WAIT_S = 120.0
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_RETRIES = 4
DEFAULT_BACKOFF_S = 1.0
ENV_WAIT = "KDCOMPOSE_TEACHER_SERVER_WAIT_S"
ENV_TIMEOUT = "KDCOMPOSE_TEACHER_SERVER_TIMEOUT_S"
ENV_RETRIES = "KDCOMPOSE_TEACHER_SERVER_RETRIES"
ENV_BACKOFF = "KDCOMPOSE_TEACHER_SERVER_BACKOFF_S"
ENV_API_KEY = "KDCOMPOSE_TEACHER_SERVER_API_KEY"

Parsed = tuple[list[list[float]], list[list[int]]]


class ScoredPrompt(tuple):
    """``(logprobs, token_ids)`` of one request, as ms-swift's parser returns them (it unpacks and
    assembles like a plain pair), plus ``prompt_token_ids``: every token the server scored, in
    order (None when the server did not send them)."""

    prompt_token_ids: list[int] | None

    def __new__(
        cls, logprobs: list[list[float]], token_ids: list[list[int]], prompt_token_ids: list[int] | None
    ) -> ScoredPrompt:
        scored = super().__new__(cls, (logprobs, token_ids))
        scored.prompt_token_ids = prompt_token_ids
        return scored

    def __reduce__(self) -> tuple[Any, ...]:  # pickled across ranks (ms-swift broadcasts answers)
        return (ScoredPrompt, (self[0], self[1], self.prompt_token_ids))


class TeacherServerError(RuntimeError):
    """The teacher server refused a request or failed; ``url`` names it."""

    def __init__(self, message: str, url: str) -> None:
        super().__init__(message)
        self.url = url


class TeacherServerUnavailable(TeacherServerError, ConnectionError):
    """The server could not be reached (at start, or after the retries mid-run)."""


class TeacherResponseError(TeacherServerError, ValueError):
    """The server answered, but not with what the protocol promises; ``index`` names the sample."""

    def __init__(self, message: str, url: str, index: int | None = None) -> None:
        super().__init__(message, url)
        self.index = index


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a number") from None
    if value < 0 or math.isnan(value):
        raise ValueError(f"{name}={raw!r}: expected a number >= 0")
    return value


def _normalize_url(url: str) -> str:
    parsed = urlparse(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"teacher server URL {url!r}: expected http(s)://HOST:PORT")
    return f"{parsed.scheme}://{parsed.netloc}{parsed.path}".rstrip("/")


def _inline_local_files(values: Any) -> Any:
    """Local image/video/audio paths -> base64, so a server on another machine can read them."""
    if not isinstance(values, list):
        return values
    out = []
    for value in values:
        is_path = isinstance(value, str) and not value.startswith(("http://", "https://", "data:"))
        if is_path and len(value) < 4096 and os.path.isfile(value):
            with open(value, "rb") as fh:
                value = base64.b64encode(fh.read()).decode("ascii")
        out.append(value)
    return out


def _request_dict(request: Any, inline_media: bool) -> dict[str, Any]:
    if dataclasses.is_dataclass(request) and not isinstance(request, type):
        data = dataclasses.asdict(request)
    elif isinstance(request, Mapping):
        data = dict(request)
    else:
        raise TypeError(f"infer request: expected a dataclass or a mapping, got {type(request).__name__}")
    if inline_media:
        for key in ("images", "videos", "audios"):
            if data.get(key):
                data[key] = _inline_local_files(list(data[key]))
    return data


def parse_prompt_logprobs(prompt_logprobs: Sequence[Any] | None, topk: int) -> Parsed:
    """``(logprobs, token_ids)`` per position, as ms-swift's ``parse_prompt_logprobs`` returns them.

    ``topk > 0``: the ``topk`` largest entries, by log-prob (vLLM's extra actual-token entry falls
    off); ``topk == 0``: the single (actual-token) entry. Entry 0 (``None``) is skipped.
    """
    lps: list[list[float]] = []
    ixs: list[list[int]] = []
    for entry in list(prompt_logprobs or [])[1:]:
        items = list(entry.items())
        items = sorted(items, key=lambda kv: -kv[1]["logprob"])[:topk] if topk > 0 else items[:1]
        lps.append([float(info["logprob"]) for _, info in items])
        ixs.append([int(tid) for tid, _ in items])
    return lps, ixs


class TeacherServerClient:
    """One teacher server. ``topk_logprobs`` for standalone use; ``infer`` mirrors ms-swift's client.

    Args:
        url: ``http(s)://HOST:PORT`` of a ``kdcompose serve-teacher``, ``swift deploy`` or
            ``swift rollout`` server.
        api_key: sent as ``Authorization: Bearer KEY`` (default: ``$KDCOMPOSE_TEACHER_SERVER_API_KEY``).
        wait_s / timeout_s / retries / backoff_s: see the module docstring (defaults from the
            environment variables named there).
        inline_media: send local media files as base64 instead of paths (a remote server cannot
            read this machine's paths; the decoded image is the same).
        wait: poll ``/health`` in the constructor (as ms-swift's client does).
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        wait_s: float | None = None,
        timeout_s: float | None = None,
        retries: int | None = None,
        backoff_s: float | None = None,
        inline_media: bool = True,
        wait: bool = True,
    ) -> None:
        import requests

        self.url = _normalize_url(url)
        self.api_key = api_key if api_key is not None else (os.environ.get(ENV_API_KEY) or None)
        self.wait_s = _env_float(ENV_WAIT, DEFAULT_WAIT_S) if wait_s is None else float(wait_s)
        self.timeout_s = _env_float(ENV_TIMEOUT, DEFAULT_TIMEOUT_S) if timeout_s is None else float(timeout_s)
        self.retries = int(_env_float(ENV_RETRIES, DEFAULT_RETRIES)) if retries is None else int(retries)
        if self.retries < 1:
            raise ValueError(f"retries={self.retries}: expected at least 1 try")
        self.backoff_s = _env_float(ENV_BACKOFF, DEFAULT_BACKOFF_S) if backoff_s is None else float(backoff_s)
        self.inline_media = inline_media
        self.session = requests.Session()
        if self.api_key:
            self.session.headers["Authorization"] = f"Bearer {self.api_key}"
        if wait:
            self.wait_until_healthy()

    def __repr__(self) -> str:
        return f"TeacherServerClient({self.url!r})"

    def wait_until_healthy(self, wait_s: float | None = None) -> None:
        """Poll ``GET /health`` until 200, at most ``wait_s`` seconds; else TeacherServerUnavailable."""
        import requests

        budget = self.wait_s if wait_s is None else float(wait_s)
        deadline = time.monotonic() + budget
        last = "no answer"
        while True:
            remaining = deadline - time.monotonic()
            try:
                response = self.session.get(f"{self.url}/health", timeout=max(0.5, min(5.0, remaining)))
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}"
                if (
                    response.status_code == 500
                ):  # the server says the teacher failed to load: no point waiting
                    raise TeacherServerUnavailable(
                        f"teacher server {self.url} is up, its teacher failed to load: {_message(response)}",
                        self.url,
                    )
            except requests.RequestException as exc:
                last = f"{type(exc).__name__}"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TeacherServerUnavailable(
                    f"teacher server {self.url} not ready after {budget:g} s (last: {last}); check that "
                    f"`kdcompose serve-teacher` / `swift deploy` runs there, or raise {ENV_WAIT} if the "
                    "teacher is still loading",
                    self.url,
                )
            time.sleep(min(1.0, remaining))

    def _post(self, body: dict[str, Any]) -> list[Any]:
        """POST /infer/ with bounded retries; returns the decoded JSON list of one successful answer."""
        import requests

        request_id = uuid.uuid4().hex
        last = ""
        for attempt in range(self.retries):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = self.session.post(
                    f"{self.url}/infer/",
                    json=body,
                    timeout=self.timeout_s,
                    headers={"X-Request-Id": f"{request_id}-{attempt}"},
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code >= 500:
                last = f"HTTP {response.status_code}: {response.text[:500]}"
                continue
            if response.status_code != 200:
                raise TeacherServerError(
                    f"teacher server {self.url} refused the request (HTTP {response.status_code}): "
                    f"{_message(response)}",
                    self.url,
                )
            try:
                data = response.json()
            except ValueError as exc:
                raise TeacherResponseError(
                    f"teacher server {self.url} answered invalid JSON: {exc}", self.url
                ) from exc
            if not isinstance(data, list):
                raise TeacherResponseError(
                    f"teacher server {self.url} answered a {type(data).__name__}, not a list of responses",
                    self.url,
                )
            return data
        raise TeacherServerUnavailable(
            f"teacher server {self.url} failed {self.retries} tries (timeout {self.timeout_s:g} s each, "
            f"backoff from {self.backoff_s:g} s; last: {last}); training stops here: restart the server and "
            "resume from the last checkpoint (`resume_from_checkpoint`)",
            self.url,
        )

    def infer_raw(
        self, infer_requests: Sequence[Any], request_config: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        """POST the requests; the JSON answers, checked to be one well-formed response per request."""
        k = request_config.get("prompt_logprobs")
        body = {
            "infer_requests": [_request_dict(r, self.inline_media) for r in infer_requests],
            "request_config": {**request_config, "return_details": True},  # prompt_token_ids to check against
        }
        data = self._post(body)
        if len(data) != len(infer_requests):
            raise TeacherResponseError(
                f"teacher server {self.url} answered {len(data)} responses to {len(infer_requests)} requests",
                self.url,
            )
        for i, item in enumerate(data):
            self._check(item, i, k)
        return data

    def _check(self, item: Any, index: int, k: int | None) -> None:
        def bad(why: str) -> TeacherResponseError:
            return TeacherResponseError(
                f"teacher server {self.url}: response for sample {index}: {why}", self.url, index
            )

        if isinstance(item, Mapping) and "response" in item and "prompt_logprobs" not in item:
            item = item["response"]  # a RolloutOutput wraps the ChatCompletionResponse
        if not isinstance(item, Mapping):
            raise bad(f"expected an object, got {type(item).__name__}")
        if k is None:
            return
        lps = item.get("prompt_logprobs")
        if not isinstance(lps, list) or not lps:
            raise bad("no prompt_logprobs (is the server one that supports prompt_logprobs, e.g. vLLM?)")
        if lps[0] is not None:
            raise bad("prompt_logprobs[0] must be null (no distribution predicts the first token)")
        ids = item.get("prompt_token_ids")
        if isinstance(ids, list) and len(ids) != len(lps):
            raise bad(
                f"{len(lps)} prompt_logprobs positions for a prompt of {len(ids)} tokens (short answer)"
            )
        need = max(1, k)
        for pos, entry in enumerate(lps[1:], start=1):
            if not isinstance(entry, Mapping) or len(entry) < need:
                raise bad(f"position {pos}: expected at least {need} log-probs, got {entry!r:.200}")
            for tid, info in entry.items():
                lp = info.get("logprob") if isinstance(info, Mapping) else None
                if not str(tid).lstrip("-").isdigit() or not isinstance(lp, (int, float)) or math.isnan(lp):
                    raise bad(f"position {pos}: malformed entry {tid!r}: {info!r:.200}")

    def infer(
        self,
        infer_requests: Sequence[Any],
        request_config: Any = None,
        metrics: Any = None,
        *,
        use_tqdm: bool | None = None,
        adapter_request: Any = None,
    ) -> list[Any]:
        """``VLLMInferClient.infer``'s signature and result type: ms-swift ``ChatCompletionResponse``s."""
        from swift.infer_engine.protocol import ChatCompletionResponse, RolloutOutput

        if dataclasses.is_dataclass(request_config) and not isinstance(request_config, type):
            request_config = dataclasses.asdict(request_config)
        data = self.infer_raw(infer_requests, dict(request_config or {}))
        out = []
        for item in data:
            if "response" in item and "prompt_logprobs" not in item:
                out.append(RolloutOutput.model_validate(item))
            else:
                out.append(ChatCompletionResponse(**item))
        return out

    def topk_logprobs(self, infer_requests: Sequence[Any], k: int) -> list[ScoredPrompt]:
        """Per request ``(logprobs, token_ids)`` ``[positions][k]`` — the teacher's top-k prompt
        log-probs — with the ``prompt_token_ids`` it scored (:class:`ScoredPrompt`)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k={k!r}: expected an integer >= 0")
        config = {"prompt_logprobs": k, "max_tokens": 1, "temperature": 0.0}
        out = []
        for item in self.infer_raw(infer_requests, config):
            item = item["response"] if "response" in item and "prompt_logprobs" not in item else item
            ids = item.get("prompt_token_ids")
            scored = [int(i) for i in ids] if isinstance(ids, list) else None
            out.append(ScoredPrompt(*parse_prompt_logprobs(item.get("prompt_logprobs"), k), scored))
        return out


def _message(response: Any) -> str:
    try:
        data = response.json()
        if isinstance(data, Mapping) and "message" in data:
            return str(data["message"])
    except ValueError:
        pass
    return response.text[:500]


class VLLMFreeInferClient:
    """Drop-in for ms-swift's ``VLLMInferClient`` on the teacher path, without vLLM.

    ms-swift 4.6 uses exactly: ``VLLMInferClient(base_urls=[url])`` in
    ``RolloutTrainerMixin._setup_teacher`` (main process only), then
    ``client.infer(requests, request_config=RequestConfig(prompt_logprobs=K, max_tokens=1,
    temperature=0.0), use_tqdm=False)`` in ``_infer_teacher_requests``, reading ``.prompt_logprobs``
    of each result. Several ``base_urls`` split the requests in order, as ``VLLMInferClient`` does.
    The API key comes from ``$KDCOMPOSE_TEACHER_SERVER_API_KEY`` (ms-swift passes none).
    """

    def __init__(
        self,
        base_urls: list[str] | None = None,
        hosts: Sequence[str] = ("0.0.0.0",),
        server_ports: Sequence[int] = (8000,),
        connection_timeout: float | None = None,
    ) -> None:
        if base_urls is None:
            if len(hosts) != len(server_ports):
                raise ValueError("hosts and server_ports must have the same length")
            base_urls = [f"http://{h}:{p}" for h, p in zip(hosts, server_ports, strict=True)]
        # ms-swift passes connection_timeout=240 by default; the documented env wait wins when set
        wait = None if os.environ.get(ENV_WAIT) or connection_timeout is None else connection_timeout
        self.clients = [TeacherServerClient(u, wait_s=wait) for u in base_urls]
        self.base_urls = [c.url for c in self.clients]
        self.hosts = [urlparse(u).hostname for u in self.base_urls]
        self.num_servers = len(self.clients)

    def check_server(self, total_timeout: float = 0.0, retry_interval: float = 2.0) -> None:
        for client in self.clients:
            client.wait_until_healthy(total_timeout)

    def infer(
        self,
        infer_requests: Sequence[Any],
        request_config: Any = None,
        metrics: Any = None,
        *,
        use_tqdm: bool | None = None,
        adapter_request: Any = None,
    ) -> list[Any]:
        n = len(infer_requests)
        size = -(-n // self.num_servers) if n else 0
        out: list[Any] = []
        for i, client in enumerate(self.clients):
            chunk = list(infer_requests[i * size : (i + 1) * size]) if size else []
            if chunk:
                out.extend(client.infer(chunk, request_config, use_tqdm=use_tqdm))
        return out


def audit_answers(
    parsed: Sequence[Any], model_inputs: Mapping[str, Any], *, name: str, url: str, template: Any = None
) -> None:
    """The alignment audit of one micro-batch's answers from a server (see
    :func:`kdcompose.teachers.audit.check_served_tokens`): the tokens it scored must be the ones
    the trainer encoded for the same samples (``model_inputs``, the teacher's view of the batch),
    else :class:`~kdcompose.teachers.audit.TeacherAlignmentError` names the sample, the first
    differing position and both tokens, and says how to start the server to match."""
    from kdcompose.teachers.audit import check_served_tokens

    template_type = getattr(getattr(template, "template_meta", None), "template_type", None)
    flag = f"--template {template_type}" if template_type else "the run's --template"
    check_served_tokens(
        [getattr(p, "prompt_token_ids", None) for p in parsed],
        model_inputs,
        source=f"teacher {name!r} ({url})" if name else f"the teacher server {url}",
        tokenizer=getattr(template, "tokenizer", None),
        fix=(
            "the server encodes the conversation differently from the trainer (another template, system "
            f"prompt, model or tokenizer): start `kdcompose serve-teacher` with the run's teacher and {flag}"
        ),
    )
