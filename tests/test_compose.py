"""docker-compose.yml is valid Compose, configures the components with settings they really have, and gives each
box only its own key (the CA key stays with the certs job). `make compose-test` starts it for real."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from common.certs import identity_from_cert
from common.transport import DEFAULT_CLIENT_ID, DEFAULT_ORCHESTRATOR_ID
from node_agent.config import NodeConfig
from orchestrator.config import OrchestratorConfig

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT.parent / "shared" / "schemas" / "compose-spec.json"
TLS_DIR = "/etc/splitmesh/tls"


# ------------------------------------------------------------------ secrets per box (also used by test_deploy.py)
def mounts(service: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read-only) of each volume, short (``src:dst:ro``) or long syntax."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            out.append((parts[0], parts[1], parts[2:] == ["ro"]))
        else:
            out.append((str(v["source"]), str(v["target"]), bool(v.get("read_only", False))))
    return out


def tls_id(service: Mapping[str, Any]) -> str | None:
    """The certificate name a splitmesh service presents; None for other images (Prometheus, Grafana)."""
    env = service.get("environment", {})
    if service.get("command") == ["splitmesh-node"]:
        return str(env["SPLITMESH_NODE_ID"])
    if service.get("command") == ["splitmesh-orchestrator"]:
        return str(env.get("SPLITMESH_ORCHESTRATOR_ID", DEFAULT_ORCHESTRATOR_ID))
    if service.get("entrypoint") == ["splitmesh"]:
        return str(env.get("SPLITMESH_CLIENT_ID", DEFAULT_CLIENT_ID))
    return None


def certs_job(doc: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    ((name, service),) = [(n, s) for n, s in doc["services"].items() if "CA_DIR" in s.get("environment", {})]
    return name, service


def secret_problems(doc: Mapping[str, Any]) -> list[str]:
    """Where a container of the one-host file could read a key that is not its own, or the CA key."""
    certs_name, certs = certs_job(doc)
    env = certs["environment"]
    boxes = dict(box.split(":") for box in env["BOXES"].split())
    ca_volumes = {src for src, dst, _ in mounts(certs) if dst == env["CA_DIR"]}
    box_volumes = {src: dst.removeprefix(env["OUT_DIR"] + "/") for src, dst, _ in mounts(certs)
                   if dst.startswith(env["OUT_DIR"] + "/")}
    problems = [f"certs issues {n} but mounts no volume for it" for n in boxes if n not in box_volumes.values()]
    for name, service in doc["services"].items():
        if name == certs_name:
            continue
        own = tls_id(service)
        for src, dst, ro in mounts(service):
            if src in ca_volumes:
                problems.append(f"{name} mounts the CA volume {src} at {dst}")
            elif src in box_volumes and box_volumes[src] != own:
                problems.append(f"{name} (certificate {own}) mounts {box_volumes[src]}'s key volume {src}")
            elif src in box_volumes and (dst != TLS_DIR or not ro):
                problems.append(f"{name} mounts its key volume at {dst}{'' if ro else ' writable'}")
        if own is not None and own not in boxes:
            problems.append(f"{name} presents certificate {own}, which certs does not issue")
        if own is not None and (TLS_DIR not in {dst for _, dst, _ in mounts(service)}):
            problems.append(f"{name} mounts no TLS directory")
    return problems


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


@pytest.mark.skipif(not SCHEMA.exists(), reason=f"compose schema not found at {SCHEMA}")
def test_compose_file_matches_the_compose_spec(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=str)
    assert not errors, [e.message for e in errors]


def _settings(cls: type) -> set[str]:
    return {"SPLITMESH_" + f.name.upper() for f in dataclasses.fields(cls)}


def test_services_use_real_settings_and_one_trusted_edge(compose: dict[str, Any]) -> None:
    services = compose["services"]
    orchestrator_env = services["orchestrator"]["environment"]
    assert set(orchestrator_env) <= _settings(OrchestratorConfig)
    nodes = {name: s for name, s in services.items() if s.get("command") == ["splitmesh-node"]}
    assert set(nodes) == {"edge-a", "edge-b", "cloud"}
    for name, service in nodes.items():
        env = service["environment"]
        assert set(env) <= _settings(NodeConfig), name
        assert env["SPLITMESH_NODE_ID"] == name
        assert env["SPLITMESH_ADVERTISE"].split(":")[0] == service["hostname"] == name
        assert env["SPLITMESH_ORCHESTRATOR"].split(":")[0] == "orchestrator"
    assert orchestrator_env["SPLITMESH_TRUSTED_NODES"] == "edge-a"
    assert int(orchestrator_env["SPLITMESH_MIN_NODES"]) == len(nodes)
    dockerfile = ROOT / services["orchestrator"]["build"]["dockerfile"]
    assert dockerfile.exists() and "splitmesh model import" in dockerfile.read_text()


@pytest.mark.skipif(not SCHEMA.exists(), reason=f"compose schema not found at {SCHEMA}")
def test_the_schema_check_rejects_a_broken_file(compose: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["edge-a"]["depends_on"] = {"orchestrator": {"condition": "when-it-feels-like-it"}}
    assert list(jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).iter_errors(broken))


def test_every_grpc_service_runs_mutual_tls(compose: dict[str, Any]) -> None:
    """Plaintext on a non-loopback address is refused at start-up, so every server needs certificates."""
    services = compose["services"]
    for name in ("orchestrator", "edge-a", "edge-b", "cloud", "cli"):
        service = services[name]
        assert service["environment"]["SPLITMESH_TLS_DIR"] == TLS_DIR, name
        assert f"{tls_id(service)}-tls:{TLS_DIR}:ro" in service["volumes"], name
        assert "SPLITMESH_INSECURE" not in service["environment"], name
    boxes = dict(box.split(":") for box in services["certs"]["environment"]["BOXES"].split())
    assert boxes == {"orchestrator": "orchestrator", "edge-a": "node", "edge-b": "node", "cloud": "node",
                     "operator": "operator"}
    assert tls_id(services["cli"]) == "operator"  # the CLI may change the mesh (resplit, drain, policy set)


def test_each_box_mounts_only_its_own_key_and_no_node_the_ca_key(compose: dict[str, Any]) -> None:
    assert secret_problems(compose) == []


def test_the_secret_check_rejects_a_shared_key_or_the_ca_volume(compose: dict[str, Any]) -> None:
    shared = json.loads(json.dumps(compose))
    shared["services"]["cloud"]["volumes"].append("edge-a-tls:/tmp/edge-a:ro")
    assert secret_problems(shared) == ["cloud (certificate cloud) mounts edge-a's key volume edge-a-tls"]
    ca = json.loads(json.dumps(compose))
    ca["services"]["cloud"]["volumes"].append("ca:/tmp/ca:ro")
    assert secret_problems(ca) == ["cloud mounts the CA volume ca at /tmp/ca"]
    one_volume = json.loads(json.dumps(compose))  # the old layout: one volume with every key, for every box
    for service in one_volume["services"].values():
        service["volumes"] = [v.replace("edge-a-tls:", "ca:").replace("cloud-tls:", "ca:") for v in
                              service.get("volumes", [])]
    assert {p.split()[0] for p in secret_problems(one_volume)} == {"edge-a", "cloud", "certs"}


def test_the_certs_job_gives_each_box_its_own_files_only(compose: dict[str, Any], tmp_path: Path) -> None:
    """The certs job's own script, run here with its volumes as folders: each box folder gets ca.crt plus that
    box's certificate (of the right kind) and key (0600); ca.key stays in the CA folder."""
    _, certs = certs_job(compose)
    env = certs["environment"]
    script = certs["command"][0].replace("$$", "$")
    shim = tmp_path / "bin" / "splitmesh"
    shim.parent.mkdir()
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m splitmesh.cli \"$@\"\n")
    shim.chmod(0o755)
    run_env = {**os.environ, "PATH": f"{shim.parent}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
               "BOXES": env["BOXES"], "CA_DIR": str(tmp_path / "ca"), "OUT_DIR": str(tmp_path / "out")}
    for _ in range(2):  # a second run (docker compose up again) keeps the CA and refreshes the box folders
        subprocess.run(["/bin/sh", "-c", script], env=run_env, check=True, timeout=120, capture_output=True)
    boxes = dict(box.split(":") for box in env["BOXES"].split())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(boxes)
    for name, kind in boxes.items():
        folder = tmp_path / "out" / name
        assert sorted(p.name for p in folder.iterdir()) == sorted(["ca.crt", f"{name}.crt", f"{name}.key"])
        assert stat.S_IMODE((folder / f"{name}.key").stat().st_mode) == 0o600
        identity = identity_from_cert((folder / f"{name}.crt").read_bytes())
        assert (identity.kind, identity.node_id) == (kind, name)
        assert (folder / "ca.crt").read_bytes() == (tmp_path / "ca" / "ca.crt").read_bytes()
    assert (tmp_path / "ca" / "ca.key").is_file()
    assert not list((tmp_path / "out").rglob("ca.key"))


