"""`kdcompose serve-teacher` as a real process on 127.0.0.1, and the vLLM-free client against it.

The oracle for the served numbers is the local teacher loaded by ms-swift, the sample encoded by
ms-swift's template in the trainer's mode, one unbatched forward, log_softmax, top-k — what the
stock trainer's local-teacher path computes.

The shared server is started the way the issue found broken: `--model-type qwen2_vl` and no
`--template` (ms-swift matches both `qwen2_vl` and `qvq` for a local folder); it must pick the
type's own template, which the oracle comparison then confirms. Next to it, servers that cannot
load (no such model folder, an unknown model type) must exit non-zero with the reason and no
traceback. The alignment audit runs against the real server: its scored tokens equal the
trainer-side encoding, and an encoding with another system prompt is named at its first
differing token.
"""

from __future__ import annotations

import copy
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from forked_cli import ForkedServerProcess
from swift_support import subprocess_env

from kdcompose.compat.swift_teacher_client import install_vllm_free_teacher_client
from kdcompose.serve.process import ServerProcess, free_port
from kdcompose.teachers.audit import TeacherAlignmentError, first_difference, token_text
from kdcompose.teachers.server_client import (
    ScoredPrompt,
    TeacherResponseError,
    TeacherServerClient,
    TeacherServerError,
    TeacherServerUnavailable,
    VLLMFreeInferClient,
    audit_answers,
    parse_prompt_logprobs,
)
from kdcompose.testing import SWIFT_MODEL_TYPE, SWIFT_TEMPLATE, tiny_gkd_args

pytestmark = pytest.mark.swift

KEY = "test-key-123"
MAX_LOGPROBS = 16
MAX_REQUESTS = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return tiny_gkd_args("qwen2_vl", str(tmp_path_factory.mktemp("out")))


@pytest.fixture(scope="module")
def server(tiny: dict[str, Any], tmp_path_factory: pytest.TempPathFactory):
    env = subprocess_env(tmp_path_factory.mktemp("env"))
    extra = ["--api-key", KEY, "--max-logprobs", str(MAX_LOGPROBS), "--max-requests", str(MAX_REQUESTS)]
    extra += ["--max-body-bytes", str(2**20), "--max-tokens-per-request", "4096", "--torch-dtype", "float32"]
    assert SWIFT_TEMPLATE["qwen2_vl"] == SWIFT_MODEL_TYPE["qwen2_vl"] == "qwen2_vl"
    with ForkedServerProcess(
        model=tiny["teacher_model"], model_type="qwen2_vl", template=None, extra_args=extra, env=env
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def samples(tiny: dict[str, Any]) -> list[dict[str, Any]]:
    """An image sample from the tiny dataset and a text-only one, as ms-swift sends them."""
    row = json.loads(Path(tiny["dataset"][0]).read_text().splitlines()[0])
    text = {
        "messages": [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "a small red square."},
        ]
    }
    return [{**row, "add_eos": "auto"}, {**text, "add_eos": "auto"}]


@pytest.fixture(scope="module")
def local_topk(tiny: dict[str, Any], samples: list[dict[str, Any]]) -> list[tuple[Any, Any]]:
    """Per sample: the local teacher's top-16 log-probs [positions-1, 16] and their token ids."""
    import torch
    from swift.model import get_model_processor
    from swift.template import get_template

    model, processor = get_model_processor(
        tiny["teacher_model"], model_type="qwen2_vl", torch_dtype=torch.float32, device_map="cpu"
    )
    template = get_template(processor, template_type="qwen2_vl", max_length=None)
    template.model = model
    template.set_mode("train")
    template.register_post_encode_hook([model])
    out = []
    with torch.inference_mode():
        for sample in samples:
            encoded = template.encode(copy.deepcopy(sample), return_length=True)
            encoded.pop("_extra_kwargs", None)
            batch = template.data_collator([encoded])
            batch.pop("labels")
            logits = model(**batch).logits[0, :-1].double()
            vals, ids = torch.topk(torch.log_softmax(logits, -1), MAX_LOGPROBS, dim=-1)
            out.append((vals, ids, encoded["input_ids"]))
    template.remove_post_encode_hook()
    return out


