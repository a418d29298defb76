"""The error types Herder itself puts in a TaskError, defined once for the coordinator and the SDK.

A handler's own failures carry the exception's name (or NonRetryableError.type); these are
the ones the system sets, all under the `herder.` prefix.
"""

from herder.clients.proto.v1 import task_pb2

# The task was canceled (CancelTask, or a cancel that reached a running attempt).
CANCELED = "herder.canceled"
# The attempt ran longer than the task's timeout.
TIMEOUT = "herder.timeout"
# The task was not started within its ttl.
EXPIRED = "herder.expired"
# The worker's session ended (or its heartbeats stopped) and it did not re-claim the attempt.
WORKER_LOST = "herder.worker_lost"
# The worker did not acknowledge the assignment in time (the attempt is re-queued, using none up).
ACK_TIMEOUT = "herder.ack_timeout"
# The payload is not the type the handler takes, or does not decode.
BAD_PAYLOAD = "herder.bad_payload"
# The handler returned another message type than its task type's output.
BAD_OUTPUT = "herder.bad_output"
# The attempt's output or error is bigger than the coordinator stores (Welcome.max_*_bytes).
RESULT_TOO_LARGE = "herder.result_too_large"
# The worker sent a result with no outcome set.
INVALID_RESULT = "herder.invalid_result"

# The supervisor's handler service ended Execute without an output or an error.
HANDLER_NO_RESULT = "herder.handler_no_result"
# The supervisor could not reach its handler service (UNAVAILABLE), or lost it mid-attempt.
HANDLER_UNAVAILABLE = "herder.handler_unavailable"
# The supervisor stopped Execute at the task's timeout (the coordinator may record herder.timeout first).
HANDLER_DEADLINE_EXCEEDED = "herder.handler_deadline_exceeded"
# Execute failed with another gRPC status (the handler raised, ...); the message names the status.
HANDLER_FAILED = "herder.handler_failed"

# Set by the coordinator only: they change how a failure counts (retried at once, not counted), so
# a worker reporting one of them is refused as an invalid result.
COORDINATOR_ERROR_TYPES = frozenset({CANCELED, TIMEOUT, EXPIRED, WORKER_LOST, ACK_TIMEOUT, INVALID_RESULT})

# What the coordinator stores unless its flags say otherwise; a Welcome carries the values in force.
DEFAULT_MAX_RESULT_BYTES = 512 * 1024
DEFAULT_MAX_ERROR_BYTES = 16 * 1024
DEFAULT_MAX_PROGRESS_BYTES = 16 * 1024


def task_error(kind: str, text: str, *, retryable: bool = False, details: str = "") -> task_pb2.TaskError:
    """A TaskError of type `kind`: how the Worker, the engine and the supervisor report a failed attempt."""
    return task_pb2.TaskError(type=kind, message=text, retryable=retryable, details=details)


# Marks where fit_error cut a traceback's head or a message's tail.
CUT = "[...]"


def fit_error(error: task_pb2.TaskError, limit: int) -> bool:
    """Shrink an error to at most `limit` serialized bytes, in place; False when even its type does not fit.

    A message longer than a quarter of the limit is cut to that first (so that a huge message
    leaves room for the traceback); then the details (a traceback) lose their head, since a
    traceback's last lines say what failed; then the message loses more of its tail. Each keeps a
    mark where it was cut.
    """
    for name, keep_tail, share in (("message", False, 4), ("details", True, 1), ("message", False, 1)):
        excess = error.ByteSize() - limit
        if excess <= 0:
            return True
        text: str = getattr(error, name)
        data = text.encode()
        if share > 1:
            excess = len(data) - limit // share
            if excess <= 0:
                continue
        # A little more than the excess: the mark, and the length prefix that may shrink by less.
        keep = len(data) - excess - len(CUT) - 4
        if keep <= 0:
            setattr(error, name, "")
            continue
        kept = data[-keep:] if keep_tail else data[:keep]
        setattr(error, name, CUT + kept.decode(errors="ignore") if keep_tail else kept.decode(errors="ignore") + CUT)
    return error.ByteSize() <= limit
