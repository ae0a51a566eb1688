"""The run's handle on Ray: joining a cluster (or starting one for the run), making the
limiter and the embed actors on it, and removing them at the end."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipeline.config import JobConfig
from pipeline.engine.ray.limiter import Limiter
from pipeline.engine.ray.workers import EmbedWorker, validate_files
from pipeline.errors import ClusterError, ConfigError

log = logging.getLogger("embedpipe.ray")


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("engine: ray needs Ray: pip install 'embedpipe[ray]'") from None
    if logging.getLogger().handlers:
        # The application set up logging (the CLI's text or JSON lines): Ray's own warnings on
        # the driver go through it too, rather than Ray's handler writing its own format.
        ray_log = logging.getLogger("ray")
        ray_log.handlers.clear()
        ray_log.propagate = True
        ray_log.setLevel(max(ray_log.level, logging.WARNING))
    return ray



class Cluster:
    """The run's handle on Ray: joins ``address`` (or ``RAY_ADDRESS``, or a cluster this
    process already joined), else starts one on this machine for the run; makes the limiter
    and the embed actors, and removes them (and a cluster it started) at the end."""

    def __init__(self, job: JobConfig, client_options: dict[str, Any],
                 address: str | None = None) -> None:
        ray = import_ray()
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS") or None
            if address:
                reachable(address, job.run.ray_connect_timeout_s)
            with warnings.catch_warnings():
                # Ray starts its daemons by fork+exec, which lancedb warns about needlessly.
                warnings.filterwarnings("ignore", message="lancedb fork support")
                ray.init(address=address,
                         include_dashboard=False, configure_logging=False,
                         log_to_driver=False, ignore_reinit_error=True)
            self.started = True
        self.cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        embed = job.embed
        quota = embed.quota
        # The limiter lives on the driver's node: a worker node lost must not take the quota's
        # accounting with it (a restarted limiter would start the minute afresh).
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        limiter_name = f"embedpipe-limiter-{os.getpid()}-{id(self):x}"
        self.limiter = ray.remote(num_cpus=0)(Limiter).options(
            name=limiter_name, max_concurrency=1000, scheduling_strategy=here).remote(
            quota.rpm, quota.tpm, quota.rpd, embed.concurrency)
        # At least two (a call waits for no restart), one per CPU at most, ~4 calls each.
        actors = min(embed.concurrency, max(2, min(self.cpus, math.ceil(embed.concurrency / 4))))
        per_actor = math.ceil(embed.concurrency / actors) + 1
        worker_cls = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)(EmbedWorker)
        self.job_ref = ray.put(job)
        # The job by value: an actor restarted after its node died must not need an object
        # that died with the node.
        self.actors = [worker_cls.options(max_concurrency=per_actor).remote(
            job, client_options, limiter_name, i) for i in range(actors)]
        self.validate = ray.remote(num_cpus=1, max_retries=0)(validate_files)
        log.info("ray: %d CPUs, %d embed actors", self.cpus, actors)

    def close(self) -> None:
        for actor in [*self.actors, self.limiter]:
            with contextlib.suppress(Exception):  # already gone
                self.ray.kill(actor)
        if self.started:
            self.ray.shutdown()


def reachable(address: str, timeout_s: float) -> None:
    """Raise ClusterError unless the cluster's head answers a TCP connection within
    ``timeout_s`` (``ray.init`` itself retries a wrong address for about 14 minutes)."""
    if address in ("auto", "local"):
        return
    hostport = address.removeprefix("ray://").rsplit("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"the Ray address {address!r} is not HOST:PORT (run.ray_address, "
                           "--address or RAY_ADDRESS)")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
            return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise ClusterError(
                    f"cannot reach the Ray cluster at {address} within {timeout_s:g} s "
                    f"({exc.strerror or exc}): check run.ray_address, --address or RAY_ADDRESS, "
                    "and that the head node is up (run.ray_connect_timeout_s sets the wait)"
                ) from None
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


@contextmanager
def cluster(job: JobConfig, client_options: dict[str, Any],
            address: str | None = None) -> Iterator[Cluster]:
    c = Cluster(job, client_options, address)
    try:
        yield c
    finally:
        c.close()

