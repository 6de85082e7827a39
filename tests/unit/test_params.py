from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from virtcontainers.config import Param, deserialize_params, serialize_params


def test_serialize_reference_edge_cases() -> None:
    params = [
        Param("", ""),
        Param("", "only-value"),
        Param("only-key", ""),
        Param("k", "v"),
    ]
    assert serialize_params(params, "=") == ["only-value", "only-key", "k=v"]
    assert serialize_params([Param("-m", "512")], "") == ["-m", "512"]
    assert serialize_params([Param("a", "b")], ":") == ["a:b"]


def test_deserialize_splits_on_first_equals_and_skips_empty() -> None:
    assert deserialize_params(["", "a=b=c", "flag", "k="]) == [
        Param("a", "b=c"),
        Param("flag", ""),
        Param("k", ""),
    ]


keys = st.text(min_size=1).filter(lambda s: "=" not in s)


@given(st.lists(st.tuples(keys, st.text())))
def test_round_trip_with_equals_delimiter(pairs: list[tuple[str, str]]) -> None:
    # Holds whenever keys contain no "=" (the split point) and are non-empty.
    params = [Param(k, v) for k, v in pairs]
    assert deserialize_params(serialize_params(params, "=")) == params
