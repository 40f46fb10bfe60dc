"""The words a rule and an alert share: severities (四级预警) and categories.

They are the rule language's (a rule names its `category` and `severity`) and the public
contracts' (pipeline.core.models re-exports them); they live here so that rules/ imports nothing
from pipeline."""

from __future__ import annotations

from enum import Enum


class Severity(str, Enum):
    """四级预警 (突发事件应对法): blue IV (lowest) .. red I (highest)."""

    blue = "blue"
    yellow = "yellow"
    orange = "orange"
    red = "red"

    @property
    def rank(self) -> int:
        return _SEVERITY_RANK[self]

    @property
    def level(self) -> str:
        """The official level: IV 一般, III 较大, II 重大, I 特别重大."""
        return ("IV", "III", "II", "I")[self.rank]

    @property
    def chinese(self) -> str:
        return ("蓝色预警", "黄色预警", "橙色预警", "红色预警")[self.rank]

    @property
    def fiware(self) -> str:
        """FIWARE smart-data-models Alert severity, for systems that speak it."""
        return ("low", "medium", "high", "critical")[self.rank]

    @classmethod
    def of_rank(cls, rank: int) -> Severity:
        return SEVERITIES[max(0, min(3, rank))]


SEVERITIES = (Severity.blue, Severity.yellow, Severity.orange, Severity.red)
_SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}


class Category(str, Enum):
    """What an alert is about; decides the department sub-centre (registry `departments`)."""

    gas = "gas"
    waterlogging = "waterlogging"
    flood = "flood"
    weather = "weather"
    environment = "environment"
    construction = "construction"
    facility = "facility"
    security = "security"
    device = "device"

    @property
    def fiware(self) -> str:
        return _FIWARE_CATEGORY[self]

    @property
    def chinese(self) -> str:
        return _CATEGORY_CN[self]


_FIWARE_CATEGORY = {
    Category.gas: "security", Category.waterlogging: "weather", Category.flood: "naturalDisaster",
    Category.weather: "weather", Category.environment: "environment",
    Category.construction: "security", Category.facility: "security",
    Category.security: "security", Category.device: "security",
}
_CATEGORY_CN = {
    Category.gas: "燃气安全", Category.waterlogging: "道路积水", Category.flood: "防汛",
    Category.weather: "气象", Category.environment: "生态环境", Category.construction: "智慧工地",
    Category.facility: "城市部件", Category.security: "社会治安", Category.device: "设备运维",
}
