"""The city registry: districts, streets, communities, micro-grids, sensors, departments, on-call.

Readings name only a sensor; the registry says where it sits and who answers for it. The format
is in docs/registry.md. Sensors are stored column-wise (one array or list per field, indexed by a
dense sensor number) because a city registry has millions of rows and the engine's state is
indexed by the same number.
"""

from __future__ import annotations

import csv
import re
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, ClassVar
from zoneinfo import ZoneInfo

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.core import registry_cache
from pipeline.core.columns import SensorIndex, SparseAttrs, Strings
from pipeline.core.models import SENSOR_ID_PATTERN, Category
from rules.yamlfile import ConfigError, Located, load_yaml, pydantic_error

SENSOR_COLUMNS = ["sensor_id", "kind", "grid", "gateway_id", "lat", "lon", "address", "building",
                  "owner", "owner_contact", "attrs"]
FIXTURE = Path(__file__).parents[1] / "fixtures" / "chengdu" / "registry.yaml"
_ID = re.compile(SENSOR_ID_PATTERN)
_WORKER_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
_SHIFT = re.compile(r"^(\d\d):(\d\d)-(\d\d):(\d\d)$")


# ---- registry.yaml schema (validated strictly; errors carry the line) ----------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GridSpec(_Strict):
    code: str
    name: str
    households: int | None = Field(default=None, ge=0)


class CommunitySpec(_Strict):
    code: str
    name: str
    grids: list[GridSpec] = []


class StreetSpec(_Strict):
    code: str
    name: str
    duty_officer: str | None = None
    communities: list[CommunitySpec] = []


class DistrictSpec(_Strict):
    code: str
    name: str
    streets: list[StreetSpec] = []


class DepartmentSpec(_Strict):
    id: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    name: str
    categories: list[Category]


def _recipient_id(v: str) -> str:
    if not _WORKER_ID.match(v):
        raise ValueError("worker id or owner id: lower-case letters, digits and '-', up to 64 "
                         "(a push topic level)")
    return v


RecipientId = Annotated[str, AfterValidator(_recipient_id)]


class WorkerSpec(_Strict):
    id: RecipientId
    name: str
    phone: str | None = None
    grids: list[str] = []
    shift: str = "00:00-24:00"
    backup: str | None = None
    channels: list[str] = []

    @field_validator("shift")
    @classmethod
    def _shift(cls, v: str) -> str:
        m = _SHIFT.match(v)
        if not m or int(m[1]) > 24 or int(m[3]) > 24 or int(m[2]) > 59 or int(m[4]) > 59:
            raise ValueError('shift must look like "08:00-20:00" (local time; may cross midnight)')
        return v


class OwnerSpec(_Strict):
    """A sensor's responsible party (项目负责人, a building's property manager): who a route with
    `notify: [owner]` pushes to. Its sensors are the rows whose `owner` cell is its `name`."""

    id: RecipientId
    name: str
    contact: str | None = None
    phone: str | None = None
    channels: list[str] = []


class CitySpec(_Strict):
    code: str
    name: str


class RegistrySpec(_Strict):
    city: CitySpec
    timezone: str = "Asia/Shanghai"
    departments: list[DepartmentSpec] = []
    districts: list[DistrictSpec]
    workers: list[WorkerSpec] = []
    owners: list[OwnerSpec] = []
    sensors: str = "sensors.csv"


# ---- the loaded registry -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Place:
    """A micro-grid with every level above it: what a notice names."""

    district: str
    district_name: str
    street: str
    street_name: str
    community: str
    community_name: str
    grid: str
    grid_name: str


@dataclass(frozen=True, slots=True)
class Worker:
    id: str
    name: str
    phone: str | None
    grids: tuple[str, ...]
    start_min: int          # shift start, minutes after local midnight
    end_min: int            # shift end; < start when the shift crosses midnight
    backup: str | None
    channels: tuple[str, ...]

    def on_duty(self, minute_of_day: int) -> bool:
        s, e = self.start_min, self.end_min
        if s == e or (s == 0 and e == 1440):
            return True
        if s < e:
            return s <= minute_of_day < e
        return minute_of_day >= s or minute_of_day < e


