"""A student learns from a teacher with another tokenizer that is a cache or a server, through
`kdcompose teacher-cache`, `kdcompose serve-teacher` and `kdcompose train`.

Real components: the tiny Qwen2 student and the briefly trained Llama teacher of
``kdcompose.testing.tokenizer_pair`` (two different locally trained BPEs; ms-swift templates
``qwen2_5`` / ``llama3``), the text caption data. One cache build and one training run per kind:
the cache run (float32 cache, no teacher model loaded) and the served run (a real
`kdcompose serve-teacher` process on 127.0.0.1, the run given the teacher's tokenizer with
`tokenizer:`) use the same seed and data, so the served run must reproduce the cached run step
for step. Damaged inputs are checked with `kdcompose validate` (the preflight `kdcompose train`
runs before any model loads).
"""

from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from forked_cli import ForkedServerProcess
from swift_support import kdcompose_command, run_command, step_logs, subprocess_env, train_as_user
from text_pair_config import text_pair_sections

from kdcompose.serve.process import ServerProcess
from kdcompose.teachers.alignment import decode_bytes, token_table
from kdcompose.testing import build_caption_dataset
from kdcompose.testing.tokenizer_pair import build_tiny_text_model, build_trained_text_model

pytestmark = [
    pytest.mark.swift,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning"),
]

SAMPLES = 16
STEPS = 24
EPOCH = SAMPLES // 2  # steps per pass over the data (batch size 2)
SERVED_STEPS = 2 * EPOCH  # the served run is the cached run's first two passes (HTTP makes steps slower)
TOPK = 8
CROSS = {"lm_jsd": {"topk": TOPK, "temperature": 1.0, "cross_tokenizer": {"unmatched": "uld"}}}
TOL = 1e-4


def _data() -> Path:
    return build_caption_dataset(n=SAMPLES, seed=0, image=False)


def config(out: Path, rlhf: dict, *, teacher: Path | None = None) -> dict:
    """The pair's config, 24 steps at 2e-2, with `teacher` as the local `teacher_model` when given
    (what `kdcompose teacher-cache` runs)."""
    return text_pair_sections(out, rlhf, teacher=teacher, samples=SAMPLES, steps=STEPS, learning_rate=2e-2)


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def validate(path: Path) -> tuple[int, str]:
    from kdcompose.cli import main

    err = io.StringIO()
    with redirect_stderr(err):
        code = main(["validate", str(path)])
    return code, err.getvalue()


def epoch_means(rows: list[dict[str, Any]]) -> list[float]:
    losses = [row["llm_kd_loss"] for row in rows]
    return [sum(losses[i : i + EPOCH]) / EPOCH for i in range(0, len(losses), EPOCH)]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("xtok-remote")


@pytest.fixture(scope="module")
def teacher_dir() -> Path:
    return build_trained_text_model("teacher", _data())


