"""The big screen's map, drawn by the console itself (SVG; no map tiles: the operations
centres' machines have no internet). The registry's sensors give the extent and where each
district's and street's name goes (the middle of its sensors); open incidents are dots at
their lat/lon, coloured by severity."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.core.identity import Scope
from pipeline.core.models import Tier
from pipeline.core.registry import Registry

WIDTH, HEIGHT, MARGIN = 800, 560, 24
MAX_STREET_NAMES = 60          # more would be unreadable: then only the districts are named


@dataclass(frozen=True, slots=True)
class Label:
    x: float
    y: float
    name: str
    code: str


class CityMap:
    def __init__(self, registry: Registry) -> None:
        lat = np.frombuffer(registry.lat, dtype=np.float32).astype(float)
        lon = np.frombuffer(registry.lon, dtype=np.float32).astype(float)
        grid = np.frombuffer(registry.grid_of, dtype=np.uint32)
        placed = np.isfinite(lat) & np.isfinite(lon) & (lat != 0) & (lon != 0)
        self.lat0, self.lat1 = (float(lat[placed].min()), float(lat[placed].max())) if placed.any() else (0.0, 1.0)
        self.lon0, self.lon1 = (float(lon[placed].min()), float(lon[placed].max())) if placed.any() else (0.0, 1.0)
        district_of = np.array([p.district for p in registry.grid_places])
        street_of = np.array([p.street for p in registry.grid_places])
        self.districts = self._labels(registry.districts, district_of[grid], lat, lon, placed)
        self.streets = self._labels({c: n for c, (n, _) in registry.streets.items()},
                                    street_of[grid], lat, lon, placed)
        self.street_district = {c: d for c, (_, d) in registry.streets.items()}
        self.street_of_community = {c: s for c, (_, s) in registry.communities.items()}

    def xy(self, lat: float, lon: float) -> tuple[float, float]:
        w, h = WIDTH - 2 * MARGIN, HEIGHT - 2 * MARGIN
        x = MARGIN + (lon - self.lon0) / ((self.lon1 - self.lon0) or 1) * w
        y = MARGIN + (self.lat1 - lat) / ((self.lat1 - self.lat0) or 1) * h
        return round(x, 1), round(y, 1)

    def _labels(self, names: dict[str, str], codes: np.ndarray, lat: np.ndarray, lon: np.ndarray,
                placed: np.ndarray) -> list[Label]:
        out = []
        for code, name in names.items():
            mine = placed & (codes == code)
            if mine.any():
                out.append(Label(*self.xy(float(lat[mine].mean()), float(lon[mine].mean())),
                                 name, code))
        return out

    def draw(self, points: list[dict], scope: Scope) -> dict:
        """What the template draws: dots, district names, street names (within the scope)."""
        def mine(street: str) -> bool:
            if scope.tier is Tier.district:
                return self.street_district.get(street) in scope.codes
            if scope.tier is Tier.community:     # the street its communities are in
                return any(self.street_of_community.get(c) == street for c in scope.codes)
            if scope.tier in (Tier.street, Tier.grid):
                return street in scope.codes or street in scope.streets or scope.tier is Tier.grid
            return True
        streets = [s for s in self.streets if mine(s.code)]
        dots = []
        for p in points:
            x, y = self.xy(p["lat"], p["lon"])
            dots.append({**p, "x": x, "y": y})
        return {"width": WIDTH, "height": HEIGHT, "dots": dots, "districts": self.districts,
                "streets": streets if len(streets) <= MAX_STREET_NAMES else []}