@dataclass(frozen=True, slots=True)
class Owner:
    id: str                 # the owner notice's target, and `by` of the owner's acknowledgement
    name: str               # the sensors.csv `owner` cell of its sensors
    contact: str | None
    phone: str | None
    channels: tuple[str, ...]


@dataclass
class Registry:
    city_code: str
    city_name: str
    tz: ZoneInfo
    districts: dict[str, str]                 # code -> name
    streets: dict[str, tuple[str, str]]       # code -> (name, district code)
    communities: dict[str, tuple[str, str]]   # code -> (name, street code)
    # The levels below the streets grow with the city. Parsed, they are lists and dicts; loaded
    # from the compiled registry, mapped records read on demand (registry_cache.GridPlaces,
    # GridWorkers; columns.Keyed), so a worker holds only the grids and people it meets.
    grid_places: Sequence[Place]              # dense grid number -> Place
    grid_index: Mapping[str, int]
    departments: dict[str, str]               # id -> name
    dept_of_category: dict[str, str]          # category -> department id
    workers: Mapping[str, Worker]
    workers_of_grid: Mapping[str, list[str]]
    duty_officer: dict[str, str]              # street code -> worker id
    # sensors, column-wise, indexed by dense sensor number (pipeline/core/columns.py: no Python
    # object per sensor; memory-mapped from the compiled registry, pipeline/core/registry_cache.py)
    sensor_ids: Strings = field(default_factory=lambda: Strings.of([]))
    index: SensorIndex = field(default_factory=lambda: SensorIndex.of([]))
    kinds: list[str] = field(default_factory=list)          # dense kind number -> kind
    kind_of: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    grid_of: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    gateway_of: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    gateways: Strings = field(default_factory=lambda: Strings.of([]))
    gateway_index: SensorIndex = field(default_factory=lambda: SensorIndex.of([]))   # id -> number
    lat: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    lon: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    address: Strings = field(default_factory=lambda: Strings.of([]))
    building: Strings = field(default_factory=lambda: Strings.of([]))
    owner: Strings = field(default_factory=lambda: Strings.of([]))
    owner_contact: Strings = field(default_factory=lambda: Strings.of([]))
    # sparse: most sensors have none
    attrs: SparseAttrs = field(default_factory=lambda: SparseAttrs(np.zeros(0, np.int64), Strings.of([]),
                                                                    _parse_attrs))
    source: str = ""
    owners: Mapping[str, Owner] = field(default_factory=dict)        # owner id -> Owner
    owner_named: Mapping[str, Owner] = field(default_factory=dict)   # `owner` cell -> Owner

    def __len__(self) -> int:
        return len(self.sensor_ids)

    def place_of(self, idx: int) -> Place:
        return self.grid_places[self.grid_of[idx]]

    def kind_number(self, kind: str) -> int:
        return self.kinds.index(kind)

    def sensors_of_kinds(self, kinds: Iterable[str]) -> list[int]:
        wanted = [self.kinds.index(k) for k in kinds if k in self.kinds]
        if not wanted or not len(self.kind_of):
            return []
        kind_of = np.frombuffer(self.kind_of, dtype=np.uint8)
        return np.flatnonzero(np.isin(kind_of, wanted)).tolist()

    BASE_FACTS: ClassVar[tuple[str, ...]] = ("id", "kind", "building", "owner", "gateway")

    def sensor_facts(self, idx: int) -> dict[str, Any]:
        """What a rule may read as `sensor.*`: its attrs plus the registry columns."""
        facts = {"id": self.sensor_ids[idx], "kind": self.kinds[self.kind_of[idx]],
                 "building": self.building[idx] or None, "owner": self.owner[idx] or None,
                 "gateway": self.gateways[self.gateway_of[idx]] if self.gateway_of[idx] >= 0 else None}
        facts.update(self.attrs.get(idx, {}))
        return facts

    def owner_of(self, idx: int) -> Owner | None:
        """The responsible party of sensor ``idx``: the `owners:` entry its `owner` cell names."""
        return self.owner_named.get(self.owner[idx]) if self.owner[idx] else None

    def streets_of_sensors(self) -> np.ndarray:
        """Per sensor number, the number of its street in ``sorted(self.streets)``."""
        order = {code: i for i, code in enumerate(sorted(self.streets))}
        per_grid = np.array([order[p.street] for p in self.grid_places], dtype=np.int64)
        return per_grid[np.frombuffer(self.grid_of, dtype=np.uint32)] if len(self) else per_grid[:0]

    def subset(self, keep: Iterable[int]) -> Registry:
        """The same city with only the given sensors (renumbered densely, in order): the part
        of the registry one Kafka partition's engine owns. Places, workers and gateways stay
        whole, so notices name places and people exactly as the full registry does."""
        keep = np.sort(np.asarray(keep if isinstance(keep, np.ndarray) else list(keep), dtype=np.int64))
        ids = self.sensor_ids.take(keep)
        return Registry(self.city_code, self.city_name, self.tz, self.districts, self.streets,
                        self.communities, self.grid_places, self.grid_index, self.departments,
                        self.dept_of_category, self.workers, self.workers_of_grid,
                        self.duty_officer, sensor_ids=ids, index=SensorIndex.of(ids),
                        kinds=list(self.kinds), kind_of=self.kind_of[keep],
                        grid_of=self.grid_of[keep], gateway_of=self.gateway_of[keep],
                        gateways=self.gateways, gateway_index=self.gateway_index,
                        lat=self.lat[keep], lon=self.lon[keep],
                        address=self.address.take(keep), building=self.building.take(keep),
                        owner=self.owner.take(keep), owner_contact=self.owner_contact.take(keep),
                        attrs=self.attrs.take(keep), source=self.source, owners=self.owners,
                        owner_named=self.owner_named)

    def on_call(self, grid: str, street: str, at_ms: int) -> Worker | None:
        """The worker to push to: on-shift grid worker, else an on-shift backup, else the
        street's duty officer (README, "The city registry")."""
        local = datetime.fromtimestamp(at_ms / 1000, self.tz)
        minute = local.hour * 60 + local.minute
        primaries = [self.workers[w] for w in self.workers_of_grid.get(grid, ())]
        for w in primaries:
            if w.on_duty(minute):
                return w
        for w in primaries:
            b = self.workers.get(w.backup or "")
            if b is not None and b.on_duty(minute):
                return b
        officer = self.duty_officer.get(street)
        return self.workers.get(officer) if officer else None


