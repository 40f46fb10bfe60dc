"""Registry columns that hold a city without a Python object per sensor.

A Python ``str`` costs ~60 bytes and a dict entry ~100 more; at Chengdu's ~22 M devices that is
gigabytes in every process. These keep strings as one UTF-8 blob plus offsets (interned: a table
of distinct strings and a code per row, for columns that repeat, like owners and buildings), and
the sensor-id index as a sorted fixed-width byte array, all numpy, so they can be memory-mapped
from the compiled registry (pipeline/core/registry_cache.py) and cost only the pages that are read.
They answer the registry's old list/dict API: ``col[i]``, ``len``, iteration, ``index.get``.
"""

from __future__ import annotations

from collections.abc import Callable, ItemsView, Iterable, Iterator, Mapping, Sequence, ValuesView
from typing import Any

import msgspec
import numpy as np


class Strings(Sequence[str]):
    """A column of strings: ``table`` (blob + offsets) and, when interned, a code per row."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray, codes: np.ndarray | None = None) -> None:
        self.blob, self.offsets, self.codes = blob, offsets, codes
        self._starts = offsets.tolist() if len(offsets) < 1 << 16 else None   # small tables: no numpy per get
        # (ignored: numpy declares ndarray's buffer protocol, __buffer__, for Python 3.12+ only)
        self._bytes = memoryview(blob)  # type: ignore[arg-type]  # a string cut from it without a numpy call

    @classmethod
    def of(cls, strings: Iterable[str], intern: bool = False) -> Strings:
        strings = list(strings)
        codes = None
        if intern:
            table: dict[str, int] = {}
            codes = np.fromiter((table.setdefault(s, len(table)) for s in strings), np.uint32, len(strings))
            strings = list(table)
        encoded = [s.encode() for s in strings]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded) or b"\0", dtype=np.uint8), offsets, codes)

    def __len__(self) -> int:
        return len(self.codes) if self.codes is not None else len(self.offsets) - 1

    def _entry(self, j: int) -> str:
        starts = self._starts
        if starts is not None:
            return str(self._bytes[starts[j]:starts[j + 1]], "utf-8")
        return str(self._bytes[self.offsets[j]:self.offsets[j + 1]], "utf-8")

    def __getitem__(self, i: Any) -> Any:
        if i.__class__ is slice:
            return [self[j] for j in range(*i.indices(len(self)))]
        if self.codes is not None:
            return self._entry(int(self.codes[i]))          # numpy checks the bounds
        n = len(self.offsets) - 1
        if not -n <= i < n:
            raise IndexError("column index out of range")
        return self._entry(int(i) % n)

    def __iter__(self) -> Iterator[str]:
        table = [self._entry(j) for j in range(len(self.offsets) - 1)]
        if self.codes is None:
            return iter(table)
        return (table[c] for c in self.codes.tolist())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(
            a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def take(self, rows: Sequence[int] | np.ndarray) -> Strings:
        """The rows given, in that order (a partition's share)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.codes is not None:
            return Strings(self.blob, self.offsets, self.codes[rows])
        starts = self.offsets[rows]
        lengths = self.offsets[rows + 1] - starts
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # the bytes of the rows, gathered in one numpy pass: no Python string per row
        pos = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return Strings(self.blob[pos] if len(pos) else np.zeros(1, np.uint8), offsets)

    def fixed_width(self) -> np.ndarray:
        """The rows as one fixed-width byte-string array (not interned columns)."""
        n = len(self.offsets) - 1
        lengths = np.diff(self.offsets)
        width = max(int(lengths.max()) if n else 1, 1)
        out = np.zeros((n, width), dtype=np.uint8)
        total = int(self.offsets[-1])
        row = np.repeat(np.arange(n), lengths)
        out[row, np.arange(total) - self.offsets[:-1][row]] = self.blob[:total]
        return out.view(f"S{width}").ravel()


class SensorIndex:
    """Sensor id -> sensor number, a sorted fixed-width byte array searched with numpy.
    ``lookup`` answers a whole batch of decoded ids in one call (-1: not in the registry)."""

    def __init__(self, keys: np.ndarray, rows: np.ndarray) -> None:
        self.keys, self.rows = keys, rows          # keys sorted ascending; rows[k]: its number

    @classmethod
    def of(cls, ids: Sequence[str] | Strings) -> SensorIndex:
        if not isinstance(ids, Strings):
            ids = Strings.of(ids)
        keys = ids.fixed_width()
        order = np.argsort(keys, kind="stable")
        return cls(keys[order], order.astype(np.int64))

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, ids: Sequence[str]) -> np.ndarray:
        out = np.full(len(ids), -1, dtype=np.int64)
        if not len(ids) or not len(self.keys):
            return out
        try:
            if "\0" in "".join(ids):
                # a trailing NUL would vanish in a fixed-width byte string and match another id
                vals = np.array([s.encode() if "\0" not in s else b"\xff\0" for s in ids], dtype=bytes)
            else:
                try:                    # ASCII ids (the common case): numpy encodes them in C
                    vals = np.array(ids, dtype=bytes)
                except UnicodeEncodeError:
                    vals = np.array([s.encode() for s in ids], dtype=bytes)
        except (AttributeError, TypeError):
            return np.array([self.get(s, -1) for s in ids], dtype=np.int64)
        at = np.minimum(np.searchsorted(self.keys, vals), len(self.keys) - 1)
        hit = self.keys[at] == vals
        out[hit] = self.rows[at[hit]]
        return out

    def get(self, sid: Any, default: Any = None) -> Any:
        if not isinstance(sid, str) or "\0" in sid or not len(self.keys):
            return default
        key = sid.encode()
        k = int(np.searchsorted(self.keys, key))
        if k < len(self.keys) and self.keys[k] == key:
            return int(self.rows[k])
        return default

    def __getitem__(self, sid: str) -> int:
        i = self.get(sid)
        if i is None:
            raise KeyError(sid)
        return i

    def __contains__(self, sid: object) -> bool:
        return self.get(sid) is not None

    def __iter__(self) -> Iterator[str]:
        """Ids in sensor-number order, as the dict it replaces iterated."""
        keys = self.keys[np.argsort(self.rows, kind="stable")]
        return (k.decode() for k in keys.tolist())


