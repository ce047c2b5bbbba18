"""Measures the links from this node to its peers, and notices within a second when one breaks.

Every ``probe_interval_s`` each other node of the committed plan gets three RTT probes (empty) and two
bandwidth probes (half and all of ``probe_bytes``; their difference cancels a shaper's burst). The best
of each link's recent readings (``node_agent.link_estimate``) goes into the capacity reports, so the
orchestrator's bandwidth trigger and cost model see real links, not the moments a probe shared them
with a prefill.

A link can break while both ends stay alive and keep reporting (a cut cable, a firewall, a dead
proxy): the orchestrator then still sees every node alive, and only the sender of the broken hop can
tell. So a probe that fails with UNAVAILABLE or DEADLINE_EXCEEDED reports the link *down*
(bandwidth 0), the reporter sends that at once instead of at the next period, and the orchestrator
leaves the link out of every plan, replacing the current plan if it uses it. Between full rounds,
every ``WATCH_S`` the channels to peers are checked without traffic: one that is not connected (the
connection a session used was closed) gets a short probe straight away. A peer whose link is down
keeps being probed at the address it had, so the link comes back as soon as a probe passes; a
peer that left the plan is forgotten ``DOWN_MEMORY_S`` after its link went down (it may have
re-registered elsewhere; if the link is still broken when a plan uses it again, the next probe says so).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from common.certs import Identity
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from common.transport import aio_channel
from node_agent.link_estimate import LinkEstimate, probe_bandwidth
from node_agent.runtime import NodeRuntime

log = logging.getLogger(__name__)

WATCH_S = 0.5  # how often channel states are checked between full probe rounds
QUICK_PROBE_TIMEOUT_S = 2.0  # deadline of the single empty probe sent to a peer whose channel is not connected
QUICK_RETRY_S = 1.0  # at most one quick probe per peer this often
DOWN_MEMORY_S = 60.0  # a peer outside the plan whose link is down is re-probed this long, then forgotten
LINK_DOWN_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
CONNECTED = frozenset({grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.CONNECTING})
BUCKET_REFILL_S = 0.05  # idle time before each padded probe: refills a 64 KiB shaper bucket at >= 10.5 Mbit/s


def down_status(peer: str) -> pb.LinkStatus:
    """What a report says about an unreachable peer: bandwidth 0 (the orchestrator reads it as no link)."""
    return pb.LinkStatus(peer_id=peer, bandwidth_bps=0.0, rtt_ms=-1.0)


class LinkProber:
    def __init__(self, runtime: NodeRuntime) -> None:
        self.rt = runtime
        self.links: dict[str, pb.LinkStatus] = {}
        self.down: dict[str, tuple[str, float]] = {}  # peer -> (address probed, when its link went down)
        self.changed = asyncio.Event()  # a link went down or came back: report now
        self._payload = bytes(runtime.config.probe_bytes)
        self._quick_at: dict[str, float] = {}
        self._estimates: dict[str, LinkEstimate] = {}

    async def _probe(self, peer: str, address: str) -> pb.LinkStatus | None:
        """Measured figures, a down status when the peer cannot be reached, None for any other failure.

        A peer whose link is down is probed on a fresh channel: the shared one may sit in gRPC's
        reconnect back-off and fail at once although the peer is back.
        """
        if peer not in self.down:
            return await self._measure(pb_grpc.NodeStub(self.rt.channels.get(address, peer)), peer)
        async with aio_channel(address, self.rt.tls, Identity("node", peer)) as channel:
            return await self._measure(pb_grpc.NodeStub(channel), peer)

    async def _measure(self, stub: pb_grpc.NodeStub, peer: str) -> pb.LinkStatus | None:
        try:
            rtts = []
            for _ in range(3):
                started = time.perf_counter()
                await stub.Probe(pb.ProbeRequest(), timeout=5)
                rtts.append(time.perf_counter() - started)
            rtt = min(rtts)
            half = self._payload[: len(self._payload) // 2]
            small_s = await self._timed_transfer(stub, half)
            full_s = await self._timed_transfer(stub, self._payload)
        except grpc.aio.AioRpcError as exc:
            log.debug("probe to %s failed: %s", peer, exc.code().name)
            return down_status(peer) if exc.code() in LINK_DOWN_CODES else None
        bandwidth = probe_bandwidth(len(half), small_s, len(self._payload), full_s, rtt)
        return pb.LinkStatus(peer_id=peer, bandwidth_bps=bandwidth, rtt_ms=rtt * 1000)

    @staticmethod
    async def _timed_transfer(stub: pb_grpc.NodeStub, payload: bytes) -> float:
        """Seconds for one padded probe, sent after ``BUCKET_REFILL_S`` of silence so a shaper's bucket is full."""
        await asyncio.sleep(BUCKET_REFILL_S)
        started = time.perf_counter()
        await stub.Probe(pb.ProbeRequest(payload=payload), timeout=30)
        return time.perf_counter() - started

    def _estimate(self, peer: str) -> LinkEstimate:
        if peer not in self._estimates:
            cfg = self.rt.config
            self._estimates[peer] = LinkEstimate(cfg.probe_bandwidth_window, cfg.probe_rtt_window)
        return self._estimates[peer]

    def _record(self, peer: str, address: str, status: pb.LinkStatus | None) -> None:
        if status is None:
            self.links.pop(peer, None)
            return
        if status.bandwidth_bps > 0:
            estimate = self._estimate(peer).add(status.bandwidth_bps, status.rtt_ms)
            if estimate is None:  # not enough readings yet: report nothing (the link is not known to be down)
                self.links.pop(peer, None)
            else:
                self.links[peer] = pb.LinkStatus(peer_id=peer, bandwidth_bps=estimate[0], rtt_ms=estimate[1])
        else:
            self._estimate(peer).reset()
            self.links[peer] = status
        if status.bandwidth_bps <= 0:
            if peer not in self.down:
                log.warning("link to %s (%s) is down", peer, address)
                self.down[peer] = (address, time.monotonic())
                self.changed.set()
        elif self.down.pop(peer, None) is not None:
            log.info("link to %s (%s) is back", peer, address)
            self.changed.set()

    def targets(self) -> dict[str, str]:
        """Peers to probe and where: every other plan node, and recently lost peers at their last address."""
        view = self.rt.plans.committed
        in_plan = {} if view is None else {p: a for p, a in view.addresses.items() if p != self.rt.node_id}
        now = time.monotonic()
        for peer, (_, since) in list(self.down.items()):
            if peer not in in_plan and now - since > DOWN_MEMORY_S:
                del self.down[peer]
                self.links.pop(peer, None)
        targets = {**{peer: address for peer, (address, _) in self.down.items()}, **in_plan}
        for peer in set(self._estimates) - set(targets):  # a peer that left the plan starts afresh if it returns
            del self._estimates[peer]
        return targets

    async def probe_once(self) -> None:
        for peer, address in sorted(self.targets().items()):
            self._record(peer, address, await self._probe(peer, address))

    async def watch_once(self) -> None:
        """A short probe to every peer whose channel is not connected, and a full one to every peer whose link
        is down; concurrently, so a peer that hangs (SIGSTOP) delays no other."""
        await asyncio.gather(*(self._watch(peer, address) for peer, address in sorted(self.targets().items())))

    async def _watch(self, peer: str, address: str) -> None:
        now = time.monotonic()
        if now - self._quick_at.get(peer, -1e9) < QUICK_RETRY_S:
            return
        if peer in self.down:  # measured in full: a pass clears the mark
            self._quick_at[peer] = now
            self._record(peer, address, await self._probe(peer, address))
            return
        channel = self.rt.channels.get(address, peer)
        if channel.get_state(try_to_connect=False) in CONNECTED:
            return
        self._quick_at[peer] = now
        try:
            await pb_grpc.NodeStub(channel).Probe(pb.ProbeRequest(), timeout=QUICK_PROBE_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in LINK_DOWN_CODES:
                self._record(peer, address, down_status(peer))

    async def run(self) -> None:
        interval = self.rt.config.probe_interval_s
        if interval <= 0:
            return
        next_round = 0.0
        while True:
            if time.monotonic() >= next_round:
                await self.probe_once()
                next_round = time.monotonic() + interval
            else:
                await self.watch_once()
            await asyncio.sleep(WATCH_S)
