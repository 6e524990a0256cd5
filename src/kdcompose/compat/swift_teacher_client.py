"""Let ms-swift's stock GKD trainer talk to a teacher server without vLLM installed.

Upstream behaviour worked around (ms-swift 4.6): `teacher_model_server` makes ms-swift build its
`VLLMInferClient`, which refuses to start unless vLLM is importable -- and vLLM has no CPU wheel
(nor one for every CUDA/torch pair). The protocol it speaks is small (`GET /health`,
`POST /infer/`), and `kdcompose.teachers.server_client.VLLMFreeInferClient` speaks it with httpx.
`install_vllm_free_teacher_client` points the name ms-swift looks the class up by at that client.

Remove when: ms-swift's teacher-server client no longer needs vLLM (`tests/swift/test_compat.py`
fails when `VLLMInferClient` starts without vLLM, saying so).
"""

from __future__ import annotations

from kdcompose.teachers.server_client import VLLMFreeInferClient


def vllm_available() -> bool:
    """Whether vLLM can be imported (ms-swift's own ``is_vllm_available`` test)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def install_vllm_free_teacher_client(*, force: bool = False) -> bool:
    """Make ms-swift's stock trainers build :class:`VLLMFreeInferClient` for ``teacher_model_server``.

    Only when vLLM is not importable (or ``force``): with vLLM installed ms-swift's own client works
    and is left alone. What is patched: the name ``VLLMInferClient`` in
    ``swift.rlhf_trainers.rollout_mixin`` — the module-level symbol ``_setup_teacher`` looks up when
    it builds ``self.teacher_clients`` (``from .vllm_client import VLLMInferClient`` there). The class
    in ``swift.rlhf_trainers.vllm_client`` itself is untouched, so nothing else (rollout weight sync,
    GRPO's vLLM server mode, which genuinely needs vLLM) changes. Idempotent. Returns whether
    kdcompose's client is in place.
    """
    from swift.rlhf_trainers import rollout_mixin

    if rollout_mixin.VLLMInferClient is VLLMFreeInferClient:
        return True
    if vllm_available() and not force:
        return False
    rollout_mixin.VLLMInferClient = VLLMFreeInferClient
    return True


__all__ = ["install_vllm_free_teacher_client", "vllm_available"]
