"""An audit tap for security tests: with ``SPLITMESH_AUDIT_DIR`` set, a process records every splitmesh
message it deserializes (requests its servers receive and replies its stubs receive) and every activation
tensor it decrypts, one JSON line each, in ``<dir>/<name>.jsonl``.

It exists so a test can play a compromised node with the real agent and then search what it received; it
changes no behaviour. Unset (the default), nothing is installed.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from common.proto import splitmesh_pb2 as pb

ENV = "SPLITMESH_AUDIT_DIR"
_lock = threading.Lock()


class _Recorder:
    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, kind: str, data: bytes, **extra: Any) -> None:
        line = json.dumps({"kind": kind, "data": base64.b64encode(data).decode(), **extra})
        with _lock, self.path.open("a") as f:
            f.write(line + "\n")


def _wrap(recorder: _Recorder, name: str, parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def tapped(data: bytes) -> Any:
        recorder.write(name, data)
        return parse(data)
    return tapped


def install_from_env(name: str) -> bool:
    """Install the tap when the environment asks for it (before any server or stub is built)."""
    folder = os.environ.get(ENV)
    if not folder:
        return False
    Path(folder).mkdir(parents=True, exist_ok=True)
    recorder = _Recorder(Path(folder) / f"{name}.jsonl")
    for message_name in pb.DESCRIPTOR.message_types_by_name:
        cls = getattr(pb, message_name)
        cls.FromString = staticmethod(_wrap(recorder, message_name, cls.FromString))
    from common.hop_codec import SealedHopReceiver

    add = SealedHopReceiver.add

    def tapped_add(self: SealedHopReceiver, *args: Any, **kwargs: Any) -> Any:
        out = add(self, *args, **kwargs)
        if out is not None:
            step, position, tensor = out
            recorder.write("decrypted-tensor", tensor.contiguous().numpy().tobytes(), dtype=str(tensor.dtype),
                           shape=list(tensor.shape), step=step, position=position)
        return out

    SealedHopReceiver.add = tapped_add  # type: ignore[method-assign]
    return True


def records(path: Path) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """(kind, raw bytes, extra fields) of every record a tap wrote."""
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        yield rec.pop("kind"), base64.b64decode(rec.pop("data")), rec
