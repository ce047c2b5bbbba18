"""Entry point of the orchestrator process: ``python -m orchestrator`` or ``splitmesh-orchestrator``."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.config import parse
from common.grpc_options import SERVER_OPTIONS
from common.proto import splitmesh_pb2_grpc as pb_grpc
from orchestrator.config import OrchestratorConfig
from orchestrator.coordinator import Coordinator
from orchestrator.model_files import ModelFilesServicer
from orchestrator.servicer import AdminServicer, OrchestratorServicer
from orchestrator.static_placement import PlacementError, place

log = logging.getLogger("orchestrator")


async def control_loop(co: Coordinator, servicer: OrchestratorServicer) -> None:
    """Make the first plan once enough nodes are up, replace a plan that lost a node, and re-issue the
    plan to plan nodes that restarted."""
    interval = co.config.report_interval_ms / 1000.0
    last_problem = ""
    while True:
        await asyncio.sleep(interval / 2)
        alive = co.registry.alive_nodes()
        try:
            if co.view is None and len(alive) >= co.config.min_nodes:
                segments = place(alive, co.model.num_layers, co.config.boundaries, co.config.placement)
                await co.install(segments)
            elif co.view is not None and (lost := [n for n in co.view.node_ids() if not co.registry.alive(n)]):
                log.warning("plan epoch %d lost %s; re-planning on %d live nodes", co.view.epoch, lost, len(alive))
                await co.install(place(alive, co.model.num_layers))
            elif (co.view is not None and servicer.stale_nodes
                  and all(co.registry.alive(n) for n in co.view.node_ids())):
                servicer.stale_nodes.clear()
                segments = [(s.span, s.node_id) for s in co.view.segments]
                log.info("re-issuing the plan to nodes that restarted")
                await co.install(segments)
        except PlacementError as exc:
            if str(exc) != last_problem:  # say it once, not every tick
                log.warning("cannot plan yet: %s", exc)
            last_problem = str(exc)


async def serve(config: OrchestratorConfig) -> None:
    co = Coordinator(config)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    servicer = OrchestratorServicer(co)
    pb_grpc.add_OrchestratorServicer_to_server(servicer, server)
    pb_grpc.add_AdminServicer_to_server(AdminServicer(co), server)
    pb_grpc.add_ModelFilesServicer_to_server(ModelFilesServicer(co.model.store), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(config.listen) == 0:
        raise SystemExit(f"cannot listen on {config.listen}")
    if not config.listen.startswith(("127.", "localhost", "[::1]")):
        log.warning("serving plaintext gRPC on %s: use only on a trusted network", config.listen)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("orchestrator serving on %s, model %s (%s)", config.listen, co.model.manifest.name, co.model.digest[:12])
    loop_task = asyncio.create_task(control_loop(co, servicer))
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
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [orchestrator] %(name)s: %(message)s")
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
