"""Runtime configuration: one small validated model, from a YAML file and CITYOPS_* variables.

    cityops run --config cityops.yaml          # file
    CITYOPS_MQTT__URL=mqtt://10.0.0.5:1883     # environment, nested with "__"; wins over the file

Checked once at start; a mistake stops the start with the file and line (or the variable) and
what to fix. Secrets (the MQTT password) are SecretStr: never printed, never logged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, ValidationError,
                      field_validator)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from pipeline.engine import EngineSettings
from pipeline.yamlfile import ConfigError, load_yaml, pydantic_error
from rules.schema import Duration


class _Part(BaseModel):
    # Defaults are validated like values (as pydantic-settings does): durations are written as
    # durations ("30s"), never as bare numbers, which a Duration reads as seconds.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class MqttSettings(_Part):
    url: str | None = Field(default=None, description="mqtt://host:port of the broker; none: "
                            "start the embedded broker on `embedded`")
    client_id: str = Field(default="cityops", pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                           description="also the persistent session's name: keep it stable")
    username: str | None = None
    password: SecretStr | None = None
    prefix: str = Field(default="cityops", pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")
    # BeforeValidator: CITYOPS_MQTT__PROTOCOL=311 arrives as text
    protocol: Annotated[Literal[5, 311], BeforeValidator(lambda v: int(v) if isinstance(v, str) and v.isdigit() else v)] = 5
    shared_group: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]+$", description=(
        "MQTT 5 shared subscription group: processes in one group split the readings. Sensor "
        "state is per process, so only split by topic (see README, Live runtime)"))
    keepalive: int = Field(default=30, ge=5, le=3600)
    session_expiry: Duration = Field(default="7d", description="how long the broker "
                                     "keeps readings for this pipeline while it is away")
    max_inflight: int = Field(default=1000, ge=1, le=65535)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        u = urlsplit(v)
        if u.scheme not in ("mqtt", "tcp") or not u.hostname:
            raise ValueError("write the broker as mqtt://host:port, e.g. mqtt://127.0.0.1:1883")
        if u.password:
            raise ValueError("put the password in mqtt.password or CITYOPS_MQTT__PASSWORD, "
                             "not in the URL (URLs end up in logs)")
        return v

    @property
    def host(self) -> str:
        return urlsplit(self.url or "").hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.url or "").port or 1883


class EmbeddedSettings(_Part):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)


class HttpSettings(_Part):
    host: str = Field(default="127.0.0.1", description="health, metrics and acks; localhost "
                      "unless you put a proxy in front")
    port: int = Field(default=9464, ge=0, le=65535, description="0: no HTTP endpoint")


class StateSettings(_Part):
    path: Path = Path(".run/cityops-state.sqlite")
    snapshot_every: Duration = Field(default="30s", description="engine snapshot cadence; "
                                     "the journal covers the time between")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CITYOPS_", env_nested_delimiter="__",
                                      extra="forbid", frozen=True)

    mqtt: MqttSettings = MqttSettings()
    embedded: EmbeddedSettings = EmbeddedSettings()
    http: HttpSettings = HttpSettings()
    state: StateSettings = StateSettings()
    # Live, timers wait `allowed_lateness` for stragglers before they fire: escalations and
    # reminders come that much after their deadline. 10 s here (60 s in replay) keeps people's
    # deadlines close while a gateway's few seconds of delay still count.
    engine: EngineSettings = EngineSettings(allowed_lateness="10s")
    registry: Path | None = Field(default=None, description="registry folder or registry.yaml "
                                  "(default: the bundled Chengdu fixture)")
    packs: list[Path] = []
    params: Path | None = None
    routing: Path | None = None
    tick: Duration = Field(default="1s", description="how often the clock moves the watermark "
                           "(escalations, reminders, absence run on it when no readings come)")
    max_batch: int = Field(default=5_000, ge=1, description="readings payloads per engine call")
    max_wait: Duration = Field(default="20ms", description="how long a batch waits to fill")
    console: bool = Field(default=False, description="print every notice on standard output")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return env_settings, init_settings        # the environment overrides the file


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """The file (if any), overridden by CITYOPS_* variables, overridden by ``overrides`` (the
    command line's flags, already typed)."""
    data: dict[str, Any] = {}
    doc = None
    if path is not None:
        doc = load_yaml(path)
        if doc.data is not None and not isinstance(doc.data, dict):
            raise ConfigError(path, 1, "the config file is a mapping (mqtt:, http:, state:, …)")
        data = dict(doc.data or {})
    settings = _validated(data, doc)
    flags = {k: v for k, v in overrides.items() if v is not None and v != []}
    return settings.model_copy(update=flags) if flags else settings


def _validated(data: dict[str, Any], doc: Any) -> Settings:
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = err["loc"]
        if doc is not None and doc.line(loc) and _in_file(doc.data, loc):
            raise pydantic_error(doc, exc) from None
        var = "CITYOPS_" + "__".join(str(x).upper() for x in loc)
        where = var if var in os.environ else ".".join(str(x) for x in loc)
        raise ConfigError(where, None, f"{err['msg']}") from None
    return settings


def _in_file(data: Any, loc: tuple) -> bool:
    node = data
    for item in loc[:1]:
        if not isinstance(node, dict) or item not in node:
            return False
    return True
