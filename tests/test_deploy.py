"""deploy/: per-box compose files, Kubernetes manifests, Prometheus and Grafana configs are valid and consistent.

Everything is checked offline: compose files against the compose spec (as in test_compose.py), Kubernetes
manifests against the schemas bundled with the pinned ``kubernetes-validate``, the dashboard's PromQL
against the metric names the orchestrator really exports, and every SPLITMESH_* variable against the config
dataclasses. Each check is also shown to reject a broken input, so none of them passes vacuously.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from common.config import build
from common.transport import TLS_ENV
from node_agent.config import NodeConfig
from orchestrator.config import OrchestratorConfig
from tests.test_compose import TLS_DIR, mounts, tls_id

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
K8S_DIR = DEPLOY / "k8s"
SCHEMA = ROOT.parent / "shared" / "schemas" / "compose-spec.json"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "splitmesh.json"

KUBERNETES_VERSION = "1.37.0"  # bundled by kubernetes-validate==1.37.0 (schemas for 1.25 ... 1.37)
ORCHESTRATOR_METRICS_PORT = 9464
NODE_METRICS_PORT = 9465  # node agents' --metrics-port (their own splitmesh_agent_* metrics)
ROLE_FILES = ("orchestrator.yml", "edge-trusted.yml", "node.yml")
# Compose-time variables that are not component settings; README's "Deploying across boxes" documents each.
DEPLOY_VARS = {"SPLITMESH_IMAGE", "SPLITMESH_ORCHESTRATOR_IMAGE", "SPLITMESH_CERTS_DIR", "SPLITMESH_GATEWAY_ID",
               "SPLITMESH_GATEWAY_BIND", "GRAFANA_ADMIN_PASSWORD", "SPLITMESH_NODE_PORT", "SPLITMESH_BASE_IMAGE",
               "SPLITMESH_TORCH"}
CLIENT_ENV = {*TLS_ENV, "SPLITMESH_ADDRESS"}  # what the CLI, SDK and gateway read
SAMPLE_ENV = {
    "SPLITMESH_CERTS_DIR": "/etc/splitmesh/certs",
    "SPLITMESH_TRUSTED_NODES": "edge-a",
    "SPLITMESH_MIN_NODES": "2",
    "SPLITMESH_NODE_ID": "edge-a",
    "SPLITMESH_ADVERTISE": "192.0.2.10:50061",
    "SPLITMESH_ORCHESTRATOR": "192.0.2.1:50051",
    "GRAFANA_ADMIN_PASSWORD": "s3cret",
}
# The dashboard must show each of these.
DASHBOARD_METRICS = {"splitmesh_latency_ewma_ms", "splitmesh_plan_epoch", "splitmesh_decisions_total",
                     "splitmesh_node_utilisation", "splitmesh_link_bandwidth_bps", "splitmesh_node_alive",
                     "splitmesh_trigger_fired", "splitmesh_agent_tokens_total",
                     "splitmesh_agent_hop_overhead_seconds_bucket", "splitmesh_agent_kv_cache_bytes"}


# ------------------------------------------------------------------ helpers
def _settings(cls: type) -> set[str]:
    return {"SPLITMESH_" + f.name.upper() for f in dataclasses.fields(cls)}


def _no_flags() -> argparse.Namespace:
    return argparse.Namespace()


def _load(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    return loaded


class InterpolationError(ValueError):
    """A required ``${VAR:?message}`` is unset, as `docker compose` would report it."""


_VAR = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}"
                  r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*)|(?P<escaped>\$))")


def _interpolate_text(text: str, env: Mapping[str, str]) -> str:
    def substitute(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        name = m["braced"] or m["plain"]
        value, op, arg = env.get(name), m["op"] or "", m["arg"]
        unset = value is None or (op.startswith(":") and value == "")
        if op.endswith("-"):
            return arg if unset else str(value)
        if op.endswith("?"):
            if unset:
                raise InterpolationError(f"{name}: {arg}")
            return str(value)
        return "" if value is None else value

    return _VAR.sub(substitute, text)


def interpolate(node: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable interpolation ($$, ${VAR}, ${VAR:-default}, ${VAR:?error}) over a loaded file."""
    if isinstance(node, str):
        return _interpolate_text(node, env)
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    return node


