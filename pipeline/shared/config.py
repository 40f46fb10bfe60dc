"""Runtime configuration: one small validated model, from a YAML file and CITYOPS_* variables.

    cityops run --config cityops.yaml          # file
    CITYOPS_MQTT__URL=mqtt://10.0.0.5:1883     # environment, nested with "__"; wins over the file

Checked once at start; a mistake stops the start with the file and line (or the variable) and
what to fix. Secrets (the MQTT password) are SecretStr: never printed, never logged.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, SecretStr,
                      ValidationError, field_validator, model_validator)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from pipeline.core.engine import EngineSettings
from rules.schema import Duration
from rules.yamlfile import ConfigError, load_yaml, pydantic_error


class _Part(BaseModel):
    # Defaults are validated like values (as pydantic-settings does): durations are written as
    # durations ("30s"), never as bare numbers, which a Duration reads as seconds.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class MqttSettings(_Part):
    url: str | None = Field(default=None, description="mqtt://host:port of the broker; none: "
                            "start the embedded broker on `embedded`")
    client_id: str = Field(default="cityops", pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                           description="also the persistent session's name: keep it stable; "
                           "unset: cityops-<a digest of state.path> (see session_named)")
    username: str | None = None
    password: SecretStr | None = None
    prefix: str = Field(default="cityops", pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")
    # BeforeValidator: CITYOPS_MQTT__PROTOCOL=311 arrives as text
    protocol: Annotated[Literal[5, 311],
                        BeforeValidator(lambda v: int(v) if isinstance(v, str) and v.isdigit() else v)] = 5
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
    max_connections: int = Field(default=100, ge=2, le=10000, description="connections open at "
                                 "once; a new one past it closes the oldest idle one")
    header_timeout: Duration = Field(default="10s", description="a connection sends its whole "
                                     "request within this, or is closed")
    keep_alive: Duration = Field(default="5s", description="an idle connection between "
                                 "requests is closed after this")


class StateSettings(_Part):
    path: Path = Path(".run/cityops-state.sqlite")
    snapshot_every: Duration = Field(default="30s", description="engine snapshot cadence; "
                                     "the journal covers the time between")
    snapshot_bytes: int = Field(default=64 * 2**20, ge=1, description="a snapshot also once the "
                                "journal since the last one holds this many bytes")


class InfluxSettings(_Part):
    """History: readings and notices into InfluxDB 2.x (connectors/influx.py). No url: off."""

    url: str | None = Field(default=None, description="http(s)://host:8086 of InfluxDB 2.x")
    token: SecretStr | None = Field(default=None, description="API token with write access to "
                                    "the bucket; or CITYOPS_INFLUX__TOKEN")
    org: str = "cityops"
    bucket: str = "cityops"
    batch_size: int = Field(default=20_000, ge=1, le=100_000, description="points per write "
                            "(each request costs the client ~0.7 ms of CPU: fewer, fuller ones)")
    flush_interval: Duration = Field(default="1s", description="a batch waits at most this long "
                                     "to fill")
    readings_every: Duration = Field(default="0s", description="down-sampling: one point per "
                                     "sensor per interval (latest value and max); 0s: every "
                                     "reading")
    buffer_max: int = Field(default=1_000_000, ge=1, description="points held while InfluxDB "
                            "is slow or away; beyond it the oldest are dropped and counted")
    retry_initial: Duration = Field(default="1s", description="first wait after a failed write; "
                                    "doubles up to retry_max, retried until written")
    retry_max: Duration = Field(default="30s")
    timeout: Duration = Field(default="10s", description="per write request")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        u = urlsplit(v)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError("write InfluxDB as http://host:port, e.g. http://127.0.0.1:8086")
        if u.password or u.query:
            raise ValueError("put the token in influx.token or CITYOPS_INFLUX__TOKEN, not in the "
                             "URL (URLs end up in logs)")
        return v


PushChannel = Literal["mqtt", "webhook", "wecom", "dingtalk", "sms"]
PushTier = Literal["city", "district", "street", "dept", "grid", "owner", "community"]
PERSONAL_TIERS = ("grid", "owner")      # pushed to a person (a phone, an app), not a group


def _http_url(v: SecretStr | None) -> SecretStr | None:
    if v is not None:
        u = urlsplit(v.get_secret_value())
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError("an http(s):// address")
    return v


HttpUrlSecret = Annotated[SecretStr | None, AfterValidator(_http_url)]


class WebhookPushSettings(_Part):
    url: HttpUrlSecret = Field(default=None, description="where each push is POSTed as JSON "
                               "(a secret: such URLs often carry a token)")
    secret: SecretStr | None = Field(default=None, description="HMAC-SHA256 key of the "
                                     "X-Cityops-Signature header; the receiver has it too")


class RobotPushSettings(_Part):
    url: HttpUrlSecret = Field(default=None, description="the group robot's webhook address "
                               "(its key/access_token lets anyone post: a secret)")
    robots: dict[str, Annotated[SecretStr, AfterValidator(_http_url)]] = Field(
        default={}, description="recipient id (worker id, street code, ...) -> its own "
        "group's robot, instead of `url`")
    secret: SecretStr | None = Field(default=None, description="DingTalk 加签 secret (SEC...): "
                                     "signs every request; WeCom robots have none")


class SmsPushSettings(_Part):
    url: HttpUrlSecret = Field(default=None, description="the SMS gateway's HTTP endpoint")
    token: SecretStr | None = Field(default=None, description="sent as Authorization: Bearer")
    template: str = Field(default="{title}：读数{value}{unit}，阈值{threshold}{unit}。"
                          "{worker_name}请处置，确认：{ack_url}", max_length=500,
                          description="the text; {names} from connectors.push.fields")
    owner_template: str = Field(default="{title}。{summary}{ack_link}", max_length=500,
                                description="the text to a sensor's owner (tier owner), whose "
                                "summary says what to do; {ack_link}: 确认整改：<link>, when "
                                "there is one")


class AckSettings(_Part):
    users: Path | None = Field(default=None, description="who may acknowledge what besides the "
                               "registry's grid workers, and their HTTP tokens (README: Who may "
                               "acknowledge what)")


class OpscentreSettings(_Part):
    """`cityops console`, the operations centres' web pages (README: The operations-centre
    console). Its users and their scopes are those of `acks.users`, with a `password`."""

    host: str = Field(default="127.0.0.1", description="localhost unless a TLS proxy is in front")
    port: int = Field(default=8080, ge=1, le=65535)
    db: Path = Field(default=Path(".run/console.sqlite"), description="the incidents as the "
                     "console has seen them (SQLite); the session secret is kept beside it")
    client_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                                  description="the persistent MQTT session / Kafka group "
                                  "(default: cityops-console-<a digest of db>)")
    secure_cookie: bool = Field(default=False, description="send the session cookie over "
                                "HTTPS only: set it when a TLS proxy is in front")
    session_hours: float = Field(default=12.0, gt=0, le=24 * 30, description="a login lasts this long")


class PushSettings(_Part):
    """Pushes to on-call grid workers and sensors' owners (pipeline/shared/delivery.py) and
    acknowledge links."""

    enabled: bool = Field(default=False, description="off: grid notices go out on "
                          "{prefix}/push/{worker_id} as every tier's do, without ack links")
    secret: SecretStr | None = Field(default=None, description="signs acknowledge tokens "
                                     "(32+ characters); or CITYOPS_PUSH__SECRET")
    public_url: str | None = Field(default=None, description="where people reach the HTTP port, "
                                   "for the acknowledge link {public_url}/ack?t=...; default "
                                   "http://{http.host}:{http.port}")
    tiers: dict[PushTier, list[PushChannel]] = Field(
        default={"grid": ["mqtt"], "owner": ["mqtt"]}, description="channels per notice tier; "
        "a worker's or owner's own `channels:` in the registry win")
    attempts: int = Field(default=6, ge=1, le=50, description="tries per delivery before its "
                          "dead letter")
    backoff: Duration = Field(default="2s", description="first retry within this (full jitter), "
                              "doubling per try")
    backoff_cap: Duration = Field(default="5m", description="longest wait between tries")
    timeout: Duration = Field(default="10s", description="per request (HTTP) or PUBACK (MQTT)")
    concurrency: int = Field(default=2, ge=1, le=64, description="deliveries in flight per channel")
    ack_ttl: Duration = Field(default="24h", description="how long an acknowledge link works")
    store: Path | None = Field(default=None, description="outbox and timeline (SQLite); default "
                               "next to state.path: <name>-push.sqlite")
    keep: Duration = Field(default="7d", description="finished deliveries and timelines kept")
    webhook: WebhookPushSettings = WebhookPushSettings()
    wecom: RobotPushSettings = RobotPushSettings()
    dingtalk: RobotPushSettings = RobotPushSettings()
    sms: SmsPushSettings = SmsPushSettings()

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, v: str | None) -> str | None:
        if v is not None and (urlsplit(v).scheme not in ("http", "https") or not urlsplit(v).hostname):
            raise ValueError("the base of the acknowledge link, e.g. https://ops.example.cn/cityops")
        return v.rstrip("/") if v else v

    @model_validator(mode="after")
    def _usable(self) -> PushSettings:
        if not self.enabled:
            return self
        if self.secret is None or len(self.secret.get_secret_value()) < 32:
            raise ValueError("push.secret (CITYOPS_PUSH__SECRET) must be set, 32 characters or "
                             "more, when push is enabled: it signs the acknowledge links. Make "
                             "one: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
        for tier, channels in self.tiers.items():
            for ch in channels:
                if ch in ("mqtt", "sms") and tier not in PERSONAL_TIERS:
                    raise ValueError(f"push.tiers.{tier}: {ch} reaches a person (a worker, an "
                                     f"owner); the {tier} tier has its own MQTT topic and no "
                                     "phone number")
        for ch in {c for cs in self.tiers.values() for c in cs}:
            self.check_channel(ch)
        return self

    def check_channel(self, channel: str) -> None:
        """ValueError unless ``channel`` can send with this configuration."""
        if channel not in ("mqtt", "webhook", "wecom", "dingtalk", "sms"):
            raise ValueError(f"unknown push channel {channel!r}: mqtt, webhook, wecom, dingtalk "
                             "or sms")
        if channel == "webhook" and (self.webhook.url is None or self.webhook.secret is None):
            raise ValueError("push.webhook needs url and secret (the receiver checks the signature)")
        if channel in ("wecom", "dingtalk"):
            robot = getattr(self, channel)
            if robot.url is None and not robot.robots:
                raise ValueError(f"push.{channel} needs url (or robots per recipient)")
        if channel == "sms" and self.sms.url is None:
            raise ValueError("push.sms needs url")


class KafkaSettings(_Part):
    """The distributed runtime's broker (`cityops bridge`, `cityops worker`)."""

    bootstrap: str = Field(default="127.0.0.1:9092", pattern=r"^[^,\s]+(,[^,\s]+)*$",
                           description="host:port[,host:port...] of the Kafka brokers")
    prefix: str = Field(default="cityops", pattern=r"^[A-Za-z0-9_-]+$",
                        description="topic prefix: {prefix}.readings, {prefix}.alerts.city, ...")
    partitions: int = Field(default=12, ge=1, le=10_000, description="partitions of the readings "
                            "topic (and of the worker's state); fixed once the topic exists")
    replication: int = Field(default=3, ge=1, le=7, description="replication factor of the "
                             "topics cityops creates (1 on a one-broker test cluster)")
    security_protocol: Literal["PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL", "SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"
    username: str | None = None
    password: SecretStr | None = None
    linger: Duration = Field(default="5ms", description="how long the producer waits to fill a "
                             "batch")


class WorkerSettings(_Part):
    """`cityops worker`: the Faust app on Kafka."""

    app_id: str = Field(default="cityops-worker", pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                        description="consumer group and state topics' name: workers with the same "
                        "id split the partitions")
    data_dir: Path = Path(".run/worker")
    checkpoint_every: Duration = Field(default="5s", description="engine state to the changelog "
                                       "this often; offsets are committed with it")
    checkpoint_piece: int = Field(default=512 * 1024, ge=1024, le=16 * 1024 * 1024, description=(
        "a checkpoint is written in pieces of this many bytes; keep it under the brokers' "
        "max.message.bytes (1 MB by default)"))
    max_batch: int = Field(default=5_000, ge=1, description="records per fetch from Kafka, "
                           "evaluated as one engine call per partition")
    fetch_max_wait: Duration = Field(default="50ms", description="how long a fetch from Kafka "
                                     "waits for records: a bound on a quiet reading's latency")
    session_timeout: Duration = Field(default="6s", description="a worker silent this long "
                                      "is presumed dead and its partitions move (fail-over time)")
    mirror_mqtt: bool = Field(default=False, description="also publish every notice on the MQTT "
                              "tier topics (mqtt.url) for dashboards that speak MQTT")


class BridgeSettings(_Part):
    """`cityops bridge`: MQTT readings into Kafka."""

    shared_group: str = Field(default="cityops-bridge", pattern=r"^[A-Za-z0-9_-]+$",
                              description="bridges in one MQTT 5 shared-subscription group split "
                              "the gateways' traffic")
    max_batch: int = Field(default=5_000, ge=1)
    max_wait: Duration = Field(default="20ms")


class ReloadSettings(_Part):
    """Hot reload of packs, params, routing and registry (README: Hot reload)."""

    watch_every: Duration = Field(default="2s", description="look at the files this often and "
                                  "reload once a change has held still for one more look; 0s: "
                                  "only on SIGHUP or POST /reload. cityops run only (on "
                                  "Kafka every worker would announce the same change)")
    switch_after: Duration = Field(default="10s", description="cityops worker: an announced "
                                   "reload switches every partition at the wall clock of the "
                                   "announcement plus this, in event time (README: Hot reload)")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CITYOPS_", env_nested_delimiter="__",
                                      extra="forbid", frozen=True)

    mqtt: MqttSettings = MqttSettings()
    embedded: EmbeddedSettings = EmbeddedSettings()
    http: HttpSettings = HttpSettings()
    state: StateSettings = StateSettings()
    kafka: KafkaSettings = KafkaSettings()
    worker: WorkerSettings = WorkerSettings()
    bridge: BridgeSettings = BridgeSettings()
    push: PushSettings = PushSettings()
    acks: AckSettings = AckSettings()
    opscentre: OpscentreSettings = OpscentreSettings()
    influx: InfluxSettings = InfluxSettings()
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
    catch_up_quiet: Duration = Field(default="1s", description="after a start or reconnect, the "
                                     "clock moves the watermark only once nothing has arrived "
                                     "for this long (the broker's backlog is in)")
    catch_up_max: Duration = Field(default="2m", description="... or once this long has passed "
                                   "since the connection, whatever still arrives")
    console: bool = Field(default=False, description="print every notice on standard output")
    reload: ReloadSettings = ReloadSettings()

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return env_settings, init_settings        # the environment overrides the file


def session_named(s: Settings) -> Settings:
    """Without an explicit mqtt.client_id, the session is named after the state file: two
    pipelines with their own state never take over each other's MQTT session, and one
    pipeline keeps its session across restarts."""
    if "client_id" in s.mqtt.model_fields_set:
        return s
    digest = hashlib.sha256(str(s.state.path.resolve()).encode()).hexdigest()[:10]
    return s.model_copy(update={"mqtt": s.mqtt.model_copy(update={"client_id": f"cityops-{digest}"})})


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
