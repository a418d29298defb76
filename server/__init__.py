"""The Herder coordinator: gRPC services, scheduler, etcd store, election and worker sessions."""

import importlib.util

# `pip install herder` leaves the coordinator's dependencies out: say which install fixes it (one line
# under `python -m herder.server`) instead of failing deep inside some module's import.
if importlib.util.find_spec("aetcd") is None:
    raise ImportError(
        "the Herder coordinator needs the server extra (aetcd is not installed): pip install 'herder[server]'",
        name=__name__,  # runpy then reports it as one line rather than a traceback
    )
