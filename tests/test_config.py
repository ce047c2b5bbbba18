"""Config precedence: defaults < TOML file < environment < flags, with readable errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from common.config import ConfigError, add_arguments, build
from node_agent.config import NodeConfig
from orchestrator.config import OrchestratorConfig


def _args(cls: type, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser, cls)
    return parser.parse_args(argv)


def test_precedence(tmp_path: Path) -> None:
    config_file = tmp_path / "c.toml"
    config_file.write_text('[orchestrator]\nmin_nodes = 2\ncluster_id = "from-file"\ntrusted_nodes = ["a"]\n')
    env = {"SPLITMESH_CLUSTER_ID": "from-env", "SPLITMESH_BOUNDARIES": "0,10,30"}
    config = build(OrchestratorConfig, _args(OrchestratorConfig, ["--config", str(config_file), "--min-nodes", "4"]),
                   env=env, section="orchestrator")
    assert config.min_nodes == 4
    assert config.cluster_id == "from-env"
    assert config.trusted_nodes == ["a"]
    assert config.boundaries == [0, 10, 30]
    assert config.report_interval_ms == 1000


def test_errors_are_readable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_sessions"):
        build(NodeConfig, _args(NodeConfig, ["--max-sessions", "many"]), env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nno_such_key = 1\n")
    with pytest.raises(ConfigError, match="unknown config keys: no_such_key"):
        build(NodeConfig, _args(NodeConfig, ["--config", str(bad)]), env={}, section="node")


def test_the_weight_reserve_is_set_from_the_environment_and_checked() -> None:
    assert build(NodeConfig, _args(NodeConfig, []), env={}).weight_reserve_s == 0  # off unless asked for
    config = build(NodeConfig, _args(NodeConfig, []), env={"SPLITMESH_WEIGHT_RESERVE_S": "60"})
    assert config.weight_reserve_s == 60
    with pytest.raises(ConfigError, match="weight_reserve_s"):
        build(NodeConfig, _args(NodeConfig, ["--weight-reserve-s", "-1"]), env={})
