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
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["EncodedRequest", "RequestError", "TeacherScorer"]


class RequestError(ValueError):
    """A request the server cannot score (bad shape, media it refuses, too long): HTTP 400/413."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


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
    """Teacher model + ms-swift template; thread-compatible (one lock guards encode and forward).

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
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def load(self) -> TeacherScorer:
        """Load the model and template (ms-swift's ``get_model_processor`` / ``get_template``)."""
        import torch

        from kdcompose.integrations.swift.runtime import prepare_swift_import

        prepare_swift_import()
        from swift.model import get_model_processor
        from swift.template import get_template

        dtype = getattr(torch, self.torch_dtype) if self.torch_dtype else None
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, processor = get_model_processor(
            self.model_path,
            model_type=self.model_type,
            torch_dtype=dtype,
            device_map=device,
            download_model=False,
        )
        model.eval()
        template = get_template(
            processor, template_type=self.template_type, max_length=None, max_pixels=self.max_pixels
        )
        template.max_length = None  # the trainer encodes teacher requests with max_length unset; our
        # own bound is ServerLimits.max_tokens_per_request (413), checked after encoding
        template.model = model  # position ids (mrope) come from the model's config, as in the trainer
        template.set_mode("train")  # ms-swift's GKD pipeline encodes in 'train' mode
        template.register_post_encode_hook([model])  # VL: images -> inputs_embeds inside forward
        self.template = template
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.model = model
        return self

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
        with self._lock:
            try:
                encoded = self.template.encode(data, return_length=True)
            except Exception as exc:  # the template's own message says what is wrong
                raise RequestError(
                    f"infer_requests[{index}]: the template could not encode it: {exc}"
                ) from exc
        encoded.pop("_extra_kwargs", None)
        return EncodedRequest(encoded=encoded, length=len(encoded["input_ids"]))

    def score(self, batch: Sequence[EncodedRequest], k: int) -> list[dict[str, Any]]:
        """One padded forward over ``batch``; per request its ``prompt_logprobs`` and token ids."""
        import torch
        from swift.utils import to_device

        with self._lock, torch.inference_mode():
            collated = self.template.data_collator([dict(item.encoded) for item in batch])
            collated = to_device(collated, self.model.device)
            collated.pop("labels", None)
            input_ids = collated["input_ids"]
            mask = collated.get("attention_mask")
            logits = self.model(**collated).logits
            results = []
            for row in range(len(batch)):
                if mask is not None:
                    positions = mask[row].nonzero().flatten()
                    start = int(positions[0]) if positions.numel() else 0
                else:
                    start = 0
                length = batch[row].length
                ids = input_ids[row, start : start + length]
                logprobs = torch.log_softmax(logits[row, start : start + length - 1].float(), dim=-1)
                results.append(self._format(ids, logprobs, k))
            return results

    def _format(self, ids: Any, logprobs: Any, k: int) -> dict[str, Any]:
        import torch

        targets = ids[1:]
        actual = logprobs.gather(-1, targets[:, None]).squeeze(-1)
        actual_rank = (logprobs > actual[:, None]).sum(-1) + 1
        if k > 0:
            top_lp, top_ix = torch.topk(logprobs, k=min(k, logprobs.shape[-1]), dim=-1)
            top_lp, top_ix = top_lp.tolist(), top_ix.tolist()
        target_list, actual_list, rank_list = targets.tolist(), actual.tolist(), actual_rank.tolist()
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
