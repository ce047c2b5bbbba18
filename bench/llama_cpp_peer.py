"""llama.cpp on the same GGUF, as the peer the dtype benchmark is measured against in the same run.

Uses the binaries ``scripts/build_llama_cpp.sh`` builds (cached outside the repository): ``llama-bench`` for
single-stream decode, ``llama-batched-bench`` for many parallel sequences, and ``llama-bench --rpc`` over two
``ggml-rpc-server`` processes on loopback for a 2-way split (llama.cpp's own split inference: the layers are
divided between the two servers). Every figure is decode tokens/s; none of this is needed by splitmesh itself.

    .venv/bin/python bench/llama_cpp_peer.py            # prints the figures, then one JSON line
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from splitmesh.launcher import free_port

DEFAULT_DIR = Path(os.environ.get("SPLITMESH_LLAMA_CPP_DIR", "~/.cache/splitmesh/llama.cpp")).expanduser()
VERSION = "0.3.36"


def binaries(top: Path = DEFAULT_DIR) -> Path | None:
    """The folder of the built binaries, or None when scripts/build_llama_cpp.sh has not been run."""
    folder = top / f"build-{VERSION}" / "bin"
    needed = ("llama-bench", "llama-batched-bench", "ggml-rpc-server")
    return folder if all((folder / name).is_file() for name in needed) else None


def _run_json_lines(args: list[str], timeout: float) -> list[dict[str, object]]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(args[0]).name} exited {proc.returncode}: {proc.stderr.strip()[-600:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def single_stream(bin_dir: Path, gguf: Path, tokens: int, threads: int, repetitions: int = 3,
                  rpc: list[str] | None = None) -> float:
    """Decode tokens/s of one sequence (llama-bench ``tg``), locally or split over RPC servers."""
    args = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-p", "0", "-n", str(tokens), "-t", str(threads),
            "-r", str(repetitions), "-o", "jsonl"]
    if rpc:
        args += ["--rpc", ",".join(rpc), "-ngl", "99"]
    rows = _run_json_lines(args, timeout=600)
    if not rows:
        raise RuntimeError("llama-bench printed no result")
    return float(rows[-1]["avg_ts"])  # type: ignore[arg-type]


def parallel(bin_dir: Path, gguf: Path, sequences: int, prompt: int, tokens: int, threads: int) -> float:
    """Aggregate decode tokens/s of ``sequences`` parallel sequences (llama-batched-bench ``S_TG``)."""
    context = sequences * (prompt + tokens) + 64
    rows = _run_json_lines([str(bin_dir / "llama-batched-bench"), "-m", str(gguf), "-c", str(context),
                            "-b", "2048", "-ub", "512", "-npp", str(prompt), "-ntg", str(tokens),
                            "-npl", str(sequences), "-t", str(threads), "--output-format", "jsonl"], timeout=600)
    if not rows:
        raise RuntimeError("llama-batched-bench printed no result")
    return float(rows[-1]["speed_tg"])  # type: ignore[arg-type]


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ggml-rpc-server on port {port} exited {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"ggml-rpc-server on port {port} did not listen within {timeout:.0f} s")


@contextlib.contextmanager
def rpc_servers(bin_dir: Path, count: int, threads: int) -> Iterator[list[str]]:
    """``count`` ggml-rpc-server processes on loopback, stopped on exit; yields their host:port."""
    procs: list[subprocess.Popen[bytes]] = []
    endpoints: list[str] = []
    try:
        for _ in range(count):
            port = free_port()  # outside the ephemeral range: no connection takes it before the server binds
            proc = subprocess.Popen([str(bin_dir / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port),
                                     "-t", str(threads)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env={**os.environ, "GGML_RPC_NO_RDMA": "1"})
            procs.append(proc)
            _wait_listening(port, proc)
            endpoints.append(f"127.0.0.1:{port}")
        yield endpoints
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def measure(bin_dir: Path, gguf: Path, *, tokens: int = 32, sequences: int = 16, threads: int = 2,
            split_threads: int = 1) -> dict[str, float]:
    """Every peer figure the dtype benchmark prints beside splitmesh's."""
    figures = {
        "single_tokens_per_s": single_stream(bin_dir, gguf, tokens, threads),
        "single_1thread_tokens_per_s": single_stream(bin_dir, gguf, tokens, 1),
        f"parallel{sequences}_tokens_per_s": parallel(bin_dir, gguf, sequences, 16, tokens, threads),
    }
    with rpc_servers(bin_dir, 2, split_threads) as endpoints:
        figures["rpc2_tokens_per_s"] = single_stream(bin_dir, gguf, tokens, split_threads, rpc=endpoints)
    return {k: round(v, 2) for k, v in figures.items()}


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from common.model_import import embedded_gguf_path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where scripts/build_llama_cpp.sh built it")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    bin_dir = binaries(args.dir)
    if bin_dir is None:
        raise SystemExit(f"llama.cpp is not built in {args.dir}: run scripts/build_llama_cpp.sh")
    figures = measure(bin_dir, embedded_gguf_path(), tokens=args.tokens, sequences=args.sequences,
                      threads=args.threads)
    for key, value in figures.items():
        print(f"{key:32s} {value:8.1f}")
    print(json.dumps({"llama_cpp": VERSION, "gguf": embedded_gguf_path().name, **figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
