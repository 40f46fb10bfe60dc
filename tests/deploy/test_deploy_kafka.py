"""deploy/ cannot drift from the code. Docker cannot run here, so the compose file, the Kubernetes
manifests, the Dockerfile and deploy/kafka/acls.sh are checked against what the code really
reads: every CITYOPS_* variable names a setting of pipeline.shared.config.Settings and validates to the
value written; the config files pass load_settings(); every container runs a real `cityops`
subcommand with real flags; probes and healthchecks hit http.port; the topics and ACLs cover
connectors.kafka.topic_names() exactly; no secret value is committed; published ports are
localhost-only; Mosquitto runs deploy/mosquitto's own config and ACL.

acls.sh is run for real, with stand-ins for kafka-topics.sh / kafka-configs.sh / kafka-acls.sh
that record their arguments."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
import typing
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import BaseModel, SecretStr

from connectors.kafka import topic_names
from pipeline.cli import _parser
from pipeline.shared.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / ".env.example"
ACLS = DEPLOY / "kafka" / "acls.sh"
K8S = DEPLOY / "k8s"
SECRET_TEMPLATE = K8S / "secret.template.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"

# Compose-only variables (interpolated into compose.yaml, never given to a cityops process).
COMPOSE_ONLY = {"CITYOPS_WORKERS": "number of worker containers (deploy.replicas)"}
# The cityops services and the Kafka user each logs in as.
SERVICES = {"bridge": "bridge", "worker": "worker"}
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|JAAS", re.IGNORECASE)
# Who writes and who reads each topic of topic_names(), by role. A new role in topic_names()
# fails test_every_topic_has_its_producers_and_consumers until acls.sh and this table cover it.
WRITERS = {"readings": {"bridge", "worker"}, "acks": {"bridge", "worker", "acks"},
           **{f"alerts.{t}": {"worker"} for t in ("city", "district", "street", "dept", "community")},
           "push": {"worker"}, "deadletter": {"bridge", "worker"}}
READERS = {"readings": {"worker"}, "acks": {"worker"},
           **{f"alerts.{t}": {"dashboard"} for t in ("city", "district", "street", "dept", "community")},
           "push": {"push"}, "deadletter": {"triage"}}
SAFE_OPERATIONS = {"Read", "Write", "Describe", "Create", "DescribeConfigs"}


# ---- helpers ---------------------------------------------------------------------------------

class MissingVariable(Exception):
    """A file uses a variable that has no value where it is read."""


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation of every string in ``value``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1) or m.group(4), m.group(2), m.group(3)
        have = env.get(name)
        unset = have is None or (have == "" and op is not None and op.startswith(":"))
        if op in (":?", "?") and unset:
            raise MissingVariable(name)
        if op in (":-", "-") and unset:
            return arg
        return have or ""

    return _VAR.sub(sub, value)


def variables(value: Any) -> set[tuple[str, str | None]]:
    """(name, operator) of every ${...} reference in ``value``."""
    text = json.dumps(value)
    return {(m.group(1) or m.group(4), m.group(2))
            for m in _VAR.finditer(text.replace("$$", "")) if m.group(0) != "$$"}


def env_example() -> dict[str, str]:
    out = {}
    for n, line in enumerate(ENV_EXAMPLE.read_text().splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f".env.example:{n}: {line!r}"
            out[key] = value
    return out


def sentinel(name: str) -> str:
    return f"test-{name.lower().replace('_', '-')}-0123456789abcdef"


def filled_env() -> dict[str, str]:
    """deploy/.env as an operator fills it: every empty value set (to a recognisable sentinel)."""
    return {k: v or sentinel(k) for k, v in env_example().items()}


def compose_raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose() -> dict:
    return interpolate(compose_raw(), filled_env())


def service_env(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in env.items()}


def k8s_docs() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d]
            for p in sorted(K8S.glob("*.yaml"))}


def k8s_objects(kind: str | None = None) -> list[dict]:
    return [d for name, docs in k8s_docs().items() if name != "kustomization.yaml"
            for d in docs if kind is None or d["kind"] == kind]


def workloads() -> list[dict]:
    return [d for d in k8s_objects() if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]


def configmap_file(key: str = "cityops.yaml") -> tuple[str, str]:
    """(key, text) of a file in the ConfigMap: the cityops config, or another it names."""
    (cm,) = [d for d in k8s_objects("ConfigMap") if d["metadata"]["name"] == "cityops-config"]
    assert key in cm["data"], f"the ConfigMap has no {key}"
    return key, cm["data"][key]


def model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if (m := model_of(arg)) is not None:
            return m
    return None


def settings_path(var: str) -> tuple[str, ...]:
    """The Settings field a CITYOPS_* variable sets, checked against the model (pydantic-settings
    silently ignores a variable whose name is not a field, so a typo would go unnoticed)."""
    assert var.startswith("CITYOPS_"), var
    parts = var[len("CITYOPS_"):].lower().split("__")
    model: type[BaseModel] = Settings
    for i, part in enumerate(parts):
        fields = model.model_fields
        where = ".".join(parts[:i + 1])
        if part not in fields:
            raise LookupError(f"{var}: `{where}` is not a setting (pipeline/shared/config.py "
                              f"{model.__name__} has {', '.join(sorted(fields))})")
        sub = model_of(fields[part].annotation)
        if i < len(parts) - 1:
            if sub is None:
                raise LookupError(f"{var}: `{where}` has no settings under it")
            model = sub
        elif sub is not None:
            raise LookupError(f"{var}: `{where}` is a section; set its fields")
    return tuple(parts)


def value_at(settings: Settings, path: tuple[str, ...]) -> Any:
    obj: Any = settings
    for p in path:
        obj = getattr(obj, p)
    return obj


def as_text(value: Any) -> str | None:
    """A setting's value as the text an environment variable would carry; None where the text
    form is not unique (durations are stored in ms)."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (str, int, Path)):
        return str(value)
    return None


