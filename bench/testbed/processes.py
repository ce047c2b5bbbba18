"""Processes inside testbed namespaces: started in their own session, stopped by process group.

Each process is ``[taskset -c CPUS] ip netns exec NS argv...``: taskset's affinity survives the exec, and
``ip netns exec`` execs in place, so the process group we signal is exactly the one we started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

HOG_CODE = "while True:\n    pass\n"  # one busy thread: the 'other tenant' on a host's core


@dataclass
class ProcessGroup:
    """Named child processes with their log files; ``stop`` ends all of them (TERM, then KILL)."""

    logdir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _logs: dict[str, IO[bytes]] = field(default_factory=dict)

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` as its own session, output to LOGDIR/NAME.log; ``env`` replaces the environment."""
        if name in self.procs and self.procs[name].poll() is None:
            raise RuntimeError(f"{name} already running")
        self.logdir.mkdir(parents=True, exist_ok=True)
        fh = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self._logs[name] = fh
        merged = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(list(argv), stdout=fh, stderr=subprocess.STDOUT, env=merged, start_new_session=True,
                                stdin=subprocess.DEVNULL)
        self.procs[name] = proc
        log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        return proc

    def running(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def check_alive(self, names: Sequence[str]) -> None:
        """RuntimeError naming the first of ``names`` that exited, with the tail of its log."""
        for name in names:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                tail = self.log_tail(name)
                raise RuntimeError(f"{name} exited with {proc.returncode}; log {self.logdir / name}.log:\n{tail}")

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.logdir / f"{name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop_one(self, name: str, grace_s: float = 5.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None:
            _terminate([proc], grace_s)
        fh = self._logs.pop(name, None)
        if fh is not None:
            fh.close()

    def stop(self, grace_s: float = 8.0) -> None:
        """TERM every group, wait up to ``grace_s`` in total, KILL what is left. Idempotent."""
        _terminate(list(self.procs.values()), grace_s)
        self.procs.clear()
        for fh in self._logs.values():
            fh.close()
        self._logs.clear()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # the child leads its own session, so its pgid is its pid


def _terminate(procs: list[subprocess.Popen[bytes]], grace_s: float) -> None:
    live = [p for p in procs if p.poll() is None]
    for p in live:
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in live:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("pid %d ignored SIGTERM for %.0f s; killing its group", p.pid, grace_s)
            _signal_group(p, signal.SIGKILL)
            p.wait(timeout=10)


def in_namespace(exec_prefix: Sequence[str], argv: Sequence[str], cpus: str = "") -> list[str]:
    """argv that runs ``argv`` in a namespace, pinned to ``cpus`` when given."""
    pin = ["taskset", "-c", cpus] if cpus else []
    return [*pin, *exec_prefix, *argv]


def python_argv(module: str, args: Sequence[str]) -> list[str]:
    """This interpreter (the repo's venv) running ``-m module``."""
    return [sys.executable, "-m", module, *args]


def hog_argv() -> list[str]:
    return [sys.executable, "-c", HOG_CODE]
