"""The teacher side of the server: load a model with ms-swift's loaders, encode requests with
ms-swift's template, and compute top-K prompt log-probabilities in one padded forward.

Why ms-swift's own loaders and template: the trainer encodes each sample with its template and
aligns the returned per-position log-probabilities to *its* token positions
(``assemble_teacher_output``). Encoding each request with the same template class, in the same
mode (``train``, no ``max_length`` truncation — the trainer's ``_template_context`` unsets it)
and the same EOS policy (``add_eos`` sent with the request) reproduces the trainer's token
sequence exactly, image tokens included.

The output follows vLLM's ``prompt_logprobs`` layout as ms-swift formats it
(``VllmEngine._format_prompt_logprobs``): one entry per prompt token; entry 0 is ``None``; entry
``i`` maps ``str(token_id) -> {"logprob", "rank", "decoded_token"}`` for the distribution that
predicts token ``i`` (computed at position ``i - 1``). With ``K > 0`` it holds the top-K tokens and,
like vLLM, the actual prompt token as a K+1-th entry when it is not among them; with ``K == 0``
only the actual token (ms-swift's OPD-RL path reads exactly that).

Cost: every prompt position needs vocabulary-sized work (the LM head, the log-sum-exp, the top-K;
the actual token's rank), so the forward never builds the whole ``[batch, tokens, vocab]`` logits
tensor: the model runs up to its LM head (a tap on the head's input, :mod:`kdcompose.training.lm_head`,
keeps the model's own forward: image embeddings, position ids), and the real (unpadded) positions
of every sample of the forward go through the head together, one vocabulary slice at a time
(:func:`kdcompose.serve.head_topk.head_topk`): the head's weight is read once per forward, so
samples that share a forward (concurrent calls) share that read, and padding costs nothing in the
head. Models whose head is not a plain linear layer (logit soft-capping, scaling) fall back to
the model's own logits, scored ``SCORE_CHUNK_BYTES`` of rows at a time.

Loading (:meth:`TeacherScorer.load`) fails with :class:`TeacherLoadError`, whose message says what
is wrong in the user's terms (no such model path, an unknown model type, no single template).
"""

from __future__ import annotations

import difflib
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["EncodedRequest", "RequestError", "TeacherLoadError", "TeacherScorer", "default_template_type"]

SCORE_CHUNK_BYTES = 16 << 20
"""Float32 logits computed at once on a CPU (rows x vocabulary x 4 bytes): small enough that the
allocator reuses the same buffers (glibc serves blocks under its 32 MiB mmap threshold from its
heap, so no page is faulted in again), large enough for an efficient matrix product."""
SCORE_CHUNK_BYTES_ACCELERATOR = 256 << 20
_MESSAGE_CHARS = 600


class TeacherLoadError(RuntimeError):
    """The teacher cannot be loaded; the message names the flag and the fix (no traceback needed)."""


