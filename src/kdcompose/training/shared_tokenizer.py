"""Whether a training script's student and teacher share a tokenizer, as the LM-head terms assume.

Why: `kdcompose.Distiller` gives the teacher the student's batch, token ids included, and the
LM-head terms compare the two distributions id by id. With a teacher of another model family
that compares unrelated tokens, and the logits' widths cannot tell: a tokenizer of another
family may have as many entries as the student's, or a few hundred more (which passes for
padding). `kdcompose train` reads both tokenizers from the model folders; a script hands its
tokenizers over (`Distiller(..., tokenizer=, teacher_tokenizer=)`), and these checks run on them.
Teaching across tokenizers (`cross_tokenizer:`) encodes every sample a second time with the
teacher's own template, which only `kdcompose train` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kdcompose.composer import LossComposer
from kdcompose.errors import ConfigIssue
from kdcompose.teachers.alignment import tokenizer_difference

CROSS_TOKENIZER_DOC = "docs/cross_tokenizer.md"


def tokenizer_issues(
    composer: LossComposer,
    tokenizer: Any | None,
    teacher_tokenizer: Any | None,
    log: Callable[[str], None],
) -> list[ConfigIssue]:
    """What rules the composition out for a teacher run on the student's token ids.

    Checked only for active terms that read the teacher's token distribution (its logits, or its
    LM head when fused) or declare `cross_tokenizer:`. Without both tokenizers nothing can be
    compared: `log` says how to have it checked, and a `cross_tokenizer:` block is refused (the
    Distiller could not honour it if the teacher's tokenizer differed)."""
    active = composer.active_terms
    readers = [t for t in active if t.needs.teacher_logits or t.needs.teacher_hidden]
    declared = [request for t in active for request in t.needs.cross_tokenizer]
    if not readers and not declared:
        return []
    issues = [
        ConfigIssue(
            request.origin,
            "`force: true` compares over aligned text, which needs every sample encoded a second time "
            "with the teacher's own template: `kdcompose train` does that, the Distiller does not "
            f"(it gives the teacher the student's batch); remove `force` here ({CROSS_TOKENIZER_DOC})",
        )
        for request in declared
        if request.force
    ]
    if tokenizer is None or teacher_tokenizer is None:
        issues += [
            ConfigIssue(
                request.origin,
                "the Distiller gives the teacher the student's token ids and cannot teach across "
                "tokenizers; pass Distiller(..., tokenizer=, teacher_tokenizer=) so it can check that the "
                f"two are the same (the block then has nothing to do), or train with `kdcompose train` "
                f"({CROSS_TOKENIZER_DOC})",
            )
            for request in declared
            if not request.force
        ]
        if not issues:
            log(
                "kdcompose: pass Distiller(..., tokenizer=, teacher_tokenizer=) to have the Distiller check "
                "that student and teacher share a tokenizer (the LM-head terms compare their "
                "distributions token id by token id)"
            )
        return issues
    difference = tokenizer_difference(tokenizer, teacher_tokenizer)
    if difference is None:
        return issues
    return issues + [
        ConfigIssue(
            term.origin,
            f"reads the teacher's next-token distribution, but the teacher's tokenizer is not the "
            f"student's ({difference}): the Distiller gives the teacher the student's token ids, so the "
            "two distributions would be compared over unrelated tokens. Teach across tokenizers with "
            f"`kdcompose train` (a local teacher, a cache or a server; {CROSS_TOKENIZER_DOC}), use a "
            "teacher of the student's family, or distil features only (rlhf.llm_kd_weight: 0)",
        )
        for term in readers or [t for t in active if t.needs.cross_tokenizer]
    ]


__all__ = ["tokenizer_issues"]
