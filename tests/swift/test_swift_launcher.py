"""`kdcompose train`, the ms-swift plugin route and their fail-fast checks (real ms-swift 4.6).

Bad configs point at a model path that does not exist: a check that ran after any model
loading would fail differently (ms-swift's own error, exit code 1 and a traceback).
"""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from swift_support import (
    args_json,
    kdcompose_command,
    run_command,
    sections,
    step_logs,
    swift_args,
    swift_command,
    write_config,
)

from kdcompose import parse_config
from kdcompose.errors import ConfigError
from kdcompose.integrations.swift import plugin_path
from kdcompose.integrations.swift.launch.argv import parse_flag_value, take_own_flags, unknown_flag_issues
from kdcompose.integrations.swift.launch.command import swift_kwargs, train
from kdcompose.integrations.swift.runtime import (
    ALLOW_UNTESTED_ENV,
    SwiftUnavailableError,
    check_swift_version,
    is_tested_version,
)
from kdcompose.training.records import loss_terms_of

pytestmark = [
    pytest.mark.swift,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning"),
]

MISSING_MODEL = "/nonexistent/kdcompose-test/model"
VISUAL = {"weight": 0.5, "vit": {"enabled": True, "weight": 1.0, "distance": "mse"}}
REL = 1e-5


def _bad(tmp_path: Path, **kwargs) -> dict:
    data = sections(tmp_path / "out", **kwargs)
    data["model"]["model"] = MISSING_MODEL
    data["model"]["teacher_model"] = MISSING_MODEL + "-teacher"
    return data


def _train_in_process(config: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = train(str(config), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------- fail fast, before any model


def _unknown_key(data):
    data["training"]["learning_rat"] = 1e-4


def _key_in_two_sections(data):
    data["model"]["max_length"] = 128


def _no_teacher(data):
    del data["model"]["teacher_model"]


def _wrong_rlhf_type(data):
    data["rlhf"]["rlhf_type"] = "dpo"


def _teacher_api(data):
    data["rlhf"]["teacher_model_server"] = "http://127.0.0.1:8000"


def _topk(data):
    """ms-swift's top-k knob is lm_jsd's `topk`: stating it twice differently is a conflict."""
    data["rlhf"]["gkd_logits_topk"] = 20
    data["rlhf"]["loss_terms"] = {"lm_jsd": {"topk": 8}}


def _negative_llm_kd_weight(data):
    data["rlhf"]["llm_kd_weight"] = -1


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_unknown_key, ["training.learning_rat", "did you mean `learning_rate`"]),
        (_key_in_two_sections, ["max_length", "also set at"]),
        (_no_teacher, ["rlhf.teacher_model", "lm_jsd", "need a teacher"]),
        (_wrong_rlhf_type, ["rlhf.rlhf_type", "gkd"]),
        (_teacher_api, ["rlhf.loss_terms.lm_jsd", "top-K", "topk: K"]),
        (_topk, ["rlhf.gkd_logits_topk", "conflicts with rlhf.loss_terms.lm_jsd.topk"]),
        (_negative_llm_kd_weight, ["rlhf.llm_kd_weight"]),
    ],
    ids=["unknown-key", "two-sections", "no-teacher", "rlhf-type", "teacher-api", "topk", "llm-kd-weight"],
)
def test_bad_config_fails_fast_naming_the_key(tmp_path, edit, expected):
    data = _bad(tmp_path)
    edit(data)
    config = write_config(tmp_path / "bad.yaml", data)
    start = time.monotonic()
    code, out, err = _train_in_process(config)
    assert code == 2, err
    for fragment in expected:
        assert fragment in err
    assert "Traceback" not in err and out == ""
    assert not (tmp_path / "out").exists()  # nothing was prepared, let alone trained
    assert time.monotonic() - start < 60


