"""validation.parse_body (orjson) reads every JSON document the gateway's checks read as json.loads does, within
RFC 8259 (finite numbers, integers within 64 bits), and refuses the rest as a ValidationError, never another
exception."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nebula.errors import ValidationError
from nebula.services.gateway.validation import parse_body

TEXT = st.text(st.characters(exclude_categories=["Cs"]))  # a lone surrogate is not Unicode text
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=20)


@given(JSON, st.booleans())
def test_a_document_reads_as_json_loads_reads_it(doc: object, ascii_only: bool) -> None:
    raw = json.dumps(doc, ensure_ascii=ascii_only).encode()
    assert parse_body(raw) == json.loads(raw)


@given(st.binary(max_size=64))
def test_any_bytes_are_a_value_or_a_validation_error(raw: bytes) -> None:
    try:
        parse_body(raw)
    except ValidationError as e:
        assert e.message.startswith("not valid JSON")


@pytest.mark.parametrize("raw", [b'{"t": NaN}', b'{"t": Infinity}', b"1e999", b"\xff", b'"\\ud800"', b"[" * 2000,
                                 b"{} {}", b""])
def test_what_rfc_8259_does_not_allow_is_refused(raw: bytes) -> None:
    with pytest.raises(ValidationError, match="not valid JSON"):
        parse_body(raw)
