"""`kdcompose.Distiller` and the tokenizers: the teacher is given the student's token ids, so a
teacher of another model family must be refused, not silently compared id by id.

The pair is `kdcompose.testing.tokenizer_pair`'s: two tiny text models whose tokenizers were trained
on different corpora (576 and 741 LM-head rows: a difference the padding check alone accepts, so
only the tokenizers can tell). Marked swift: the Qwen2 model class needs the torchvision fix.
"""

from __future__ import annotations

import logging

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdcompose import ConfigError, Distiller
from kdcompose.compat import ensure_torchvision_importable
from kdcompose.testing.tokenizer_pair import build_tiny_text_model

pytestmark = [
    pytest.mark.swift,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning"),
]

LM_JSD = {"rlhf": {"loss_terms": {"lm_jsd": {}}}}


def _cross(**block) -> dict:
    return {"rlhf": {"loss_terms": {"lm_jsd": {"cross_tokenizer": {"unmatched": "uld", **block}}}}}


@pytest.fixture(scope="module")
def pair():
    ensure_torchvision_importable()
    folders = {role: build_tiny_text_model(role) for role in ("student", "teacher")}
    models = {role: AutoModelForCausalLM.from_pretrained(path) for role, path in folders.items()}
    tokenizers = {role: AutoTokenizer.from_pretrained(path) for role, path in folders.items()}
    assert models["student"].lm_head.out_features != models["teacher"].lm_head.out_features
    return models, tokenizers


def _given(tokenizers: dict, teacher: str = "teacher") -> dict:
    """The Distiller's tokenizer arguments: the student's, and the `teacher` role's as the teacher's."""
    return {"tokenizer": tokenizers["student"], "teacher_tokenizer": tokenizers[teacher]}


def _paths(info: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return [issue.path for issue in info.value.issues]


def test_a_teacher_with_another_tokenizer_is_refused_naming_the_term(pair):
    models, tokenizers = pair
    with pytest.raises(ConfigError) as info:
        Distiller(LM_JSD, models["student"], models["teacher"], **_given(tokenizers))
    assert _paths(info) == ["rlhf.loss_terms.lm_jsd"]
    message = info.value.issues[0].message
    assert "vocabularies differ" in message and "kdcompose train" in message
    assert "rlhf.llm_kd_weight: 0" in message


def test_the_same_tokenizer_passes_and_sets_the_vocabulary_size(pair, caplog):
    models, tokenizers = pair
    with caplog.at_level(logging.INFO, logger="kdcompose"):
        kd = Distiller(LM_JSD, models["student"], models["student"], **_given(tokenizers, "student"))
    try:
        assert kd.vocab_size == len(tokenizers["student"])
        assert "teacher_tokenizer=" not in caplog.text  # nothing left to advise
    finally:
        kd.close()


def test_the_tokenizer_size_decides_what_is_padding(pair):
    """The 741-row model as student, the 576-row one as teacher: 165 extra rows pass for padding
    when the size is unknown; with the tokenizer given (741 tokens) the narrower head misses real
    tokens and is refused."""
    from kdcompose.functional.vocab import VocabMismatchError

    models, tokenizers = pair
    wide, narrow, tokenizer = models["teacher"], models["student"], tokenizers["teacher"]
    assert len(tokenizer) > narrow.lm_head.out_features
    Distiller(LM_JSD, wide, narrow).close()
    with pytest.raises(VocabMismatchError, match=f"the tokenizer has {len(tokenizer)} tokens"):
        Distiller(LM_JSD, wide, narrow, tokenizer=tokenizer, teacher_tokenizer=tokenizer)


def test_without_the_tokenizers_it_says_how_to_have_them_checked(pair, caplog):
    models, _ = pair
    with caplog.at_level(logging.INFO, logger="kdcompose"):
        kd = Distiller(LM_JSD, models["student"], models["teacher"])
    kd.close()
    assert "tokenizer=, teacher_tokenizer=" in caplog.text


def test_features_only_needs_no_shared_tokenizer(pair, caplog):
    models, tokenizers = pair
    layer = {"student": "model.layers.0", "teacher": "model.layers.0", "projector": "linear"}
    config = {"rlhf": {"llm_kd_weight": 0, "loss_terms": {"hidden_kd": {"pairs": [layer]}}}}
    with caplog.at_level(logging.INFO, logger="kdcompose"):
        kd = Distiller(config, models["student"], models["teacher"], **_given(tokenizers))
    kd.close()
    assert "tokenizer=" not in caplog.text


def test_a_cross_tokenizer_block_is_accepted_only_where_it_has_nothing_to_do(pair):
    models, tokenizers = pair
    student, teacher = models["student"], models["teacher"]
    same, other = _given(tokenizers, "student"), _given(tokenizers)
    for config, kwargs in (
        (_cross(), {}),  # the Distiller cannot know whether the teacher's tokenizer differs
        (_cross(force=True), same),
    ):
        with pytest.raises(ConfigError) as info:
            Distiller(config, student, teacher, **kwargs)
        assert _paths(info) == ["rlhf.loss_terms.lm_jsd.cross_tokenizer"], info.value
        assert "kdcompose train" in info.value.issues[0].message
    with pytest.raises(ConfigError) as info:  # another tokenizer: refused as without the block
        Distiller(_cross(), student, teacher, **other)
    assert _paths(info) == ["rlhf.loss_terms.lm_jsd"]
    kd = Distiller(_cross(), student, student, **same)  # nothing to do, as in `kdcompose train`
    kd.close()
