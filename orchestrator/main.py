"""Entry point of the orchestrator process: ``python -m orchestrator`` or ``splitmesh-orchestrator``."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Sequence

from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY, start_http_server

from common.authz import authorized_server
from common.config import parse
from common.log_format import setup_logging
from common.proto import splitmesh_pb2_grpc as pb_grpc
from common.transport import bind
from orchestrator.adaptation import Adapter
from orchestrator.config import OrchestratorConfig
from orchestrator.coordinator import Coordinator
from orchestrator.metrics import MeshCollector
from orchestrator.model_files import ModelFilesServicer
from orchestrator.planning import DecisionConfig
from orchestrator.policy import Policy
from orchestrator.replanning import replace_plan
from orchestrator.servicer import AdminServicer, OrchestratorServicer
from orchestrator.static_placement import PlacementError, place

log = logging.getLogger("orchestrator")


def initial_policy(config: OrchestratorConfig) -> Policy:
    decision = DecisionConfig(latency_max_ms=config.latency_max_ms, utilisation_max=config.utilisation_max,
                              bandwidth_min_bps=config.bandwidth_min_mbps * 1e6, cooldown_s=config.cooldown_s,
                              hysteresis=config.hysteresis, ewma_alpha=config.ewma_alpha)
    return Policy(adaptive=config.adaptive, interval_s=config.decision_interval_s, decision=decision)


async def control_loop(co: Coordinator, adapter: Adapter, servicer: OrchestratorServicer) -> None:
    """Make the first plan once enough nodes are up, replace a plan that lost a node or a link, re-issue the
    plan to plan nodes that restarted, and run one adaptive decision per monitoring interval."""
    last_problem = ""
    next_decision = 0.0
    while True:
        await asyncio.sleep(min(0.5, adapter.policy.interval_s / 2))
        alive = [r for r in co.registry.alive_nodes() if r.node_id not in adapter.drained]
        try:
            if co.view is None:
                if len(alive) >= co.config.min_nodes:
                    segments = place(alive, co.model.num_layers, co.config.boundaries, co.config.placement)
                    await co.install(segments)
            elif lost := co.lost_plan_nodes():
                await replace_plan(adapter, "node-lost", f"lost {', '.join(lost)}")
            elif not all(co.registry.alive(n) for n in co.view.node_ids()):
                pass  # after a restart: plan nodes still have the rejoin grace to register again
            elif servicer.stale_nodes:
                servicer.stale_nodes.clear()
                log.info("re-issuing the plan to nodes that restarted")
                await co.install(co.current_segments())
            elif cut := co.down_hops(co.current_segments()):
                await replace_plan(adapter, "link-lost", "links down: " + ", ".join(f"{a}->{b}" for a, b in cut))
            else:
                co.no_plan_reason = ""
                if time.monotonic() >= next_decision:
                    next_decision = time.monotonic() + adapter.policy.interval_s
                    await adapter.tick()
            last_problem = ""
        except PlacementError as exc:
            if str(exc) != last_problem:  # say it once, not every tick
                log.warning("cannot plan: %s", exc)
            last_problem = str(exc)


async def serve(config: OrchestratorConfig) -> None:
    co = Coordinator(config)
    server = authorized_server(tls_on=co.tls is not None)
    adapter = Adapter(co, initial_policy(config))
    co.latency_listeners.append(adapter.observe_latency)
    if config.metrics_port:
        REGISTRY.register(MeshCollector(co, adapter))
        start_http_server(config.metrics_port)
        log.info("Prometheus metrics on :%d/metrics", config.metrics_port)
    servicer = OrchestratorServicer(co)
    pb_grpc.add_OrchestratorServicer_to_server(servicer, server)
    pb_grpc.add_AdminServicer_to_server(AdminServicer(co, adapter), server)
    pb_grpc.add_ModelFilesServicer_to_server(ModelFilesServicer(co.model.store), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if bind(server, config.listen, co.tls, insecure=config.insecure) == 0:  # mTLS, or plaintext where allowed
        raise SystemExit(f"cannot listen on {config.listen}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("orchestrator serving on %s, model %s (%s)", config.listen, co.model.manifest.name, co.model.digest[:12])
    loop_task = asyncio.create_task(control_loop(co, adapter, servicer))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("orchestrator stopping")
    loop_task.cancel()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=2.0)
    await co.close()


def main(argv: Sequence[str] | None = None) -> int:
    config = parse(OrchestratorConfig, argv, "splitmesh orchestrator: plans and reconfigures the mesh",
                   section="orchestrator")
    setup_logging("orchestrator", config.log_level, config.log_json)
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
