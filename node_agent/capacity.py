"""What this box can do right now: CPU and memory from psutil, GPUs from NVML when present."""

from __future__ import annotations

import logging
import os

import psutil

from common.proto import splitmesh_pb2 as pb
from node_agent.decode_fit import DecodeCost

log = logging.getLogger(__name__)

NO_DECODE = DecodeCost(0.0, 0.0, 0.0)  # before the node ran any decode step

try:
    import pynvml
except ImportError:  # nvidia-ml-py is a dependency, but a trimmed image may lack it
    pynvml = None


class GpuProbe:
    """NVML handles opened once; no NVML (no driver, no GPU) is normal and means an empty list."""

    def __init__(self) -> None:
        self._handles: list[object] = []
        if pynvml is None:
            return
        try:
            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except pynvml.NVMLError as exc:
            log.info("no GPU reported: %s", exc)

    def read(self) -> list[pb.GpuStatus]:
        out = []
        for index, handle in enumerate(self._handles):
            util = pynvml.nvmlDeviceGetUtilizationRates(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            out.append(pb.GpuStatus(index=index, name=name if isinstance(name, str) else name.decode(),
                                    utilisation=util.gpu / 100.0, memory_total_bytes=int(mem.total),
                                    memory_used_bytes=int(mem.used)))
        return out


class CapacityProbe:
    """CPU load from *other* work on the CPUs this process may run on, so co-located nodes (or a node
    busy with its own layers) do not read as an overloaded box."""

    def __init__(self) -> None:
        self._gpus = GpuProbe()
        self._cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self._me = psutil.Process()
        psutil.cpu_percent(interval=None, percpu=True)  # primes the counters: later calls measure since then
        self._me.cpu_percent(interval=None)

    def other_work(self) -> float:
        per_cpu = psutil.cpu_percent(interval=None, percpu=True)
        mine = [per_cpu[i] for i in self._cpus if i < len(per_cpu)] or per_cpu
        busy = sum(mine) / 100.0  # in CPUs
        own = self._me.cpu_percent(interval=None) / 100.0  # this process, in CPUs
        return max(0.0, min(1.0, (busy - own) / max(1, len(mine))))

    def read(self, decode: DecodeCost = NO_DECODE, layer_prefill_ms: float = 0.0) -> pb.Capacity:
        memory = psutil.virtual_memory()
        return pb.Capacity(cpu_utilisation=self.other_work(), memory_total_bytes=memory.total,
                           memory_available_bytes=memory.available, gpus=self._gpus.read(),
                           cpu_count=len(self._cpus) or psutil.cpu_count() or 1, layer_decode_ms=decode.one_row_ms,
                           layer_prefill_ms_per_token=layer_prefill_ms, layer_decode_row_ms=decode.row_ms,
                           decode_rows_mean=decode.rows_mean)
