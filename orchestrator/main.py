"""Entry point of the orchestrator process: ``python -m orchestrator`` or ``splitmesh-orchestrator``."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Mapping, Sequence

from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY, start_http_server

from common.authz import authorized_server
from common.config import parse_with_sources
from common.log_format import setup_logging
from common.proto import splitmesh_pb2_grpc as pb_grpc
from common.transport import bind
from orchestrator.adaptation import Adapter
from orchestrator.config import OrchestratorConfig
from orchestrator.controller import Controller
from orchestrator.coordinator import Coordinator
from orchestrator.metrics import MeshCollector
from orchestrator.model_files import ModelFilesServicer
from orchestrator.policy import PolicyError
from orchestrator.policy_source import startup_policy
from orchestrator.servicer import AdminServicer, OrchestratorServicer

log = logging.getLogger("orchestrator")
SERVICES = ("", "splitmesh.v1.Orchestrator", "splitmesh.v1.Admin")  # names the health service answers for


async def report_health(controller: Controller, servicer: health.aio.HealthServicer) -> None:
    """Keep the health service in step with the control loop: NOT_SERVING while it is dead or stuck."""
    serving_before: bool | None = None
    while True:
        serving, why = controller.health()
        if serving != serving_before:
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in SERVICES:
                await servicer.set(name, status)
            if serving_before is not None or not serving:
                (log.info if serving else log.error)("health: %s%s", "SERVING" if serving else "NOT_SERVING",
                                                     "" if serving else f" ({why})")
            serving_before = serving
        await asyncio.sleep(controller.period_s)


async def serve(config: OrchestratorConfig, sources: Mapping[str, str]) -> None:
    co = Coordinator(config)
    try:
        policy, lines = startup_policy(config, sources, co.state.get_meta("policy"))
    except PolicyError as exc:
        raise SystemExit(str(exc)) from None
    log.info("policy at start: explicit settings win over the persisted policy, which wins over the defaults")
    for line in lines:
        log.info("policy: %s", line)
    adapter = Adapter(co, policy)
    co.latency_listeners.append(adapter.observe_latency)
    controller = Controller(co, adapter)
    if config.metrics_port:
        REGISTRY.register(MeshCollector(co, controller))
        start_http_server(config.metrics_port)
        log.info("Prometheus metrics on :%d/metrics", config.metrics_port)
    server = authorized_server(tls_on=co.tls is not None)
    pb_grpc.add_OrchestratorServicer_to_server(OrchestratorServicer(co, controller), server)
    pb_grpc.add_AdminServicer_to_server(AdminServicer(co, controller), server)
    pb_grpc.add_ModelFilesServicer_to_server(ModelFilesServicer(co.model.store, co.assigned_blobs), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if bind(server, config.listen, co.tls, insecure=config.insecure) == 0:  # mTLS, or plaintext where allowed
        raise SystemExit(f"cannot listen on {config.listen}")
    await server.start()
    log.info("orchestrator serving on %s, model %s (%s)", config.listen, co.model.manifest.name, co.model.digest[:12])
    controller.start()
    health_task = asyncio.create_task(report_health(controller, health_servicer), name="health")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("orchestrator stopping")
    health_task.cancel()
    await controller.stop()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=2.0)
    await co.close()


def main(argv: Sequence[str] | None = None) -> int:
    config, sources = parse_with_sources(OrchestratorConfig, argv,
                                         "splitmesh orchestrator: plans and reconfigures the mesh",
                                         section="orchestrator")
    setup_logging("orchestrator", config.log_level, config.log_json)
    asyncio.run(serve(config, sources))
    return 0


if __name__ == "__main__":
    sys.exit(main())
