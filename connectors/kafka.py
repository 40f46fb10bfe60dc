"""Kafka: the topics of the distributed runtime, how readings are partitioned, and clients.

Topics (ARCHITECTURE.md; prefix configurable, default `cityops`):

    {prefix}.readings           in: readings, key sensor_id, partition by the sensor's street
    {prefix}.acks               in: acknowledgements, key alert_id
    {prefix}.alerts.city        out: key district code
    {prefix}.alerts.district    out: key district code
    {prefix}.alerts.street      out: key street code
    {prefix}.alerts.dept        out: key department id
    {prefix}.alerts.community   out: key community code (a route that names the community tier)
    {prefix}.push               out: notices for the on-call grid worker, key worker_id
    {prefix}.deadletter         out: refused input with the reason

Why the readings' partition follows the street and not a hash of the key: correlation rules
group sensors by building and street (同楼栋多户燃气报警, 同街道多点积水) and the absence rule
groups a gateway's sensors; those groups must meet in one engine. A street holds them all, and
Chengdu's 261 streets and towns are enough to spread a city over many workers. The key is still
the sensor id (the contract), so per-sensor order holds and a compacted topic keeps one per sensor.
"""

from __future__ import annotations

from collections.abc import Iterable

from kafka.partitioner.default import murmur2

TIER_TOPICS = ("city", "district", "street", "dept", "community")


def topic_names(prefix: str = "cityops") -> dict[str, str]:
    """Every topic cityops reads or writes, by role."""
    names = {"readings": f"{prefix}.readings", "acks": f"{prefix}.acks",
             "push": f"{prefix}.push", "deadletter": f"{prefix}.deadletter"}
    for tier in TIER_TOPICS:
        names[f"alerts.{tier}"] = f"{prefix}.alerts.{tier}"
    return names


def street_partition(street_code: str, partitions: int) -> int:
    """Kafka's own default partitioner (murmur2, positive) applied to the street code, so a
    producer keyed by street code would land in the same place."""
    return (murmur2(street_code.encode()) & 0x7FFFFFFF) % partitions


def notice_key(n: dict) -> str:
    """The Kafka key of a notice on its tier topic (ARCHITECTURE.md)."""
    tier = n["tier"]
    if tier == "city":
        return n["district"]
    if tier == "grid":
        return n.get("worker_id") or n["target"]
    return n["target"]


def notice_topic(prefix: str, n: dict) -> str:
    return f"{prefix}.push" if n["tier"] in ("grid", "owner") else f"{prefix}.alerts.{n['tier']}"


def client_options(kafka, client: str = "kafka-python") -> dict:
    """Security options from KafkaSettings, named for kafka-python (client="kafka-python") or
    aiokafka/Faust (client="aiokafka"). The password never leaves a SecretStr until here."""
    if kafka.security_protocol == "PLAINTEXT":
        return {}
    opts = {"security_protocol": kafka.security_protocol}
    if kafka.security_protocol.startswith("SASL"):
        opts.update(sasl_mechanism=kafka.sasl_mechanism,
                    sasl_plain_username=kafka.username,
                    sasl_plain_password=kafka.password.get_secret_value() if kafka.password else None)
    return opts


def bootstrap_list(bootstrap: str) -> list[str]:
    return [b.strip() for b in bootstrap.split(",") if b.strip()]


def ensure_topics(kafka, names: Iterable[str] | None = None, *, partitions: int | None = None,
                  timeout_s: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet (partitions and replication from the settings);
    returns the ones this call created. Existing topics are left as they are, also those
    another process creates meanwhile."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    names = list(names) if names is not None else list(topic_names(kafka.prefix).values())
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap_list(kafka.bootstrap),
                                 client_id="cityops-admin",
                                 request_timeout_ms=int(timeout_s * 1000), **client_options(kafka))
    except KafkaError as exc:        # the CLI says this in one line, not a traceback
        raise ConnectionError(f"no Kafka broker answered at {kafka.bootstrap} ({exc.__class__.__name__}); "
                              "start one, or set kafka.bootstrap / --kafka") from None
    try:
        have = set(admin.list_topics())
        missing = [n for n in names if n not in have]
        created = []
        for n in missing:       # one at a time: workers started together race to create them
            try:
                admin.create_topics([NewTopic(n, partitions or kafka.partitions, kafka.replication)])
                created.append(n)
            except TopicAlreadyExistsError:
                pass            # another process made it first: as good as ours
        return created
    finally:
        admin.close()
