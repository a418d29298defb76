"""The Herder supervisor sidecar (its contract is in protos/herder/v1/supervisor.proto).

`herder supervisor` runs a TaskHandlerService's tasks for a coordinator: the same worker-session
engine as the Python Worker (herder.clients.engine), with attempts forwarded to Execute.
"""

from herder.supervisor.app import Supervisor, SupervisorConfig
from herder.supervisor.handler import HandlerRunner, HandlerSettings

__all__ = ["HandlerRunner", "HandlerSettings", "Supervisor", "SupervisorConfig"]
