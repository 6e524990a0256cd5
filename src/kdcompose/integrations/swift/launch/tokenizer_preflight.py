"""Teachers with another tokenizer, found from the tokenizer files before any model loads.

Part of the model preflight (`model_preflight.inspect_models`), so `kdcompose validate` and
`kdcompose train` refuse in seconds what the trainer would refuse after loading both models: a
term that reads a teacher whose tokenizer differs from the student's without `cross_tokenizer`
(named: the term, the teacher, what differs, the fix), a `cross_tokenizer` term whose teacher's
tokenizer cannot be known, and an unknown `rlhf.teacher_template`. The tokenizers are read from
`tokenizer.json` (the files ms-swift loads); anything not readable here is left to the trainer,
which compares the tokenizers it actually loaded (`integrations.swift.cross_teachers`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdcompose.errors import ConfigIssue
from kdcompose.training.cross_tokenizer import CrossTokenizerPlan, TeacherTokenizer, plan_cross_tokenizer

TEMPLATE_PATH = "rlhf.teacher_template"


def read_tokenizer(folder: Path | None) -> Any:
    """The fast tokenizer of a model folder (its `tokenizer.json`), or None when there is none."""
    path = folder / "tokenizer.json" if folder is not None else None
    if path is None or not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception:  # unreadable here: the trainer compares the tokenizers it loads
        return None


def tokenizer_issues(
    config: Any, composer: Any, student: Any, teacher: Any, registry: Any = None
) -> tuple[list[ConfigIssue], CrossTokenizerPlan]:
    """Issues, and the plan (which teachers are taught across tokenizers), from the files of the
    student and of the local teacher (`RunModel`s of model_preflight; None when absent)."""
    issues: list[ConfigIssue] = []
    template = getattr(config, "teacher_template", None)
    if template is not None and registry is not None and template not in registry.templates:
        from kdcompose.integrations.swift.launch.model_registry import closest

        hint = closest(template, sorted(registry.templates))
        did_you_mean = f"; did you mean {' or '.join(repr(h) for h in hint)}?" if hint else ""
        issues.append(ConfigIssue(TEMPLATE_PATH, f"{template!r} is not an ms-swift template{did_you_mean}"))
    student_tokenizer = read_tokenizer(student.location.folder if student is not None else None)
    if student_tokenizer is None:
        return issues, CrossTokenizerPlan()
    teachers = []
    if teacher is not None and teacher.location.folder is not None:
        tokenizer = read_tokenizer(teacher.location.folder)
        if tokenizer is not None:
            label = f"the default teacher (local model {teacher.location.name})"
            teachers.append(TeacherTokenizer("", tokenizer, label, "model.teacher_model"))
    plan, found = plan_cross_tokenizer(
        composer.active_terms, student_tokenizer, teachers, frozenset(config.teachers)
    )
    issues += found
    if "" in plan and template is None and registry is not None:
        issues += _template_choice_issues(student, teacher, registry)
    return issues, plan


def _template_choice_issues(student: Any, teacher: Any, registry: Any) -> list[ConfigIssue]:
    """The teacher encodes every sample with its own template: can ms-swift choose one for it?"""
    if teacher.name_template or isinstance(teacher.folder_args.get("template"), str):
        return []
    info = registry.model_types.get(teacher.model_type) if teacher.model_type else None
    if info is None or info.template or len(info.candidate_templates) == 1:
        return []
    if student is not None and teacher.model_type == student.model_type:
        return []  # the same family: the student's template
    candidates = ", ".join(info.candidate_templates) or "none"
    return [
        ConfigIssue(
            TEMPLATE_PATH,
            f"the teacher ({teacher.location.name}) has another tokenizer, so it encodes every sample with "
            f"its own template, and ms-swift cannot choose one for model type {teacher.model_type!r} "
            f"(candidates: {candidates}): set `{TEMPLATE_PATH}` to the template the teacher was trained with",
        )
    ]


__all__ = ["read_tokenizer", "tokenizer_issues"]
