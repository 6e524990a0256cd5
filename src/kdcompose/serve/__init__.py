"""A teacher server speaking ms-swift's ``teacher_model_server`` protocol, on transformers.

``kdcompose serve-teacher`` (see docs/teacher_server.md) answers ``GET /health`` and ``POST /infer/``
with the teacher's top-K prompt log-probabilities, for teachers vLLM cannot serve, machines
without vLLM, and CI. FastAPI/uvicorn/torch are imported only when a server is built.
"""

from kdcompose.serve.app import ServerLimits, create_app
from kdcompose.serve.scorer import RequestError, TeacherScorer

__all__ = ["RequestError", "ServerLimits", "TeacherScorer", "create_app"]
