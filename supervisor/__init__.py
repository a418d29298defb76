"""The Herder supervisor sidecar (its contract is in protos/herder/v1/supervisor.proto)."""