def variables(node: Any) -> set[str]:
    """Names of the variables a compose file interpolates."""
    text = json.dumps(node)
    return {m["braced"] or m["plain"] for m in _VAR.finditer(text) if not m["escaped"]}


def compose_errors(doc: Mapping[str, Any]) -> list[str]:
    schema = json.loads(SCHEMA.read_text())
    return sorted(e.message for e in jsonschema.Draft7Validator(schema).iter_errors(doc))


def k8s_errors(doc: Mapping[str, Any]) -> list[str]:
    """Strict validation (unknown fields rejected) against the bundled Kubernetes schemas; [] when valid."""
    try:
        kubernetes_validate.validate(dict(doc), KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path))}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [exc.message]
    return []


def _k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [(f"{path.name}:{d['kind']}/{d['metadata']['name']}", d)
                     for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


K8S_DOCS = _k8s_documents()


def _k8s(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for _, d in K8S_DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any attempt to open a network connection fails the test."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield


def exported_metrics() -> set[str]:
    """Metric names the orchestrator and the node agents export, as their source declares them (counters also as
    NAME_total)."""
    names: set[str] = set()
    for module in ("orchestrator/metrics.py", "orchestrator/controller.py", "node_agent/metrics.py",
                   "node_agent/metrics_registry.py"):
        source = (ROOT / module).read_text()
        for kind, name in re.findall(r"\b(GaugeMetricFamily|CounterMetricFamily|Counter|Gauge|Histogram|Summary)"
                                     r"\(\s*\"(splitmesh_\w+)\"", source):
            names.add(name)
            if kind.startswith("Counter") and not name.endswith("_total"):
                names.add(name + "_total")
            if kind in ("Histogram", "Summary"):
                names |= {name + "_sum", name + "_count", name + "_bucket"}
    return names


def unknown_metrics(expr: str, known: set[str]) -> set[str]:
    """splitmesh_* names in a PromQL expression that nothing exports; an expression with none is an error too."""
    used = set(re.findall(r"\bsplitmesh_[a-z0-9_]+\b", expr))
    return (used - known) if used else {f"<no splitmesh metric in {expr!r}>"}


def dashboard_exprs(dashboard: Mapping[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


# ------------------------------------------------------------------ per-box compose files
@pytest.fixture(scope="module", params=ROLE_FILES)
def role_file(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return request.param, _load(COMPOSE_DIR / request.param)


def _splitmesh_services(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in doc["services"].items() if s.get("command") in (["splitmesh-orchestrator"],
                                                                                   ["splitmesh-node"])}


@pytest.mark.skipif(not SCHEMA.exists(), reason=f"compose schema not found at {SCHEMA}")
def test_role_files_match_the_compose_spec(role_file: tuple[str, dict[str, Any]]) -> None:
    name, doc = role_file
    assert not compose_errors(doc), name
    assert not compose_errors(interpolate(doc, SAMPLE_ENV)), name  # also once the variables are filled in


@pytest.mark.skipif(not SCHEMA.exists(), reason=f"compose schema not found at {SCHEMA}")
def test_the_compose_check_rejects_a_broken_role_file() -> None:
    broken = copy.deepcopy(_load(COMPOSE_DIR / "node.yml"))
    broken["services"]["node"]["volumes"] = "node-state:/var/lib/splitmesh/node"  # a list, not a string
    assert compose_errors(broken)
    broken = copy.deepcopy(_load(COMPOSE_DIR / "node.yml"))
    broken["services"]["node"]["restart_policy"] = "always"  # not a service key
    assert compose_errors(broken)


def test_role_files_use_real_settings_and_documented_variables(role_file: tuple[str, dict[str, Any]]) -> None:
    name, doc = role_file
    settings = _settings(OrchestratorConfig) | _settings(NodeConfig)
    assert variables(doc) <= settings | DEPLOY_VARS, name
    services = _splitmesh_services(doc)
    assert len(services) == 1, name
    for service in doc["services"].values():
        env = set(service.get("environment", {}))
        if service.get("command") == ["splitmesh-orchestrator"]:
            assert env <= _settings(OrchestratorConfig), name
        elif service.get("command") == ["splitmesh-node"]:
            assert env <= _settings(NodeConfig), name
        elif service.get("entrypoint") == ["splitmesh"]:
            assert env <= CLIENT_ENV, name
        else:  # Prometheus and Grafana, monitoring only
            assert service.get("profiles") == ["monitoring"], name


@pytest.mark.parametrize("name", ROLE_FILES)
def test_role_files_configure_the_component_they_run(name: str) -> None:
    doc = interpolate(_load(COMPOSE_DIR / name), SAMPLE_ENV)
    ((service_name, service),) = _splitmesh_services(doc).items()
    env = service["environment"]
    is_node = service["command"] == ["splitmesh-node"]
    config: OrchestratorConfig | NodeConfig = (build(NodeConfig, _no_flags(), env=env) if is_node
                                               else build(OrchestratorConfig, _no_flags(), env=env))
    port = config.listen.rpartition(":")[2]
    assert config.listen.startswith("0.0.0.0:")  # reachable from other boxes ...
    assert config.tls_dir  # ... so only with mutual TLS
    assert not config.insecure
    targets = {dst: src for src, dst, _ in mounts(service)}
    assert targets[f"{config.tls_dir}/ca.crt"] == f"{SAMPLE_ENV['SPLITMESH_CERTS_DIR']}/ca.crt"
    assert config.state_dir in targets  # state survives re-creating the container
    assert f"{port}:{port}" in service["ports"]
    health = " ".join(service["healthcheck"]["test"][1:])
    assert f"health --address 127.0.0.1:{port}" in health
    assert (COMPOSE_DIR / service["build"]["context"]).resolve() == ROOT
    assert (ROOT / service["build"]["dockerfile"]).exists()
    if isinstance(config, NodeConfig):
        assert config.node_id == SAMPLE_ENV["SPLITMESH_NODE_ID"]
        assert config.advertised_address == SAMPLE_ENV["SPLITMESH_ADVERTISE"]
        assert config.orchestrator == SAMPLE_ENV["SPLITMESH_ORCHESTRATOR"]
        assert config.encrypt_activations
        assert '--tls-id "$SPLITMESH_NODE_ID"' in health  # the box's own certificate, named by its node id
    else:
        assert service_name == "orchestrator"
        assert config.trusted_nodes == ["edge-a"]
        assert config.min_nodes == 2
        assert config.metrics_port == ORCHESTRATOR_METRICS_PORT
        assert f"{ORCHESTRATOR_METRICS_PORT}:{ORCHESTRATOR_METRICS_PORT}" in service["ports"]
        assert f"--tls-id {config.orchestrator_id}" in health


@pytest.mark.parametrize(("name", "missing"), [("orchestrator.yml", "SPLITMESH_TRUSTED_NODES"),
                                               ("orchestrator.yml", "SPLITMESH_CERTS_DIR"),
                                               ("edge-trusted.yml", "SPLITMESH_NODE_ID"),
                                               ("edge-trusted.yml", "SPLITMESH_ADVERTISE"),
                                               ("node.yml", "SPLITMESH_ORCHESTRATOR"),
                                               ("node.yml", "SPLITMESH_CERTS_DIR")])
def test_role_files_refuse_to_start_without_their_required_variables(name: str, missing: str) -> None:
    env = {k: v for k, v in SAMPLE_ENV.items() if k != missing}
    with pytest.raises(InterpolationError, match=missing):
        interpolate(_load(COMPOSE_DIR / name), env)


def test_role_files_start_without_the_variables_of_inactive_profiles() -> None:
    """Compose interpolates every service, profiles or not: a required Grafana password stopped a plain `up`."""
    env = {k: v for k, v in SAMPLE_ENV.items() if k != "GRAFANA_ADMIN_PASSWORD"}
    doc = interpolate(_load(COMPOSE_DIR / "orchestrator.yml"), env)
    grafana = doc["services"]["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == ""
    assert 'test -n "$GF_SECURITY_ADMIN_PASSWORD"' in grafana["entrypoint"][-1]  # Grafana itself refuses to start


def role_secret_problems(doc: Mapping[str, Any]) -> list[str]:
    """Where a container of an (interpolated) role file could read a key that is not its own, or the CA key."""
    problems = []
    for name, service in doc["services"].items():
        own = tls_id(service)
        tls = {dst.removeprefix(TLS_DIR + "/"): (src, ro) for src, dst, ro in mounts(service)
               if dst == TLS_DIR or dst.startswith(TLS_DIR + "/")}
        if own is None:
            if tls:
                problems.append(f"{name} mounts {sorted(tls)} but presents no certificate")
            continue
        wanted = {"ca.crt", f"{own}.crt", f"{own}.key"}
        if set(tls) != wanted:
            problems.append(f"{name} (certificate {own}) mounts {sorted(tls)} in {TLS_DIR}, not {sorted(wanted)}")
        for file, (src, ro) in tls.items():
            if Path(src).name != file or not ro:
                problems.append(f"{name} mounts {src} as {file}{'' if ro else ' writable'}")
        problems += [f"{name} mounts {src}" for src, _, _ in mounts(service) if Path(src).name == "ca.key"]
    return problems


@pytest.mark.parametrize("name", ROLE_FILES)
def test_role_files_mount_only_the_box_own_key_and_never_the_ca_key(name: str) -> None:
    doc = interpolate(_load(COMPOSE_DIR / name), SAMPLE_ENV)
    assert role_secret_problems(doc) == []
    if name == "edge-trusted.yml":  # the gateway on the head box presents its own client certificate
        assert tls_id(doc["services"]["gateway"]) == "gateway"


def test_the_role_secret_check_rejects_a_whole_certs_folder_or_another_key() -> None:
    doc = interpolate(_load(COMPOSE_DIR / "node.yml"), SAMPLE_ENV)
    whole = copy.deepcopy(doc)
    whole["services"]["node"]["volumes"][1:] = [f"{SAMPLE_ENV['SPLITMESH_CERTS_DIR']}:{TLS_DIR}:ro"]
    assert role_secret_problems(whole)
    other = copy.deepcopy(doc)
    other["services"]["node"]["volumes"][-1]["source"] = "/etc/splitmesh/certs/cloud.key"
    assert role_secret_problems(other) == ["node mounts /etc/splitmesh/certs/cloud.key as edge-a.key"]
    ca = copy.deepcopy(doc)
    ca["services"]["node"]["volumes"].append("/etc/splitmesh/certs/ca.key:/tmp/ca.key:ro")
    assert role_secret_problems(ca) == ["node mounts /etc/splitmesh/certs/ca.key"]


def test_only_the_trusted_edge_runs_the_gateway() -> None:
    gateways = {name for name in ROLE_FILES if "gateway" in _load(COMPOSE_DIR / name)["services"]}
    assert gateways == {"edge-trusted.yml"}  # prompts pass through it in clear
    gateway = interpolate(_load(COMPOSE_DIR / "edge-trusted.yml"), SAMPLE_ENV)["services"]["gateway"]
    assert gateway["environment"]["SPLITMESH_ADDRESS"] == SAMPLE_ENV["SPLITMESH_ORCHESTRATOR"]
    assert gateway["ports"] == ["127.0.0.1:8000:8000"]  # loopback unless SPLITMESH_GATEWAY_BIND says otherwise


def test_readme_documents_every_deploy_variable() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.partition("## Deploying across boxes")[2].partition("\n## ")[0]
    assert section, "README.md lacks the 'Deploying across boxes' section"
    for name in sorted(DEPLOY_VARS | {"SPLITMESH_TRUSTED_NODES", "SPLITMESH_NODE_ID", "SPLITMESH_ADVERTISE",
                                      "SPLITMESH_ORCHESTRATOR"}):
        assert name in section, name
    for role in ROLE_FILES:
        assert f"deploy/compose/{role}" in section, role


# ------------------------------------------------------------------ Kubernetes
@pytest.mark.parametrize(("name", "doc"), K8S_DOCS, ids=[n for n, _ in K8S_DOCS])
def test_manifests_validate_offline_against_the_kubernetes_schemas(name: str, doc: dict[str, Any],
                                                                   offline: None) -> None:
    assert not k8s_errors(doc), name


def test_the_kubernetes_check_rejects_broken_manifests(offline: None) -> None:
    deployment = _k8s("Deployment", "splitmesh-orchestrator")
    assert not k8s_errors(deployment)
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "one"
    no_selector = copy.deepcopy(deployment)
    del no_selector["spec"]["selector"]
    unknown_kind = {**copy.deepcopy(deployment), "kind": "Deploymint"}
    for broken in (typo, wrong_type, no_selector, unknown_kind):
        assert k8s_errors(broken)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = _load(K8S_DIR / "kustomization.yaml")
    manifests = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests
    assert kustomization["namespace"] == "splitmesh"
    assert all(d["metadata"].get("namespace", "splitmesh") == "splitmesh" for _, d in K8S_DOCS)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed")
def test_the_kustomize_build_validates(offline: None) -> None:
    rendered = subprocess.run(["kubectl", "kustomize", str(K8S_DIR)], capture_output=True, text=True, check=True)
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    assert len(docs) == len(K8S_DOCS)
    for doc in docs:
        assert not k8s_errors(doc), doc["metadata"]["name"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "splitmesh"


def _container(workload: Mapping[str, Any]) -> dict[str, Any]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return dict(container)


def test_orchestrator_runs_once_with_persistent_state_and_its_certificate() -> None:
    settings = _k8s("ConfigMap", "splitmesh-orchestrator")["data"]
    assert set(settings) <= _settings(OrchestratorConfig)
    config = build(OrchestratorConfig, _no_flags(), env=settings)
    deployment = _k8s("Deployment", "splitmesh-orchestrator")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # never two orchestrators on one state
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    assert container["envFrom"] == [{"configMapRef": {"name": "splitmesh-orchestrator"}}]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes[mounts[config.state_dir]]["persistentVolumeClaim"]["claimName"]
    assert _k8s("PersistentVolumeClaim", claim)
    assert volumes[mounts[config.tls_dir]]["secret"]["secretName"] == "splitmesh-orchestrator-tls"
    port = int(config.listen.rpartition(":")[2])
    probe = ["splitmesh", "--tls-id", config.orchestrator_id, "health", "--address", f"127.0.0.1:{port}"]
    assert container["readinessProbe"]["exec"]["command"] == container["livenessProbe"]["exec"]["command"] == probe
    assert {"requests", "limits"} <= set(container["resources"])
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == config.metrics_port == ORCHESTRATOR_METRICS_PORT
    service = _k8s("Service", "splitmesh-orchestrator")
    assert {p["port"] for p in service["spec"]["ports"]} == {port, config.metrics_port}
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    node_settings = _k8s("ConfigMap", "splitmesh-node")["data"]
    host, _, node_port = node_settings["SPLITMESH_ORCHESTRATOR"].rpartition(":")
    assert host.split(".")[:2] == [service["metadata"]["name"], service["metadata"]["namespace"]]
    assert int(node_port) == port


def test_node_daemonsets_split_trusted_and_untrusted_hosts() -> None:
    settings = _k8s("ConfigMap", "splitmesh-node")["data"]
    assert set(settings) <= _settings(NodeConfig)
    listen_port = settings["SPLITMESH_LISTEN"].rpartition(":")[2]
    trusted, untrusted = _k8s("DaemonSet", "splitmesh-node-trusted"), _k8s("DaemonSet", "splitmesh-node")
    secrets = set()
    for daemonset in (trusted, untrusted):
        pod = daemonset["spec"]["template"]["spec"]
        container = _container(daemonset)
        env = {e["name"]: e for e in container["env"]}
        assert set(env) - {"HOST_IP"} <= _settings(NodeConfig)
        assert env["SPLITMESH_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
        assert env["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
        assert env["SPLITMESH_ADVERTISE"]["value"] == f"$(HOST_IP):{listen_port}"
        names = [e["name"] for e in container["env"]]
        assert names.index("HOST_IP") < names.index("SPLITMESH_ADVERTISE")  # $(VAR) expands only earlier ones
        assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
        assert {"containerPort": int(listen_port), "hostPort": int(listen_port), "name": "grpc"} in container["ports"]
        for probe in ("readinessProbe", "livenessProbe"):
            command = container[probe]["exec"]["command"]
            assert command[:2] == ["sh", "-c"]
            assert f'--tls-id "$SPLITMESH_NODE_ID" health --address 127.0.0.1:{listen_port}' in command[2]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        secrets.add(volumes[mounts[settings["SPLITMESH_TLS_DIR"]]]["secret"]["secretName"])
        assert settings["SPLITMESH_STATE_DIR"] in mounts
        assert {"requests", "limits"} <= set(container["resources"])
        assert int(daemonset["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]) == NODE_METRICS_PORT
    assert len(secrets) == 2  # an untrusted pod never mounts a trusted node's key
    assert trusted["spec"]["template"]["spec"]["nodeSelector"] == {"splitmesh.io/trusted": "true"}
    terms = untrusted["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": "splitmesh.io/trusted", "operator": "NotIn", "values": ["true"]}]}]
    trust_list = _k8s("ConfigMap", "splitmesh-orchestrator")["data"]["SPLITMESH_TRUSTED_NODES"]
    assert trust_list and "splitmesh.io/trusted=true" in (K8S_DIR / "configmap.yaml").read_text()


# ------------------------------------------------------------------ Prometheus and Grafana
def test_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    known = exported_metrics()
    assert known >= DASHBOARD_METRICS  # the names the dashboard must show are really exported
    exprs = dashboard_exprs(dashboard)
    assert exprs
    for expr in exprs:
        assert not unknown_metrics(expr, known), expr
    used = {name for expr in exprs for name in re.findall(r"\bsplitmesh_[a-z0-9_]+\b", expr)}
    assert used >= DASHBOARD_METRICS
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_the_metric_check_rejects_an_unknown_or_missing_metric() -> None:
    known = exported_metrics()
    assert unknown_metrics("rate(splitmesh_decisions_total[5m])", known) == set()
    assert unknown_metrics("splitmesh_latency_ewma_seconds", known) == {"splitmesh_latency_ewma_seconds"}
    assert unknown_metrics("up", known)


def test_grafana_provisioning_matches_the_dashboard_and_compose() -> None:
    datasource = _load(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]}
    uids |= {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {datasource["uid"]}
    assert datasource["url"] == "http://prometheus:9090"
    provider = _load(DEPLOY / "grafana" / "provisioning" / "dashboards" / "splitmesh.yml")["providers"][0]
    for compose_file in (ROOT / "docker-compose.yml", COMPOSE_DIR / "orchestrator.yml"):
        grafana = _load(compose_file)["services"]["grafana"]
        assert grafana["profiles"] == ["monitoring"]
        mounts = {v.split(":")[1]: (compose_file.parent / v.split(":")[0]).resolve() for v in grafana["volumes"]}
        assert mounts[provider["options"]["path"]] == DASHBOARD.parent
        assert mounts["/etc/grafana/provisioning"] == DEPLOY / "grafana" / "provisioning"
        assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == (
            f"{provider['options']['path']}/{DASHBOARD.name}")


def _targets(config: Mapping[str, Any], job: str) -> list[str]:
    (scrape,) = [s for s in config["scrape_configs"] if s["job_name"] == job]
    return [t for group in scrape["static_configs"] for t in group["targets"]]


def _prometheus(compose_file: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The compose file and the Prometheus config its monitoring profile mounts."""
    compose = _load(compose_file)
    prometheus = compose["services"]["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prometheus["image"])
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", compose["services"]["grafana"]["image"])
    (source,) = [v.split(":")[0] for v in prometheus["volumes"] if v.split(":")[1] == "/etc/prometheus/prometheus.yml"]
    return compose, _load(compose_file.parent / source)


def test_prometheus_scrapes_the_ports_compose_configures() -> None:
    compose, config = _prometheus(ROOT / "docker-compose.yml")
    services = compose["services"]
    port = int(services["orchestrator"]["environment"]["SPLITMESH_METRICS_PORT"])
    assert port == ORCHESTRATOR_METRICS_PORT
    assert _targets(config, "splitmesh-orchestrator") == [f"orchestrator:{port}"]
    nodes = sorted(name for name, s in services.items() if s.get("command") == ["splitmesh-node"])
    assert sorted(_targets(config, "splitmesh-nodes")) == [f"{n}:{NODE_METRICS_PORT}" for n in nodes]
    if "metrics_port" in {f.name for f in dataclasses.fields(NodeConfig)}:  # once node agents export metrics
        for name in nodes:
            assert services[name]["environment"].get("SPLITMESH_METRICS_PORT") == str(NODE_METRICS_PORT), name


def test_the_orchestrator_box_prometheus_scrapes_its_orchestrator() -> None:
    compose, config = _prometheus(COMPOSE_DIR / "orchestrator.yml")
    port = int(compose["services"]["orchestrator"]["environment"]["SPLITMESH_METRICS_PORT"])
    assert _targets(config, "splitmesh-orchestrator") == [f"orchestrator:{port}"]
    assert config["global"]["scrape_interval"]