@pytest.fixture(scope="module")
def cache(tmp: Path, teacher_dir: Path) -> dict[str, Any]:
    build = write(
        tmp / "build.yaml",
        config(tmp / "unused", {"loss_terms": CROSS, "teacher_template": "llama3"}, teacher=teacher_dir),
    )
    out = tmp / "cache"
    result = run_command(
        kdcompose_command("teacher-cache", str(build), "--out", str(out), "--dtype", "float32"), tmp
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return {"dir": out, "result": result}


@pytest.fixture(scope="module")
def cached_run(tmp: Path, cache: dict[str, Any]) -> dict[str, Any]:
    path = write(
        tmp / "cached.yaml", config(tmp / "cached", {"loss_terms": CROSS, "teacher_cache": str(cache["dir"])})
    )
    result = train_as_user(path, tmp)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return {"result": result, "logs": step_logs(tmp / "cached")}


@pytest.fixture(scope="module")
def server(tmp: Path, teacher_dir: Path):
    with ForkedServerProcess(
        model=str(teacher_dir),
        model_type="llama",
        template="llama3",
        extra_args=["--torch-dtype", "float32"],
        env=subprocess_env(tmp),
    ) as process:
        yield process


def served_rlhf(url: str, tokenizer: Path | None) -> dict:
    teacher = {"server": url} if tokenizer is None else {"server": url, "tokenizer": str(tokenizer)}
    terms = {"lm_jsd": {**CROSS["lm_jsd"], "teacher": "llama"}}
    return {"loss_terms": terms, "teachers": {"llama": teacher}}


@pytest.fixture(scope="module")
def served_run(tmp: Path, server: ServerProcess, teacher_dir: Path) -> dict[str, Any]:
    data = config(tmp / "served", served_rlhf(server.url, teacher_dir))
    data["training"]["max_steps"] = SERVED_STEPS
    path = write(tmp / "served.yaml", data)
    result = train_as_user(path, tmp)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return {"result": result, "logs": step_logs(tmp / "served")}


# ---------------------------------------------------------------------------------------- cache


def test_the_cache_holds_the_teachers_own_encoding_of_each_completion(cache, teacher_dir) -> None:
    from transformers import AutoTokenizer

    from kdcompose.teachers.cache import TeacherCache

    directory = cache["dir"]
    manifest = json.loads((directory / "manifest.json").read_text())
    teacher_tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    student_tok = AutoTokenizer.from_pretrained(str(build_tiny_text_model("student")))
    from tokenizers import Tokenizer

    files = Tokenizer.from_file(str(teacher_dir / "tokenizer.json"))  # the teacher's own files
    assert manifest["teacher_tokenizer"]["fingerprint"] == token_table(files).fingerprint
    assert manifest["teacher_template"]["name"] == "llama3" and manifest["template"]["name"] == "qwen2_5"
    assert (directory / manifest["teacher_tokenizer"]["path"] / "tokenizer.json").is_file()
    opened = TeacherCache.open(directory)
    assert opened.cross_tokenizer and len(opened) == SAMPLES
    answers = {
        json.loads(line)["messages"][-1]["content"].encode() for line in _data().read_text().splitlines()
    }
    spelled = set()
    for key in opened:
        rows = opened.rows(key)
        text = decode_bytes(teacher_tok, rows.tokens.tolist())
        assert text.endswith(b"<|eot_id|>")  # the teacher's own end of turn, not the student's <|im_end|>
        spelled.add(text.removesuffix(b"<|eot_id|>"))
        # the student's encoding of the same answer is another token sequence: the rows are the teacher's
        assert rows.tokens.tolist() != student_tok.encode(text.decode(), add_special_tokens=False)
        assert rows.ids.shape == (rows.tokens.numel(), TOPK)
        assert torch.all(rows.logprobs[:, :-1] >= rows.logprobs[:, 1:])  # top-K by descending probability
        assert torch.all(rows.token_logprobs <= 0)
        inside = rows.ids == rows.tokens[:, None].to(rows.ids.dtype)
        # where the actual token is among the top K its own log-probability is that entry
        assert torch.allclose(rows.logprobs[inside], rows.token_logprobs[inside.any(-1)])
    assert spelled == answers


def test_a_student_learns_from_a_cached_teacher_with_another_tokenizer(cached_run, cache) -> None:
    result, logs = cached_run["result"], cached_run["logs"]
    out = result.stdout + result.stderr
    assert f"the default teacher (cache {cache['dir']}): taught across tokenizers" in out
    assert "vocabularies differ" in out
    assert "teacher_model" not in yaml.safe_load((cache["dir"].parent / "cached.yaml").read_text())["model"]
    assert len(logs) == STEPS
    means = epoch_means(logs)
    assert means[0] > means[1] > means[2] and means[2] < 0.9 * means[0], means  # measured 0.413 0.378 0.344
    fracs = [row["llm_kd_loss_matched_frac"] for row in logs]
    assert all(0.0 < f < 1.0 for f in fracs)  # digits and rare words split differently on the two sides
    assert all(row["loss"] == pytest.approx(row["llm_kd_loss"]) for row in logs)


def test_damaged_cross_tokenizer_caches_end_before_training_with_named_errors(
    cache, tmp, teacher_dir
) -> None:
    directory = cache["dir"]
    # a term reading the cache position by position
    plain = {"lm_jsd": {"topk": TOPK}}
    code, err = validate(
        write(tmp / "v1.yaml", config(tmp / "o", {"loss_terms": plain, "teacher_cache": str(directory)}))
    )
    assert code == 2 and f"rlhf.loss_terms.lm_jsd: reads the default teacher (cache {directory})" in err
    assert "vocabularies differ" in err and "cross_tokenizer: {unmatched: uld}" in err
    # cached log-probabilities are at temperature 1; the chain rule over a group needs the term's
    hot = {"lm_jsd": {**CROSS["lm_jsd"], "temperature": 0.8}}
    code, err = validate(
        write(tmp / "v2.yaml", config(tmp / "o", {"loss_terms": hot, "teacher_cache": str(directory)}))
    )
    assert code == 2 and "rlhf.loss_terms.lm_jsd.cross_tokenizer" in err and "`temperature: 1`" in err
    # `tokenizer:` naming another tokenizer than the one the cache was scored with
    named = {
        "loss_terms": {"lm_jsd": {**CROSS["lm_jsd"], "teacher": "llama"}},
        "teachers": {"llama": {"cache": str(directory), "tokenizer": str(build_tiny_text_model("student"))}},
    }
    code, err = validate(write(tmp / "v3.yaml", config(tmp / "o", named)))
    assert (
        code == 2
        and "rlhf.teachers.llama.tokenizer" in err
        and "is not the one the teacher was scored with" in err
    )
    named["teachers"]["llama"]["tokenizer"] = str(teacher_dir)  # the teacher's own folder is fine
    code, err = validate(write(tmp / "v4.yaml", config(tmp / "o", named)))
    assert code == 0, err
    # the cache's copy of the teacher's tokenizer gone
    broken = tmp / "broken-cache"
    shutil.copytree(directory, broken)
    shutil.rmtree(broken / "teacher-tokenizer")
    code, err = validate(
        write(tmp / "v5.yaml", config(tmp / "o", {"loss_terms": CROSS, "teacher_cache": str(broken)}))
    )
    assert (
        code == 2 and "rlhf.teacher_cache" in err and "teacher-tokenizer/tokenizer.json does not exist" in err
    )
    assert f"kdcompose teacher-cache {tmp / 'build.yaml'} --out {broken}" in err and "copy again" in err
    # a term that needs the teacher's full logits
    full = {"lm_jsd": {"temperature": 1.0, "cross_tokenizer": {"unmatched": "uld"}}}
    code, err = validate(
        write(tmp / "v6.yaml", config(tmp / "o", {"loss_terms": full, "teacher_cache": str(directory)}))
    )
    assert code == 2 and "rlhf.loss_terms.lm_jsd" in err and "top-K" in err


# ---------------------------------------------------------------------------------------- server


def test_a_served_teacher_with_another_tokenizer_teaches_as_its_cache_does(
    served_run, cached_run, server
) -> None:
    result, logs = served_run["result"], served_run["logs"]
    out = result.stdout + result.stderr
    assert f"teacher 'llama' (server {server.url}): taught across tokenizers" in out
    assert len(logs) == SERVED_STEPS
    # the same teacher, seed and data: the live server and its float32 cache give the same run (the
    # teacher's values agree to float32 rounding; the server scores in padded shared forwards)
    cached = cached_run["logs"][:SERVED_STEPS]
    assert [r["llm_kd_loss"] for r in logs] == pytest.approx([r["llm_kd_loss"] for r in cached], abs=TOL)
    assert [r["llm_kd_loss_matched_frac"] for r in logs] == [r["llm_kd_loss_matched_frac"] for r in cached]
    means = epoch_means(logs)
    assert means[1] < 0.95 * means[0], means  # measured 0.413 -> 0.378


def test_the_server_encodes_the_conversation_itself_and_names_the_completion(server, teacher_dir) -> None:
    """Asked with text (a dataset answer, then a completion the student generated, given to the
    server re-spelled by the trainer's `text_requests`), the server answers its own completion."""
    from transformers import AutoTokenizer

    from kdcompose.integrations.swift.cross_teachers import text_requests
    from kdcompose.teachers.server_client import TeacherServerClient

    teacher_tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    student_tok = AutoTokenizer.from_pretrained(str(build_tiny_text_model("student")))
    row = json.loads(_data().read_text().splitlines()[0])
    client = TeacherServerClient(server.url)
    (scored,) = client.topk_completions([{"messages": row["messages"]}], TOPK)
    answer = row["messages"][-1]["content"].encode()
    assert decode_bytes(teacher_tok, scored.ids) == answer + b"<|eot_id|>"
    assert all(len(top) == TOPK and top == sorted(top, reverse=True) for top in scored.topk_logprobs)
    inside = 0
    for token, own, ids, lps in zip(
        scored.ids, scored.token_logprobs, scored.topk_ids, scored.topk_logprobs, strict=True
    ):
        assert own <= lps[0] + 1e-6
        if token in ids:  # its own log-probability is its top-K entry
            inside += 1
            assert own == pytest.approx(lps[ids.index(token)])
    assert 0 < inside < len(scored.ids)  # measured 7 of 15: both branches of the check ran

    class Generated:  # what ms-swift's GKD sample of an on-policy step carries
        add_eos = None

        def __init__(self, ids: list[int]) -> None:
            self.response_token_ids = ids

        def to_infer_request(self) -> Any:
            from swift.infer_engine.protocol import RolloutInferRequest

            return RolloutInferRequest(messages=[dict(m) for m in row["messages"]])

    generated = student_tok.encode("The diamond is 12 white", add_special_tokens=False)
    ended = [*generated, student_tok.convert_tokens_to_ids("<|im_end|>")]
    labels = torch.full((2, len(ended) + 3), -100)
    labels[0, 3 : 3 + len(generated)] = torch.tensor(generated)
    labels[1, 3:] = torch.tensor(ended)
    requests, kept = text_requests([Generated(generated), Generated(ended)], student_tok, teacher_tok, labels)
    assert kept == [len(generated), len(ended)]
    partial, whole = client.topk_completions(requests, TOPK)
    assert decode_bytes(teacher_tok, whole.ids) == b"The diamond is 12 white<|eot_id|>"
    assert decode_bytes(teacher_tok, partial.ids) == b"The diamond is 12 white"  # no end of turn generated


def test_a_server_whose_tokenizer_the_run_cannot_know_is_refused_before_training(tmp, teacher_dir) -> None:
    url = "http://127.0.0.1:9"  # never contacted: the preflight reads files only
    code, err = validate(write(tmp / "s1.yaml", config(tmp / "o", served_rlhf(url, None))))
    assert code == 2 and "rlhf.teachers.llama.server" in err and "cannot know its tokenizer" in err
    assert "add `tokenizer: PATH`" in err
    code, err = validate(write(tmp / "s2.yaml", config(tmp / "o", served_rlhf(url, tmp / "nowhere"))))
    assert code == 2 and "rlhf.teachers.llama.tokenizer" in err and "does not exist" in err
    stock = {"loss_terms": CROSS, "teacher_model_server": url}  # ms-swift's own key sends token ids
    code, err = validate(write(tmp / "s3.yaml", config(tmp / "o", stock)))
    assert code == 2 and "cannot know its tokenizer" in err and "rlhf.teachers.NAME" in err
    code, err = validate(write(tmp / "s4.yaml", config(tmp / "o", served_rlhf(url, teacher_dir))))
    assert code == 0, err


def test_a_server_declared_with_another_tokenizer_than_its_own_stops_at_the_first_batch(tmp, server) -> None:
    """`tokenizer:` naming the student's tokenizer for the Llama server: the run takes the teacher
    for a same-tokenizer one, and the audit stops it at the first batch, naming the sample, the
    first differing position and the fix, without a traceback."""
    data = config(tmp / "wrong", served_rlhf(server.url, build_tiny_text_model("student")))
    data["training"]["max_steps"] = 1
    result = train_as_user(write(tmp / "wrong.yaml", data), tmp)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (message,) = [line for line in result.stderr.splitlines() if line.startswith("kdcompose train:")]
    assert message.startswith(f"kdcompose train: teacher 'llama' ({server.url}) scored other tokens"), message
    assert "sample 0 of the micro-batch" in message and "first difference at position" in message
    assert "tokenizer: PATH" in message
    assert not list((tmp / "wrong").glob("**/logging.jsonl")) or not step_logs(tmp / "wrong")