class RequestError(ValueError):
    """A request the server cannot score (bad shape, media it refuses, too long): HTTP 400/413."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def default_template_type(processor: Any, requested: str | None = None) -> str:
    """The template to serve with: ``requested`` (checked to exist), else the one ms-swift would
    choose for the model, except where it finds several candidates for the model type
    (``qwen2_vl`` matches ``qwen2_vl`` and ``qvq`` when the model is a local folder whose name
    matches no known model): then the model type's own template, the one named like the type.
    TeacherLoadError when there is none to choose."""
    from swift.template import get_template_meta

    meta = processor.model_meta
    if requested is not None:  # an unknown name fails here, before the weights load
        get_template_meta(processor.model_info, meta, template_type=requested)
        return requested
    try:
        return str(get_template_meta(processor.model_info, meta).template_type)
    except ValueError as exc:
        candidates = list(getattr(meta, "candidate_templates", []) or [])
        if meta.model_type in candidates:
            return str(meta.model_type)
        raise TeacherLoadError(
            f"--template: ms-swift finds no single template for model type {meta.model_type!r} "
            f"(candidates: {candidates or 'none'}); pass --template, the trainer's `template` ({exc})"
        ) from None


def load_failure(exc: BaseException, model: str, model_type: str | None) -> TeacherLoadError:
    """A loading error in the user's terms: the flag to change and, for an unknown model type, the
    closest known ones instead of ms-swift's list of every type."""
    if isinstance(exc, TeacherLoadError):
        return exc
    text = str(exc)
    for kind, flag, argument in (
        ("model_type", "--model-type", "teacher_model_type"),
        ("template_type", "--template", "template"),
    ):
        unknown = re.match(rf"{kind}: '([^']*)' not in \[", text)
        if unknown is not None:
            close = difflib.get_close_matches(unknown.group(1), _known(kind), n=3)
            hint = f"; closest: {', '.join(close)}" if close else ""
            return TeacherLoadError(
                f"{flag} {unknown.group(1)!r} is not an ms-swift {kind.replace('_', ' ')}{hint} (use the "
                f"trainer's {argument})"
            )
    if re.match(r"path: '.*' not found", text):
        return TeacherLoadError(
            f"--model {model!r}: no such directory, and this server does not download models (give a "
            "local checkpoint folder, or a hub id already in the local cache)"
        )
    if len(text) > _MESSAGE_CHARS:
        text = text[:_MESSAGE_CHARS] + " ..."
    return TeacherLoadError(
        f"cannot load the teacher --model {model!r} --model-type {model_type!r}: {type(exc).__name__}: {text}"
    )


@dataclass
class EncodedRequest:
    """One request encoded by the template (``encoded`` is what the collator takes)."""

    encoded: dict[str, Any]
    length: int


def _check_media(value: Any, where: str) -> None:
    """Refuse remote media: the server must not fetch URLs on a caller's behalf (SSRF)."""
    if isinstance(value, str) and value.strip().lower().startswith(("http://", "https://")):
        raise RequestError(
            f"{where}: remote media URLs are not fetched by this server; send the image inline "
            "(base64) or as a path readable on the server"
        )
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_media(item, f"{where}[{i}]")
    if isinstance(value, Mapping):
        for key in ("url", "image", "image_url", "video", "audio"):
            if key in value:
                _check_media(value[key], f"{where}.{key}")


