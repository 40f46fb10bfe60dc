"""connectors/numtext against Python's own number text: every column of numbers, of every mix of
signs, sizes and decimals, must read back as the numbers it was made of, and look as a person (and
InfluxDB) expects — no leading zeros, no trailing zeros, no point without decimals."""

from __future__ import annotations

import math
import re

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.numtext import MAX_DECIMALS, float_text, int_text, join

INT64 = st.integers(min_value=-(2**63) + 1, max_value=2**63 - 1)
# sensors report a few decimals; the rest (1/3, 1e-9, 1e300) must still read back exactly
FEW_DECIMALS = st.builds(lambda i, d: i / 10**d, st.integers(-10**13, 10**13), st.integers(0, 8))
FLOATS = st.one_of(FEW_DECIMALS, st.floats(allow_nan=False, allow_infinity=False))
PLAIN = re.compile(rb"-?(0|[1-9][0-9]*)(\.[0-9]*[1-9])?")


def lines(n: int, column: np.ndarray) -> list[bytes]:
    return join(n, column, b"\n").split(b"\n")[:-1]


@given(st.lists(INT64, max_size=40))
@settings(max_examples=300, deadline=None)
def test_integers_are_written_as_python_writes_them(xs: list[int]) -> None:
    assert lines(len(xs), int_text(np.array(xs, dtype=np.int64))) == [str(x).encode() for x in xs]


@given(st.lists(FLOATS, max_size=40))
@settings(max_examples=500, deadline=None)
def test_floats_read_back_exactly_and_in_the_fewest_decimals(vs: list[float]) -> None:
    texts = lines(len(vs), float_text(np.array(vs, dtype=np.float64)))
    assert len(texts) == len(vs)
    for v, text in zip(vs, texts, strict=True):
        back = float(text)
        assert back == v and math.copysign(1, back) == math.copysign(1, v), (v, text)
        a = abs(v)
        fewest = next((d for d in range(MAX_DECIMALS + 1) if round(a * 10**d) / 10**d == a), None)
        if fewest is not None and a < 1e12:
            # the plain form: as many decimals as it takes, at most MAX_DECIMALS
            assert PLAIN.fullmatch(text), (v, text)
            assert len(text.partition(b".")[2]) == fewest, (v, text)
        else:
            assert text == repr(v).encode(), (v, text)


def test_an_empty_column_is_no_text() -> None:
    assert join(0, int_text(np.array([], dtype=np.int64)), b"\n") == b""
    assert join(0, float_text(np.array([], dtype=np.float64)), b"\n") == b""
