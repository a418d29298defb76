"""The etcd key layout of a namespace.

/herder/<namespace>/{leader,members/,tasks/,idem/,types/,type_versions/,limits/,paused/,gc/,locks/}.
"""

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


def type_versions_prefix(ns: bytes, name: str) -> bytes:
    """The kept versions of one task type: type_versions/<name>/<version, 10 digits> (outside types/,
    so listing types never reads the history)."""
    return ns + f"type_versions/{name}/".encode()


def type_version(ns: bytes, name: str, version: int) -> bytes:
    return type_versions_prefix(ns, name) + f"{version:010d}".encode()


def limits_prefix(ns: bytes) -> bytes:
    return ns + b"limits/"


def limit(ns: bytes, scope: int, name: str) -> bytes:
    return limits_prefix(ns) + f"{scope}/{name}".encode()


def paused_prefix(ns: bytes) -> bytes:
    """Paused queues: paused/<queue> exists while the queue is paused."""
    return ns + b"paused/"


def paused(ns: bytes, queue: str) -> bytes:
    return paused_prefix(ns) + queue.encode()


def gc_prefix(ns: bytes) -> bytes:
    """Finished tasks by deletion time: gc/<milliseconds, 16 hex digits>/<task id>."""
    return ns + b"gc/"


def gc(ns: bytes, delete_at: float, task_id: str) -> bytes:
    return gc_ms(ns, int(delete_at * 1000), task_id)


def gc_ms(ns: bytes, delete_ms: int, task_id: str) -> bytes:
    """The gc key of a task deleted at delete_ms milliseconds (Task.delete_time names it exactly)."""
    return gc_prefix(ns) + f"{delete_ms:016x}/{task_id}".encode()


def gc_until(ns: bytes, now: float) -> bytes:
    """The range end covering every gc key due at or before now."""
    return gc_prefix(ns) + f"{int(now * 1000) + 1:016x}".encode()


def lock_prefix(ns: bytes, name: str) -> bytes:
    """Every waiter's and the holder's key of one lock: locks/<name>/ (names hold no "/", so no lock's
    prefix covers another's keys)."""
    return ns + f"locks/{name}/".encode()


def lock(ns: bytes, name: str, lease: int) -> bytes:
    """One Acquire's key: locks/<name>/<its lease, 16 hex digits>."""
    return lock_prefix(ns, name) + f"{lease:016x}".encode()
