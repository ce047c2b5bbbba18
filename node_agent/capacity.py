"""What this box can do right now: CPU and memory from psutil, GPUs from NVML when present."""

from __future__ import annotations

import logging

import psutil

from common.proto import splitmesh_pb2 as pb

log = logging.getLogger(__name__)

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
    def __init__(self) -> None:
        self._gpus = GpuProbe()
        psutil.cpu_percent(interval=None)  # primes the counter: later calls measure since the previous one

    def read(self, layer_ms: float = 0.0) -> pb.Capacity:
        memory = psutil.virtual_memory()
        return pb.Capacity(cpu_utilisation=psutil.cpu_percent(interval=None) / 100.0,
                           memory_total_bytes=memory.total, memory_available_bytes=memory.available,
                           gpus=self._gpus.read(), cpu_count=psutil.cpu_count() or 1, layer_decode_ms=layer_ms)
