"""Server reflection that knows the task types' messages too.

grpcurl resolves the `Any` payloads and results in replies through reflection;
serving the registered task types' descriptors beside Herder's own lets it
render them as JSON instead of "type not recognized".
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from herder.clients.descriptors import add_files, descriptor_set_for
from herder.clients.proto.v1 import coordinator_pb2, lock_pb2

log = logging.getLogger(__name__)


class ContractReflection:
    """A descriptor pool for reflection, grown as task types are registered."""

    def __init__(self) -> None:
        self.pool = descriptor_pool.DescriptorPool()
        self.add(
            descriptor_set_for(
                coordinator_pb2.SubmitTaskRequest,
                lock_pb2.AcquireRequest,
                health_pb2.HealthCheckRequest,
                reflection_pb2.ServerReflectionRequest,
            )
        )

    def add(self, files: descriptor_pb2.FileDescriptorSet) -> None:
        """Add the files not known yet; one that clashes with a known file of the same name is skipped."""
        skipped = add_files(self.pool, files.file)
        if skipped:
            log.warning("reflection skips %s", ", ".join(skipped))

    def enable(self, server: grpc.aio.Server, service_names: tuple[str, ...]) -> None:
        reflection.enable_server_reflection((*service_names, reflection.SERVICE_NAME), server, pool=self.pool)