def test_every_problem_is_reported_at_once(tmp_path):
    data = _bad(tmp_path)
    _unknown_key(data)
    data["training"]["use_liger_kernel"] = True
    _no_teacher(data)
    code, _, err = _train_in_process(write_config(tmp_path / "bad.yaml", data))
    assert code == 2
    assert "(4 problems)" in err  # the three edits, and the student path that does not exist
    assert all(
        p in err
        for p in ("training.learning_rat", "training.use_liger_kernel", "rlhf.teacher_model", "model.model")
    )


def test_cli_exit_code_and_message_without_traceback(tmp_path):
    data = _bad(tmp_path)
    _unknown_key(data)
    result = run_command(kdcompose_command("train", str(write_config(tmp_path / "bad.yaml", data))), tmp_path)
    assert result.returncode == 2
    assert "training.learning_rat" in result.stderr and "learning_rate" in result.stderr
    assert "Traceback" not in result.stderr


def test_no_teacher_is_fine_when_no_active_term_needs_one(tmp_path):
    data = sections(tmp_path / "out", rlhf={"llm_kd_weight": 0.0, "sft_alpha": 1.0})  # real model files
    _no_teacher(data)
    kwargs = swift_kwargs(parse_config(data))
    assert "teacher_model" not in kwargs


def test_rlhf_type_defaults_to_gkd_and_list_arguments_accept_scalars(tmp_path):
    data = sections(tmp_path / "out", drop=("rlhf_type",))  # real model files: the preflight reads them
    data["data"]["dataset"] = "one.jsonl"
    kwargs = swift_kwargs(parse_config(data))
    assert kwargs["rlhf_type"] == "gkd"
    assert kwargs["dataset"] == ["one.jsonl"]


# ----------------------------------------------------------------------- ms-swift presence and version


