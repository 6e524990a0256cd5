"""Test-only kdcompose plugin (`plugins: [this file]`): the named teacher server dies for rank 1.

From its second fetch on, rank 1's named-server client talks to a port where nothing listens
(a real connection refused, through the real HTTP client and its bounded retries), while rank 0
keeps talking to the live server: the one-rank failure that must still stop every rank together.
"""

from __future__ import annotations

import os

from kdcompose.serve.process import free_port
from kdcompose.teachers.server_client import TeacherServerClient

DEAD_URL = f"http://127.0.0.1:{free_port()}"
_real_topk_logprobs = TeacherServerClient.topk_logprobs
_calls = {"n": 0}


def _topk_logprobs(self, infer_requests, k):
    _calls["n"] += 1
    if os.environ.get("RANK") == "1" and _calls["n"] >= 2:
        self.url = DEAD_URL
    return _real_topk_logprobs(self, infer_requests, k)


TeacherServerClient.topk_logprobs = _topk_logprobs
