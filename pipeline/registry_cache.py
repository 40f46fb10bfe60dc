"""The compiled registry: a city's registry as columns on disk, memory-mapped, rebuilt when the
source files change.

Parsing 1 M sensors from CSV and YAML takes seconds and a Python object per cell; every runtime,
worker and replay would pay it at each start. The first load writes what it parsed to a cache
folder named by a digest of registry.yaml (its path and bytes) and of the rule packs' kinds; the
sensors file's digest is kept inside and compared at each load. A later load maps the columns
(numpy ``.npy`` files, ``mmap_mode="r"``): pages are read from disk when touched and shared by
every process on the machine. The places, departments and workers (small) are msgpack.

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
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import numpy as np

FORMAT = 3          # bump when the layout below changes: old folders are then never read
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
    from pipeline.columns import SensorIndex, SparseAttrs, Strings
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
    # msgpack gives each occurrence of a name its own str: a district's name 50,000 times over
    # in a city of 50,000 grids. One object per distinct text (what parsing made) keeps the
    # place tree, which every worker holds whole, at its parsed size.
    one = _Interner()
    places = [place(*map(one, row)) for row in p["grid_places"]]
    workers = {w[0]: worker(one(w[0]), w[1], w[2], tuple(map(one, w[3])), w[4], w[5], one(w[6]),
                            tuple(map(one, w[7])))
               for w in p["workers"]}
    p["workers_of_grid"] = {one(g): [one(w) for w in ws] for g, ws in p["workers_of_grid"].items()}
    p["duty_officer"] = {one(k): one(v) for k, v in p["duty_officer"].items()}
    owners = {o[0]: owner(o[0], o[1], o[2], o[3], tuple(o[4])) for o in p["owners"]}
    reg = registry_type(
        p["city_code"], p["city_name"], ZoneInfo(p["tz"]), p["districts"],
        {k: tuple(v) for k, v in p["streets"].items()},
        {k: tuple(v) for k, v in p["communities"].items()}, places,
        {pl.grid: i for i, pl in enumerate(places)}, p["departments"], p["dept_of_category"],
        workers, p["workers_of_grid"], p["duty_officer"],
        sensor_ids=strings("sensor_ids"), index=SensorIndex(arr("index.keys"), arr("index.rows")),
        kinds=p["kinds"], owners=owners, owner_named={o.name: o for o in owners.values()},
        gateway_index=SensorIndex(arr("gateway_index.keys"), arr("gateway_index.rows")),
        attrs=SparseAttrs(arr("attrs.rows"), strings("attrs"), parse_attrs),
        **{name: strings(name) for name in _STRINGS[1:]}, **{name: arr(name) for name in _NUMBERS})
    return reg


class _Interner(dict):
    def __call__(self, value: Any) -> Any:
        return self.setdefault(value, value) if value.__class__ is str else value


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
        for name in ("index", "gateway_index"):
            save(f"{name}.keys", getattr(reg, name).keys)
            save(f"{name}.rows", getattr(reg, name).rows)
        save("attrs.rows", reg.attrs.rows)
        save_strings("attrs", reg.attrs.text)
        places = {
            "city_code": reg.city_code, "city_name": reg.city_name, "tz": reg.tz.key,
            "districts": reg.districts, "streets": reg.streets, "communities": reg.communities,
            "grid_places": [[getattr(p, f) for f in p.__slots__] for p in reg.grid_places],
            "departments": reg.departments, "dept_of_category": reg.dept_of_category,
            "workers": [[getattr(w, f) for f in w.__slots__] for w in reg.workers.values()],
            "workers_of_grid": reg.workers_of_grid, "duty_officer": reg.duty_officer,
            "kinds": reg.kinds,
            "owners": [[getattr(o, f) for f in o.__slots__] for o in reg.owners.values()],
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
        elif depth < 2 and hasattr(obj, "__dict__"):
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