def test_state_directories_exist_in_the_image_owned_by_the_runtime_user(compose: dict[str, Any]) -> None:
    """Docker seeds an empty named volume from the image's directory: without one owned by uid 10001, the
    orchestrator cannot open its database and crash-loops."""
    dockerfile = (ROOT / services_build(compose)["dockerfile"]).read_text()
    for service in ("orchestrator", "edge-a", "edge-b", "cloud"):
        state = compose["services"][service]["environment"]["SPLITMESH_STATE_DIR"]
        assert any(dst == state for _, dst, _ in mounts(compose["services"][service])), service
        assert state in dockerfile.partition("mkdir -p")[2].partition("&&")[0], state
    assert "chown -R splitmesh:splitmesh /var/lib/splitmesh" in dockerfile
    assert "USER splitmesh" in dockerfile


def services_build(compose: Mapping[str, Any]) -> dict[str, Any]:
    build: dict[str, Any] = compose["services"]["orchestrator"]["build"]
    return build


def test_no_top_level_name_for_docker_compose_1_29(compose: dict[str, Any]) -> None:
    """Debian's docker-compose 1.29 rejects the top-level `name:`; the project name comes from -p."""
    assert "name" not in compose


def test_the_health_probe_does_not_load_torch() -> None:
    """Every container's health check runs `splitmesh health`; importing torch made it take longer than the probe
    timeout on a busy box, so healthy containers were reported unhealthy."""
    code = ("import sys; from splitmesh.cli import main; main(['health', '--address', '127.0.0.1:1']); "
            "print(sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def _dockerfile_stages(text: str) -> dict[str, str]:
    """Stage name -> its instructions, in file order (the last one is what a plain `docker build` makes)."""
    stages: dict[str, str] = {}
    name = ""
    for line in text.splitlines():
        if line.startswith("FROM "):
            name = line.split(" AS ")[-1].strip() if " AS " in line else f"stage{len(stages)}"
            stages[name] = ""
        elif name:
            stages[name] += line + "\n"
    return stages


def test_only_the_orchestrator_image_holds_the_weight_keys(compose: dict[str, Any]) -> None:
    """The store's weight keys open every layer: they are built into the orchestrator's target alone, and every
    other splitmesh service (nodes, the CLI, the certs job), in this file and the role files, runs the default
    keyless target."""
    stages = _dockerfile_stages((ROOT / services_build(compose)["dockerfile"]).read_text())
    holding = [n for n, body in stages.items() if "weight_keys.json" in body and n != "build"]
    assert holding == ["orchestrator"], holding
    assert list(stages)[-1] == "node" and "weight_keys" not in stages["node"] + stages["runtime"]
    assert "mv /opt/splitmesh/store/weight_keys.json" in stages["build"]  # out of the store every image copies
    role_files = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "deploy" / "compose").glob("*.yml"))]
    for doc in (compose, *role_files):
        for name, service in doc["services"].items():
            if "build" not in service:
                continue  # Prometheus, Grafana
            want = "orchestrator" if service.get("command") == ["splitmesh-orchestrator"] else "node"
            assert service["build"].get("target") == want, name