def load(path: str | Path | None = None, known_kinds: Iterable[str] | None = None) -> Registry:
    """Load and check a registry folder or registry.yaml; ConfigError names file and line.
    The compiled form (pipeline/core/registry_cache.py) is used when the files have not changed
    since it was written, and written when it is missing."""
    path = Path(path) if path else FIXTURE
    if path.is_dir():
        path = path / "registry.yaml"
    kinds = set(known_kinds) if known_kinds is not None else None
    try:
        folder: Path | None = registry_cache.folder_for(path, kinds)
    except OSError:
        folder = None                       # load_yaml says what is wrong with the file
    if folder is not None:
        reg = registry_cache.open_compiled(folder, Registry, Place, Worker, _parse_attrs, Owner)
        if reg is not None:
            reg.source = str(path)
            return reg
    doc = load_yaml(path)
    if not isinstance(doc.data, dict):
        raise ConfigError(path, 1, "a registry is a mapping with city, districts, workers, sensors")
    try:
        spec = RegistrySpec.model_validate(doc.data)
    except ValidationError as exc:
        raise pydantic_error(doc, exc) from None
    reg = _places(doc, spec)
    sensors_path = (path.parent / spec.sensors).resolve()
    try:
        seen = registry_cache.seen(sensors_path)
    except OSError:
        seen = None                         # _load_sensors says what is wrong with the file
    _load_sensors(reg, sensors_path, kinds)
    if folder is not None and seen is not None:
        registry_cache.write_compiled(folder, reg, sensors_path, seen)
    reg.source = str(path)
    return reg


