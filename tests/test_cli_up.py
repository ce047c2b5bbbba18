"""`splitmesh up` as a user runs it: mutual TLS by default with certificates found by every command, a reused
workdir that honours --boundaries/--place, a second mesh on a taken port, drained nodes, and stopping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitmesh import Client
from splitmesh.gateway import build_app
from splitmesh.launcher import LocalMesh, MeshSpec, MeshStartError, free_port
from splitmesh.local_meshes import ENV_MESHES_DIR
from tests.conftest import STORE
from tests.test_gateway import running

pytestmark = pytest.mark.slow
STARTUP_LIMIT_S = 10.0


def _env(home: Path) -> dict[str, str]:
    return {"COLUMNS": "200", "PATH": "/usr/bin:/bin", "HOME": str(home), "SPLITMESH_STORE": str(STORE),
            "SPLITMESH_MESHES_DIR": str(home / "meshes")}


def splitmesh(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "splitmesh", *args], capture_output=True, text=True, timeout=120,
                          env=_env(home))


def _children(marker: str) -> list[int]:
    """Processes whose command line names ``marker`` (the mesh's workdir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


class Up:
    """A `splitmesh up` process and what it printed."""

    def __init__(self, home: Path, workdir: Path, address: str, *args: str) -> None:
        self.home, self.workdir, self.address = home, workdir, address
        self.out = (home / f"up-{time.monotonic_ns()}.out").open("w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "splitmesh", "up", "--address", address, "--workdir",
                                      str(workdir), "--nodes", "2", "--threads", "1", *args],
                                     stdout=self.out, stderr=subprocess.STDOUT, text=True, env=_env(home))

    def text(self) -> str:
        self.out.seek(0)
        return self.out.read()

    def wait_serving(self, timeout_s: float = 240) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.text()
            if "serving on" in text:
                return text
            assert self.proc.poll() is None, text
            time.sleep(0.5)
        raise AssertionError(f"not serving: {self.text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=60)
        self.out.close()
        return code


@pytest.fixture()
def home(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


def test_up_with_tls_by_default_and_every_command_after_it(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    workdir, address = home / "local", f"127.0.0.1:{free_port()}"
    up = Up(home, workdir, address)
    try:
        text = up.wait_serving()
        assert "with mutual TLS" in text and str(workdir / "tls") in text
        assert {p.name for p in (workdir / "tls").glob("*.crt")} >= {"ca.crt", "client.crt", "operator.crt"}
        status = splitmesh(home, "status", "--address", address)  # no flag: the record of `up` names the certs
        assert status.returncode == 0, status.stderr
        assert "alive trusted" in status.stdout and "no token measured on this plan yet" in status.stdout
        plaintext = subprocess.run([sys.executable, "-m", "splitmesh", "status", "--address", address],
                                   capture_output=True, text=True, timeout=60,
                                   env={**_env(home), "SPLITMESH_MESHES_DIR": str(home / "elsewhere")})
        assert plaintext.returncode == 1 and "is the mesh up?" not in plaintext.stderr
        assert "serves mutual TLS" in plaintext.stderr
        monkeypatch.setenv(ENV_MESHES_DIR, str(home / "meshes"))
        with Client(address) as client:  # the SDK finds the certificates the same way
            assert client.tls is not None and client.status().serving
        with running(build_app(address)) as url, urllib.request.urlopen(f"{url}/health", timeout=30) as health:
            assert json.loads(health.read())["status"] == "serving"  # and so does the gateway

        adjacent = splitmesh(home, "resplit", "--address", address, "--boundaries", "0,5,10,20,30",
                             "--place", "node-0,node-0,node-1,node-0", "--dry-run")
        assert adjacent.returncode == 0 and "inf ms" not in adjacent.stdout  # a hop within one box costs no link

        drained = splitmesh(home, "drain", "--address", address, "node-1")
        assert drained.returncode == 0, drained.stderr
        nodes = splitmesh(home, "nodes", "--address", address)
        assert any(line.split()[:1] == ["node-1"] and "drained" in line for line in nodes.stdout.splitlines())
        onto = splitmesh(home, "resplit", "--address", address, "--boundaries", "0,10,30", "--place", "node-0,node-1")
        assert onto.returncode == 1 and "FAILED_PRECONDITION: node-1 is drained" in onto.stderr
        assert "not registered and alive" not in onto.stderr
        splitmesh(home, "drain", "--address", address, "node-1", "--undo")
        history = splitmesh(home, "history", "--address", address, "--kind", "operator")
        kinds = {line.split()[1] for line in history.stdout.splitlines() if line[:2].isdigit()}
        assert kinds == {"operator"}, history.stdout

        started = time.monotonic()
        second = splitmesh(home, "up", "--address", address, "--workdir", str(home / "other"))
        assert time.monotonic() - started < STARTUP_LIMIT_S
        assert second.returncode == 2 and "already in use" in second.stderr and "serving on" not in second.stdout
    finally:
        assert up.stop() == 0
    assert not list((home / "meshes").glob("*.json"))  # the record goes with the mesh
    assert not _children(str(workdir))

    again = Up(home, workdir, address, "--boundaries", "0,12,30", "--place", "node-0,node-1", "--trusted",
               "node-0,node-1")
    try:
        again.wait_serving()
        plan = splitmesh(home, "plan", "--address", address)
        assert "[0,12)" in plan.stdout and "[12,30)" in plan.stdout, plan.stdout
    finally:
        again.stop()


def test_ctrl_c_during_start_up_stops_every_process(home: Path) -> None:
    workdir = home / "local"
    up = Up(home, workdir, f"127.0.0.1:{free_port()}")
    deadline = time.monotonic() + 60
    while not (workdir / "node-1.log").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "serving on" not in up.text()
    code = up.stop()
    assert code == 130, up.text()
    assert not _children(str(workdir))


def test_a_process_that_dies_while_starting_is_reported_with_its_reason(tmp_path: Path) -> None:
    spec = MeshSpec(nodes=1, store=STORE, workdir=tmp_path, orchestrator_port=0,
                    extra_env={"SPLITMESH_LOG_LEVEL": "NO-SUCH-LEVEL"})
    started = time.monotonic()
    with pytest.raises(MeshStartError, match="Unknown level: 'NO-SUCH-LEVEL'"), LocalMesh(spec):
        pass
    assert time.monotonic() - started < 60  # not the start timeout (180 s)
    assert os.path.exists(tmp_path / "orchestrator.log")
