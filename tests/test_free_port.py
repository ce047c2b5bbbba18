"""Ports a local mesh names for its servers stay clear of the ports outgoing connections take."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from splitmesh import launcher
from splitmesh.launcher import ephemeral_ports, free_port


def test_free_ports_are_outside_the_ephemeral_range_distinct_and_bindable() -> None:
    ephemeral = ephemeral_ports()
    ports = [free_port() for _ in range(100)]
    assert not [p for p in ports if p in ephemeral]
    assert len(set(ports)) == len(ports)
    for port in ports[:10]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_an_outgoing_connection_holds_is_never_named() -> None:
    """What broke a mesh start: a node's port, chosen seconds before it bound it, taken as a source port."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        clients = [socket.create_connection(server.getsockname()) for _ in range(20)]
        try:
            taken = {c.getsockname()[1] for c in clients}
            assert not taken & {free_port() for _ in range(200)}
        finally:
            for c in clients:
                c.close()


def test_the_range_follows_the_kernel_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    setting = tmp_path / "ip_local_port_range"
    setting.write_text("20000\t60999\n")
    monkeypatch.setattr(launcher, "EPHEMERAL_RANGE_FILE", setting)
    assert all(10000 <= free_port() < 20000 for _ in range(50))
    setting.write_text("1024\t40000\n")  # ephemeral ports start low: servers get the ports above the range
    assert all(40000 < free_port() <= 65535 for _ in range(50))
