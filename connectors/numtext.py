"""Numbers to text a whole column at a time, in numpy, for line protocol.

Every function returns a ``(n, width)`` uint8 matrix, one row per number, where a zero byte is
"nothing here"; ``join`` puts such matrices side by side and drops the zero bytes, which gives
the text of ``n`` lines at once. Text never holds a zero byte, so nothing real is dropped.

Why not ``repr``: Python spends ~250 ns on ``repr(float)`` and ~100 ns on ``str(int)``; at the
pipeline's 350,000 readings/s that alone would cost it a fifth of its time. Here a number is cut
into 4-digit pieces (two or three integer divisions) and each piece is looked up in a table; the
work is numpy's, and numpy lets other threads run meanwhile.

Floats are written exactly: a value is written with the fewest decimals (at most 6) ``d`` for
which ``round(v * 10**d) / 10**d == v`` holds in floating point, which means the decimal text
reads back as the same float. A value that needs more (1/3, 1e-9) or is huge is written with
``repr`` (rare: sensors report a few decimals).
"""

from __future__ import annotations

import numpy as np

MAX_DECIMALS = 6
_SCALE = 10.0 ** np.arange(MAX_DECIMALS + 1)
_ISCALE = 10 ** np.arange(MAX_DECIMALS + 1, dtype=np.int64)
# "0000".."9999" as one uint32 each: a piece's 4 bytes in one gather
_LUT = np.frombuffer(b"".join(f"{i:04d}".encode() for i in range(10_000)), dtype=np.uint32)
_POW10 = 10 ** np.arange(19, dtype=np.int64)
_EXACT_BELOW = 1e12           # |v| * 10**6 stays well inside int64 and float's 53 bits
MINUS, POINT = 45, 46


def join(n: int, *columns: np.ndarray | bytes) -> bytes:
    """Side by side, zero bytes dropped: the text of every row, one after the other. A bytes
    column is the same text on every row."""
    cols = [np.frombuffer(c, dtype=np.uint8) if isinstance(c, bytes) else c for c in columns]
    m = np.empty((n, sum(c.shape[-1] for c in cols)), dtype=np.uint8)
    at = 0
    for c in cols:
        m[:, at:at + c.shape[-1]] = c
        at += c.shape[-1]
    return m[m != 0].tobytes()


def digits(a: np.ndarray, width: int) -> np.ndarray:
    """Non-negative integers below 10**width as exactly ``width`` digits, zero-padded."""
    k = (width + 3) // 4
    out = np.empty((len(a), k), dtype=np.uint32)
    for j in range(k - 1, -1, -1):
        out[:, j] = np.take(_LUT, a % 10_000)
        a = a // 10_000
    return out.view(np.uint8)[:, 4 * k - width:]


def int_text(x: np.ndarray) -> np.ndarray:
    """Integers (int64) as decimal text, right-aligned."""
    if not len(x):
        return np.zeros((0, 1), dtype=np.uint8)
    a = np.abs(x)
    width = len(str(int(a.max())))
    out = digits(a, width)
    if width > 1 and (a < _POW10[width - 1]).any():          # shorter numbers: no leading 0s
        shown = 1 + (a[:, None] >= _POW10[1:width][None, :]).sum(axis=1, dtype=np.int64)
        out = out * (np.arange(width)[None, :] >= (width - shown)[:, None])
    if (x < 0).any():
        out = np.concatenate([np.where(x < 0, MINUS, 0).astype(np.uint8)[:, None], out], axis=1)
    return out


def float_text(v: np.ndarray) -> np.ndarray:
    """Finite floats as exact decimal text (see the module's note)."""
    n = len(v)
    a = np.abs(v)
    decimals = np.full(n, -1, dtype=np.int64)
    for d in range(MAX_DECIMALS + 1):
        with np.errstate(over="ignore"):      # a huge value times 10**d is inf: not exact, repr
            exact = (decimals < 0) & (np.round(a * _SCALE[d]) / _SCALE[d] == a)
        decimals[exact] = d
        if not (decimals < 0).any():
            break
    plain = (decimals >= 0) & (a < _EXACT_BELOW)
    decimals[~plain] = 0
    most = int(decimals.max()) if n else 0
    scaled = np.where(plain, np.round(a * _SCALE[decimals]), 0).astype(np.int64)
    scaled *= _ISCALE[most - decimals]                        # every row to `most` decimals
    parts = [np.where(np.signbit(v), MINUS, 0).astype(np.uint8)[:, None],
             int_text(scaled // _ISCALE[most])]
    if most:
        fraction = digits(scaled % _ISCALE[most], most)
        fraction = fraction * (np.arange(most)[None, :] < decimals[:, None])   # no trailing 0s
        parts += [np.where(decimals > 0, POINT, 0).astype(np.uint8)[:, None], fraction]
    out = np.concatenate(parts, axis=1, dtype=np.uint8)
    if not plain.all():
        out = _with_repr(out, v, np.flatnonzero(~plain))
    return out


def _with_repr(out: np.ndarray, v: np.ndarray, rows: np.ndarray) -> np.ndarray:
    texts = np.array([repr(float(x)).encode() for x in v[rows]])
    width = texts.dtype.itemsize
    if width > out.shape[1]:
        out = np.concatenate([out, np.zeros((len(out), width - out.shape[1]), np.uint8)], axis=1)
    out[rows] = 0
    out[rows, :width] = texts.view(np.uint8).reshape(len(rows), width)
    return out
