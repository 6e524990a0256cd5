"""The term registry: decorators, lookups, and plugins through the entry-point group."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdcompose import LossContext, LossTerm, TermNeeds, UnknownTermError, get_term_class, register_term
from kdcompose.registry import registered_terms, unregister_term

REPO = Path(__file__).resolve().parents[2]


class _Term(LossTerm):
    @property
    def needs(self) -> TermNeeds:
        return TermNeeds()

    def compute(self, ctx: LossContext) -> torch.Tensor:
        return torch.zeros(())


def test_bare_decorator_uses_the_class_name_and_keyed_uses_the_key():
    class bare_term_for_test(_Term):
        pass

    try:
        register_term(bare_term_for_test)
        assert get_term_class("bare_term_for_test") is bare_term_for_test
        register_term("keyed_term_for_test")(_Term)
        assert get_term_class("keyed_term_for_test") is _Term
        assert _Term.type_name == "keyed_term_for_test"
    finally:
        unregister_term("bare_term_for_test")
        unregister_term("keyed_term_for_test")


def test_a_key_cannot_be_taken_twice_by_different_classes():
    class Other(_Term):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_term("lm_jsd")(Other)


def test_only_loss_terms_and_identifier_keys_register():
    with pytest.raises(TypeError):
        register_term("not_a_term")(dict)
    with pytest.raises(ValueError, match="identifier"):
        register_term("bad-key")(_Term)


def test_unknown_lookup_lists_what_is_registered():
    with pytest.raises(UnknownTermError) as info:
        get_term_class("nope")
    message = str(info.value)
    assert all(name in message for name in ("ce", "lm_jsd", "visual_kd"))


def test_builtins_are_registered():
    assert {"lm_jsd", "ce", "visual_kd"} <= registered_terms().keys()
