"""The operator CLI against a live mesh and against nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from splitmesh.launcher import LocalMesh, free_port


def splitmesh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "splitmesh", *args], capture_output=True, text=True, timeout=120,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


def test_status_fails_cleanly_without_a_mesh() -> None:
    result = splitmesh("status", "--address", f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "cannot reach the orchestrator" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_status_plan_resplit_and_generate(mesh: LocalMesh) -> None:
    status = splitmesh("status", "--address", mesh.address)
    assert status.returncode == 0, status.stderr
    assert "serving" in status.stdout and "node-4" in status.stdout
    resplit = splitmesh("resplit", "--address", mesh.address, "--boundaries", "0,7,30", "--place", "node-0,node-4")
    assert resplit.returncode == 0, resplit.stderr
    plan = splitmesh("plan", "--address", mesh.address)
    assert "[0,7)" in plan.stdout and "[7,30)" in plan.stdout
    dry = subprocess.run([sys.executable, "-m", "splitmesh", "resplit", "--dry-run", "--address", mesh.address],
                         capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})  # piped
    assert dry.returncode == 0, dry.stderr
    header = next(line.split() for line in dry.stdout.splitlines() if "ms/token" in line and "tok/s" in line)
    assert header == ["plan", "ms/token", "tok/s", "bound", "by"], dry.stdout
    current = next(line.split() for line in dry.stdout.splitlines() if line.split()[:1] == ["current"])
    assert float(current[1]) > 0 and float(current[2]) > 0 and "sessions" in dry.stdout
    assert any(line.split()[:1] == ["proposed"] for line in dry.stdout.splitlines())
    bad = splitmesh("resplit", "--address", mesh.address, "--boundaries", "0,7,30", "--place", "node-1,node-4")
    assert bad.returncode == 1
    assert "INVALID_ARGUMENT" in bad.stderr and "not trusted" in bad.stderr
    gen = splitmesh("generate", "--address", mesh.address, "What is the capital of France?", "--max-new-tokens", "12")
    assert gen.returncode == 0, gen.stderr
    assert "Paris" in gen.stdout