def settings_for(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, config_text: str,
                 env: dict[str, str], where: str) -> Settings:
    """load_settings() as the container runs it: its config file and its environment only. Every
    CITYOPS_* variable must name a setting and come out as the value written."""
    for k in list(os.environ):
        if k.startswith("CITYOPS_"):
            monkeypatch.delenv(k)
    cityops_env = {k: v for k, v in env.items() if k.startswith("CITYOPS_")}
    for k, v in cityops_env.items():
        monkeypatch.setenv(k, v)
    path = tmp_path / f"{re.sub(r'[^a-z0-9]+', '-', where.lower())}.yaml"
    path.write_text(config_text)
    s = load_settings(path)
    for k, v in cityops_env.items():
        try:
            field = settings_path(k)
        except LookupError as e:
            pytest.fail(f"{where}: {e}", pytrace=False)
        got = as_text(value_at(s, field))
        if got is not None:
            assert got.lower() == v.lower(), f"{where}: {k}={v!r} became {got!r}"
    return s


def cli(argv: list[str], where: str) -> Any:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return _parser().parse_args(argv)
        except SystemExit:          # argparse's way of refusing; its reason is on stderr
            refused = err.getvalue().strip()
    pytest.fail(f"{where}: `cityops {shlex.join(argv)}` is not a command the CLI accepts: "
                f"{refused}", pytrace=False)


def config_flag(argv: list[str]) -> str:
    assert "--config" in argv, argv
    return argv[argv.index("--config") + 1]


def scalar_settings_vars(text: str) -> dict[str, str]:
    """${CITYOPS_X__Y:-default} references in a shell script: name -> default."""
    return {m.group(1): m.group(2)
            for m in re.finditer(r"\$\{(CITYOPS_[A-Z0-9_]+):-([^}]*)\}", text)}


# ---- the environment file ----------------------------------------------------------------------

def test_env_example_documents_every_variable_and_holds_no_secret() -> None:
    example = env_example()
    used = variables(compose_raw())
    names = {n for n, _ in used}
    assert names <= set(example), f"not in deploy/.env.example: {sorted(names - set(example))}"
    assert set(example) <= names, f"in .env.example, unused: {sorted(set(example) - names)}"
    for name, op in used:
        if SECRET_NAME.search(name):
            assert op == ":?", f"${{{name}}} must be required (${{{name}:?...}}), no default"
            assert example[name] == "", f".env.example must not hold a value for {name}"
    for name in example:
        if name.startswith("CITYOPS_"):
            assert name in COMPOSE_ONLY, f"{name} in .env.example: cityops reads it only inside a container"


