"""Local meshes that ``splitmesh up`` runs on this box, so clients find their certificates with no flag.

While it runs, ``up`` records its address and TLS folder under ``~/.cache/splitmesh/meshes``
(``SPLITMESH_MESHES_DIR``); the SDK and the CLI dialling that address use that folder unless told
otherwise. A record whose ``up`` process is gone is ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

ENV_MESHES_DIR = "SPLITMESH_MESHES_DIR"


def meshes_dir() -> Path:
    return Path(os.environ.get(ENV_MESHES_DIR) or "~/.cache/splitmesh/meshes").expanduser()


def _record_path(address: str) -> Path:
    return meshes_dir() / (address.replace(":", "_").replace("/", "_") + ".json")


@dataclass(frozen=True)
class MeshRecord:
    """What ``splitmesh up`` leaves behind while its mesh runs."""

    address: str
    workdir: str
    tls_dir: str  # "" = the mesh is plaintext
    pid: int  # the `splitmesh up` process; a record whose process is gone is stale

    def save(self) -> Path:
        path = _record_path(self.address)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.__dict__, indent=1))
        return path

    def remove(self) -> None:
        path = _record_path(self.address)
        with contextlib.suppress(FileNotFoundError, ValueError):
            if MeshRecord.load(self.address) == self:
                path.unlink()

    @staticmethod
    def load(address: str) -> MeshRecord | None:
        try:
            record = MeshRecord(**json.loads(_record_path(address).read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return None
        try:
            os.kill(record.pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, someone else's
        return record
