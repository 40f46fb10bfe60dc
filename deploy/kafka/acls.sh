#!/usr/bin/env bash
# Kafka users, topics and ACLs of cityops (README.md next to this file says who is who and why).
#
# Run by compose's `kafka-init` job before the bridge and the workers start; on another cluster
# run it by hand with the same variables. Every step is idempotent (users are re-set, topics
# created if missing, ACLs added if missing), so run it again after changing it. It never
# removes anything: an ACL taken out of this file must also be removed by hand
# (kafka-acls.sh --remove ...), and a topic's partitions are never changed here: readings are
# partitioned by street, so more partitions would move streets, and their state, between workers.
#
# The broker must run an authorizer with allow.everyone.if.no.acl.found=false: then what is not
# granted here is refused.
set -euo pipefail

BIN=${KAFKA_BIN:-/opt/kafka/bin}
# A listener where the super user logs in (compose: the broker's INTERNAL listener, SASL/PLAIN).
BOOTSTRAP=${KAFKA_ADMIN_BOOTSTRAP:?set KAFKA_ADMIN_BOOTSTRAP to host:port of a listener the admin can use}
ADMIN_USER=${KAFKA_ADMIN_USER:-admin}
ADMIN_MECHANISM=${KAFKA_ADMIN_SASL_MECHANISM:-PLAIN}
ADMIN_PROTOCOL=${KAFKA_ADMIN_SECURITY_PROTOCOL:-SASL_PLAINTEXT}

# The same names and defaults as the cityops settings (pipeline/shared/config.py), so the workers and
# this script agree on topic names, partitions and the workers' group.
PREFIX=${CITYOPS_KAFKA__PREFIX:-cityops}
PARTITIONS=${CITYOPS_KAFKA__PARTITIONS:-12}
REPLICATION=${CITYOPS_KAFKA__REPLICATION:-3}
APP_ID=${CITYOPS_WORKER__APP_ID:-cityops-worker}

# A write is acknowledged once two replicas have it, where there are two: a reading is a
# possible gas alarm, and one broker's disk is not enough to keep it.
if [ "$REPLICATION" -ge 3 ]; then MIN_ISR=2; else MIN_ISR=1; fi

# The admin's login, in a file only this process can read (not on the command line, where `ps`
# shows it), removed on exit.
umask 077
ADMIN_CONFIG=$(mktemp)
trap 'rm -f "$ADMIN_CONFIG"' EXIT
case "$ADMIN_MECHANISM" in
    PLAIN) LOGIN_MODULE=org.apache.kafka.common.security.plain.PlainLoginModule ;;
    SCRAM-SHA-256|SCRAM-SHA-512) LOGIN_MODULE=org.apache.kafka.common.security.scram.ScramLoginModule ;;
    *) echo "acls.sh: KAFKA_ADMIN_SASL_MECHANISM must be PLAIN or SCRAM-SHA-256/512" >&2; exit 2 ;;
esac
cat > "$ADMIN_CONFIG" <<EOF
security.protocol=$ADMIN_PROTOCOL
sasl.mechanism=$ADMIN_MECHANISM
sasl.jaas.config=$LOGIN_MODULE required username="$ADMIN_USER" password="${KAFKA_ADMIN_PASSWORD:?set KAFKA_ADMIN_PASSWORD}";
EOF

kafka() {  # kafka-TOOL.sh ARGS..., as the admin
    local tool=$1
    shift
    "$BIN/kafka-$tool.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" "$@"
}

echo "acls.sh: waiting for Kafka at $BOOTSTRAP"
for _ in $(seq 60); do
    kafka topics --list >/dev/null 2>&1 && break
    sleep 2
done
kafka topics --list >/dev/null   # still down after 2 min: fail here, with Kafka's own error

# --- Users: SCRAM-SHA-512 logins for the cityops processes and their readers ---------------------
# Each password comes from the environment (compose: deploy/.env). SCRAM's own syntax cannot
# carry ',' ']' or '=', and the JAAS line cannot carry '"': use hex (`openssl rand -hex 24`).
scram_user() {  # NAME PASSWORD
    case "$2" in
        *[,\]=\"]*) echo "acls.sh: the password of $1 has one of , ] = \" (use hex)" >&2; exit 2 ;;
    esac
    kafka configs --alter --entity-type users --entity-name "$1" \
        --add-config "SCRAM-SHA-512=[iterations=8192,password=$2]"
}
scram_user bridge "${KAFKA_BRIDGE_PASSWORD:?set KAFKA_BRIDGE_PASSWORD}"
scram_user worker "${KAFKA_WORKER_PASSWORD:?set KAFKA_WORKER_PASSWORD}"
scram_user dashboard "${KAFKA_DASHBOARD_PASSWORD:?set KAFKA_DASHBOARD_PASSWORD}"
scram_user acks "${KAFKA_ACKS_PASSWORD:?set KAFKA_ACKS_PASSWORD}"
scram_user push "${KAFKA_PUSH_PASSWORD:?set KAFKA_PUSH_PASSWORD}"
scram_user triage "${KAFKA_TRIAGE_PASSWORD:?set KAFKA_TRIAGE_PASSWORD}"