@pytest.fixture(scope="module")
def encodings(tiny: dict[str, Any], samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The samples encoded trainer-side by the qwen2_vl template, as is and with a system prompt
    the server does not know about (a tokenization that differs on purpose)."""
    from swift.model import get_model_processor
    from swift.template import get_template

    _, processor = get_model_processor(tiny["teacher_model"], model_type="qwen2_vl", load_model=False)
    out: dict[str, Any] = {}
    for name, system in (("same", None), ("other", "You are a pirate.")):
        template = get_template(processor, template_type="qwen2_vl", max_length=None, default_system=system)
        template.set_mode("train")
        ids = [template.encode(copy.deepcopy(sample))["input_ids"] for sample in samples]
        out[name] = ids
        out["template"] = template
    return out


def _client(server: ServerProcess, **kw: Any) -> TeacherServerClient:
    return TeacherServerClient(server.url, api_key=KEY, wait_s=30, **kw)


def test_health_is_503_while_loading_then_200(server: ServerProcess) -> None:
    assert server.health_statuses[-1] == 200
    assert 503 in server.health_statuses  # the model loads after the port opens
    assert requests.get(f"{server.url}/health", timeout=5).status_code == 200  # no key needed
    # no --template: ms-swift finds qwen2_vl and qvq for this folder; the type's own is served
    assert "ready (model " in server.log_tail() and "template qwen2_vl)" in server.log_tail()


@pytest.mark.parametrize(
    ("model", "model_type", "reason"),
    [
        ("/nonexistent/teacher", "qwen2_vl", "--model '/nonexistent/teacher': no such directory"),
        (None, "qwen2_vll", "--model-type 'qwen2_vll' is not an ms-swift model type; closest: qwen2_vl"),
    ],
    ids=["no-such-model", "unknown-model-type"],
)
def test_a_teacher_that_cannot_load_exits_non_zero_with_the_reason(
    tiny: dict[str, Any], tmp_path: Path, model: str | None, model_type: str, reason: str
) -> None:
    process = ForkedServerProcess(
        model=model or tiny["teacher_model"],
        model_type=model_type,
        env=subprocess_env(tmp_path),
        ready_timeout_s=120,
    )
    with pytest.raises(RuntimeError, match="teacher server exited with 1") as info:
        process.start()
    assert reason in str(info.value) and "Traceback" not in process.log_tail(20000)
    process.log_path.unlink(missing_ok=True)


@pytest.mark.parametrize("k", [8, MAX_LOGPROBS])
def test_served_topk_equals_local_teacher(server, samples, local_topk, k: int) -> None:
    import torch

    parsed = _client(server).topk_logprobs(samples, k)
    assert len(parsed) == len(samples)
    for (lps, ixs), (vals, ids, input_ids) in zip(parsed, local_topk, strict=True):
        assert len(lps) == len(input_ids) - 1  # one distribution per predicted prompt token
        served = torch.tensor(lps, dtype=torch.float64)
        assert served.shape == (len(input_ids) - 1, k)
        torch.testing.assert_close(served, vals[:, :k], atol=1e-5, rtol=0)
        assert torch.equal(torch.tensor(ixs), ids[:, :k])


def test_infer_returns_ms_swift_responses_with_the_vllm_layout(server, samples, local_topk) -> None:
    from swift.infer_engine import RequestConfig
    from swift.infer_engine.protocol import ChatCompletionResponse, RolloutInferRequest
    from swift.rlhf_trainers.utils import parse_prompt_logprobs as swift_parse

    requests_ = [RolloutInferRequest(**s) for s in samples]
    config = RequestConfig(prompt_logprobs=4, max_tokens=1, temperature=0.0)
    responses = _client(server).infer(requests_, request_config=config, use_tqdm=False)
    for response, (_vals, ids, input_ids) in zip(responses, local_topk, strict=True):
        assert isinstance(response, ChatCompletionResponse)
        assert response.prompt_logprobs[0] is None and response.prompt_token_ids == list(input_ids)
        for pos, entry in enumerate(response.prompt_logprobs[1:]):
            actual = str(input_ids[pos + 1])  # vLLM's layout: top-K plus the actual token (K+1-th)
            assert actual in entry and len(entry) == (
                4 if actual in {str(i) for i in ids[pos, :4].tolist()} else 5
            )
        lps, ixs = swift_parse(response, topk=4)  # ms-swift's own parser drops the extra entry
        assert ixs == ids[:, :4].tolist()
        assert lps == parse_prompt_logprobs(response.prompt_logprobs, 4)[0]


def test_served_tokens_pass_the_audit_and_another_encoding_is_named(server, samples, encodings) -> None:
    import torch

    parsed = _client(server).topk_logprobs(samples, 4)
    assert all(isinstance(p, ScoredPrompt) for p in parsed)
    assert [p.prompt_token_ids for p in parsed] == [list(ids) for ids in encodings["same"]]

    def batch(rows: list[list[int]]) -> dict[str, Any]:  # left padding, as the collator pads
        width = max(len(r) for r in rows)
        ids = torch.tensor([[0] * (width - len(r)) + list(r) for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}

    template = encodings["template"]
    audit_answers(parsed, batch(encodings["same"]), name="t", url=server.url, template=template)
    with pytest.raises(TeacherAlignmentError) as info:
        audit_answers(parsed, batch(encodings["other"]), name="t", url=server.url, template=template)
    student, teacher = list(encodings["other"][0]), parsed[0].prompt_token_ids
    at = first_difference(student, teacher)
    assert at is not None and info.value.position == at and info.value.sample == "sample 0 of the micro-batch"
    message = str(info.value)
    assert f"teacher 't' ({server.url}) scored other tokens" in message and f"position {at}" in message
    assert f"student {token_text(template.tokenizer, student[at])}" in message
    assert f"vs teacher {token_text(template.tokenizer, teacher[at])}" in message
    assert "--template qwen2_vl" in message
    short = [ScoredPrompt(p[0], p[1], p.prompt_token_ids[:-2]) for p in parsed]
    with pytest.raises(TeacherAlignmentError, match="the student has"):
        audit_answers(short, batch(encodings["same"]), name="t", url=server.url, template=template)


def test_k0_returns_the_actual_token_only(server, samples) -> None:
    (lps, ixs), _ = _client(server).topk_logprobs(samples, 0)
    ids = _client(server).infer_raw(samples[:1], {"prompt_logprobs": 0})[0]["prompt_token_ids"]
    assert [i[0] for i in ixs] == ids[1:] and all(len(x) == 1 and x[0] <= 0 for x in lps)


def test_api_key_required_on_infer(server, samples) -> None:
    body = {"infer_requests": samples[:1], "request_config": {"prompt_logprobs": 2}}
    assert requests.post(f"{server.url}/infer/", json=body, timeout=60).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert requests.post(f"{server.url}/infer/", json=body, headers=wrong, timeout=60).status_code == 401
    right = {"Authorization": f"Bearer {KEY}"}
    assert requests.post(f"{server.url}/infer/", json=body, headers=right, timeout=60).status_code == 200
    with pytest.raises(TeacherServerError, match=r"HTTP 401.*API key"):
        TeacherServerClient(server.url, api_key="nope", wait_s=10).topk_logprobs(samples[:1], 2)


def test_limits_answer_413_and_400_with_a_message(server, samples) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}

    def post(body: Any) -> requests.Response:
        return requests.post(f"{server.url}/infer/", json=body, headers=headers, timeout=60)

    too_many = post(
        {"infer_requests": samples[1:] * (MAX_REQUESTS + 1), "request_config": {"prompt_logprobs": 2}}
    )
    assert too_many.status_code == 413 and f"limit of {MAX_REQUESTS}" in too_many.json()["message"]
    huge = {"messages": [{"role": "user", "content": "x" * 2**20}]}
    big = post({"infer_requests": [huge], "request_config": {"prompt_logprobs": 2}})
    assert big.status_code == 413 and "bytes" in big.json()["message"]
    long = {"messages": [{"role": "user", "content": "hello " * 5000}, {"role": "assistant", "content": "x"}]}
    tokens = post({"infer_requests": [long], "request_config": {"prompt_logprobs": 2}})
    assert tokens.status_code == 413 and "tokens" in tokens.json()["message"]
    k = post({"infer_requests": samples[1:], "request_config": {"prompt_logprobs": MAX_LOGPROBS + 1}})
    assert k.status_code == 400 and f"max_logprobs ({MAX_LOGPROBS})" in k.json()["message"]
    url = post(
        {
            "infer_requests": [{**samples[0], "images": ["http://example.com/a.png"]}],
            "request_config": {"prompt_logprobs": 2},
        }
    )
    assert url.status_code == 400 and "remote media" in url.json()["message"]
    with pytest.raises(TeacherServerError, match="max_logprobs"):
        _client(server).topk_logprobs(samples[1:], MAX_LOGPROBS + 1)


def test_concurrent_requests_share_forwards_and_match(server, samples) -> None:
    client = _client(server)
    alone = client.topk_logprobs(samples, 8)
    results: list[Any] = [None] * 6
    clients = [_client(server) for _ in results]

    def call(i: int) -> None:
        results[i] = clients[i].topk_logprobs(samples, 8)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for result in results:
        for (lps, ixs), (lps0, ixs0) in zip(result, alone, strict=True):
            assert ixs == ixs0
            diffs = [abs(a - b) for x, y in zip(lps, lps0, strict=True) for a, b in zip(x, y, strict=True)]
            assert max(diffs) < 1e-5


def test_short_or_malformed_answer_names_the_url_and_sample(server, samples) -> None:
    client = _client(server)
    good = client.infer_raw(samples, {"prompt_logprobs": 4})
    short = copy.deepcopy(good[1])
    short["prompt_logprobs"] = short["prompt_logprobs"][:-3]
    with pytest.raises(TeacherResponseError, match=rf"{server.url}.*sample 1.*short") as err:
        client._check(short, 1, 4)
    assert err.value.index == 1 and err.value.url == server.url
    thin = copy.deepcopy(good[0])
    thin["prompt_logprobs"][2] = dict(list(thin["prompt_logprobs"][2].items())[:2])
    with pytest.raises(TeacherResponseError, match=r"sample 0: position 2: expected at least 4"):
        client._check(thin, 0, 4)
    client._check(good[0], 0, 4)  # the real answer passes


def test_dead_url_fails_within_the_wait_naming_it() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TeacherServerUnavailable, match=rf"{url} not ready after 2 s"):
        TeacherServerClient(url, wait_s=2)
    assert time.monotonic() - start < 6
    os.environ["KDCOMPOSE_TEACHER_SERVER_WAIT_S"] = "1"
    try:  # the path ms-swift's trainer takes: VLLMInferClient(base_urls=[url]), env-bounded wait
        with pytest.raises(TeacherServerUnavailable, match=url):
            VLLMFreeInferClient(base_urls=[url])
    finally:
        del os.environ["KDCOMPOSE_TEACHER_SERVER_WAIT_S"]
    assert time.monotonic() - start < 10


def test_install_patches_only_ms_swifts_teacher_lookup() -> None:
    from swift.rlhf_trainers import rollout_mixin, vllm_client

    original = rollout_mixin.VLLMInferClient
    try:
        assert install_vllm_free_teacher_client() is True  # vLLM is not installed here
        assert install_vllm_free_teacher_client() is True  # idempotent
        assert rollout_mixin.VLLMInferClient is VLLMFreeInferClient
        assert vllm_client.VLLMInferClient is not VLLMFreeInferClient  # the class itself is untouched
    finally:
        rollout_mixin.VLLMInferClient = original


def test_stalled_server_retried_result_counted_once(server, samples) -> None:
    """A stall longer than the per-request timeout: the retry's answer is the one returned, once."""
    client = _client(server, timeout_s=3, retries=6, backoff_s=0.5)
    reference = client.topk_logprobs(samples, 8)
    server.pause()
    timer = threading.Timer(4.0, server.resume)
    timer.start()
    try:
        start = time.monotonic()
        again = client.topk_logprobs(samples, 8)
    finally:
        timer.cancel()
        server.resume()
    assert time.monotonic() - start > 3  # at least one attempt timed out and was retried
    assert len(again) == len(samples)
    assert [ixs for _, ixs in again] == [ixs for _, ixs in reference]


def test_server_killed_mid_run_bounded_retries_then_error(server, samples) -> None:
    """Runs last in this module: it kills the shared server."""
    client = _client(server, timeout_s=2, retries=3, backoff_s=0.2)
    client.topk_logprobs(samples[1:], 4)
    server.pause()  # stalled: every attempt times out
    start = time.monotonic()
    with pytest.raises(TeacherServerUnavailable, match=rf"{server.url} failed 3 tries.*resume") as err:
        client.topk_logprobs(samples[1:], 4)
    assert err.value.url == server.url
    assert time.monotonic() - start < 3 * 2 + 0.2 + 0.4 + 5
    server.kill()  # dead: connections refused
    start = time.monotonic()
    with pytest.raises(TeacherServerUnavailable, match=rf"{server.url} failed 3 tries.*last checkpoint"):
        client.topk_logprobs(samples[1:], 4)
    assert time.monotonic() - start < 5