def _places(doc: Located, spec: RegistrySpec) -> Registry:
    try:
        tz = ZoneInfo(spec.timezone)
    except Exception:
        raise doc.error(("timezone",), f"unknown time zone {spec.timezone!r}; use e.g. Asia/Shanghai") from None
    if not re.fullmatch(r"\d{6}", spec.city.code):
        raise doc.error(("city", "code"), "city code must be 6 digits (GB/T 2260), e.g. \"510100\"")
    # built here, read-only (Mapping, Sequence) once made: a compiled registry's are columns
    grid_places: list[Place] = []
    grid_index: dict[str, int] = {}
    workers: dict[str, Worker] = {}
    workers_of_grid: dict[str, list[str]] = {}
    owners: dict[str, Owner] = {}
    owner_named: dict[str, Owner] = {}
    reg = Registry(city_code=spec.city.code, city_name=spec.city.name, tz=tz, districts={},
                   streets={}, communities={}, grid_places=grid_places, grid_index=grid_index,
                   departments={}, dept_of_category={}, workers=workers,
                   workers_of_grid=workers_of_grid, duty_officer={}, owners=owners,
                   owner_named=owner_named)
    seen: dict[str, tuple] = {}

    def unique(code: str, loc: tuple) -> None:
        if code in seen:
            raise doc.error(loc, f"code {code} is used twice (first at line {doc.line(seen[code])})")
        seen[code] = loc

    for di, d in enumerate(spec.districts):
        dloc = ("districts", di, "code")
        if not re.fullmatch(r"\d{6}", d.code) or d.code[:4] != spec.city.code[:4]:
            raise doc.error(dloc, f"district code {d.code} must be 6 digits starting with the "
                            f"city's {spec.city.code[:4]} (GB/T 2260), e.g. 510104 锦江区")
        unique(d.code, dloc)
        reg.districts[d.code] = d.name
        for si, s in enumerate(d.streets):
            sloc = ("districts", di, "streets", si, "code")
            if not re.fullmatch(r"\d{9}", s.code) or not s.code.startswith(d.code):
                raise doc.error(sloc, f"street code {s.code} must have 9 digits and start with its "
                                f"district code {d.code}")
            unique(s.code, sloc)
            reg.streets[s.code] = (s.name, d.code)
            if s.duty_officer:
                reg.duty_officer[s.code] = s.duty_officer
            for ci, c in enumerate(s.communities):
                cloc = ("districts", di, "streets", si, "communities", ci, "code")
                if not re.fullmatch(r"\d{12}", c.code) or not c.code.startswith(s.code):
                    raise doc.error(cloc, f"community code {c.code} must have 12 digits and start "
                                    f"with its street code {s.code}")
                unique(c.code, cloc)
                reg.communities[c.code] = (c.name, s.code)
                for gi, g in enumerate(c.grids):
                    gloc = cloc[:-1] + ("grids", gi, "code")
                    if not re.fullmatch(r"\d{15}", g.code) or not g.code.startswith(c.code):
                        raise doc.error(gloc, f"grid code {g.code} must have 15 digits and start "
                                        f"with its community code {c.code}")
                    unique(g.code, gloc)
                    grid_index[g.code] = len(grid_places)
                    grid_places.append(Place(d.code, d.name, s.code, s.name, c.code, c.name,
                                             g.code, g.name))
    for i, dep in enumerate(spec.departments):
        if dep.id in reg.departments:
            raise doc.error(("departments", i, "id"), f"department {dep.id} is listed twice")
        reg.departments[dep.id] = dep.name
        for cat in dep.categories:
            if cat.value in reg.dept_of_category:
                raise doc.error(("departments", i, "categories"),
                                f"category {cat.value} already belongs to department "
                                f"{reg.dept_of_category[cat.value]}; one department per category")
            reg.dept_of_category[cat.value] = dep.id
    for i, w in enumerate(spec.workers):
        if w.id in reg.workers:
            raise doc.error(("workers", i, "id"), f"worker {w.id} is listed twice")
        m = _SHIFT.match(w.shift)       # (ignored below: never None, WorkerSpec._shift matched it)
        workers[w.id] = Worker(w.id, w.name, w.phone, tuple(w.grids),
                               int(m[1]) * 60 + int(m[2]), int(m[3]) * 60 + int(m[4]),  # type: ignore[index]
                               w.backup, tuple(w.channels))
        for gi, g in enumerate(w.grids):
            if g not in reg.grid_index:
                raise doc.error(("workers", i, "grids", gi), f"worker {w.id} covers unknown grid {g}")
            workers_of_grid.setdefault(g, []).append(w.id)
    for i, w in enumerate(spec.workers):
        if w.backup and w.backup not in reg.workers:
            raise doc.error(("workers", i, "backup"), f"backup {w.backup} is not a listed worker")
    for i, o in enumerate(spec.owners):
        if o.id in reg.owners:
            raise doc.error(("owners", i, "id"), f"owner {o.id} is listed twice")
        if o.id in reg.workers:
            raise doc.error(("owners", i, "id"), f"owner {o.id} is also a worker's id: both are "
                            "push recipients (cityops/push/{id}); give the owner another")
        if o.name in reg.owner_named:
            raise doc.error(("owners", i, "name"), f"owner name {o.name} is used twice (by "
                            f"{reg.owner_named[o.name].id}): sensors name their owner by it")
        owners[o.id] = owner_named[o.name] = Owner(o.id, o.name, o.contact, o.phone,
                                                   tuple(o.channels))
    for di, d in enumerate(spec.districts):
        for si, s in enumerate(d.streets):
            if s.duty_officer and s.duty_officer not in reg.workers:
                raise doc.error(("districts", di, "streets", si, "duty_officer"),
                                f"duty officer {s.duty_officer} is not a listed worker")
    return reg


