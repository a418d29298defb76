"""The etcd key layout of a namespace: /herder/<namespace>/{leader,members/,tasks/,idem/,types/,locks/}."""

from __future__ import annotations


def prefix(namespace: str) -> bytes:
    return f"/herder/{namespace}/".encode()


def leader(ns: bytes) -> bytes:
    return ns + b"leader"


def members_prefix(ns: bytes) -> bytes:
    return ns + b"members/"


def member(ns: bytes, replica_id: str) -> bytes:
    return members_prefix(ns) + replica_id.encode()


def tasks_prefix(ns: bytes) -> bytes:
    return ns + b"tasks/"


def task(ns: bytes, task_id: str) -> bytes:
    return tasks_prefix(ns) + task_id.encode()


def idempotency_prefix(ns: bytes) -> bytes:
    return ns + b"idem/"


def idempotency(ns: bytes, key: str) -> bytes:
    return idempotency_prefix(ns) + key.encode()


def types_prefix(ns: bytes) -> bytes:
    return ns + b"types/"


def task_type(ns: bytes, name: str) -> bytes:
    return types_prefix(ns) + name.encode()