class TeacherScorer:
    """Teacher model + ms-swift template; thread-safe: ``encode`` may run in several threads at
    once (as ms-swift's own inference engines call ``template.encode``), ``score`` holds a lock
    (one forward at a time).

    ``load()`` is separate from construction so the HTTP server can answer ``/health`` with 503
    while a large teacher loads.
    """

    def __init__(
        self,
        model: str,
        model_type: str | None = None,
        template: str | None = None,
        *,
        torch_dtype: str | None = None,
        device: str | None = None,
        max_pixels: int | None = None,
    ) -> None:
        self.model_path = model
        self.model_type = model_type
        self.template_type = template
        self.torch_dtype = torch_dtype
        self.device = device
        self.max_pixels = max_pixels
        self.model: Any = None
        self.template: Any = None
        self.vocab_size: int | None = None
        self._head_tap = False
        self._chunk_bytes = SCORE_CHUNK_BYTES
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def load(self) -> TeacherScorer:
        """Load the model and template (ms-swift's ``get_model_processor`` / ``get_template``);
        TeacherLoadError (see :func:`load_failure`) when that fails."""
        try:
            return self._load()
        except Exception as exc:
            raise load_failure(exc, self.model_path, self.model_type) from exc

    def _load(self) -> TeacherScorer:
        import torch

        from kdcompose.integrations.swift.runtime import prepare_swift_import

        prepare_swift_import()
        from swift.model import get_model_processor
        from swift.template import get_template

        dtype = getattr(torch, self.torch_dtype) if self.torch_dtype else None
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        _, processor = get_model_processor(
            self.model_path, model_type=self.model_type, download_model=False, load_model=False
        )
        template_type = default_template_type(processor, self.template_type)  # before the weights load
        model, processor = get_model_processor(
            self.model_path,
            model_type=self.model_type,
            torch_dtype=dtype,
            device_map=device,
            download_model=False,
        )
        model.eval()
        template = get_template(
            processor, template_type=template_type, max_length=None, max_pixels=self.max_pixels
        )
        template.max_length = None  # the trainer encodes teacher requests with max_length unset; our
        # own bound is ServerLimits.max_tokens_per_request (413), checked after encoding
        template.model = model  # position ids (mrope) come from the model's config, as in the trainer
        template.set_mode("train")  # ms-swift's GKD pipeline encodes in 'train' mode
        template.register_post_encode_hook([model])  # VL: images -> inputs_embeds inside forward
        self.template = template
        self.template_type = template_type
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self._head_tap = _head_is_tappable(model)
        self._chunk_bytes = SCORE_CHUNK_BYTES if model.device.type == "cpu" else SCORE_CHUNK_BYTES_ACCELERATOR
        self.model = model
        return self

    def describe(self) -> str:
        """What was loaded, for the server's start-up line."""
        return f"model {self.model_path}, model type {self.model_type}, template {self.template_type}"

    def encode(self, request: Mapping[str, Any], index: int) -> EncodedRequest:
        """Encode one ``RolloutInferRequest``-shaped dict exactly as the trainer encodes the sample."""
        if not isinstance(request, Mapping) or not isinstance(request.get("messages"), list):
            raise RequestError(f"infer_requests[{index}]: expected an object with a 'messages' list")
        for key in ("images", "videos", "audios"):
            _check_media(request.get(key), f"infer_requests[{index}].{key}")
        for m, message in enumerate(request["messages"]):
            if not isinstance(message, Mapping) or "role" not in message:
                raise RequestError(f"infer_requests[{index}].messages[{m}]: expected an object with a 'role'")
            _check_media(message.get("content"), f"infer_requests[{index}].messages[{m}].content")
        data = {k: v for k, v in request.items() if k not in ("uuid", "data_dict")}
        for key in ("images", "videos", "audios", "tools", "objects"):
            if data.get(key) in (None, [], {}):
                data.pop(key, None)
        try:
            encoded = self.template.encode(data, return_length=True)
        except Exception as exc:  # the template's own message says what is wrong
            raise RequestError(f"infer_requests[{index}]: the template could not encode it: {exc}") from exc
        encoded.pop("_extra_kwargs", None)
        return EncodedRequest(encoded=encoded, length=len(encoded["input_ids"]))

    def score(self, batch: Sequence[EncodedRequest], k: int) -> list[dict[str, Any]]:
        """One padded forward over ``batch``; per request its ``prompt_logprobs`` and token ids."""
        import torch
        from swift.utils import to_device

        from kdcompose.serve.head_topk import head_topk
        from kdcompose.training.lm_head import tap_lm_head

        with self._lock, torch.inference_mode():
            collated = self.template.data_collator([dict(item.encoded) for item in batch])
            collated = to_device(collated, self.model.device)
            collated.pop("labels", None)
            input_ids = collated["input_ids"]
            mask = collated.get("attention_mask")
            with tap_lm_head(self.model, hidden=self._head_tap, logits=not self._head_tap) as tap:
                logits = self.model(**collated).logits
            spans = []
            for row in range(len(batch)):
                start = 0
                if mask is not None:
                    positions = mask[row].nonzero().flatten()
                    start = int(positions[0]) if positions.numel() else 0
                spans.append((row, start, batch[row].length))
            ids = [input_ids[row, start : start + length] for row, start, length in spans]
            if tap.hidden is not None:  # every scored position of the forward through the head at once
                rows = torch.cat(
                    [tap.hidden[row, start : start + length - 1] for row, start, length in spans]
                )
                head = tap.head
                top_lp, top_ix, own, rank = head_topk(
                    rows, head.weight, head.bias, torch.cat([i[1:] for i in ids]), k
                )
                parts = [length - 1 for _, _, length in spans]
                scored = zip(
                    *([t.tolist() for t in tensor.split(parts)] for tensor in (top_lp, top_ix, own, rank)),
                    strict=True,
                )
            else:
                scored = (
                    self._score_rows(logits[row, start : start + length - 1], ids[n][1:], k)
                    for n, (row, start, length) in enumerate(spans)
                )
            return [self._format(i, s, k) for i, s in zip(ids, scored, strict=True)]

    def _score_rows(
        self, rows: Any, targets: Any, k: int
    ) -> tuple[list[list[float]], list[list[int]], list[float], list[int]]:
        """Top-K log-probabilities and ids, the actual token's log-probability and rank, for each
        row of logits (models whose head cannot be tapped), a chunk of rows at a time."""
        import torch

        vocab = int(self.vocab_size or 1)
        step = max(1, self._chunk_bytes // (4 * vocab))
        top_lp: list[list[float]] = []
        top_ix: list[list[int]] = []
        actual: list[float] = []
        ranks: list[int] = []
        for begin in range(0, rows.shape[0], step):
            chunk = rows[begin : begin + step]
            logprobs = torch.log_softmax(chunk.float(), dim=-1)
            want = targets[begin : begin + step]
            own = logprobs.gather(-1, want[:, None]).squeeze(-1)
            rank = torch.ones_like(want)
            if k > 0:
                values, ids = torch.topk(logprobs, k=min(k, logprobs.shape[-1]), dim=-1)
                top_lp += values.tolist()
                top_ix += ids.tolist()
                # the actual token among the top K: everything above it is among them too
                rank += (values > own[:, None]).sum(-1)
                outside = ~(ids == want[:, None]).any(-1)
            else:
                outside = torch.ones_like(want, dtype=torch.bool)
            if bool(outside.any()):  # the whole vocabulary only where it is not among the top K
                rank[outside] = (logprobs[outside] > own[outside, None]).sum(-1, dtype=torch.int32).long() + 1
            actual += own.tolist()
            ranks += rank.tolist()
        return top_lp, top_ix, actual, ranks

    @staticmethod
    def _format(
        ids: Any, scored: tuple[list[list[float]], list[list[int]], list[float], list[int]], k: int
    ) -> dict[str, Any]:
        top_lp, top_ix, actual_list, rank_list = scored
        target_list = ids[1:].tolist()
        out: list[dict[str, dict[str, Any]] | None] = [None]
        for pos, tid in enumerate(target_list):
            entry: dict[str, dict[str, Any]] = {}
            if k > 0:
                for r, (lp, ix) in enumerate(zip(top_lp[pos], top_ix[pos], strict=True)):
                    entry[str(ix)] = {"logprob": lp, "rank": r + 1, "decoded_token": None}
            if str(tid) not in entry:  # vLLM adds the actual prompt token (the only entry when K == 0)
                entry[str(tid)] = {"logprob": actual_list[pos], "rank": rank_list[pos], "decoded_token": None}
            out.append(entry)
        return {"prompt_token_ids": ids.tolist(), "prompt_logprobs": out}


def _known(kind: str) -> list[str]:
    """ms-swift's registered model types or templates (for suggestions; empty if unavailable)."""
    try:
        if kind == "model_type":
            from swift.model import MODEL_MAPPING as known
        else:
            from swift.template import TEMPLATE_MAPPING as known
    except Exception:  # the suggestion is a courtesy
        return []
    return list(known)


def _head_is_tappable(model: Any) -> bool:
    """Whether the LM head is a plain linear layer whose output is the logits (then the scorer
    reads the hidden states and applies the head itself, a few rows at a time)."""
    from kdcompose.training.lm_head import LmHeadUnsupported, lm_head_of

    try:
        lm_head_of(model)
    except LmHeadUnsupported:
        return False
    return True
