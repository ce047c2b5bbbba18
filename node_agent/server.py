"""A node agent's gRPC server: the Node and health services, metrics, the capacity reporter, clean shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY, start_http_server

from common.audit_tap import install_from_env
from common.authz import ORCHESTRATOR, authorized_server
from common.log_format import setup_logging
from common.proto import splitmesh_pb2_grpc as pb_grpc
from common.transport import TransportError, bind
from node_agent.config import NodeConfig
from node_agent.memory import freeze_startup_objects
from node_agent.metrics import AgentCollector
from node_agent.reporter import Reporter
from node_agent.runtime import NodeRuntime
from node_agent.servicer import NodeServicer
from node_agent.torch_threads import confined_executor, single_threaded_here

log = logging.getLogger("node_agent")


async def serve(config: NodeConfig) -> None:
    if install_from_env(config.node_id):
        log.warning("audit tap on: recording every message this node receives (security tests only)")
    loop = asyncio.get_running_loop()
    loop.set_default_executor(confined_executor("node-io"))
    try:
        runtime = NodeRuntime(config)
    except TransportError as exc:
        raise SystemExit(f"TLS settings: {exc}") from None
    restored = await loop.run_in_executor(None, runtime.plans.restore_blocking)
    if restored is not None:
        log.info("serving the plan of epoch %d again after a restart", restored.epoch)
    if config.metrics_port:
        REGISTRY.register(AgentCollector(runtime))
        start_http_server(config.metrics_port)
    server = authorized_server(tls_on=runtime.tls is not None, pinned={ORCHESTRATOR: config.orchestrator_id})
    pb_grpc.add_NodeServicer_to_server(NodeServicer(runtime), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        port = bind(server, config.listen, runtime.tls, insecure=config.insecure)
    except TransportError as exc:
        raise SystemExit(str(exc)) from None
    if port == 0:
        raise SystemExit(f"cannot listen on {config.listen}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("splitmesh.v1.Node", health_pb2.HealthCheckResponse.SERVING)
    log.info("node %s serving on %s (pid %d, %s, activations %s)", config.node_id, config.listen, os.getpid(),
             "mutual TLS" if runtime.tls else "plaintext",
             "encrypted" if config.encrypt_activations else "in clear at the frame layer")
    reporter = asyncio.create_task(Reporter(runtime).run())
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("node %s stopping", config.node_id)
    await health_servicer.enter_graceful_shutdown()
    reporter.cancel()
    await server.stop(grace=2.0)
    await runtime.channels.close()
    runtime.compute.shutdown()


def run(config: NodeConfig, openmp: str) -> None:
    """Serve until SIGINT/SIGTERM; torch's OpenMP settings (``openmp`` says which) are already in place."""
    setup_logging(config.node_id, config.log_level, config.log_json)
    threads = config.threads or os.cpu_count() or 1
    log.info("torch threads: %d; OpenMP idle workers: %s", threads, openmp)
    torch.set_num_threads(threads)  # the default the compute thread starts from
    single_threaded_here()  # this thread (the event loop) and the executors: see node_agent/torch_threads.py
    log.debug("%d start-up objects frozen out of the cycle collector", freeze_startup_objects())
    asyncio.run(serve(config))