def test_untested_swift_versions_are_refused_with_a_clear_message(monkeypatch):
    assert is_tested_version("4.6.0") and is_tested_version("4.6.3")
    assert not is_tested_version("4.7.0") and not is_tested_version("4.5.2")
    monkeypatch.delenv(ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(
        SwiftUnavailableError, match=r"ms-swift 4\.7\.0 .* tested with ms-swift >=4\.6\.0,<4\.7"
    ):
        check_swift_version("4.7.0")
    monkeypatch.setenv(ALLOW_UNTESTED_ENV, "1")
    with pytest.warns(RuntimeWarning, match="4.7.0"):
        assert check_swift_version("4.7.0") == "4.7.0"


def test_missing_swift_says_how_to_install(tmp_path, monkeypatch):
    from kdcompose.integrations.swift import runtime

    monkeypatch.setattr(runtime, "installed_swift_version", lambda: None)
    with pytest.raises(SwiftUnavailableError, match=r"install kdcompose\[swift\]"):
        check_swift_version()
    code, _, err = _train_in_process(write_config(tmp_path / "ok.yaml", _bad(tmp_path)))
    assert code == 1 and "install kdcompose[swift]" in err


def test_importing_kdcompose_never_imports_ms_swift():
    code = (
        "import sys, kdcompose, kdcompose.cli, kdcompose.integrations.swift, "
        "kdcompose.integrations.swift.launch.command, kdcompose.integrations.swift.launch.argv\n"
        "heavy = ('swift', 'swift.', 'trl', 'transformers')\n"
        "bad = sorted(m for m in sys.modules if m.startswith(heavy))\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plugin_path_command(tmp_path):
    result = run_command(kdcompose_command("plugin-path"), tmp_path)
    assert result.returncode == 0
    printed = Path(result.stdout.strip())
    assert printed == plugin_path() and printed.is_file() and printed.name == "plugin.py"


# ----------------------------------------------------------------------- the plugin's argv handling


def test_own_flags_are_taken_out_of_argv_in_every_spelling():
    argv = [
        "--model",
        "m",
        "--loss_terms",
        '{"ce": {"weight": 0.1}}',
        "--llm-kd-weight=0.5",
        "--visual_kd",
        "{weight: 1, vit: {enabled: true}}",
        "--lmbda",
        "0",
    ]
    own, rest = take_own_flags(argv)
    assert rest == ["--model", "m", "--lmbda", "0"]
    assert own == {
        "loss_terms": {"ce": {"weight": 0.1}},
        "llm_kd_weight": 0.5,
        "visual_kd": {"weight": 1, "vit": {"enabled": True}},
    }
    assert parse_flag_value("True") is True and parse_flag_value("abc") == "abc"
    with pytest.raises(ConfigError, match="--llm_kd_weight"):
        take_own_flags(["--llm_kd_weight"])
    with pytest.raises(ConfigError, match="twice"):
        take_own_flags(["--llm_kd_weight", "1", "--llm_kd_weight", "2"])


def test_unknown_flags_get_a_suggestion():
    issues = unknown_flag_issues(["--learning_rat", "1e-4", "--llm_kd_weigth", "0.5"])
    assert [i.path for i in issues] == ["--learning_rat", "--llm_kd_weigth"]
    assert "learning_rate" in issues[0].message and "llm_kd_weight" in issues[1].message


@pytest.fixture(autouse=True)
def _restore_swift_globals():
    """The plugin selects our trainer for the whole process (that is its job in a `swift rlhf`
    run); give the rest of the test session ms-swift's own entry back."""
    from swift.trainers import TrainerFactory

    saved = dict(TrainerFactory.TRAINER_MAPPING)
    yield
    TrainerFactory.TRAINER_MAPPING.clear()
    TrainerFactory.TRAINER_MAPPING.update(saved)
    _expected_trainer_run(None)


def _expected_trainer_run(clear: object = "read"):
    """What the plugin handed to the next trainer (`KDComposeGKDTrainer.expect`); clears it when
    called with None."""
    from kdcompose.integrations.swift.trainer import KDComposeGKDTrainer

    if clear is None:
        KDComposeGKDTrainer.expect(None)
        return None
    return KDComposeGKDTrainer._expected


def _parse_with_plugin(argv: list[str]):
    """ms-swift's own argument parsing (`swift rlhf` does exactly this) with our plugin."""
    from swift import RLHFArguments
    from swift.utils import parse_args

    for name in [m for m in sys.modules if m.startswith("_swift_external_")]:
        del sys.modules[name]  # ms-swift imports a plugin file once per process
    _expected_trainer_run(None)
    return parse_args(RLHFArguments, [*argv, "--external_plugins", str(plugin_path())])


def test_plugin_consumes_its_flags_during_swift_argument_parsing(tmp_path):
    from kdcompose.testing import to_cli_args

    argv = to_cli_args(swift_args(tmp_path / "out", sft_alpha=0.2))
    argv += ["--llm_kd_weight", "0.5", "--visual_kd", json.dumps(VISUAL)]
    try:
        args, remaining = _parse_with_plugin(argv)
        parked = _expected_trainer_run()
    finally:
        _expected_trainer_run(None)
    assert remaining == []
    assert parked is not None and parked.origin == "the kdcompose ms-swift plugin"
    composer = parked.composer
    assert composer.term("lm_jsd").weight == 0.5 and composer.term("ce").weight == 0.2
    assert composer.term("visual_kd").weight == 0.5
    assert args.llm_kd_weight == 0.5 and args.kdcompose_loss_terms == loss_terms_of(composer)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--rlhf_type", "dpo", "--llm_kd_weight", "0.5"], "--rlhf_type"),
        (["--llm_kd_weight", "-1"], "--llm_kd_weight"),
        (["--loss_terms", '{"lm_jsd": {"wieght": 1}}'], "--loss_terms.lm_jsd"),
        (["--learnin_rate", "1e-4"], "did you mean `learning_rate`"),
        (["--gkd_logits_topk", "5", "--loss_terms", '{"lm_jsd": {"topk": 8}}'], "--gkd_logits_topk"),
    ],
    ids=["rlhf-type", "negative-weight", "typo-in-term", "unknown-flag", "topk"],
)
def test_plugin_rejects_bad_flags_before_any_model_loads(tmp_path, extra, expected):
    from kdcompose.testing import to_cli_args

    argv = to_cli_args(swift_args(tmp_path / "out")) + extra
    try:
        with pytest.raises(ConfigError) as info:
            _parse_with_plugin(argv)
    finally:
        _expected_trainer_run(None)
    assert expected in str(info.value)


