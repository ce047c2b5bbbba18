"""The `splitmesh` command's own checks, run as a subprocess with no mesh: usage errors, start-up refusals,
model import errors, tables in 80 columns, and the SDK's error type."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from common.proto import splitmesh_pb2 as pb
from orchestrator.registry import NodeRecord
from orchestrator.static_placement import place
from splitmesh import Client, SplitmeshError
from splitmesh.client import build_request
from splitmesh.launcher import free_port
from splitmesh.tables import history_table, nodes_table, plan_table
from tests.conftest import STORE

STARTUP_LIMIT_S = 10.0  # a start-up failure must say why within this


def splitmesh(*args: str, tmp: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {"COLUMNS": "200", "PATH": "/usr/bin:/bin", "SPLITMESH_STORE": str(STORE)}
    if tmp is not None:
        env |= {"HOME": str(tmp), "SPLITMESH_MESHES_DIR": str(tmp / "meshes")}
    return subprocess.run([sys.executable, "-m", "splitmesh", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_up_tls_is_not_read_as_an_abbreviation(tmp_path: Path) -> None:
    result = splitmesh("up", "--tls", "--boundaries", "0,10", "--workdir", str(tmp_path), tmp=tmp_path)
    assert "ambiguous option" not in result.stderr
    assert result.returncode == 2 and "bad boundaries [0, 10]" in result.stderr  # --tls parsed, the split refused
    abbreviated = splitmesh("status", "--addr", "127.0.0.1:1")
    assert abbreviated.returncode == 2 and "unrecognized arguments: --addr" in abbreviated.stderr


def test_plaintext_is_an_explicit_flag_that_says_what_it_gives_up() -> None:
    text = " ".join(splitmesh("up", "--help").stdout.split())
    assert "--insecure-plaintext" in text and "any local process can then register as a node" in text


@pytest.mark.parametrize("args", [
    ("generate", "hi", "--top-k", "-5"),
    ("generate", "hi", "--seed", "-1"),
    ("generate", "hi", "--max-new-tokens", "0"),
    ("generate", "hi", "--top-p", "nan"),
    ("history", "--limit", "-1"),
    ("up", "--nodes", "0"),
])
def test_out_of_range_values_are_usage_errors(args: tuple[str, ...]) -> None:
    result = splitmesh(*args, "--address", f"127.0.0.1:{free_port()}")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "must be" in result.stderr.splitlines()[-1]


def test_model_import_errors_are_one_line(tmp_path: Path) -> None:
    missing = splitmesh("model", "import", "--store", str(tmp_path / "store"), "--checkpoint", "/nonexistent")
    assert missing.returncode == 1 and missing.stderr.strip() == "error: checkpoint folder /nonexistent does not exist"
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    bad = splitmesh("model", "import", "--store", str(tmp_path / "store"), "--gguf", str(text))
    assert bad.returncode == 1 and "is not a GGUF file" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize(("args", "reason"), [
    (("--boundaries", "0,10,20"), "bad boundaries [0, 10, 20]: spans end at layer 20, model has 30 layers"),
    (("--trusted", "node-O"), "--trusted names node-O, not a node of this mesh"),
    (("--boundaries", "0,10,20,30", "--place", "node-1,node-2,node-0"),
     "segment 0 is privacy-critical; node 'node-1' is not trusted"),
])
def test_start_up_failures_exit_at_once_with_the_reason(tmp_path: Path, args: tuple[str, ...], reason: str) -> None:
    started = time.monotonic()
    result = splitmesh("up", "--address", f"127.0.0.1:{free_port()}", "--workdir", str(tmp_path / "w"), *args,
                       tmp=tmp_path)
    assert time.monotonic() - started < STARTUP_LIMIT_S
    assert result.returncode == 2
    assert reason in " ".join(result.stderr.split())
    assert not (tmp_path / "w" / "orchestrator.log").exists()  # refused before any process started


def test_up_on_a_taken_port_fails_at_once(tmp_path: Path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        started = time.monotonic()
        result = splitmesh("up", "--address", f"127.0.0.1:{port}", "--workdir", str(tmp_path / "w"), tmp=tmp_path)
    assert time.monotonic() - started < STARTUP_LIMIT_S
    assert result.returncode == 2 and f"127.0.0.1:{port} is already in use" in result.stderr
    assert "serving on" not in result.stdout


def test_tables_keep_names_and_numbers_whole_in_80_columns() -> None:
    address = "192.168.100.200:50061"
    status = pb.StatusReply(nodes=[pb.NodeState(
        node_id=n, address=address, trusted=n == "edge-a", alive=True, last_seen_s=0.31, drained=n == "cloud",
        capacity=pb.Capacity(cpu_utilisation=0.5, memory_available_bytes=123 << 30, layer_decode_ms=1.2345),
        active_sessions=3, plan_epoch=12345) for n in ("edge-a", "edge-b", "cloud")])
    plan = pb.Plan(epoch=12345, num_layers=30, model_digest="abcdef0123456789",
                   nodes=[pb.PlanNode(node_id=n, address=address, trusted=True) for n in ("edge-a", "edge-b")],
                   segments=[pb.PlanSegment(start=0, end=10, node_id="edge-a", privacy_critical=True),
                             pb.PlanSegment(start=10, end=30, node_id="edge-b", privacy_critical=True)])
    decision = pb.DecisionRecord(at_ms=1_700_000_000_000, kind="node-lost", epoch_before=12344, epoch_after=12345,
                                 triggers="utilisation=0.97 (limit 0.85), latency=180.5 (limit 150)",
                                 reason="lost edge-b; resplit to [0,10)@edge-a [10,30)@cloud " * 3,
                                 predicted_latency_old_ms=123.456, predicted_latency_new_ms=98.765)
    console = Console(width=80, record=True)
    for table in (nodes_table(status), plan_table(plan), history_table([decision])):
        console.print(table)
    out = console.export_text()
    assert max(map(len, out.splitlines())) <= 80
    rows = [line.split() for line in out.splitlines()]
    for name in ("edge-a", "edge-b", "cloud"):
        assert any(row and row[0] == name and address in row and "12345" in row for row in rows), out
    assert "drained" in out and "…" not in out
    assert "123.46->98.77" in out and "12344->12345" in out and "node-lost" in out


def test_piped_output_is_laid_out_whole() -> None:
    code = ("from splitmesh.tables import console_for_tables; c = console_for_tables(); "
            "print(c.width)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PATH": "/usr/bin"},
                            check=True)
    assert int(result.stdout) >= 200


def _records(*specs: tuple[str, bool]) -> list[NodeRecord]:
    return [NodeRecord(node_id=n, address=f"{n}:1", trusted=t, model_digests=set(), capacity=pb.Capacity())
            for n, t in specs]


def test_two_trusted_nodes_get_one_segment_each() -> None:
    # It put both segments on the head ([a, a]), leaving the second trusted node idle.
    assert [s.node_id for s in place(_records(("a", True), ("b", True)), 30).segments] == ["a", "b"]


@pytest.mark.parametrize("call", [
    lambda c: c.history(-1),
    lambda c: c.drain(7),
    lambda c: c.resplit([-1, 30]),
    lambda c: list(c.generate("hi", top_k=-5)),
    lambda c: list(c.generate("hi", seed=-1)),
    lambda c: list(c.generate([{"role": "user"}])),
    lambda c: list(c.generate([1, "two"])),
    lambda c: list(c.generate(42)),
    lambda c: list(c.generate("hi", stop="x")),
])
def test_the_sdk_refuses_bad_values_with_its_own_error(call: object) -> None:
    with Client(f"127.0.0.1:{free_port()}") as client, pytest.raises(SplitmeshError) as caught:
        call(client)  # type: ignore[operator]
    assert caught.value.code == "INVALID_ARGUMENT"


def test_build_request_keeps_every_valid_form() -> None:
    assert build_request([1, 2], 4, 0.0, 1.0, 0, 2**64 - 1, (), False).token_ids.ids == [1, 2]
    chat = build_request([{"role": "user", "content": "hi"}], 4, 0.0, 1.0, 0, 0, ["x"], False)
    assert chat.messages.messages[0].content == "hi" and list(chat.stop) == ["x"]
    assert build_request("", 4, 0.0, 1.0, 0, 0, (), False).WhichOneof("input") == "prompt"


def test_up_exposes_metrics_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    from splitmesh.cli import build_parser

    assert build_parser().parse_args(["up"]).metrics_port == 0
    assert build_parser().parse_args(["up", "--metrics-port", "9464"]).metrics_port == 9464
    monkeypatch.setenv("SPLITMESH_METRICS_PORT", "9470")
    assert build_parser().parse_args(["up"]).metrics_port == 9470  # it was always overridden with 0


def test_commands_that_change_the_mesh_present_the_operator_certificate(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from argparse import Namespace

    from common import certs
    from common.transport import TransportError
    from splitmesh.cli import _tls

    monkeypatch.delenv("SPLITMESH_TLS_DIR", raising=False)
    monkeypatch.delenv("SPLITMESH_OPERATOR_ID", raising=False)
    certs.init_ca(tmp_path)
    certs.issue(tmp_path, "client", "client")

    def args(command: str, **extra: object) -> Namespace:
        return Namespace(command=command, tls_dir=str(tmp_path), tls_id=None, address="127.0.0.1:1", **extra)

    assert _tls(args("status")).cert.name == "client.crt"  # type: ignore[union-attr]
    assert _tls(args("drain")).cert.name == "client.crt"  # type: ignore[union-attr]  # no operator cert yet
    with pytest.raises(TransportError, match="certs issue operator --kind operator"):
        _tls(Namespace(command="resplit", tls_dir=str(tmp_path), tls_id="operator", address="127.0.0.1:1"))
    certs.issue(tmp_path, "operator", "operator")
    for command, extra in (("drain", {}), ("resplit", {}), ("policy", {"action": "set"})):
        assert _tls(args(command, **extra)).cert.name == "operator.crt"  # type: ignore[union-attr]
    assert _tls(args("policy", action="get")).cert.name == "client.crt"  # type: ignore[union-attr]
