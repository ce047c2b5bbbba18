"""Structured logs carry the session and epoch of the request being handled."""

from __future__ import annotations

import json
import logging

import pytest

from common.log_format import EPOCH, SESSION, setup_logging


def test_json_lines_carry_session_and_epoch(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("node-7", "INFO", json_lines=True)
    SESSION.set("abc123")
    EPOCH.set(42)
    logging.getLogger("splitmesh.test").info("step %d done", 3)
    SESSION.set("")
    EPOCH.set(0)
    logging.getLogger("splitmesh.test").warning("idle")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert lines[0]["msg"] == "step 3 done" and lines[0]["session"] == "abc123" and lines[0]["epoch"] == 42
    assert lines[0]["component"] == "node-7" and lines[0]["level"] == "INFO"
    assert "session" not in lines[1] and lines[1]["level"] == "WARNING"
    setup_logging("node-7", "INFO", json_lines=False)
