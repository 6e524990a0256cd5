"""A cache's or a server's tokenizer, and a server's completion answer, for cross-tokenizer runs:
the `tokenizer:` key of a teacher source, where each kind says its tokenizer is, loading and
checking those files, and parsing `completion_positions` answers (no ms-swift, no model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdcompose.errors import ConfigIssue
from kdcompose.registry import get_teacher_source
from kdcompose.teachers.alignment import token_table, tokenizer_difference
from kdcompose.teachers.provider import TeacherSource, TokenizerSource, load_tokenizer_files
from kdcompose.teachers.server_client import TeacherResponseError, _scored_completion
from kdcompose.testing.tokenizer_pair import build_pair_tokenizer


def parse(
    kind: str, block: dict, base_dir: Path | None = None
) -> tuple[TeacherSource | None, list[ConfigIssue]]:
    issues: list[ConfigIssue] = []
    source = get_teacher_source(kind).parse("llama", block, "rlhf.teachers.llama", base_dir, issues)
    return source, issues


def test_the_tokenizer_key_is_read_from_the_configs_folder(tmp_path: Path) -> None:
    for kind, location in (("server", "http://127.0.0.1:8000"), ("cache", "cache/llama")):
        source, issues = parse(kind, {kind: location, "tokenizer": "models/llama"}, tmp_path)
        assert issues == [] and source is not None
        assert source.options["tokenizer"] == str((tmp_path / "models" / "llama").resolve())
        where = get_teacher_source(kind).tokenizer_source(source)
        if kind == "server":
            assert where == TokenizerSource(
                "rlhf.teachers.llama.tokenizer", folder=source.options["tokenizer"]
            )
    source, issues = parse("server", {"server": "http://h:1", "tokenizer": 3})
    assert source is None and [i.path for i in issues] == ["rlhf.teachers.llama.tokenizer"]
    assert "tokenizer.json" in issues[0].message


def test_a_server_without_a_tokenizer_key_says_where_to_write_it() -> None:
    named, _ = parse("server", {"server": "http://h:1"})
    assert named is not None
    where = get_teacher_source("server").tokenizer_source(named)
    assert where.folder is None and not where.student and where.origin == "rlhf.teachers.llama.server"
    assert where.missing_fix.startswith("add `tokenizer: PATH`") and where.missing_fix.endswith(
        "rlhf.teachers.llama"
    )
    default = TeacherSource("", "server", "http://h:1", "rlhf.teacher_model_server")
    fix = get_teacher_source("server").tokenizer_source(default).missing_fix
    assert "rlhf.teachers.NAME: {server: http://h:1, tokenizer: PATH}" in fix and "teacher: NAME" in fix


def test_tokenizer_files_are_loaded_checked_and_named(tmp_path: Path) -> None:
    teacher, student = build_pair_tokenizer("teacher"), build_pair_tokenizer("student")
    folder = tmp_path / "llama"
    teacher.save_pretrained(str(folder))
    from tokenizers import Tokenizer

    files = token_table(Tokenizer.from_file(str(folder / "tokenizer.json"))).fingerprint
    where = TokenizerSource("rlhf.teachers.llama.tokenizer", folder=str(folder), fingerprint=files)
    raw, issues = load_tokenizer_files(where, "teacher 'llama'")
    assert issues == [] and type(raw).__module__.startswith("tokenizers")
    loaded, issues = load_tokenizer_files(where, "teacher 'llama'", transformers=True)
    assert (
        issues == [] and tokenizer_difference(loaded, teacher) is None
    )  # loaded as a run loads the student's
    assert tokenizer_difference(loaded, student) is not None
    other = TokenizerSource("rlhf.teachers.llama.tokenizer", folder=str(folder), fingerprint="0" * 16)
    none, issues = load_tokenizer_files(other, "teacher 'llama'")
    assert none is None and [i.path for i in issues] == ["rlhf.teachers.llama.tokenizer"]
    assert (
        f"fingerprint {files}" in issues[0].message
        and "is not the one the teacher was scored with" in issues[0].message
    )
    gone = TokenizerSource("rlhf.teacher_cache", folder=str(tmp_path / "nowhere"), files_fix="rebuild it")
    none, issues = load_tokenizer_files(gone, "the default teacher")
    assert none is None and issues[0].path == "rlhf.teacher_cache"
    assert issues[0].message.endswith("nowhere/tokenizer.json does not exist: rebuild it")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json", encoding="utf-8")
    bad = TokenizerSource("rlhf.teachers.llama.tokenizer", folder=str(tmp_path / "broken"))
    none, issues = load_tokenizer_files(bad, "teacher 'llama'")
    assert none is None and "is not a readable tokenizer" in issues[0].message


ANSWER = {
    "prompt_token_ids": [5, 7, 9, 11],
    "completion_positions": [2, 3],
    "prompt_logprobs": [
        None,
        {"7": {"logprob": -0.3}, "8": {"logprob": -1.5}},
        {"1": {"logprob": -1.0}, "9": {"logprob": -0.5}, "2": {"logprob": -2.0}},
        {"4": {"logprob": -0.1}, "3": {"logprob": -0.2}, "11": {"logprob": -3.0}},  # 11 outside the top 2
    ],
}


def test_a_served_completion_is_its_labelled_tokens_with_their_top_k_and_own_log_probabilities() -> None:
    scored = _scored_completion(ANSWER, 2, "http://h:1", 0)
    assert scored.ids == [9, 11]
    assert scored.topk_ids == [[9, 1], [4, 3]]
    assert scored.topk_logprobs == [[-0.5, -1.0], [-0.1, -0.2]]
    assert scored.token_logprobs == [-0.5, -3.0]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"completion_positions": None}, "no completion_positions"),
        ({"completion_positions": [0, 3]}, "holds 0, outside 1..3"),
        ({"prompt_token_ids": [5, 7, 6, 11]}, "position 2: no log-probability for its own token 6"),
    ],
    ids=["not-answered", "prompt-start", "own-token-missing"],
)
def test_a_malformed_completion_answer_names_the_server_and_the_sample(change: dict, expected: str) -> None:
    with pytest.raises(
        TeacherResponseError, match="teacher server http://h:1: response for sample 3"
    ) as info:
        _scored_completion({**ANSWER, **change}, 2, "http://h:1", 3)
    assert expected in str(info.value) and info.value.index == 3
