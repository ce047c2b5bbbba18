"""Measures the links from this node to its peers: RTT with an empty probe, bandwidth with a padded one.

Probes run every ``probe_interval_s`` against every other node of the committed plan; the figures
go into the capacity reports, so the orchestrator's bandwidth trigger and cost model see real links.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from node_agent.runtime import NodeRuntime

log = logging.getLogger(__name__)


class LinkProber:
    def __init__(self, runtime: NodeRuntime) -> None:
        self.rt = runtime
        self.links: dict[str, pb.LinkStatus] = {}
        self._payload = bytes(runtime.config.probe_bytes)

    async def _probe(self, peer: str, address: str) -> pb.LinkStatus | None:
        stub = pb_grpc.NodeStub(self.rt.channels.get(address, peer))
        try:
            rtts = []
            for _ in range(3):
                started = time.perf_counter()
                await stub.Probe(pb.ProbeRequest(), timeout=5)
                rtts.append(time.perf_counter() - started)
            rtt = min(rtts)
            started = time.perf_counter()
            await stub.Probe(pb.ProbeRequest(payload=self._payload), timeout=30)
            transfer = max(time.perf_counter() - started - rtt, 1e-6)
        except grpc.aio.AioRpcError as exc:
            log.debug("probe to %s failed: %s", peer, exc.code().name)
            return None
        return pb.LinkStatus(peer_id=peer, bandwidth_bps=len(self._payload) * 8 / transfer, rtt_ms=rtt * 1000)

    async def probe_once(self) -> None:
        view = self.rt.plans.committed
        if view is None:
            return
        for peer, address in sorted(view.addresses.items()):
            if peer == self.rt.node_id:
                continue
            status = await self._probe(peer, address)
            if status is not None:
                self.links[peer] = status
            else:
                self.links.pop(peer, None)

    async def run(self) -> None:
        interval = self.rt.config.probe_interval_s
        if interval <= 0:
            return
        while True:
            await self.probe_once()
            await asyncio.sleep(interval)