# --- Topics: connectors/kafka.py topic_names(prefix), all partitioned alike ----------------------
# Same partition count everywhere, as connectors/kafka.py ensure_topics() creates them: what a
# worker consumes and what it produces stay aligned when workers are added.
topic() {  # NAME [--config K=V ...]
    local name=$1
    shift
    kafka topics --create --if-not-exists --topic "$name" --partitions "$PARTITIONS" \
        --replication-factor "$REPLICATION" --config "min.insync.replicas=$MIN_ISR" "$@"
}
topic "$PREFIX.readings"
topic "$PREFIX.acks"
topic "$PREFIX.alerts.city"
topic "$PREFIX.alerts.district"
topic "$PREFIX.alerts.street"
topic "$PREFIX.alerts.dept"
topic "$PREFIX.alerts.community"
topic "$PREFIX.push"
# Refused input waits for a person to look at it: keep it a month, not the default week.
topic "$PREFIX.deadletter" --config retention.ms=2592000000

# --- ACLs -----------------------------------------------------------------------------------------
# acl PRINCIPAL OPERATION[,OPERATION...] topic|group NAME [prefixed]
acl() {
    local principal=$1 ops=$2 type=$3 name=$4 pattern=${5:-literal} op
    local args=()
    for op in ${ops//,/ }; do args+=(--operation "$op"); done
    kafka acls --add --allow-principal "User:$principal" "${args[@]}" \
        "--$type" "$name" --resource-pattern-type "$pattern"
}

# bridge: MQTT into Kafka (pipeline/runtimes/bridge.py). The only way readings come in: gateways never
# write to Kafka (README.md: a Kafka ACL cannot keep a producer to its own keys; Mosquitto's ACL
# keeps a gateway to its own topic). It also forwards the acknowledgements that grid workers'
# apps publish on MQTT; what it cannot decode goes to the dead letters.
acl bridge Write,Describe topic "$PREFIX.readings"
acl bridge Write,Describe topic "$PREFIX.acks"
acl bridge Write,Describe topic "$PREFIX.deadletter"

# worker: the engine (pipeline/runtimes/worker.py). Readings and acknowledgements in, notices and dead
# letters out; its consumer group is its app id. It also writes readings (a record that arrived
# on the wrong partition is sent on to its street's) and acknowledgements (POST /acks on its
# HTTP port).
acl worker Read,Write,Describe topic "$PREFIX.readings"
acl worker Read,Write,Describe topic "$PREFIX.acks"
acl worker Write,Describe topic "$PREFIX.alerts.city"
acl worker Write,Describe topic "$PREFIX.alerts.district"
acl worker Write,Describe topic "$PREFIX.alerts.street"
acl worker Write,Describe topic "$PREFIX.alerts.dept"
acl worker Write,Describe topic "$PREFIX.alerts.community"
acl worker Write,Describe topic "$PREFIX.push"
acl worker Write,Describe topic "$PREFIX.deadletter"
acl worker Read,Describe group "$APP_ID"
# Faust's own topics (the engine table's changelog, the acks fan-out, the assignor's leader
# topic) are named "<app id>-...", and the worker creates them itself.
acl worker Create,Read,Write,Describe,DescribeConfigs topic "$APP_ID-" prefixed

# Bridge and workers may see every cityops topic's metadata (not its data): ensure_topics()
# then finds the topics made above and creates nothing, which it would not be allowed to.
acl bridge Describe topic "$PREFIX." prefixed
acl worker Describe topic "$PREFIX." prefixed

# dashboard: operations-centre screens and integrations. Alert topics only, read only; any
# consumer group of its own whose name starts with "<prefix>-dashboard".
acl dashboard Read,Describe topic "$PREFIX.alerts.city"
acl dashboard Read,Describe topic "$PREFIX.alerts.district"
acl dashboard Read,Describe topic "$PREFIX.alerts.street"
acl dashboard Read,Describe topic "$PREFIX.alerts.dept"
acl dashboard Read,Describe topic "$PREFIX.alerts.community"
acl dashboard Read group "$PREFIX-dashboard" prefixed

# acks: operations consoles that acknowledge alerts (stops escalation). Write only.
acl acks Write,Describe topic "$PREFIX.acks"

# push: the dispatcher that delivers grid-worker notices (app push, WeCom, DingTalk, SMS).
acl push Read,Describe topic "$PREFIX.push"
acl push Read group "$PREFIX-push" prefixed

# triage: whoever looks at refused input (a support console, a sink into InfluxDB).
acl triage Read,Describe topic "$PREFIX.deadletter"
acl triage Read group "$PREFIX-triage" prefixed

echo "acls.sh: users, topics and ACLs of $PREFIX are in place"