def _parse_attrs(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        key, eq, raw = part.partition("=")
        key, raw = key.strip(), raw.strip()
        if not eq or not re.fullmatch(r"[a-z_][a-z0-9_]*", key):
            raise ValueError(f"attrs entry {part!r} must be key=value with a lower-case key")
        if raw in ("true", "false"):
            out[key] = raw == "true"
        else:
            try:
                out[key] = float(raw) if any(c in raw for c in ".eE") else int(raw)
            except ValueError:
                out[key] = raw
    return out


def _load_sensors(reg: Registry, path: Path, known_kinds: set[str] | None) -> None:
    try:
        f = path.open(encoding="utf-8", newline="")
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read the sensors file: {exc.strerror}") from None
    kind_number: dict[str, int] = {}
    gateway_number: dict[str, int] = {}
    gateways: list[str] = []
    with f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header != SENSOR_COLUMNS:
            raise ConfigError(path, 1, "header must be exactly: " + ",".join(SENSOR_COLUMNS))
        grid_index = reg.grid_index
        index: dict[str, int] = {}
        ids: list[str] = []
        kind_of, grid_of, gateway_of = array("B"), array("I"), array("i")
        lat_col, lon_col = array("f"), array("f")
        address_col: list[str] = []
        building_col: list[str] = []
        owner_col: list[str] = []
        contact_col: list[str] = []
        attrs_rows: list[int] = []
        attrs_text: list[str] = []
        for line, row in enumerate(rows, start=2):
            if len(row) != 11:
                if not row:
                    continue
                raise ConfigError(path, line, f"expected 11 columns, found {len(row)}")
            sid, kind, grid, gw, lat, lon, address, building, owner, contact, attrs = row
            if not _ID.match(sid):
                raise ConfigError(path, line, f"sensor id {sid!r}: letters, digits, '_.:-', up to 128")
            if sid in index:
                raise ConfigError(path, line, f"sensor {sid} is listed twice (first at line "
                                  f"{index[sid] + 2})")
            k = kind_number.get(kind)
            if k is None:
                if known_kinds is not None and kind not in known_kinds:
                    raise ConfigError(path, line, f"unknown sensor kind {kind!r}; the rule packs "
                                      f"declare: {', '.join(sorted(known_kinds))}")
                k = kind_number[kind] = len(reg.kinds)
                reg.kinds.append(kind)
            g = grid_index.get(grid)
            if g is None:
                raise ConfigError(path, line, f"sensor {sid} is in unknown grid {grid!r}; add the "
                                  "grid to registry.yaml or fix the code")
            try:
                la, lo = float(lat), float(lon)
            except ValueError:
                raise ConfigError(path, line, f"lat/lon must be decimal degrees, got {lat!r}, {lon!r}") from None
            if not (-90 <= la <= 90 and -180 <= lo <= 180):
                raise ConfigError(path, line, f"lat/lon out of range: {la}, {lo}")
            if gw:
                gn = gateway_number.get(gw)
                if gn is None:
                    gn = gateway_number[gw] = len(gateways)
                    gateways.append(gw)
            else:
                gn = -1
            n = len(ids)
            if attrs:
                try:
                    _parse_attrs(attrs)
                except ValueError as exc:
                    raise ConfigError(path, line, str(exc)) from None
                attrs_rows.append(n)
                attrs_text.append(attrs)
            index[sid] = n
            ids.append(sid)
            kind_of.append(k)
            grid_of.append(g)
            gateway_of.append(gn)
            lat_col.append(la)
            lon_col.append(lo)
            address_col.append(address)
            building_col.append(building)
            owner_col.append(owner)
            contact_col.append(contact)
        if len(reg.kinds) > 255:
            raise ConfigError(path, None, "more than 255 sensor kinds")
    del index
    reg.gateways = Strings.of(gateways)
    reg.gateway_index = SensorIndex.of(reg.gateways)
    reg.sensor_ids = Strings.of(ids)
    reg.index = SensorIndex.of(reg.sensor_ids)
    del ids
    reg.kind_of = np.frombuffer(kind_of, dtype=np.uint8)
    reg.grid_of = np.frombuffer(grid_of, dtype=np.uint32)
    reg.gateway_of = np.frombuffer(gateway_of, dtype=np.int32)
    reg.lat = np.frombuffer(lat_col, dtype=np.float32)
    reg.lon = np.frombuffer(lon_col, dtype=np.float32)
    # interned: owners, buildings and contacts repeat; addresses too, a building's sensors share one
    reg.address = Strings.of(address_col, intern=True)
    reg.building = Strings.of(building_col, intern=True)
    reg.owner = Strings.of(owner_col, intern=True)
    reg.owner_contact = Strings.of(contact_col, intern=True)
    reg.attrs = SparseAttrs(np.array(attrs_rows, dtype=np.int64), Strings.of(attrs_text), _parse_attrs)


def check_districts(packs: Iterable[Any], sources: Iterable[str], registry: Registry,
                    params: str | Path | None = None) -> None:
    """ConfigError, at the line that names it, for a pack parameter set for a district the
    registry does not hold: a mistyped code would otherwise silently never apply."""
    for pack, source in zip(packs, sources, strict=False):
        for code in pack.districts:
            if code in registry.districts:
                continue
            doc = load_yaml(params) if params else None
            if doc is None or code not in ((doc.data or {}).get(pack.pack) or {}).get("districts", {}):
                doc = load_yaml(source)
                loc: tuple = ("districts", code)
            else:
                loc = (pack.pack, "districts", code)
            raise doc.error(loc, f"no district {code} in the registry {registry.source}; its "
                            f"districts are {', '.join(sorted(registry.districts))}")
