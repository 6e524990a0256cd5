"""Keep ms-swift from announcing self-distillation when a cache or server is the teacher.

Upstream behaviour worked around (ms-swift 4.6, `RLHFArguments._check_teacher`): with no
`teacher_model` and no `teacher_model_server`, ms-swift logs "No teacher_model specified. Using
self-distillation mode (teacher = student)". A run whose default teacher is a kdcompose provider
(`rlhf.teacher_cache`) sets neither on purpose -- no teacher model is loaded, and the student is
*not* its own teacher -- so that line would tell the user the opposite of what happens.
`without_self_distillation_notice` drops exactly that record while the arguments are built;
kdcompose says where the teacher comes from instead.

Remove when: ms-swift lets a trainer plugin declare its teacher (`tests/swift/test_compat.py`
fails when the message is no longer logged by `_check_teacher`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

NOTICE = "No teacher_model specified. Using self-distillation mode"


class _DropNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(NOTICE)


@contextmanager
def without_self_distillation_notice() -> Iterator[None]:
    """ms-swift's logger, minus the self-distillation notice, for the block."""
    from swift.utils import get_logger

    logger, notice = get_logger(), _DropNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


__all__ = ["NOTICE", "without_self_distillation_notice"]
