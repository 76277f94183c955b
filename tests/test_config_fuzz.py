"""Property tests of `SlimConfig`: any JSON value in any field gives a config that round-trips, or a
ValueError naming the field; never another exception type."""

from __future__ import annotations

import json
from dataclasses import fields

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llmslim.config import SlimConfig

FIELDS = [f.name for f in fields(SlimConfig)]
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any JSON value (NaN and infinities included: Python's json reads them), big integers too.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=10**300, max_value=10**400) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)
# Values some field accepts, so that valid configs (and their cross-field checks) are explored too.
plausible = st.sampled_from(
    [None, "nf4", "fp4", "int8", "int4", "bfloat16", "float16", 64, 128, 4096, 0, 1, 2, 1.5, 5.0, 0.9, 8, True, False, "all", "mean",
     "sqrt", "none", "q_proj", ["q_proj"], ["lm_head"], [], [[0, 1], [2, 3]], "llmslim", "corpus.txt", -1, 0.0, -0.0]
)  # fmt: skip
values = json_values | plausible


def _round_trips(config: SlimConfig) -> None:
    data = config.to_dict()
    text = json.dumps(data, allow_nan=False)  # a valid config holds no NaN or infinity
    back = SlimConfig.from_dict(json.loads(text))
    assert back == config and back.to_dict() == data
    assert SlimConfig.from_dict(json.loads(config.to_json_string())) == config
    assert SlimConfig(**{k: v for k, v in data.items()}) == config


def _build(build, named: list[str]) -> SlimConfig | None:
    """`build()`, or None after checking that its ValueError names one of `named`."""
    try:
        return build()
    except ValueError as err:
        assert any(name in str(err) for name in named), f"{err} names none of {named}"
        return None


@SETTINGS
@given(field=st.sampled_from(FIELDS), value=values)
@example(field="int8_threshold", value=float("nan"))  # once accepted, then saved as NaN
@example(field="int8_threshold", value=float("inf"))
@example(field="int8_threshold", value=10**400)  # once an OverflowError
@example(field="version", value=True)
@example(field="embedding_corpus", value=[1])
def test_any_value_in_one_field_round_trips_or_names_the_field(field, value):
    config = _build(lambda: SlimConfig(**{field: value}), [field])
    if config is not None:
        _round_trips(config)


@SETTINGS
@given(data=st.dictionaries(st.sampled_from(FIELDS), values, max_size=6))
def test_any_fields_from_dict_round_trip_or_name_a_field(data):
    data = json.loads(json.dumps(data))  # what a config.json holds
    config = _build(lambda: SlimConfig.from_dict(data), list(data))
    if config is not None:
        _round_trips(config)


@settings(max_examples=200, deadline=None)
@given(data=st.dictionaries(st.text(max_size=10), values, max_size=4) | json_values)
@example(data={"weights": "nf4", "block_sise": 64})  # once a TypeError
@example(data=None)
def test_any_json_to_from_dict_gives_a_config_or_a_value_error(data):
    try:
        config = SlimConfig.from_dict(data)
    except ValueError as err:
        assert str(err)
    else:
        _round_trips(config)