# ----------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def kdcompose_run(tmp_path_factory):
    """`kdcompose train` on a tiny config: lm_jsd at 0.5, CE at 0.2, visual KD on the ViT."""
    tmp = tmp_path_factory.mktemp("kdcompose_train")
    data = sections(tmp / "out", rlhf={"llm_kd_weight": 0.5, "sft_alpha": 0.2}, custom={"visual_kd": VISUAL})
    result = run_command(kdcompose_command("train", str(write_config(tmp / "cfg.yaml", data))), tmp)
    assert result.returncode == 0, result.stderr[-4000:]
    return tmp, result


def test_kdcompose_train_writes_per_term_metrics(kdcompose_run):
    tmp, result = kdcompose_run
    assert "Loss = 0.5*lm_jsd(beta=0.5, T=0.9) + 0.2*ce + 0.5*visual_kd(vit:mse)" in result.stdout
    rows = step_logs(tmp / "out")
    assert len(rows) == 3
    for row in rows:
        assert {"loss", "llm_kd_loss", "sft_loss", "vision_kd_loss", "vision_kd_loss_vit"} <= set(row)
        parts = row["llm_kd_loss"] + row["sft_loss"] + row["vision_kd_loss"]
        assert row["loss"] == pytest.approx(parts, rel=1e-4)
    saved = args_json(tmp / "out")
    assert saved["llm_kd_weight"] == 0.5
    assert saved["kdcompose_loss_terms"]["visual_kd"]["weight"] == 0.5


def test_swift_rlhf_with_the_plugin_gives_the_same_losses(kdcompose_run, tmp_path):
    """ms-swift's own route: a flat ms-swift YAML with kdcompose's keys, plus the plugin."""
    tmp, _ = kdcompose_run
    flat = swift_args(tmp_path / "out", sft_alpha=0.2)
    flat.update({"llm_kd_weight": 0.5, "visual_kd": VISUAL})
    config = tmp_path / "swift.yaml"
    config.write_text(yaml.safe_dump(flat, sort_keys=False))
    result = run_command(swift_command(str(config), "--external_plugins", str(plugin_path())), tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    ours, theirs = step_logs(tmp / "out"), step_logs(tmp_path / "out")
    assert len(theirs) == len(ours) == 3
    for a, b in zip(ours, theirs, strict=True):
        for key in ("loss", "llm_kd_loss", "sft_loss", "vision_kd_loss"):
            assert b[key] == pytest.approx(a[key], rel=REL), key


def test_on_policy_run_skips_ce_on_student_batches(tmp_path):
    seed, lmbda, steps = 42, 0.5, 4
    data = sections(tmp_path / "out", max_steps=steps, lmbda=lmbda, seed=seed, rlhf={"sft_alpha": 0.2})
    code, _, err = _train_in_process(write_config(tmp_path / "cfg.yaml", data))
    assert code == 0, err
    rows = step_logs(tmp_path / "out")
    assert len(rows) == steps
    # ms-swift draws the data source per step from Random(seed + global_step) (GKDTrainer._get_random_num).
    student = [random.Random(seed + step).random() <= lmbda for step in range(steps)]
    assert any(student) and not all(student)
    for row, generated in zip(rows, student, strict=True):
        assert "llm_kd_loss" in row
        assert ("sft_loss" in row) == (not generated)
