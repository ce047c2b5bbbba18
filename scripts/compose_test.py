"""`make compose-test`: the root docker-compose.yml for real, with Debian's docker-compose 1.29 (or Compose v2).

Phases, each timed: a Docker engine (installed from Debian and started when missing), the same greedy requests on
a local mutual-TLS mesh of processes (the reference, on a store freshly imported here), a base image (pulled, or
made from Debian packages), the CPU images (torch from a local CPU wheel; the nodes' and the orchestrator's, one
build), the embedded model inside both equal to the one imported here layer by layer, encrypted at rest, with the
weight keys in the orchestrator's image alone, `up -d` until healthy, each container holding only its own key, a greedy
generation through the `cli` service equal to the reference, `docker kill` of the untrusted cloud box in the middle
of a generation that must still finish with the reference's tokens, the cloud box restarted and back in the plan,
then `down -v` and the built images removed. Any failure names its phase and shows the containers' last log lines.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SPLITMESH_DOCKER_CACHE", "~/.cache/splitmesh/docker")).expanduser()
PROJECT = os.environ.get("SPLITMESH_COMPOSE_PROJECT", "splitmesh-compose-test")
IMAGE = os.environ.get("SPLITMESH_COMPOSE_IMAGE", "splitmesh:compose-test")
ORCHESTRATOR_IMAGE = os.environ.get("SPLITMESH_COMPOSE_ORCHESTRATOR_IMAGE", "splitmesh-orchestrator:compose-test")
KEY_FILE = "/opt/splitmesh/store/weight_keys.json"  # the store's weight keys: in the orchestrator's image alone
REGISTRY_BASE = "python:3.11-slim"
LOCAL_BASE = "splitmesh-base:bookworm"
TORCH_PIN = "torch==2.13.0"
PROMPT = "Name three primary colours and say why they are called primary."
SHORT, LONG = 24, 96  # tokens: the CLI comparison; the generation the cloud box dies in
KILL_AFTER = 4  # tokens received before `docker kill`
NODES = ("edge-a", "edge-b", "cloud")
# Each box's TLS directory: its own certificate and key plus ca.crt, nothing else.
OWN_TLS = {"orchestrator": "orchestrator", "edge-a": "edge-a", "edge-b": "edge-b", "cloud": "cloud"}

# Runs inside the `cli` service (the image has no copy of scripts/): the SDK, one JSON object per line.
IN_CLI = r"""
import json, os, sys
from splitmesh.client import Client
with Client(os.environ["SPLITMESH_ADDRESS"]) as client:
    if sys.argv[1] == "status":
        s = client.status()
        print(json.dumps({"serving": s.serving, "reason": s.reason, "epoch": s.plan.epoch,
                          "segments": [[g.start, g.end, g.node_id] for g in s.plan.segments],
                          "alive": sorted(n.node_id for n in s.nodes if n.alive)}))
    else:
        messages = [{"role": "user", "content": sys.argv[2]}]
        for e in client.generate(messages, max_new_tokens=int(sys.argv[3])):
            print(json.dumps({"id": e.token_id, "epoch": e.epoch, "text": e.text}), flush=True)
"""


class ComposeTestError(RuntimeError):
    """A phase failed; the message says what was expected and what happened."""


@dataclass
class Reference:
    """The local mesh's answers: token ids and text of the SHORT and LONG generations, the model digest, and its
    weights by plaintext hash (an import draws fresh keys, so two imports' ciphertexts and digests differ)."""

    digest: str = ""
    plaintext: dict[str, str] = field(default_factory=dict)
    ids: dict[int, list[int]] = field(default_factory=dict)
    text: dict[int, str] = field(default_factory=dict)


TIMINGS: list[tuple[str, float]] = []


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    print(f"[compose-test] {name} ...", flush=True)
    started = time.monotonic()
    try:
        yield
    except Exception as exc:
        raise ComposeTestError(f"phase '{name}' failed: {exc}") from exc
    took = time.monotonic() - started
    TIMINGS.append((name, took))
    print(f"[compose-test] {name}: {took:.1f} s", flush=True)


def sh(args: Sequence[str], *, timeout: float = 600, check: bool = True, env: dict[str, str] | None = None,
       quiet: bool = False) -> subprocess.CompletedProcess[str]:
    """Run a command; a non-zero exit (when ``check``) raises with its last output lines."""
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if check and proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-25:]
        raise ComposeTestError(f"`{' '.join(args)}` exited {proc.returncode}:\n  " + "\n  ".join(tail))
    if not quiet and proc.stderr.strip() and proc.returncode != 0:
        print(proc.stderr.strip(), file=sys.stderr)
    return proc


