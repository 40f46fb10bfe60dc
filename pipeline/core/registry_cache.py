"""The compiled registry: a city's registry as columns on disk, memory-mapped, rebuilt when the
source files change.

Parsing 1 M sensors from CSV and YAML takes seconds and a Python object per cell; every runtime,
worker and replay would pay it at each start. The first load writes what it parsed to a cache
folder named by a digest of registry.yaml (its path and bytes) and of the rule packs' kinds; the
sensors file's digest is kept inside and compared at each load. A later load maps the columns
(numpy ``.npy`` files, ``mmap_mode="r"``): pages are read from disk when touched and shared by
every process on the machine. The grids, workers and owners are mapped too, as msgpack records
with a sorted index (pipeline/core/columns.py, ``Records`` and ``Keyed``); the levels above a grid,
the departments and the kinds (small) are one msgpack document.

Where: ``$CITYOPS_CACHE``, else ``$XDG_CACHE_HOME/cityops/registry``, else
``~/.cache/cityops/registry``. A folder that cannot be written is no error: the registry is then
used as parsed. Deleting the cache is always safe.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import numpy as np

from pipeline.core.columns import Keyed, Records, SensorIndex, SparseAttrs, Strings

FORMAT = 4          # bump when the layout below changes: old folders are then never read
_STRINGS = ("sensor_ids", "address", "building", "owner", "owner_contact", "gateways")
_NUMBERS = ("kind_of", "grid_of", "gateway_of", "lat", "lon")


def cache_root() -> Path:
    if os.environ.get("CITYOPS_CACHE"):
        return Path(os.environ["CITYOPS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cityops" / "registry"


def file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=20)
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def seen(path: Path) -> tuple[list[int], str, int]:
    """The sensors file as it is before parsing: its stat, its digest, and when."""
    return _stat(path), file_digest(path), time.time_ns()


def folder_for(yaml_path: Path, known_kinds: Iterable[str] | None) -> Path:
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{FORMAT}\n{yaml_path.resolve()}\n".encode())
    h.update(yaml_path.read_bytes())
    h.update(("\n" + ",".join(sorted(known_kinds)) if known_kinds is not None else "\n*").encode())
    return cache_root() / h.hexdigest()


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _unchanged(path: Path, meta: dict) -> bool:
    """Whether the sensors file is the one compiled. Hashing 1 M rows takes most of a second, so
    as git does: same size, mtime and inode as when it was hashed is the same file, unless it was
    written within a second of that (a change in the same clock tick would not show)."""
    st = _stat(path)
    if st == meta["sensors_stat"] and st[1] < meta["hashed_at_ns"] - 1_000_000_000:
        return True
    return file_digest(path) == meta["sensors_digest"]


def open_compiled(folder: Path, registry_type: Callable[..., Any],
                  place: Callable[..., Any], worker: Callable[..., Any],
                  parse_attrs: Callable[[str], dict], owner: Callable[..., Any]) -> Any | None:
    """The registry compiled in ``folder``, or None when there is none or its sensors file
    (named in it: registry.yaml's path and bytes are in the folder's name) has changed since."""
    try:
        meta = msgspec.msgpack.decode((folder / "meta.msgpack").read_bytes())
    except (OSError, msgspec.DecodeError):
        return None
    try:
        if meta.get("format") != FORMAT or not _unchanged(Path(meta["sensors_path"]), meta):
            return None
    except OSError:
        return None

    def arr(name: str) -> np.ndarray:
        # a plain ndarray over the mapping: np.memmap's Python __getitem__ costs µs per element
        return np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False).view(np.ndarray)

    def strings(name: str) -> Strings:
        codes = arr(f"{name}.codes") if (folder / f"{name}.codes.npy").exists() else None
        return Strings(arr(f"{name}.blob"), arr(f"{name}.offsets"), codes)

    p = meta["places"]
    # The place tree below the streets (grids, grid workers, owners) grows with the city: as
    # Python objects, 1.4 million of them in a synthetic 5,000,000-sensor city, held whole by
    # every worker. Mapped records instead, read when a notice or a rule asks: a worker holds
    # the grids of its own sensors and meets the people its notices name.
    grid_rows = Records(arr("grids.blob"), arr("grids.offsets"))
    grid_index = Keyed(SensorIndex(arr("grid_index.keys"), arr("grid_index.rows")),
                       range(len(grid_rows)))
    streets = {k: tuple(v) for k, v in p["streets"].items()}
    communities = {k: tuple(v) for k, v in p["communities"].items()}
    places = GridPlaces(grid_rows, place, p["districts"], streets, communities)
    people = Records(arr("workers.blob"), arr("workers.offsets"),
                     lambda r: worker(r[0], r[1], r[2], tuple(r[3]), r[4], r[5], r[6], tuple(r[7])))
    workers = Keyed(SensorIndex(arr("workers.keys"), arr("workers.rows")), people)
    owners = Records(arr("owners.blob"), arr("owners.offsets"),
                     lambda r: owner(r[0], r[1], r[2], r[3], tuple(r[4])))
    reg = registry_type(
        p["city_code"], p["city_name"], ZoneInfo(p["tz"]), p["districts"], streets, communities,
        places, grid_index, p["departments"], p["dept_of_category"], workers,
        GridWorkers(grid_index, arr("workers_of_grid.offsets"), arr("workers_of_grid.rows"),
                    people, grid_rows),
        p["duty_officer"],
        sensor_ids=strings("sensor_ids"), index=SensorIndex(arr("index.keys"), arr("index.rows")),
        kinds=p["kinds"],
        owners=Keyed(SensorIndex(arr("owners.keys"), arr("owners.rows")), owners),
        owner_named=Keyed(SensorIndex(arr("owners.names.keys"), arr("owners.names.rows")), owners),
        gateway_index=SensorIndex(arr("gateway_index.keys"), arr("gateway_index.rows")),
        attrs=SparseAttrs(arr("attrs.rows"), strings("attrs"), parse_attrs),
        **{name: strings(name) for name in _STRINGS[1:]}, **{name: arr(name) for name in _NUMBERS})
    return reg


class GridPlaces(Sequence[Any]):
    """Grid number -> Place (every level above it), built from the grid's record when first
    asked and kept: what a worker ends up holding is the grids of the sensors it owns (its
    rules and notices ask for those), not the city's. Iterating (a reload's comparison, the
    map) builds each grid once and keeps none."""

    def __init__(self, rows: Records, place: Callable[..., Any], districts: dict[str, str],
                 streets: dict[str, tuple], communities: dict[str, tuple]) -> None:
        self.rows, self.place = rows, place
        self.districts, self.streets, self.communities = districts, streets, communities
        self._made: dict[int, Any] = {}
        self._above: dict[str, tuple] = {}      # community -> the levels above a grid, shared

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, g: Any) -> Any:
        try:
            return self._made[g]
        except (KeyError, TypeError):           # TypeError: a slice (unhashable before 3.12)
            pass
        if g.__class__ is slice:
            return [self[j] for j in range(*g.indices(len(self)))]
        p = self._make(self.rows[g])             # Records checks the bounds
        self._made[int(g) % len(self.rows)] = p
        return p

    def _make(self, row: list) -> Any:
        code, name, community = row
        above = self._above.get(community)
        if above is None:
            cname, street = self.communities[community]
            sname, district = self.streets[street]
            above = self._above[community] = (district, self.districts[district], street, sname,
                                              community, cname)
        return self.place(*above, code, name)

    def __iter__(self) -> Iterator[Any]:
        return (self._make(r) for r in self.rows)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(
            a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]


class GridWorkers(Mapping[str, list]):
    """``workers_of_grid`` over the compiled rows: grid code -> the ids of its workers, in the
    order registry.yaml lists them (per grid number, an offset into worker row numbers)."""

    def __init__(self, grid_index: Keyed, offsets: np.ndarray, rows: np.ndarray,
                 workers: Records, grids: Records) -> None:
        self.grid_index, self.offsets, self.rows = grid_index, offsets, rows
        self.workers, self.grids = workers, grids

    def __getitem__(self, grid: Any) -> list:
        g = self.grid_index.get(grid)
        if g is None or self.offsets[g] == self.offsets[g + 1]:
            raise KeyError(grid)
        return [self.workers[r].id for r in self.rows[self.offsets[g]:self.offsets[g + 1]].tolist()]

    def __iter__(self) -> Iterator[str]:
        return (self.grids[g][0] for g in np.flatnonzero(np.diff(self.offsets)).tolist())

    def __len__(self) -> int:
        return int(np.count_nonzero(np.diff(self.offsets)))


def write_compiled(folder: Path, reg: Any, sensors_path: Path, sensors_seen: tuple) -> bool:
    """Write ``reg``, as parsed from ``sensors_path`` when ``sensors_seen`` (``seen(path)``: its
    stat, digest and when) was taken, to ``folder``; False when the cache cannot be written."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".new-"))
    except OSError:
        return False
    try:
        def save(name: str, a: np.ndarray) -> None:
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(a), allow_pickle=False)

        def save_strings(name: str, col: Any) -> None:
            save(f"{name}.blob", col.blob)
            save(f"{name}.offsets", col.offsets)
            if col.codes is not None:
                save(f"{name}.codes", col.codes)

        for name in _STRINGS:
            save_strings(name, getattr(reg, name))
        for name in _NUMBERS:
            save(name, getattr(reg, name))
        def save_index(name: str, keys: Any) -> None:
            index = keys if isinstance(keys, SensorIndex) else SensorIndex.of(keys)
            save(f"{name}.keys", index.keys)
            save(f"{name}.rows", index.rows)

        def save_records(name: str, rows: Iterable[list]) -> None:
            blob, offsets = Records.encode(rows)
            save(f"{name}.blob", blob)
            save(f"{name}.offsets", offsets)

        for name in ("index", "gateway_index"):
            save_index(name, getattr(reg, name))
        save("attrs.rows", reg.attrs.rows)
        save_strings("attrs", reg.attrs.text)
        grids = [p.grid for p in reg.grid_places]
        save_records("grids", ([p.grid, p.grid_name, p.community] for p in reg.grid_places))
        save_index("grid_index", grids)
        worker_ids = list(reg.workers)
        save_records("workers", ([getattr(w, f) for f in w.__slots__] for w in reg.workers.values()))
        save_index("workers", worker_ids)
        row_of = {w: i for i, w in enumerate(worker_ids)}
        of_grid = [[row_of[w] for w in reg.workers_of_grid.get(g, ())] for g in grids]
        offsets = np.zeros(len(grids) + 1, dtype=np.int64)
        np.cumsum([len(ws) for ws in of_grid], out=offsets[1:])
        save("workers_of_grid.offsets", offsets)
        save("workers_of_grid.rows", np.array([r for ws in of_grid for r in ws], dtype=np.int64))
        owners = list(reg.owners.values())
        save_records("owners", ([getattr(o, f) for f in o.__slots__] for o in owners))
        save_index("owners", [o.id for o in owners])
        save_index("owners.names", [o.name for o in owners])
        places = {
            "city_code": reg.city_code, "city_name": reg.city_name, "tz": reg.tz.key,
            "districts": reg.districts, "streets": reg.streets, "communities": reg.communities,
            "departments": reg.departments, "dept_of_category": reg.dept_of_category,
            "duty_officer": reg.duty_officer, "kinds": reg.kinds,
        }
        stat, digest, hashed_at = sensors_seen
        meta = {"format": FORMAT, "sensors_path": str(sensors_path), "sensors_stat": stat,
                "sensors_digest": digest, "hashed_at_ns": hashed_at, "places": places}
        (tmp / "meta.msgpack").write_bytes(msgspec.msgpack.encode(meta))
        if folder.exists():             # stale (its sensors file changed): replace it
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        return True
    except OSError:
        return False                    # another process won the race, or the disk is full
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def release_pages(*holders: Any) -> int:
    """Drop this process's resident pages of every memory-mapped column reachable from
    ``holders`` (a Registry, its columns): they stay in the page cache, shared, and a later
    read maps a page in again. A worker calls it once its partitions' sensors are copied out
    (``Registry.subset`` reads scattered rows, so it touches nearly every page of the city's
    columns): what stays resident is then its share, not the whole city. Returns the bytes
    advised; 0 where nothing is mapped (a registry used as parsed)."""
    seen: dict[int, mmap.mmap] = {}

    def visit(obj: Any, depth: int = 0) -> None:
        if isinstance(obj, np.ndarray):
            base: Any = obj
            while base is not None and not isinstance(base, mmap.mmap):
                base = getattr(base, "base", None)
            if base is not None:
                seen[id(base)] = base
        elif depth < 3 and hasattr(obj, "__dict__"):     # registry → Keyed → SensorIndex → array
            for value in vars(obj).values():
                visit(value, depth + 1)

    for h in holders:
        visit(h)
    advised = 0
    for m in seen.values():
        if not m.closed:
            m.madvise(mmap.MADV_DONTNEED)
            advised += len(m)
    return advised
