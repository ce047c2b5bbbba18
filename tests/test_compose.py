"""docker-compose.yml is valid Compose and configures the components with settings they really have."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from node_agent.config import NodeConfig
from orchestrator.config import OrchestratorConfig

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT.parent / "shared" / "schemas" / "compose-spec.json"


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
        assert service["environment"]["SPLITMESH_TLS_DIR"] == "/etc/splitmesh/tls", name
        assert "tls:/etc/splitmesh/tls:ro" in service["volumes"], name
        assert "SPLITMESH_INSECURE" not in service["environment"], name
    issued = services["certs"]["command"][0]
    for name in ("orchestrator", "edge-a", "edge-b", "cloud", "client"):
        assert name in issued