# ------------------------------------------------------------------ engine and images
def ensure_engine() -> list[str]:
    """docker + a compose implementation (installed from Debian when missing) and a running engine."""
    if shutil.which("docker") is None or (shutil.which("docker-compose") is None and not _compose_v2()):
        if os.geteuid() != 0:
            raise ComposeTestError("docker and docker-compose are missing and this is not root: "
                                   "apt-get install -y docker.io docker-compose")
        sh(["apt-get", "update"], timeout=300)
        sh(["apt-get", "install", "-y", "--no-install-recommends", "docker.io", "docker-compose"], timeout=900,
           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if sh(["docker", "info"], check=False, quiet=True, timeout=60).returncode != 0:
        dockerd = shutil.which("dockerd")
        if dockerd is None or os.geteuid() != 0:
            raise ComposeTestError("no Docker engine answers and dockerd cannot be started here (need root)")
        CACHE.mkdir(parents=True, exist_ok=True)
        log = (CACHE / "dockerd.log").open("ab")
        subprocess.Popen([dockerd], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while sh(["docker", "info"], check=False, quiet=True, timeout=60).returncode != 0:
            if time.monotonic() > deadline:
                raise ComposeTestError(f"dockerd did not answer within 60 s; see {CACHE / 'dockerd.log'}")
            time.sleep(1)
    override = os.environ.get("SPLITMESH_COMPOSE")
    if override:
        return override.split()
    return ["docker-compose"] if shutil.which("docker-compose") else ["docker", "compose"]


def _compose_v2() -> bool:
    return shutil.which("docker") is not None and sh(["docker", "compose", "version"], check=False,
                                                      quiet=True, timeout=30).returncode == 0


def base_image() -> str:
    """The registry's python:3.11-slim when it can be pulled, else one built from Debian packages."""
    if sh(["docker", "image", "inspect", REGISTRY_BASE], check=False, quiet=True).returncode == 0:
        return REGISTRY_BASE
    if sh(["docker", "pull", REGISTRY_BASE], check=False, quiet=True, timeout=120).returncode == 0:
        return REGISTRY_BASE
    print(f"[compose-test]   {REGISTRY_BASE} cannot be pulled: {LOCAL_BASE} (from Debian packages)", flush=True)
    if shutil.which("mmdebstrap") is None:
        if os.geteuid() != 0:
            raise ComposeTestError("mmdebstrap is missing: apt-get install -y mmdebstrap")
        sh(["apt-get", "install", "-y", "--no-install-recommends", "mmdebstrap"], timeout=600,
           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    sh([str(ROOT / "scripts" / "compose_base_image.sh"), LOCAL_BASE], timeout=900)
    return LOCAL_BASE


def cpu_wheel() -> Path:
    """A CPU-only torch wheel in deploy/wheels/ (cached outside the repository; hard-linked when possible)."""
    cached = CACHE / "wheels"
    wheels = sorted(cached.glob("torch-2.13.0*.whl"))
    if not wheels:
        cached.mkdir(parents=True, exist_ok=True)
        sh([sys.executable, "-m", "pip", "download", TORCH_PIN, "--no-deps", "-d", str(cached)], timeout=900)
        wheels = sorted(cached.glob("torch-2.13.0*.whl"))
    cpu = [w for w in wheels if "+cpu" in w.name]
    if not cpu:
        raise ComposeTestError(f"pip found no CPU-only torch wheel (got {[w.name for w in wheels]}); put one in "
                               f"{cached} (e.g. from https://download.pytorch.org/whl/cpu)")
    target = ROOT / "deploy" / "wheels" / cpu[0].name
    if not target.exists():
        try:
            os.link(cpu[0], target)
        except OSError:
            shutil.copy2(cpu[0], target)
    return target


# ------------------------------------------------------------------ compose
class Stack:
    """The compose project under test, addressed the same way by Compose v2 and docker-compose 1.29."""

    def __init__(self, compose: list[str], base: str) -> None:
        sys.path.insert(0, str(ROOT))
        from splitmesh.launcher import free_port

        self.compose = compose
        self.env = {**os.environ, "SPLITMESH_IMAGE": IMAGE, "SPLITMESH_ORCHESTRATOR_IMAGE": ORCHESTRATOR_IMAGE,
                    "SPLITMESH_BASE_IMAGE": base, "SPLITMESH_TORCH": "cpu",
                    "SPLITMESH_ORCHESTRATOR_PORT": str(free_port())}  # 50051 may be a local mesh's

    def cmd(self, *args: str) -> list[str]:
        return [*self.compose, "-p", PROJECT, "-f", str(ROOT / "docker-compose.yml"), *args]

    def run(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh(self.cmd(*args), timeout=timeout, check=check, env=self.env)

    def container(self, service: str) -> str:
        ids = self.run("ps", "-q", service).stdout.split()
        if len(ids) != 1:
            raise ComposeTestError(f"expected one container for {service}, found {ids}")
        return ids[0]

    def health(self, service: str) -> str:
        fmt = "{{.State.Status}}/{{if .State.Health}}{{.State.Health.Status}}{{end}}"
        return sh(["docker", "inspect", "--format", fmt, self.container(service)]).stdout.strip()

    def wait_healthy(self, services: Sequence[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = {s: self.health(s) for s in services}
            if all(v == "running/healthy" for v in states.values()):
                return
            if any(v.startswith(("exited", "dead")) for v in states.values()):
                break
            time.sleep(2)
        raise ComposeTestError(f"not healthy after {timeout:.0f} s: {states}")

    def in_cli(self, *args: str, timeout: float = 300) -> list[dict[str, Any]]:
        out = self.run("run", "--rm", "-T", "--no-deps", "--entrypoint", "python", "cli", "-c", IN_CLI, *args,
                       timeout=timeout).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def status(self) -> dict[str, Any]:
        (reply,) = self.in_cli("status")
        return reply

    def logs(self) -> str:
        return self.run("logs", "--no-color", "--tail", "30", check=False, timeout=60).stdout

    def down(self) -> None:
        self.run("down", "-v", "--remove-orphans", "--timeout", "5", check=False, timeout=300)


def plan_nodes(status: dict[str, Any]) -> set[str]:
    return {segment[2] for segment in status["segments"]}


# ------------------------------------------------------------------ phases
def local_reference(workdir: Path) -> Reference:
    """The embedded model imported here, and the same greedy requests on a local mutual-TLS mesh."""
    sys.path.insert(0, str(ROOT))
    from common.model_import import EMBEDDED_MODEL_NAME, embedded_gguf_path, import_gguf
    from common.model_store import ModelStore
    from splitmesh.launcher import LocalMesh, MeshSpec

    # A fresh import by this checkout's code, cached per version of that code (the import takes minutes here).
    code = hashlib.sha256(b"".join((ROOT / "common" / f).read_bytes() for f in ("model_import.py", "model_store.py"))
                          + (ROOT / "pyproject.toml").read_bytes())
    store = ModelStore(CACHE / "stores" / code.hexdigest()[:16])
    if EMBEDDED_MODEL_NAME in store.names() and not store.open(EMBEDDED_MODEL_NAME).missing_or_corrupt():
        ref = Reference(digest=store.resolve(EMBEDDED_MODEL_NAME))
    else:
        ref = Reference(digest=import_gguf(store, embedded_gguf_path(), EMBEDDED_MODEL_NAME))
    ref.plaintext = _plaintext_hashes(store.open(ref.digest).manifest.files)
    spec = MeshSpec(nodes=3, store=store.root, workdir=workdir / "mesh", orchestrator_port=0, tls=True)
    with LocalMesh(spec) as mesh, mesh.client() as client:
        mesh.wait_serving()
        for n in (SHORT, LONG):
            events = list(client.generate([{"role": "user", "content": PROMPT}], max_new_tokens=n))
            ref.ids[n] = [e.token_id for e in events]
            ref.text[n] = "".join(e.text for e in events)
    print(f"[compose-test]   digest {ref.digest[:16]}, reference: {ref.text[SHORT]!r}", flush=True)
    return ref


def _plaintext_hashes(files: Any) -> dict[str, str]:
    """Role -> sha256 of the plaintext of every file of a manifest (encrypted or not)."""
    return {role: entry.plain_sha256 or entry.sha256 for role, entry in files.items()}


def check_weights(ref: Reference) -> None:
    """Both images hold the model imported here (the same plaintext, layer by layer), encrypted at rest under the
    same keys (one build), and only the orchestrator's image holds those keys."""
    code = ("import json; from common.model_store import ModelStore; "
            "m = ModelStore('/opt/splitmesh/store').open('smollm2-135m-instruct').manifest; "
            "print(json.dumps({'digest': m.digest, 'encrypted': m.encrypted, "
            "'plain': {r: e.plain_sha256 or e.sha256 for r, e in m.files.items()}}))")
    seen = {}
    for image in (IMAGE, ORCHESTRATOR_IMAGE):
        seen[image] = json.loads(sh(["docker", "run", "--rm", "--entrypoint", "python", image, "-c", code]).stdout)
        if seen[image]["plain"] != ref.plaintext:
            raise ComposeTestError(f"{image}'s embedded model differs from the one imported here")
        if not seen[image]["encrypted"]:
            raise ComposeTestError(f"{image}'s model store is not encrypted at rest")
    if seen[IMAGE]["digest"] != seen[ORCHESTRATOR_IMAGE]["digest"]:
        raise ComposeTestError("the two images hold different ciphertext: they are not from one build")
    probe = ["docker", "run", "--rm", "--entrypoint", "test"]
    if sh([*probe, IMAGE, "-e", KEY_FILE], check=False, quiet=True).returncode == 0:
        raise ComposeTestError(f"{IMAGE} (nodes, CLI) carries the weight keys {KEY_FILE}")
    if sh([*probe, ORCHESTRATOR_IMAGE, "-r", KEY_FILE], check=False, quiet=True).returncode != 0:
        raise ComposeTestError(f"{ORCHESTRATOR_IMAGE} has no readable {KEY_FILE}")
    print(f"[compose-test]   both images: digest {seen[IMAGE]['digest'][:16]}, weights equal to the local "
          "import's; the keys only in the orchestrator's", flush=True)


def check_secrets(stack: Stack) -> None:
    """Each running box holds ca.crt plus its own certificate and key; no container can read ca.key."""
    for service, name in OWN_TLS.items():
        ctr = stack.container(service)
        files = set(sh(["docker", "exec", ctr, "ls", "-A", "/etc/splitmesh/tls"]).stdout.split())
        if files != {"ca.crt", f"{name}.crt", f"{name}.key"}:
            raise ComposeTestError(f"{service} holds {sorted(files)} in /etc/splitmesh/tls")
        found = sh(["docker", "exec", ctr, "find", "/", "(", "-path", "/proc", "-o", "-path", "/sys", ")", "-prune",
                    "-o", "-name", "ca.key", "-print"], check=False, quiet=True).stdout.split()  # as the box's user
        if found:
            raise ComposeTestError(f"{service} can read a CA key: {found}")


def cli_generate(stack: Stack, ref: Reference) -> None:
    out = stack.run("run", "--rm", "-T", "--no-deps", "cli", "generate", "--max-new-tokens", str(SHORT), PROMPT).stdout
    if out != ref.text[SHORT] + "\n":
        raise ComposeTestError(f"cli generate printed {out!r}, the local mesh {ref.text[SHORT]!r}")
    ids = [e["id"] for e in stack.in_cli("generate", PROMPT, str(SHORT))]
    if ids != ref.ids[SHORT]:
        raise ComposeTestError(f"token ids {ids} differ from the local mesh's {ref.ids[SHORT]}")


def kill_cloud_mid_generation(stack: Stack, ref: Reference) -> dict[str, Any]:
    before = stack.status()
    if "cloud" not in plan_nodes(before):
        raise ComposeTestError(f"the plan does not use cloud, so killing it tests nothing: {before['segments']}")
    cloud = stack.container("cloud")
    proc = subprocess.Popen(stack.cmd("run", "--rm", "-T", "--no-deps", "--entrypoint", "python", "cli", "-c", IN_CLI,
                                      "generate", PROMPT, str(LONG)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=stack.env)
    assert proc.stdout is not None
    events: list[dict[str, Any]] = []
    killed_at = -1
    try:
        for line in proc.stdout:
            if not line.startswith("{"):
                continue
            events.append(json.loads(line))
            if len(events) == KILL_AFTER:
                sh(["docker", "kill", cloud])
                killed_at = len(events)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise ComposeTestError(f"the generation failed after cloud was killed (exit {proc.returncode}): "
                               f"{stderr.strip()[-800:]}")
    if killed_at < 0 or killed_at >= len(events):
        raise ComposeTestError(f"cloud was not killed before the generation ended ({len(events)} tokens)")
    ids = [e["id"] for e in events]
    if ids != ref.ids[LONG]:
        raise ComposeTestError(f"after the kill the tokens differ from the local mesh's:\n  {ids}\n  {ref.ids[LONG]}")
    epochs = sorted({e["epoch"] for e in events})
    print(f"[compose-test]   cloud killed after token {killed_at}/{len(events)}; plan epochs seen {epochs}; "
          f"{len(ids)} tokens equal the local mesh's", flush=True)
    return before


def restart_cloud(stack: Stack, before: dict[str, Any], ref: Reference, timeout: float = 300) -> None:
    """docker start the killed box; it must register, go healthy and host a segment again."""
    sh(["docker", "start", stack.container("cloud")])
    stack.wait_healthy(["cloud"], timeout)
    deadline = time.monotonic() + timeout
    status = stack.status()
    while "cloud" not in status["alive"] and time.monotonic() < deadline:
        time.sleep(2)
        status = stack.status()
    if "cloud" not in status["alive"]:
        raise ComposeTestError(f"cloud did not register again: alive {status['alive']}")
    by_itself = "cloud" in plan_nodes(status)
    if not by_itself:
        # The adaptive loop may keep a working plan; the operator installs the first plan again.
        boundaries = [str(before["segments"][0][0])] + [str(s[1]) for s in before["segments"]]
        placement = [s[2] for s in before["segments"]]
        stack.run("run", "--rm", "-T", "--no-deps", "cli", "resplit", "--boundaries", ",".join(boundaries),
                  "--place", ",".join(placement))
        status = stack.status()
    if "cloud" not in plan_nodes(status) or not status["serving"]:
        raise ComposeTestError(f"cloud is not back in a serving plan: {status}")
    ids = [e["id"] for e in stack.in_cli("generate", PROMPT, str(SHORT))]
    if ids != ref.ids[SHORT]:
        raise ComposeTestError(f"with cloud back the tokens differ: {ids} vs {ref.ids[SHORT]}")
    how = "by itself" if by_itself else "after an operator resplit to the first plan"
    print(f"[compose-test]   cloud back in the plan {how}: {status['segments']} (epoch {status['epoch']})", flush=True)


def main() -> int:
    started = time.monotonic()
    stack: Stack | None = None
    keep = os.environ.get("SPLITMESH_COMPOSE_KEEP_IMAGE") == "1"
    try:
        with phase("docker engine"):
            compose = ensure_engine()
            print(f"[compose-test]   compose: {' '.join(compose)}", flush=True)
        with (tempfile.TemporaryDirectory(prefix="splitmesh-compose-test-") as tmp,
              phase("local mesh reference (import + 2 generations)")):
            ref = local_reference(Path(tmp))
        with phase("base image"):
            base = base_image()
            print(f"[compose-test]   base: {base}", flush=True)
        with phase("CPU torch wheel"):
            print(f"[compose-test]   {cpu_wheel().name}", flush=True)
        stack = Stack(compose, base)
        stack.down()
        with phase("image build"):
            stack.run("build", "certs", "orchestrator", timeout=1800)
            for image in (IMAGE, ORCHESTRATOR_IMAGE):
                size = sh(["docker", "image", "inspect", "--format", "{{.Size}}", image]).stdout.strip()
                print(f"[compose-test]   {image}: {int(size) / 1e9:.2f} GB", flush=True)
        with phase("weights inside the images"):
            check_weights(ref)
        with phase("up -d until healthy"):
            stack.run("up", "-d", timeout=600)
            stack.wait_healthy(["orchestrator", *NODES], timeout=420)
            deadline = time.monotonic() + 120
            while not stack.status()["serving"]:
                if time.monotonic() > deadline:
                    raise ComposeTestError(f"healthy but not serving: {stack.status()}")
                time.sleep(2)
        with phase("secrets per box"):
            check_secrets(stack)
        with phase("greedy generation through cli"):
            cli_generate(stack, ref)
        with phase("docker kill cloud mid-generation"):
            before = kill_cloud_mid_generation(stack, ref)
        with phase("cloud restarted and back in the plan"):
            restart_cloud(stack, before, ref)
    except (ComposeTestError, subprocess.TimeoutExpired) as exc:
        print(f"[compose-test] FAILED: {exc}", file=sys.stderr, flush=True)
        if stack is not None:
            print(stack.logs(), file=sys.stderr)
        return 1
    finally:
        if stack is not None:
            with phase("down -v and clean up"):
                stack.down()
                if not keep:
                    sh(["docker", "image", "rm", "-f", IMAGE, ORCHESTRATOR_IMAGE], check=False, quiet=True)
                    sh(["docker", "image", "prune", "-f"], check=False, quiet=True)
        print("[compose-test] timings: " + ", ".join(f"{n} {t:.0f} s" for n, t in TIMINGS), flush=True)
        print(f"[compose-test] total {time.monotonic() - started:.0f} s", flush=True)
    print("[compose-test] PASSED", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
