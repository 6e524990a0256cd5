"""Property tests of the schema: invalid weights always rejected at their path, valid ones
kept exactly, and dump -> load round-trips give the same composition."""

from __future__ import annotations

import math
from typing import Any

from helpers import config_error, config_from, yaml_round_trip
from hypothesis import given
from hypothesis import strategies as st

from kdcompose import build_composer, parse_config

valid_weights = st.one_of(
    st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False),
    st.integers(min_value=0, max_value=10**6),
)
invalid_weights = st.one_of(
    st.floats(max_value=-1e-12, allow_nan=False, allow_infinity=False),
    st.integers(max_value=-1),
    st.sampled_from([math.nan, math.inf, -math.inf, True, False]),
    st.text(max_size=8),
    st.lists(st.floats(allow_nan=False), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)

# (path of the weight, function building a config with that weight at that path)
WEIGHT_SITES: dict[str, Any] = {
    "rlhf.llm_kd_weight": lambda w: {"rlhf": {"llm_kd_weight": w, "sft_alpha": 1}},
    "rlhf.sft_alpha": lambda w: {"rlhf": {"sft_alpha": w}},
    "rlhf.loss_terms.lm_jsd.weight": lambda w: {"rlhf": {"loss_terms": {"lm_jsd": {"weight": w}, "ce": {}}}},
    "rlhf.loss_terms.ce.weight": lambda w: {"rlhf": {"loss_terms": {"ce": {"weight": w}}}},
    "rlhf.loss_terms.visual_kd.weight": lambda w: {
        "rlhf": {"loss_terms": {"visual_kd": {"weight": w, "aligner": {}}}}
    },
    "rlhf.loss_terms.visual_kd.aligner.weight": lambda w: {
        "rlhf": {"loss_terms": {"visual_kd": {"aligner": {"weight": w}, "vit": {}}}}
    },
    "custom.visual_kd.weight": lambda w: {"custom": {"visual_kd": {"weight": w, "vit": {}}}},
    "custom.visual_kd.deepstack.weight": lambda w: {
        "custom": {"visual_kd": {"deepstack": {"weight": w}, "vit": {}}}
    },
    "rlhf.loss_terms.aux.weight": lambda w: {"rlhf": {"loss_terms": {"aux": {"type": "ce", "weight": w}}}},
}


@given(site=st.sampled_from(sorted(WEIGHT_SITES)), weight=invalid_weights)
def test_every_invalid_weight_is_rejected_with_its_path(site, weight):
    error = config_error(WEIGHT_SITES[site](weight))
    assert error.paths == (site,), str(error)


WEIGHT_READERS: dict[str, Any] = {
    "rlhf.llm_kd_weight": lambda c: c.llm_kd_weight,
    "rlhf.sft_alpha": lambda c: c.composition.term("ce").weight,
    "rlhf.loss_terms.lm_jsd.weight": lambda c: c.composition.term("lm_jsd").weight,
    "rlhf.loss_terms.ce.weight": lambda c: c.composition.term("ce").weight,
    "rlhf.loss_terms.visual_kd.weight": lambda c: c.composition.term("visual_kd").weight,
    "rlhf.loss_terms.visual_kd.aligner.weight": lambda c: c.composition.term("visual_kd").spec.aligner.weight,
    "custom.visual_kd.weight": lambda c: c.composition.term("visual_kd").weight,
    "custom.visual_kd.deepstack.weight": lambda c: c.composition.term("visual_kd").spec.deepstack.weight,
    "rlhf.loss_terms.aux.weight": lambda c: c.composition.term("aux").weight,
}


@given(site=st.sampled_from(sorted(WEIGHT_SITES)), weight=valid_weights)
def test_every_valid_weight_is_kept_exactly(site, weight):
    try:
        config = parse_config(WEIGHT_SITES[site](weight))
    except Exception as exc:  # weight 0 on the only active term is legitimately rejected
        assert weight == 0 and "no active loss term" in str(exc), exc
        return
    value = WEIGHT_READERS[site](config)
    assert type(value) is float and value == float(weight)


# --- round trip -------------------------------------------------------------------------

target_blocks = st.none() | st.fixed_dictionaries(
    {},
    optional={
        "enabled": st.booleans(),
        "weight": valid_weights,
        "distance": st.sampled_from(["mse", "cosine", "smooth_l1"]),
        "module": st.sampled_from(["model.visual", "model.visual.merger"]),
    },
)
lm_jsd_specs = st.fixed_dictionaries(
    {"weight": valid_weights},
    optional={
        "beta": st.floats(0, 1),
        "temperature": st.floats(0.05, 10),
        "chunk_size": st.integers(1, 4096),
    },
)
ce_specs = st.fixed_dictionaries({"weight": valid_weights}, optional={"on_student_generated": st.booleans()})
visual_specs = st.fixed_dictionaries(
    {"weight": valid_weights, "aligner": st.just({"enabled": True, "weight": 1.0})},
    optional={"vit": target_blocks, "deepstack": target_blocks, "enabled": st.booleans()},
)


@st.composite
def loss_terms_blocks(draw) -> dict[str, Any]:
    block: dict[str, Any] = {}
    if draw(st.booleans()):
        block["lm_jsd"] = draw(lm_jsd_specs)
    if draw(st.booleans()):
        block["ce"] = draw(ce_specs)
    if draw(st.booleans()):
        block["visual_kd"] = draw(visual_specs)
    for i in range(draw(st.integers(0, 2))):
        kind, spec = draw(st.sampled_from(["lm_jsd", "ce"])), None
        spec = draw(lm_jsd_specs if kind == "lm_jsd" else ce_specs)
        block[f"extra_{kind}_{i}"] = {"type": kind, **spec}
    return block


@given(
    loss_terms=loss_terms_blocks(),
    knobs=st.fixed_dictionaries(
        {}, optional={"beta": st.floats(0, 1), "temperature": st.floats(0.1, 5), "sft_alpha": valid_weights}
    ),
)
def test_dump_then_load_gives_the_same_composition(loss_terms, knobs):
    rlhf = {"loss_terms": loss_terms}
    # A knob and a term field stating the same thing differently is (correctly) an error;
    # only generate configs that are valid by construction.
    if "beta" in knobs and "beta" in loss_terms.get("lm_jsd", {}):
        knobs = {k: v for k, v in knobs.items() if k != "beta"}
    if "sft_alpha" in knobs and "ce" in loss_terms:
        knobs = {k: v for k, v in knobs.items() if k != "sft_alpha"}
    rlhf.update(knobs)
    try:
        first = parse_config({"rlhf": rlhf})
    except Exception as exc:  # all-zero compositions are legitimately rejected
        assert "no active loss term" in str(exc), exc
        return
    dumped = yaml_round_trip({"rlhf": {"loss_terms": first.composition.to_loss_terms()}})
    second = parse_config(dumped)
    assert second.composition == first.composition
    assert build_composer(second.composition).formula() == build_composer(first.composition).formula()


@given(weight=valid_weights.filter(lambda w: w > 0))
def test_llm_kd_weight_round_trips_into_loss_terms(weight):
    first = config_from(rlhf={"llm_kd_weight": weight, "beta": 0.25})
    second = parse_config({"rlhf": {"loss_terms": first.composition.to_loss_terms()}})
    assert second.llm_kd_weight == first.llm_kd_weight == float(weight)
    assert second.composition.term("lm_jsd").spec.beta == 0.25