class Records(Sequence[Any]):
    """Small records (a city's grids, workers, owners) as msgpack rows in one blob plus offsets:
    no Python object until a row is read, and then ``make(row)`` builds it. Memory-mapped from
    the compiled registry, the people and places a worker never meets cost it nothing."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray,
                 make: Callable[[list], Any] = list) -> None:
        self.blob, self.offsets, self.make = blob, offsets, make

    @staticmethod
    def encode(rows: Iterable[Sequence[Any]]) -> tuple[np.ndarray, np.ndarray]:
        """(blob, offsets) of the rows, for the compiled registry to save."""
        encoded = [msgspec.msgpack.encode(list(r)) for r in rows]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        return np.frombuffer(b"".join(encoded) or b"\0", dtype=np.uint8), offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: Any) -> Any:
        n = len(self.offsets) - 1
        if i.__class__ is slice:
            return [self[j] for j in range(*i.indices(n))]
        if not -n <= i < n:
            raise IndexError("record index out of range")
        i = int(i) % n
        return self.make(msgspec.msgpack.decode(self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes()))

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(
            a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]


class Keyed(Mapping[str, Any]):
    """A dict's read API (``get``, ``[]``, ``in``, iteration in row order, ``==``) over a
    SensorIndex: key -> ``table[row]``. The table is Records (a worker by its id, an owner by
    id or name) or a ``range`` (a grid code -> its number)."""

    def __init__(self, index: SensorIndex, table: Sequence[Any]) -> None:
        self.index, self.table = index, table

    def __getitem__(self, key: Any) -> Any:
        row = self.index.get(key)
        if row is None:
            raise KeyError(key)
        return self.table[row]

    def get(self, key: Any, default: Any = None) -> Any:
        row = self.index.get(key)
        return default if row is None else self.table[row]

    def __contains__(self, key: object) -> bool:
        return self.index.get(key) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)

    # rows in order, without a search per key (SensorIndex iterates its keys in row order)
    def values(self) -> ValuesView:
        return _RowValues(self)

    def items(self) -> ItemsView:
        return _RowItems(self)


class _RowValues(ValuesView):
    _mapping: Keyed             # (MappingView's)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._mapping.table)


class _RowItems(ItemsView):
    _mapping: Keyed

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return zip(self._mapping.index, self._mapping.table, strict=True)


class SparseAttrs:
    """``attrs`` per sensor number, for the few sensors that have any: the numbers sorted, the
    attrs as ``key=value;...`` text parsed when asked (registry._parse_attrs)."""

    def __init__(self, rows: np.ndarray, text: Strings, parse: Any) -> None:
        self.rows, self.text, self.parse = rows, text, parse

    def _at(self, idx: Any) -> int:
        k = int(np.searchsorted(self.rows, idx))
        return k if k < len(self.rows) and self.rows[k] == idx else -1

    def get(self, idx: Any, default: Any = None) -> Any:
        k = self._at(idx) if isinstance(idx, (int, np.integer)) else -1
        return self.parse(self.text[k]) if k >= 0 else default

    def __getitem__(self, idx: int) -> dict:
        v = self.get(idx)
        if v is None:
            raise KeyError(idx)
        return v

    def __contains__(self, idx: object) -> bool:
        return isinstance(idx, (int, np.integer)) and self._at(idx) >= 0

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[int]:
        return iter(self.rows.tolist())

    def keys(self) -> Iterator[int]:
        return iter(self)

    def items(self) -> Iterator[tuple[int, dict]]:
        return ((int(r), self.parse(t)) for r, t in zip(self.rows.tolist(), self.text, strict=True))

    def take(self, rows: Sequence[int] | np.ndarray) -> SparseAttrs:
        """The attrs of the given rows, renumbered by their place in ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        pos = np.searchsorted(self.rows, rows)
        pos = np.minimum(pos, max(len(self.rows) - 1, 0))
        has = (self.rows[pos] == rows) if len(self.rows) else np.zeros(len(rows), dtype=bool)
        new = np.flatnonzero(has)
        return SparseAttrs(new, Strings.of([self.text[int(k)] for k in pos[has]]), self.parse)