def test_the_filled_in_secrets_are_never_committed() -> None:
    """compose reads deploy/.env and deploy/secrets/: git must ignore both."""
    done = subprocess.run(["git", "check-ignore", "deploy/.env", "deploy/secrets/mosquitto.passwd"],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.stdout.split() == ["deploy/.env", "deploy/secrets/mosquitto.passwd"], done.stderr
    assert compose_raw()["secrets"]["mosquitto_accounts"]["file"] == "./secrets/mosquitto.passwd"
    tracked = subprocess.run(["git", "check-ignore", "deploy/.env.example"], cwd=ROOT,
                             capture_output=True, text=True, check=False)
    assert tracked.returncode == 1, "deploy/.env.example is the template and must be committed"


def test_compose_refuses_to_start_without_its_secrets() -> None:
    example = env_example()
    with pytest.raises(MissingVariable):
        interpolate(compose_raw(), example)
    for name in (n for n, v in example.items() if v == ""):
        env = dict(filled_env())
        env[name] = ""
        with pytest.raises(MissingVariable, match=name):
            interpolate(compose_raw(), env)


def test_compose_only_variables_are_not_settings() -> None:
    for name in COMPOSE_ONLY:
        with pytest.raises(LookupError):
            settings_path(name)
    raw = compose_raw()
    assert raw["services"]["worker"]["deploy"]["replicas"] == "${CITYOPS_WORKERS:-3}"
    for svc in raw["services"].values():
        assert not set(service_env(svc)) & set(COMPOSE_ONLY)


# ---- settings: every variable a real field, every config file valid ----------------------------

def every_cityops_variable() -> list[tuple[str, str]]:
    out = []
    for name, svc in compose_raw()["services"].items():
        out += [(f"compose {name}", k) for k in service_env(svc) if k.startswith("CITYOPS_")]
    for w in workloads():
        for c in w["spec"]["template"]["spec"]["containers"]:
            out += [(f"k8s {w['metadata']['name']}", e["name"]) for e in c.get("env", [])
                    if e["name"].startswith("CITYOPS_")]
    out += [("deploy/kafka/acls.sh", k) for k in scalar_settings_vars(ACLS.read_text())]
    return out


def test_every_cityops_variable_is_a_setting() -> None:
    found = every_cityops_variable()
    assert len(found) > 10, found
    bad = []
    for where, var in found:
        try:
            settings_path(var)
        except LookupError as e:
            bad.append(f"{where}: {e}")
    assert not bad, "\n".join(bad)


def test_the_settings_check_refuses_what_pydantic_settings_would_ignore() -> None:
    for var in ("CITYOPS_KAFKA__BOOTSTRAPS", "CITYOPS_WORKERS", "CITYOPS_KAFKA", "CITYOPS_HTTP__PORT__X",
                "CITYOPS_KAFKA_BOOTSTRAP"):
        with pytest.raises(LookupError):
            settings_path(var)
    assert settings_path("CITYOPS_KAFKA__PASSWORD") == ("kafka", "password")


def test_acls_script_defaults_are_the_settings_defaults() -> None:
    defaults = Settings()
    read = scalar_settings_vars(ACLS.read_text())
    assert set(read) == {"CITYOPS_KAFKA__PREFIX", "CITYOPS_KAFKA__PARTITIONS",
                         "CITYOPS_KAFKA__REPLICATION", "CITYOPS_WORKER__APP_ID"}
    for var, default in read.items():
        assert as_text(value_at(defaults, settings_path(var))) == default, var


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_compose_service_settings(service: str, monkeypatch: pytest.MonkeyPatch,
                                  tmp_path: Path) -> None:
    c = compose()
    svc = c["services"][service]
    (mount,) = svc["configs"]
    config_text = c["configs"][mount["source"]]["content"]
    argv = svc["command"]
    assert config_flag(argv) == mount["target"], "--config must name the file compose mounts"
    env = service_env(svc)
    s = settings_for(monkeypatch, tmp_path, config_text, env, f"compose {service}")

    # Reached from outside the container, on the port the healthcheck asks.
    assert s.http.host == "0.0.0.0"
    assert s.http.port > 0
    probe = " ".join(svc["healthcheck"]["test"])
    assert f"127.0.0.1:{s.http.port}/healthz" in probe

    # Kafka: the broker's CLIENT listener, its mechanism, this service's own user and password.
    kafka_env = service_env(c["services"]["kafka"])
    advertised = dict(x.split("://") for x in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert s.kafka.bootstrap == advertised["CLIENT"]
    protocols = dict(p.split(":") for p in kafka_env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert s.kafka.security_protocol == protocols["CLIENT"] == "SASL_PLAINTEXT"
    assert s.kafka.sasl_mechanism == kafka_env["KAFKA_LISTENER_NAME_CLIENT_SASL_ENABLED_MECHANISMS"]
    user = SERVICES[service]
    assert s.kafka.username == user
    assert s.kafka.password.get_secret_value() == sentinel(f"KAFKA_{user.upper()}_PASSWORD")

    # The topics and the group acls.sh made are the ones this process uses.
    init = service_env(c["services"]["kafka-init"])
    assert s.kafka.prefix == init["CITYOPS_KAFKA__PREFIX"]
    assert s.worker.app_id == init["CITYOPS_WORKER__APP_ID"]
    assert s.kafka.partitions == int(init["CITYOPS_KAFKA__PARTITIONS"])
    assert s.kafka.replication == int(init["CITYOPS_KAFKA__REPLICATION"])
    assert svc["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"

    # MQTT: the Mosquitto service, as the account deploy/mosquitto/acl gives the pipeline.
    u = urlsplit(s.mqtt.url)
    assert (u.hostname, u.port) == ("mosquitto", 1883)
    assert s.mqtt.username == "cityops"
    assert s.mqtt.prefix == "cityops"       # the acl's topics
    if service == "bridge":
        assert s.mqtt.password.get_secret_value() == sentinel("MQTT_PIPELINE_PASSWORD")

    # What it writes lies on a volume: the root file system is read-only.
    assert svc["read_only"] is True
    mounts = [v.split(":")[1] if ":" in v else v for v in svc.get("volumes", [])]
    for path in (s.worker.data_dir, s.state.path):
        assert Path(path).is_absolute() and any(Path(path).is_relative_to(m) for m in mounts), \
            f"{service}: {path} is not on a volume"


def test_compose_worker_writes_history_to_the_influxdb_service(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    c = compose()
    svc = c["services"]["worker"]
    s = settings_for(monkeypatch, tmp_path, c["configs"]["cityops"]["content"], service_env(svc),
                     "compose worker")
    influx = service_env(c["services"]["influxdb"])
    assert urlsplit(s.influx.url).hostname == "influxdb"
    assert s.influx.org == influx["DOCKER_INFLUXDB_INIT_ORG"]
    assert s.influx.bucket == influx["DOCKER_INFLUXDB_INIT_BUCKET"]
    assert s.influx.token.get_secret_value() == influx["DOCKER_INFLUXDB_INIT_ADMIN_TOKEN"]


def test_compose_worker_count_fits_the_partitions() -> None:
    example = env_example()
    assert int(example["CITYOPS_WORKERS"]) <= int(example["KAFKA_PARTITIONS"])


def k8s_containers() -> list[tuple[dict, dict]]:
    return [(w, c) for w in workloads() for c in w["spec"]["template"]["spec"]["containers"]]


def k8s_env(container: dict, pod_name: str) -> dict[str, str]:
    template = yaml.safe_load(SECRET_TEMPLATE.read_text())
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
            continue
        ref = e["valueFrom"]
        if "secretKeyRef" in ref:
            key = ref["secretKeyRef"]["key"]
            assert ref["secretKeyRef"]["name"] == template["metadata"]["name"]
            assert key in template["stringData"], f"{e['name']}: no key {key} in the Secret"
            env[e["name"]] = sentinel(key.upper().replace("-", "_"))
        elif ref.get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[e["name"]] = pod_name
        else:
            pytest.fail(f"{e['name']}: unexpected valueFrom {ref}")
    return env


@pytest.mark.parametrize("index", range(2))
def test_k8s_workload_settings(index: int, monkeypatch: pytest.MonkeyPatch,
                               tmp_path: Path) -> None:
    containers = k8s_containers()
    assert len(containers) == 2, "one bridge and one worker container"
    w, c = containers[index]
    name = w["metadata"]["name"]
    key, text = configmap_file()
    spec = w["spec"]["template"]["spec"]
    s = settings_for(monkeypatch, tmp_path, text, k8s_env(c, f"{name}-0"), f"k8s {name}")

    argv = c["args"]
    assert "command" not in c, "command would replace the image's `cityops` entrypoint"
    command = cli(argv, f"k8s {name}").command
    assert command in SERVICES
    assert s.kafka.username == SERVICES[command]
    config = Path(config_flag(argv))
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    (cfg,) = [m for m in mounts.values() if config.parent == Path(m["mountPath"])]
    assert volumes[cfg["name"]]["configMap"]["name"] == "cityops-config"
    assert config.name == key
    if s.acks.users is not None:        # next to the config, in the ConfigMap, and it loads
        from pipeline.core.identity import AckUsers
        from pipeline.core.registry import load as load_registry
        from rules.compiler import load_rules
        assert s.acks.users.parent == config.parent
        users_key, users_text = configmap_file(s.acks.users.name)
        (tmp_path / users_key).write_text(users_text)
        AckUsers(load_registry(None, load_rules().kinds), tmp_path / users_key)

    # Probes: /healthz on http.port, which must listen beyond localhost.
    assert s.http.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        if kind not in c:
            assert kind == "startupProbe", f"{name}: no {kind}"
            continue
        get = c[kind]["httpGet"]
        assert get["path"] == "/healthz"
        port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
        assert port == s.http.port, f"{name} {kind}: port {port}, http.port {s.http.port}"

    # What it writes lies on a volume: the root file system is read-only.
    writable = [Path(m["mountPath"]) for m in c["volumeMounts"] if not m.get("readOnly")]
    for path in (s.worker.data_dir, s.state.path):
        assert any(Path(path).is_relative_to(m) for m in writable), f"{name}: {path} not writable"

    if command == "worker":
        assert w["kind"] == "Deployment"
        assert 1 <= w["spec"]["replicas"] <= s.kafka.partitions
    else:
        # The MQTT client id is the bridge's persistent session: stable and one per pod.
        assert w["kind"] == "StatefulSet"
        assert s.mqtt.client_id == f"{name}-0"


# ---- commands ----------------------------------------------------------------------------------

def test_dockerfile_entrypoint_and_user() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"(?m)^FROM python:3\.11-slim\b", text)
    (entry,) = re.findall(r"(?m)^ENTRYPOINT (.*)$", text)
    assert json.loads(entry) == ["cityops"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["cityops"] == "pipeline.cli:main"
    (user,) = re.findall(r"(?m)^USER (\S+)$", text)
    uid = user.split(":")[0]
    assert uid not in ("0", "root")
    for w in workloads():
        ctx = w["spec"]["template"]["spec"]["securityContext"]
        assert str(ctx["runAsUser"]) == uid and ctx["runAsNonRoot"] is True
    (expose,) = re.findall(r"(?m)^EXPOSE (\d+)$", text)
    assert int(expose) == Settings().http.port


def test_dockerfile_installs_the_package_as_pyproject_builds_it() -> None:
    text = DOCKERFILE.read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied = {p.rstrip("/") for line in re.findall(r"(?m)^COPY (.*)$", text)
              for p in line.split()[:-1]}
    packages = {p.rstrip("*").rstrip(".") for p in
                pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed = packages | {"pyproject.toml", pyproject["project"]["readme"]}
    assert needed <= copied, f"not copied into the image: {sorted(needed - copied)}"
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert needed <= kept, f"left out of the build context: {sorted(needed - kept)}"
    (install,) = re.findall(r"(?m)^RUN pip install (\S+)", text)
    for extra in image_extras(pyproject):
        assert re.search(rf"[\[,]{extra}[\],]", install), f"the image lacks the `{extra}` extra"


def image_extras(pyproject: dict) -> set[str]:
    return set(pyproject["project"].get("optional-dependencies", {})) - {"test", "dev", "docs", "bench"}


def test_the_image_has_every_package_the_code_imports() -> None:
    """`pip install .` in the image installs the declared dependencies only: a module the code
    imports (at the top or inside a function) that no declared dependency provides makes
    `cityops worker` or `cityops bridge` fail in the container although it works in .venv."""
    import ast
    import importlib.metadata as md

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = list(pyproject["project"]["dependencies"])
    for extra in image_extras(pyproject):
        declared += pyproject["project"]["optional-dependencies"][extra]
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
    declared_names = {norm(re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0]) for d in declared}
    local = {p.rstrip("*").rstrip(".") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    provides = md.packages_distributions()
    missing = {}
    for package in sorted(local):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module]
                else:
                    continue
                for mod in mods:
                    top = mod.split(".")[0]
                    if top in sys.stdlib_module_names or top in local or top == "__future__":
                        continue
                    dists = {norm(d) for d in provides.get(top, [top])}
                    if not dists & declared_names:
                        missing.setdefault(top, f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not missing, ("imported but not a dependency in pyproject.toml (the image would not "
                         "have it): " + ", ".join(f"{m} ({where})" for m, where in missing.items()))


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_compose_commands_are_real(service: str) -> None:
    c = compose()
    svc = c["services"][service]
    assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (COMPOSE.parent / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert "entrypoint" not in svc
    args = cli(svc["command"], f"compose {service}")
    assert args.command == service


def test_the_cli_check_refuses_what_the_parser_refuses() -> None:
    with pytest.raises(pytest.fail.Exception, match="not a command"):
        cli(["worker", "--no-such-flag"], "here")
    with pytest.raises(pytest.fail.Exception, match="not a command"):
        cli(["workers", "--config", "x.yaml"], "here")


# ---- Kafka: topics, users, ACLs, run through acls.sh ----------------------------------------------

STUB = """#!{python} -S
import json, os, sys
args = sys.argv[1:]
entry = {{"tool": os.path.basename(sys.argv[0]), "args": args}}
if "--command-config" in args:
    entry["command_config"] = open(args[args.index("--command-config") + 1]).read()
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps(entry) + "\\n")
"""


def run_acls(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("kafka-topics.sh", "kafka-configs.sh", "kafka-acls.sh"):
        (bin_dir / tool).write_text(STUB.format(python=sys.executable))
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / "calls.jsonl"
    log.unlink(missing_ok=True)
    full = {"PATH": os.environ["PATH"], "KAFKA_BIN": str(bin_dir), "STUB_LOG": str(log),
            "TMPDIR": str(tmp_path), **env}
    return subprocess.run(["bash", str(ACLS)], env=full, capture_output=True, text=True,
                          check=False, timeout=60)


def option_values(args: list[str], option: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == option]


class KafkaSetup:
    """What acls.sh did, from the stand-ins' records."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        done = run_acls(tmp_path, env)
        assert done.returncode == 0, done.stderr
        self.calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
        self.topics: dict[str, list[str]] = {}
        self.users: dict[str, str] = {}
        self.acls: list[tuple[str, frozenset[str], str, str, str]] = []
        for call in self.calls:
            a = call["args"]
            if call["tool"] == "kafka-topics.sh" and "--create" in a:
                (name,) = option_values(a, "--topic")
                self.topics[name] = a
            elif call["tool"] == "kafka-configs.sh":
                (name,) = option_values(a, "--entity-name")
                assert option_values(a, "--entity-type") == ["users"]
                (config,) = option_values(a, "--add-config")
                m = re.fullmatch(r"SCRAM-SHA-512=\[iterations=(\d+),password=(.*)\]", config)
                assert m and int(m.group(1)) >= 4096, config
                self.users[name] = m.group(2)
            elif call["tool"] == "kafka-acls.sh":
                assert "--add" in a and "--deny-principal" not in a and "--cluster" not in a, a
                (principal,) = option_values(a, "--allow-principal")
                assert principal.startswith("User:")
                ops = frozenset(option_values(a, "--operation"))
                (pattern,) = option_values(a, "--resource-pattern-type")
                kinds = [k for k in ("topic", "group", "transactional-id") if f"--{k}" in a]
                (kind,) = kinds
                (name,) = option_values(a, f"--{kind}")
                self.acls.append((principal[5:], ops, kind, name, pattern))

    def who(self, operation: str, kind: str, name: str) -> set[str]:
        return {p for p, ops, k, n, pattern in self.acls
                if operation in ops and k == kind
                and (n == name if pattern == "literal" else name.startswith(n))}


def compose_init_env() -> dict[str, str]:
    return service_env(compose()["services"]["kafka-init"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> KafkaSetup:
    return KafkaSetup(tmp_path_factory.mktemp("acls"), compose_init_env())


def test_acls_script_creates_exactly_the_topics_of_the_code(setup: KafkaSetup) -> None:
    env = compose_init_env()
    names = topic_names(env["CITYOPS_KAFKA__PREFIX"])
    assert set(setup.topics) == set(names.values())
    for name, args in setup.topics.items():
        assert "--if-not-exists" in args
        assert option_values(args, "--partitions") == [env["CITYOPS_KAFKA__PARTITIONS"]], name
        assert option_values(args, "--replication-factor") == [env["CITYOPS_KAFKA__REPLICATION"]], name


def test_every_acl_names_a_topic_of_the_code(setup: KafkaSetup) -> None:
    env = compose_init_env()
    prefix, app_id = env["CITYOPS_KAFKA__PREFIX"], env["CITYOPS_WORKER__APP_ID"]
    names = set(topic_names(prefix).values())
    for principal, ops, kind, name, pattern in setup.acls:
        assert ops <= SAFE_OPERATIONS, (principal, ops)
        if kind != "topic":
            continue
        if pattern == "literal":
            assert name in names, f"ACL for {principal} on {name}: not a topic of topic_names()"
        elif name == f"{prefix}.":
            assert ops == {"Describe"}, "the prefix-wide grant shows metadata only"
        else:
            assert (principal, name) == ("worker", f"{app_id}-"), (principal, name)


def test_every_topic_has_its_producers_and_consumers(setup: KafkaSetup) -> None:
    prefix = compose_init_env()["CITYOPS_KAFKA__PREFIX"]
    for role, topic in topic_names(prefix).items():
        assert role in WRITERS and role in READERS, \
            f"topic_names() has a new role {role!r}: give it ACLs in acls.sh and list them here"
        assert setup.who("Write", "topic", topic) == WRITERS[role], f"writers of {topic}"
        assert setup.who("Read", "topic", topic) == READERS[role], f"readers of {topic}"


def test_readers_have_their_groups_and_the_worker_its_own_topics(setup: KafkaSetup) -> None:
    env = compose_init_env()
    prefix, app_id = env["CITYOPS_KAFKA__PREFIX"], env["CITYOPS_WORKER__APP_ID"]
    assert setup.who("Read", "group", app_id) == {"worker"}
    for reader in {r for rs in READERS.values() for r in rs} - {"worker"}:
        assert setup.who("Read", "group", f"{prefix}-{reader}-console-1") == {reader}
    for op in ("Create", "Read", "Write", "Describe"):
        assert "worker" in setup.who(op, "topic", f"{app_id}-engine-changelog")
        assert "worker" in setup.who(op, "topic", f"{app_id}-acks-fanout")
        assert "worker" in setup.who(op, "topic", f"{app_id}-reload")     # hot reload
    assert setup.who("Write", "topic", f"{app_id}-engine-changelog") == {"worker"}
    # Faust's group is the app id: another app id would need its own ACLs.
    assert "worker" not in setup.who("Read", "group", "another-app")


def test_users_are_the_principals_with_passwords_from_the_environment(setup: KafkaSetup) -> None:
    env = compose_init_env()
    principals = {p for p, *_ in setup.acls}
    assert set(setup.users) == principals
    for user, password in setup.users.items():
        assert password == env[f"KAFKA_{user.upper()}_PASSWORD"] == sentinel(f"KAFKA_{user.upper()}_PASSWORD")
    admin = env["KAFKA_ADMIN_PASSWORD"]
    for call in setup.calls:
        assert admin not in " ".join(call["args"]), "the admin password must not be an argument"
        assert f'password="{admin}"' in call["command_config"]
        assert option_values(call["args"], "--bootstrap-server") == [env["KAFKA_ADMIN_BOOTSTRAP"]]


def test_acls_script_stops_without_a_password(tmp_path: Path) -> None:
    env = compose_init_env()
    del env["KAFKA_WORKER_PASSWORD"]
    done = run_acls(tmp_path, env)
    assert done.returncode != 0 and "KAFKA_WORKER_PASSWORD" in done.stderr
    env = compose_init_env()
    env["KAFKA_PUSH_PASSWORD"] = "a,b"
    assert run_acls(tmp_path, env).returncode != 0


def test_broker_refuses_what_acls_do_not_grant() -> None:
    c = compose()
    env = service_env(c["services"]["kafka"])
    assert env["KAFKA_AUTHORIZER_CLASS_NAME"] == "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
    assert env["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false"
    assert env["KAFKA_SUPER_USERS"] == "User:admin"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert "broker,controller" == env["KAFKA_PROCESS_ROLES"]          # KRaft
    assert c["services"]["kafka"]["image"].startswith("apache/kafka:")
    protocols = dict(p.split(":") for p in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(protocols.values()) == {"SASL_PLAINTEXT"}, "no listener without a login"
    ports = {x.split("://")[0]: int(x.rsplit(":", 1)[1]) for x in env["KAFKA_LISTENERS"].split(",")}
    published = {int(str(p).split(":")[-1]) for p in c["services"]["kafka"]["ports"]}
    for listener in protocols:
        mechanisms = env[f"KAFKA_LISTENER_NAME_{listener}_SASL_ENABLED_MECHANISMS"]
        assert mechanisms in ("PLAIN", "SCRAM-SHA-512"), listener
        if mechanisms == "PLAIN":     # the super user's own listeners: only admin is defined
            jaas = env[f"KAFKA_LISTENER_NAME_{listener}_PLAIN_SASL_JAAS_CONFIG"]
            assert re.findall(r"user_(\w+)=", jaas) == ["admin"], listener
            assert ports[listener] not in published, f"{listener} (the admin's) is published"
    # The init job logs in on the admin's listener, with PLAIN (acls.sh's default).
    init = service_env(c["services"]["kafka-init"])
    advertised = dict(x.split("://") for x in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    (admin_listener,) = [k for k, v in advertised.items() if v == init["KAFKA_ADMIN_BOOTSTRAP"]]
    assert env[f"KAFKA_LISTENER_NAME_{admin_listener}_SASL_ENABLED_MECHANISMS"] == "PLAIN"
    assert "KAFKA_ADMIN_SASL_MECHANISM:-PLAIN" in ACLS.read_text()
    assert c["services"]["kafka-init"]["entrypoint"][-1] == "/deploy/kafka/acls.sh"
    (mount,) = c["services"]["kafka-init"]["volumes"]
    src, dst = mount.split(":")[:2]
    assert (COMPOSE.parent / src).resolve() == ACLS and dst == "/deploy/kafka/acls.sh"


# ---- no secret value committed -------------------------------------------------------------------

REQUIRED_REF = r"\$\{[A-Z_][A-Z0-9_]*:\?[^}]*\}"


def test_compose_secrets_only_from_the_environment_file() -> None:
    raw = compose_raw()
    checked = 0
    for name, svc in raw["services"].items():
        for key, value in service_env(svc).items():
            if not SECRET_NAME.search(key):
                continue
            checked += 1
            if "JAAS" in key:
                for field, v in re.findall(r'(password|user_\w+)="([^"]*)"', value):
                    assert re.fullmatch(REQUIRED_REF, v), f"{name} {key}: {field} is written in"
            else:
                assert re.fullmatch(REQUIRED_REF, value), f"{name} {key} = {value!r}"
    assert checked >= 15
    # The cityops config itself holds no secret: they come from the environment.
    assert not secret_keys(yaml.safe_load(raw["configs"]["cityops"]["content"]))


def secret_keys(data: Any, path: str = "") -> list[str]:
    if isinstance(data, dict):
        return [p for k, v in data.items() for p in
                ([f"{path}{k}"] if re.search(r"password|token|secret", str(k), re.IGNORECASE) else [])
                + secret_keys(v, f"{path}{k}.")]
    if isinstance(data, list):
        return [p for v in data for p in secret_keys(v, path)]
    return []


def test_k8s_secrets_only_from_the_secret() -> None:
    template = yaml.safe_load(SECRET_TEMPLATE.read_text())
    assert template["kind"] == "Secret"
    for key, value in template["stringData"].items():
        assert re.fullmatch(r"<REQUIRED: [^<>]+>", value), f"secret.template.yaml {key}: {value!r}"
    assert "data" not in template
    used = set()
    for w, c in k8s_containers():
        for e in c.get("env", []):
            if SECRET_NAME.search(e["name"]):
                assert "value" not in e, f"{w['metadata']['name']} {e['name']} is written in"
                used.add(e["valueFrom"]["secretKeyRef"]["key"])
    assert used == set(template["stringData"]), "Secret keys and their uses must match"
    assert [d for d in k8s_objects("Secret")] == [template]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert SECRET_TEMPLATE.name not in kustomization["resources"]
    assert not secret_keys(yaml.safe_load(configmap_file()[1]))


def test_grafana_reads_the_token_from_its_environment() -> None:
    c = compose()
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/influxdb.yaml").read_text())
    (source,) = ds["datasources"]
    assert source["secureJsonData"]["token"] == "$INFLUX_TOKEN"
    dash = c["services"]["dashboard"]
    assert service_env(dash)["INFLUX_TOKEN"] == sentinel("INFLUX_TOKEN")
    influx = service_env(c["services"]["influxdb"])
    assert source["jsonData"]["organization"] == influx["DOCKER_INFLUXDB_INIT_ORG"]
    assert source["jsonData"]["defaultBucket"] == influx["DOCKER_INFLUXDB_INIT_BUCKET"]
    assert urlsplit(source["url"]).hostname == "influxdb"
    mounts = dict(v.split(":")[:2] for v in dash["volumes"] if v.startswith("./"))
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/cityops.yaml").read_text())
    (p,) = provider["providers"]
    assert mounts["./grafana/dashboards"] == p["options"]["path"]


# ---- exposure --------------------------------------------------------------------------------------

def test_published_ports_bind_localhost_only() -> None:
    published = 0
    for name, svc in compose()["services"].items():
        assert svc.get("network_mode") != "host", name
        for port in svc.get("ports", []):
            published += 1
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port}"
            else:
                parts = str(port).split(":")
                assert len(parts) == 3 and parts[0] == "127.0.0.1", f"{name}: {port!r}"
    assert published >= 4
    for w in workloads():
        spec = w["spec"]["template"]["spec"]
        assert not spec.get("hostNetwork")
        for c in spec["containers"]:
            assert all("hostPort" not in p for p in c.get("ports", []))
    for svc in k8s_objects("Service"):
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", svc["metadata"]["name"]


# ---- Mosquitto -------------------------------------------------------------------------------------

def test_mosquitto_runs_the_production_config_and_acl(tmp_path: Path) -> None:
    svc = compose()["services"]["mosquitto"]
    mounts = {dst: (COMPOSE.parent / src).resolve()
              for src, dst, *_ in (v.split(":") for v in svc["volumes"] if v.startswith("./"))}
    conf = DEPLOY / "mosquitto" / "mosquitto.conf"
    assert mounts["/etc/mosquitto/mosquitto.conf"] == conf
    assert mounts["/etc/mosquitto/acl"] == DEPLOY / "mosquitto" / "acl"
    script = svc["command"][0]
    assert 'sed -e "$CONF_EDITS" /etc/mosquitto/mosquitto.conf > /mosquitto/cityops.conf' in script
    assert "exec mosquitto -c /mosquitto/cityops.conf" in script

    # The container's edits, applied to the production file: only these lines change.
    edits = service_env(svc)["CONF_EDITS"]
    out = subprocess.run(["sed", "-e", edits, str(conf)], capture_output=True, text=True,
                         check=True).stdout
    before = conf.read_text().splitlines()
    after = out.splitlines()
    removed = [line for line in before if line not in after]
    added = [line for line in after if line not in before]
    assert [line.split()[0] for line in removed] == ["listener", "pid_file", "log_dest"]
    assert added == ["listener 1883", "log_dest stdout"]
    for line in ("allow_anonymous false", "password_file /etc/mosquitto/passwd",
                 "acl_file /etc/mosquitto/acl", "persistence true", "max_queued_messages 1000000"):
        assert line in after, line

    # The password file the config names is the one the container writes, with the pipeline's
    # account, which the production ACL knows.
    assert "mosquitto_passwd -b /etc/mosquitto/passwd cityops" in script
    acl = (DEPLOY / "mosquitto" / "acl").read_text()
    assert re.search(r"(?m)^user cityops\n(topic .*\n)*topic read cityops/gateways/#", acl)


# ---- Kubernetes structure --------------------------------------------------------------------------

def test_kustomization_applies_every_manifest_but_the_secret_template() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", SECRET_TEMPLATE.name}
    assert set(kustomization["resources"]) == files
    (ns,) = k8s_objects("Namespace")
    assert kustomization["namespace"] == ns["metadata"]["name"]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in k8s_objects():
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == ns["metadata"]["name"], obj["metadata"]["name"]


def test_k8s_selectors_find_their_pods() -> None:
    pods = [w["spec"]["template"]["metadata"]["labels"] for w in workloads()]
    for w in workloads():
        assert w["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
    for svc in k8s_objects("Service"):
        sel = svc["spec"]["selector"].items()
        (labels,) = [p for p in pods if sel <= p.items()]
        (w,) = [w for w in workloads() if w["spec"]["template"]["metadata"]["labels"] == labels]
        ports = {p["name"]: p["containerPort"] for c in w["spec"]["template"]["spec"]["containers"]
                 for p in c["ports"]}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports
            assert svc["metadata"]["annotations"]["prometheus.io/port"] == str(ports[p["targetPort"]])
    pdbs = {p["metadata"]["name"]: p["spec"]["selector"]["matchLabels"].items()
            for p in k8s_objects("PodDisruptionBudget")}
    (worker,) = [w for w in workloads() if w["spec"]["template"]["spec"]["containers"][0]["args"][0] == "worker"]
    assert pdbs["cityops-worker"] <= worker["spec"]["template"]["metadata"]["labels"].items()
    for name, sel in pdbs.items():
        assert len([p for p in pods if sel <= p.items()]) == 1, name
    (policy,) = k8s_objects("NetworkPolicy")
    sel = policy["spec"]["podSelector"]["matchLabels"].items()
    assert all(sel <= p.items() for p in pods), "the policy must cover every cityops pod"
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == [Settings().http.port] == sorted(
        {p["containerPort"] for w in workloads() for c in w["spec"]["template"]["spec"]["containers"]
         for p in c["ports"]})
    for w in workloads():
        if w["kind"] == "StatefulSet":
            (svc,) = [s for s in k8s_objects("Service") if s["metadata"]["name"] == w["spec"]["serviceName"]]
            assert svc["spec"]["clusterIP"] == "None"


def test_k8s_pods_are_non_root_with_read_only_root() -> None:
    for w in workloads():
        spec = w["spec"]["template"]["spec"]
        assert spec["automountServiceAccountToken"] is False
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
        assert pod["seccompProfile"]["type"] == "RuntimeDefault"
        for c in spec["containers"]:
            ctx = c["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False
            assert ctx["readOnlyRootFilesystem"] is True
            assert ctx["capabilities"]["drop"] == ["ALL"]
            assert "memory" in c["resources"]["limits"] and "cpu" in c["resources"]["requests"]
            writable = [m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")]
            assert "/tmp" in writable
