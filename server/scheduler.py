"""Which queued task a worker gets next: priorities, fair sharing between concurrency keys, and limits.

Plain Python types only (no protobuf, asyncio or etcd), so it is unit-tested and benchmarked in
process. The leader owns one `Scheduler` per namespace and tells it what is queued, what was picked
and what finished; it never blocks and never raises on an unknown task id.

Model
-----
- A queued task is a ``task_id`` with a ``task_type``, a ``queue``, a ``priority`` (higher first), a
  concurrency ``key`` ("" is the default key, shared like any other) and a ``sequence`` (FIFO order,
  lower first). A task that re-enters after a failed attempt is pushed again with its original
  sequence, so it goes back to its FIFO place within its key.
- A task may request resources: ``request = (cpu_millis, memory_bytes)``, (0, 0) for none.
- Lanes: one per (queue, task_type, request). Inside a lane, tasks are grouped by priority level, highest
  first. Inside a level, the keys with tasks share the level by deficit round-robin with unit cost:
  a key of weight w (default 1) takes up to w tasks per turn, then goes to the back of the ring.
  Each key's tasks come out FIFO by sequence.
- A worker picks by task types: of the lanes of those types, the lane whose next pick has the
  highest priority wins, ties to the lower sequence (FIFO across lanes). With `fits`, lanes whose
  request the worker cannot take are passed over: a big request waiting for a big node does not
  hold back smaller ones behind it (they are in other lanes), and keeps its own place for a node it
  fits. Tasks with the same request stay FIFO among themselves; fair sharing between keys holds
  within each lane, so among the tasks of one request.
- Fairness bound: a key that joins a level enters its ring at the back, so it waits at most one turn
  of each key ahead of it. With one busy key A of weight w, a newly arrived key B's task comes out
  after at most w more tasks of A; with w = 1, next or after exactly one A (a key whose turn just
  ended yields to a newcomer before starting another turn).
- Running: `pick` marks the task running, counted in its queue, its key and globally, until
  `finished` releases it (call it when the attempt ends, whatever the outcome). `add_running` counts
  a task that runs already (found assigned or running when a leader takes over) the same way.
- Limits, each optional (0 = none) and changeable at any time: per queue, per concurrency key
  (across queues) and global, all on running counts. A key at its limit is parked out of the rings
  (it costs nothing per pick) and comes back when it drops below; a queue at its limit makes its
  lanes ineligible; at the global limit `pick` returns None. Running counts never exceed a limit
  through `pick`; a limit lowered below the current count holds back everything it covers until the
  count drops below it.
- `oldest(queue)` is kept here (the queued task with the lowest sequence, O(log n) amortized); how
  long a task has waited is the caller's to know, since a retried task keeps its old sequence.

Costs, n queued tasks: push, remove, update_priority, pick and finished are O(log n) amortized
(each lazy deletion is paid for by the operation that made it). A pick looks at the head of one
heap per task type the worker serves, never at all keys or all tasks; with `fits`, it also pops
and puts back the heads of the lanes ahead that do not fit (one per distinct request and queue, a
handful in practice), calling `fits` once per distinct request. Unparking a key costs the
number of (lane, level) rings where it was parked. Stale heap entries are compacted away once they
outnumber the live ones, so memory stays proportional to what is queued.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterable

# Where a key's tasks in one level stand with respect to that level's ring.
_IDLE, _RINGED, _PARKED = 0, 1, 2


# A queued or running task: (sequence, task_id, task_type, queue, priority, key, cpu_millis,
# memory_bytes). Heaps order these
# tuples directly (sequence first, then id). A heap entry is live while `tasks[task_id] is` that very
# tuple; a re-push or move makes a new tuple, so old entries turn stale without being touched. Plain
# tuples of str and int also drop out of the cyclic garbage collector's sight, which keeps a large
# backlog cheap to hold.
_Rec = tuple[int, str, str, str, int, str, int, int]
# What a task requests: (cpu_millis, memory_bytes); (0, 0) for nothing.
Request = tuple[int, int]
NO_REQUEST: Request = (0, 0)


class _Key:
    """A concurrency key across all queues: limit, weight, running count and parked key queues."""

    __slots__ = ("limit", "name", "parked", "queued", "running", "weight")

    def __init__(self, name: str) -> None:
        self.name = name
        self.limit = 0
        self.weight = 1
        self.queued = 0
        self.running = 0
        self.parked: dict[_KeyQueue, None] = {}


class _Queue:
    """A named queue: limit, pause, counts, lanes parked at its limit (or while paused), and its tasks oldest first."""

    __slots__ = ("limit", "name", "oldest", "parked", "paused", "queued", "running")

    def __init__(self, name: str) -> None:
        self.name = name
        self.limit = 0
        self.paused = False
        self.queued = 0
        self.running = 0
        self.parked: dict[_Lane, None] = {}
        self.oldest: list[_Rec] = []


class _KeyQueue:
    """One key's tasks in one priority level of one lane, FIFO by sequence; a member of the level's ring."""

    __slots__ = ("heap", "key", "level", "live", "state", "turn")

    def __init__(self, key: _Key, level: _Level) -> None:
        self.key = key
        self.level = level
        self.heap: list[_Rec] = []
        self.live = 0
        self.state = _IDLE
        # Picks left in this key's current turn; 0 at the head of the ring means the turn is over.
        self.turn = 0


class _Level:
    """One priority level of a lane: its key queues and the DRR ring of those that may be served."""

    __slots__ = ("count", "in_heap", "keys", "lane", "order", "priority", "ring")

    def __init__(self, lane: _Lane, priority: int, order: int) -> None:
        self.lane = lane
        self.priority = priority
        self.order = order
        self.count = 0
        self.keys: dict[str, _KeyQueue] = {}
        self.ring: deque[_KeyQueue] = deque()
        self.in_heap = False


# (-priority, sequence, tiebreak, lane): a lane's next pick, in its task type's heap.
_Head = tuple[int, int, int, "_Lane"]


class _Lane:
    """One (queue, task_type, request): priority levels, highest first, and the lane's current next pick."""

    __slots__ = (
        "count", "head", "head_kq", "level_heap", "levels", "name", "parked", "queue", "request", "requested", "type",
    )  # fmt: skip

    def __init__(self, queue: _Queue, task_type: _Type, request: Request) -> None:
        self.queue = queue
        self.type = task_type
        self.request = request
        self.requested = request != NO_REQUEST
        # Its key in the type's lanes.
        self.name = (queue.name, request[0], request[1])
        self.count = 0
        self.levels: dict[int, _Level] = {}
        self.level_heap: list[tuple[int, int, _Level]] = []
        # The entry in the type's heap that is current; any other entry for this lane is stale.
        self.head: _Head | None = None
        self.head_kq: _KeyQueue | None = None
        self.parked = False


class _Type:
    """A task type: its lanes (one per queue and request) and a heap of their next picks."""

    __slots__ = ("heap", "lanes", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.lanes: dict[tuple[str, int, int], _Lane] = {}
        self.heap: list[_Head] = []


def _full(limit: int, running: int) -> bool:
    return 0 < limit <= running


def _check_limit(what: str, n: int) -> None:
    if n < 0:
        raise ValueError(f"{what} must be 0 (no limit) or more, got {n}")


class Scheduler:
    """Queued tasks of one namespace and their running counts; picks the next task for a worker.

    Not thread-safe; the leader calls it from its event loop only. Methods never block.
    """

    def __init__(self) -> None:
        self._tasks: dict[str, _Rec] = {}
        self._running: dict[str, _Rec] = {}
        self._types: dict[str, _Type] = {}
        self._queues: dict[str, _Queue] = {}
        self._keys: dict[str, _Key] = {}
        self._global_limit = 0
        self._global_running = 0
        self._tiebreak = itertools.count()
        # Queued tasks with a resource request.
        self._requested = 0

    # ----------------------------------------------------------------- queries

    def __len__(self) -> int:
        """Number of queued tasks (running ones not included)."""
        return len(self._tasks)

    def __contains__(self, task_id: object) -> bool:
        """Whether the task is queued (not whether it is running)."""
        return task_id in self._tasks

    @property
    def requested(self) -> int:
        """Queued tasks that request resources."""
        return self._requested

    def queued(self, queue: str | None = None) -> int:
        """Queued tasks in this queue, or in all queues."""
        if queue is None:
            return len(self._tasks)
        q = self._queues.get(queue)
        return q.queued if q is not None else 0

    def running(self, *, queue: str | None = None, key: str | None = None) -> int:
        """Running tasks in this queue, or with this concurrency key, or (with neither) in all."""
        if queue is not None and key is not None:
            raise ValueError("count running tasks by queue or by key, not both")
        if queue is not None:
            q = self._queues.get(queue)
            return q.running if q is not None else 0
        if key is not None:
            k = self._keys.get(key)
            return k.running if k is not None else 0
        return self._global_running

    def oldest(self, queue: str) -> str | None:
        """The id of the queued task with the lowest sequence in this queue, or None if it has none."""
        q = self._queues.get(queue)
        if q is None:
            return None
        heap, tasks = q.oldest, self._tasks
        while heap and tasks.get(heap[0][1]) is not heap[0]:
            heapq.heappop(heap)
        return heap[0][1] if heap else None

    def queues(self) -> list[str]:
        """Names of the queues with queued or running tasks or a limit, sorted."""
        return sorted(self._queues)

    def queue_limit(self, queue: str) -> int:
        q = self._queues.get(queue)
        return q.limit if q is not None else 0

    def key_limit(self, key: str) -> int:
        k = self._keys.get(key)
        return k.limit if k is not None else 0

    def key_weight(self, key: str) -> int:
        k = self._keys.get(key)
        return k.weight if k is not None else 1

    @property
    def global_limit(self) -> int:
        return self._global_limit

    def hold_reason(self, task_id: str) -> str:
        """Why a queued task cannot be picked now: a limit it is under, or "" if none holds it back.

        Checks its queue, then its key, then the global limit. "" also for a task that is not queued.
        Waiting behind higher priorities or other keys is not a hold.
        """
        task = self._tasks.get(task_id)
        if task is None:
            return ""
        _, _, _, queue, _, key, _, _ = task
        q = self._queues[queue]
        if q.paused:
            return f"queue {queue!r} is paused"
        if _full(q.limit, q.running):
            return f"queue {queue!r} is at its limit of {q.limit} running"
        k = self._keys[key]
        if _full(k.limit, k.running):
            name = f"concurrency key {key!r}" if key else "the default concurrency key"
            return f"{name} is at its limit of {k.limit} running"
        if _full(self._global_limit, self._global_running):
            return f"the global limit of {self._global_limit} running is reached"
        return ""

    def held_by_key_limits(self) -> dict[str, int]:
        """Queued tasks per queue whose concurrency key is at its limit (queues with none are left out).

        A status query: costs the keys, plus lanes x levels x full keys when some key is full.
        """
        full = [k.name for k in self._keys.values() if _full(k.limit, k.running)]
        held: dict[str, int] = {}
        if not full:
            return held
        for task_type in self._types.values():
            for lane in task_type.lanes.values():
                for level in lane.levels.values():
                    for name in full:
                        kq = level.keys.get(name)
                        if kq is not None and kq.live:
                            held[lane.queue.name] = held.get(lane.queue.name, 0) + kq.live
        return held

    def request(self, task_id: str) -> Request:
        """What a queued or running task requests; NO_REQUEST for one that is neither."""
        task = self._tasks.get(task_id) or self._running.get(task_id)
        return (task[6], task[7]) if task is not None else NO_REQUEST

    def task_type(self, task_id: str) -> str:
        """A queued task's type; "" for one that is not queued."""
        task = self._tasks.get(task_id)
        return task[2] if task is not None else ""

    def waiting_requests(self, queue: str) -> list[tuple[Request, frozenset[str], int]]:
        """The resource requests queued in this queue, smallest first: (request, task types, count) each.

        Costs the number of lanes of all types (a status query, not a dispatch path).
        """
        found: dict[Request, tuple[set[str], int]] = {}
        for task_type in self._types.values():
            for lane in task_type.lanes.values():
                if lane.queue.name == queue and lane.request != NO_REQUEST:
                    types, count = found.get(lane.request, (set(), 0))
                    types.add(task_type.name)
                    found[lane.request] = (types, count + lane.count)
        return [(request, frozenset(types), count) for request, (types, count) in sorted(found.items())]

    # ----------------------------------------------------------------- changes

    def push(
        self,
        task_id: str,
        task_type: str,
        queue: str,
        priority: int,
        key: str,
        sequence: int,
        request: Request = NO_REQUEST,
    ) -> None:
        """Queue a task. An id already queued is replaced; an id running is first released as finished."""
        if task_id in self._running:
            self.finished(task_id)
        old = self._tasks.get(task_id)
        if old is not None:
            self._unqueue(old)
        task = (sequence, task_id, task_type, queue, priority, key, request[0], request[1])
        self._tasks[task_id] = task
        self._enqueue(task)

    def remove(self, task_id: str) -> bool:
        """Take a queued task out (canceled, expired). False if it was not queued; running ones stay running."""
        task = self._tasks.get(task_id)
        if task is None:
            return False
        self._unqueue(task)
        return True

    def update_priority(self, task_id: str, priority: int) -> bool:
        """Move a queued task to another priority level, for the next pick. False if it is not queued.

        It keeps its sequence, so it takes its FIFO place among its key's tasks at the new level.
        """
        task = self._tasks.get(task_id)
        if task is None:
            return False
        sequence, _, task_type, queue, old_priority, key, cpu, memory = task
        if old_priority != priority:
            self._unqueue(task)
            moved = (sequence, task_id, task_type, queue, priority, key, cpu, memory)
            self._tasks[task_id] = moved
            self._enqueue(moved)
        return True

    def pick(self, task_types: Iterable[str], fits: Callable[[Request], bool] | None = None) -> str | None:
        """Remove and return the next task for a worker serving these types, now running; None if none may run.

        `fits(request)` says whether the worker can take a task requesting that much; without it,
        every request fits. Tasks requesting nothing are always taken (fits is not asked).
        """
        if 0 < self._global_limit <= self._global_running:
            return None
        best: _Head | None = None
        # Heads of lanes that do not fit, popped while looking past them: put back before returning.
        passed: list[_Head] | None = None
        verdicts: dict[Request, bool] = {}
        for name in task_types:
            task_type = self._types.get(name)
            if task_type is None:
                continue
            head = self._top(task_type)
            if fits is not None:
                while head is not None and head[3].requested:
                    request = head[3].request
                    verdict = verdicts.get(request)
                    if verdict is None:
                        verdict = verdicts[request] = fits(request)
                    if verdict:
                        break
                    if passed is None:
                        passed = []
                    passed.append(heapq.heappop(task_type.heap))
                    head = self._top(task_type)
            if head is not None and (best is None or head < best):
                best = head
        for head in passed or ():
            heapq.heappush(head[3].type.heap, head)
        if best is None:
            return None
        lane = best[3]
        theap = lane.type.heap
        if theap and theap[0] is best:
            heapq.heappop(theap)
        # Otherwise a passed-over head went back in front of it: it stays in the heap, stale from here.
        lane.head = None
        return self._take(lane)

    def add_running(
        self,
        task_id: str,
        task_type: str,
        queue: str,
        priority: int,
        key: str,
        sequence: int,
        request: Request = NO_REQUEST,
    ) -> None:
        """Count a task as running without picking it: one a new leader finds assigned or running in etcd.

        A queued entry of the id is taken out first; an id already running is left as it is. Limits are
        not checked (the task runs already): over a limit, nothing more it covers is picked until the
        count drops below it.
        """
        if task_id in self._running:
            return
        old = self._tasks.get(task_id)
        if old is not None:
            self._unqueue(old)
        self._running[task_id] = (sequence, task_id, task_type, queue, priority, key, request[0], request[1])
        self._queue(queue).running += 1
        self._key(key).running += 1
        self._global_running += 1

    def finished(self, task_id: str) -> bool:
        """Release a picked task's running slot (its attempt ended). False if it was not running."""
        task = self._running.pop(task_id, None)
        if task is None:
            return False
        _, _, _, queue, _, key, _, _ = task
        self._global_running -= 1
        q = self._queues[queue]
        q.running -= 1
        if q.parked and not q.paused and not _full(q.limit, q.running):
            self._unpark_queue(q)
        k = self._keys[key]
        k.running -= 1
        if k.parked and not _full(k.limit, k.running):
            self._unpark_key(k)
        self._forget_queue(q)
        self._forget_key(k)
        return True

    def set_queue_limit(self, queue: str, n: int) -> None:
        """At most n tasks of this queue run at once (0: no limit). Lowering it preempts nothing."""
        _check_limit("a queue limit", n)
        q = self._queue(queue)
        q.limit = n
        if q.parked and not q.paused and not _full(q.limit, q.running):
            self._unpark_queue(q)
        self._forget_queue(q)

    def set_queue_paused(self, queue: str, paused: bool) -> None:
        """A paused queue keeps its tasks queued and hands none out; resuming lets them be picked again."""
        q = self._queue(queue)
        q.paused = paused
        if not paused and q.parked and not _full(q.limit, q.running):
            self._unpark_queue(q)
        self._forget_queue(q)

    def queue_paused(self, queue: str) -> bool:
        q = self._queues.get(queue)
        return q is not None and q.paused

    def set_key_limit(self, key: str, n: int) -> None:
        """At most n tasks with this concurrency key run at once, across queues (0: no limit)."""
        _check_limit("a concurrency key limit", n)
        k = self._key(key)
        k.limit = n
        if k.parked and not _full(k.limit, k.running):
            self._unpark_key(k)
        self._forget_key(k)

    def set_global_limit(self, n: int) -> None:
        """At most n tasks run at once in all (0: no limit)."""
        _check_limit("the global limit", n)
        self._global_limit = n

    def set_key_weight(self, key: str, weight: int) -> None:
        """This key takes up to `weight` tasks per DRR turn (default 1), from its next turn on."""
        if weight < 1:
            raise ValueError(f"a concurrency key weight must be 1 or more, got {weight}")
        k = self._key(key)
        k.weight = weight
        self._forget_key(k)

    # ----------------------------------------------------------------- internals: state records

    def _queue(self, name: str) -> _Queue:
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = _Queue(name)
        return q

    def _key(self, name: str) -> _Key:
        k = self._keys.get(name)
        if k is None:
            k = self._keys[name] = _Key(name)
        return k

    def _forget_queue(self, q: _Queue) -> None:
        # Queue names come from users: keep no state for one that has nothing left.
        if not (q.queued or q.running or q.limit or q.paused):
            del self._queues[q.name]

    def _forget_key(self, k: _Key) -> None:
        if not (k.queued or k.running or k.limit or k.weight != 1):
            del self._keys[k.name]

    # ----------------------------------------------------------------- internals: queueing

    def _enqueue(self, task: _Rec) -> None:
        sequence, _, type_name, queue, priority, key, cpu, memory = task
        q = self._queue(queue)
        k = self._key(key)
        task_type = self._types.get(type_name)
        if task_type is None:
            task_type = self._types[type_name] = _Type(type_name)
        lane = task_type.lanes.get((queue, cpu, memory))
        if lane is None:
            lane = _Lane(q, task_type, (cpu, memory))
            task_type.lanes[lane.name] = lane
        level = lane.levels.get(priority)
        if level is None:
            level = lane.levels[priority] = _Level(lane, priority, next(self._tiebreak))
        kq = level.keys.get(key)
        if kq is None:
            kq = level.keys[key] = _KeyQueue(k, level)
        heapq.heappush(kq.heap, task)
        heapq.heappush(q.oldest, task)
        if cpu or memory:
            self._requested += 1
        kq.live += 1
        level.count += 1
        lane.count += 1
        q.queued += 1
        k.queued += 1
        if kq.state == _IDLE:
            if _full(k.limit, k.running):
                kq.state = _PARKED
                k.parked[kq] = None
                return
            self._ring(kq)
        head = lane.head
        if head is not None:
            # Most pushes cannot change the lane's next pick: skip recomputing it then.
            if priority < -head[0]:
                return
            if priority == -head[0]:
                head_kq = lane.head_kq
                if kq is head_kq:
                    if sequence > head[1]:
                        return
                elif head_kq is not None and head_kq.turn > 0:
                    return
        self._refresh(lane)

    def _unqueue(self, task: _Rec) -> None:
        """Take a queued task out of every structure and refresh its lane's next pick."""
        _, task_id, type_name, queue, priority, key, cpu, memory = task
        kq = self._types[type_name].lanes[(queue, cpu, memory)].levels[priority].keys[key]
        del self._tasks[task_id]
        lane = self._unlink(kq)
        if lane.count:
            self._refresh(lane)
        self._forget_queue(lane.queue)
        self._forget_key(kq.key)

    def _unlink(self, kq: _KeyQueue) -> _Lane:
        """Count one task of this key queue out (already gone from tasks, so its heap entries are stale).

        Returns the lane, which may now be empty.
        """
        tasks = self._tasks
        key = kq.key
        level = kq.level
        lane = level.lane
        q = lane.queue
        kq.live -= 1
        if not kq.live:
            del level.keys[key.name]
            kq.heap.clear()
            if kq.state == _PARKED:
                del key.parked[kq]
                kq.state = _IDLE
            # A ringed one leaves the ring when it reaches the head.
        elif len(kq.heap) > 2 * kq.live + 16:
            kq.heap[:] = [e for e in kq.heap if tasks.get(e[1]) is e]
            heapq.heapify(kq.heap)
        level.count -= 1
        if lane.requested:
            self._requested -= 1
        if not level.count:
            # Its entry in the lane's level heap turns stale: the lane no longer maps the priority to it.
            del lane.levels[level.priority]
        lane.count -= 1
        if not lane.count:
            self._drop_lane(lane)
        q.queued -= 1
        key.queued -= 1
        oldest = q.oldest
        while oldest and tasks.get(oldest[0][1]) is not oldest[0]:
            heapq.heappop(oldest)
        if len(oldest) > 2 * q.queued + 1024:
            oldest[:] = [e for e in oldest if tasks.get(e[1]) is e]
            heapq.heapify(oldest)
        return lane

    def _drop_lane(self, lane: _Lane) -> None:
        task_type = lane.type
        del task_type.lanes[lane.name]
        lane.head = None
        lane.head_kq = None
        if lane.parked:
            del lane.queue.parked[lane]
            lane.parked = False
        if not task_type.lanes:
            del self._types[task_type.name]

    def _ring(self, kq: _KeyQueue) -> None:
        """Put a key queue at the back of its level's ring, with a fresh turn."""
        kq.state = _RINGED
        kq.turn = kq.key.weight
        level = kq.level
        level.ring.append(kq)
        if not level.in_heap:
            level.in_heap = True
            heapq.heappush(level.lane.level_heap, (-level.priority, level.order, level))

    # ----------------------------------------------------------------- internals: picking

    def _settle(self, level: _Level) -> _KeyQueue | None:
        """The key queue that serves this level's next pick, after dropping empty ones and parking full ones."""
        ring = level.ring
        while ring:
            kq = ring[0]
            if not kq.live:
                ring.popleft()
                kq.state = _IDLE
                continue
            key = kq.key
            if 0 < key.limit <= key.running:
                ring.popleft()
                kq.state = _PARKED
                key.parked[kq] = None
                continue
            if kq.turn <= 0 and len(ring) > 1:
                # Its turn is over: next key. Alone in the ring it simply starts a new turn when picked.
                ring.rotate(-1)
                kq.turn = key.weight
                continue
            return kq
        return None

    def _refresh(self, lane: _Lane) -> None:
        """Recompute a lane's next pick and publish it in its type's heap if it changed."""
        if lane.parked:
            return
        heap = lane.level_heap
        kq: _KeyQueue | None = None
        while heap:
            level = heap[0][2]
            if lane.levels.get(level.priority) is not level:
                heapq.heappop(heap)
                continue
            kq = self._settle(level)
            if kq is not None:
                break
            heapq.heappop(heap)
            level.in_heap = False
        if len(heap) > 2 * len(lane.levels) + 16:
            heap[:] = [(-lv.priority, lv.order, lv) for lv in lane.levels.values() if lv.in_heap]
            heapq.heapify(heap)
        lane.head_kq = kq
        if kq is None:
            lane.head = None
            return
        kheap, tasks = kq.heap, self._tasks
        while tasks.get(kheap[0][1]) is not kheap[0]:
            heapq.heappop(kheap)
        sequence, _, _, _, priority, _, _, _ = kheap[0]
        head = lane.head
        if head is not None and head[0] == -priority and head[1] == sequence:
            return
        head = (-priority, sequence, next(self._tiebreak), lane)
        lane.head = head
        theap = lane.type.heap
        heapq.heappush(theap, head)
        if len(theap) > 2 * len(lane.type.lanes) + 16:
            # In place: _top may be walking this very list.
            theap[:] = [ln.head for ln in lane.type.lanes.values() if ln.head is not None]
            heapq.heapify(theap)

    def _top(self, task_type: _Type) -> _Head | None:
        """The best next pick among a type's lanes that may run now, parking lanes and keys at their limits."""
        heap = task_type.heap
        while heap:
            head = heap[0]
            lane = head[3]
            if lane.head is not head:
                heapq.heappop(heap)
                continue
            q = lane.queue
            # A paused queue parks its lanes like a full one: a pick never looks at them again until resumed.
            if q.paused or 0 < q.limit <= q.running:
                heapq.heappop(heap)
                lane.head = None
                lane.head_kq = None
                lane.parked = True
                q.parked[lane] = None
                continue
            kq = lane.head_kq
            assert kq is not None
            key = kq.key
            if 0 < key.limit <= key.running:
                # Published before its key filled up elsewhere: recompute, which parks the key.
                heapq.heappop(heap)
                lane.head = None
                self._refresh(lane)
                continue
            return head
        return None

    def _take(self, lane: _Lane) -> str:
        """Pick the lane's next task (its head was just validated) and count it as running."""
        kq = lane.head_kq
        assert kq is not None
        if kq.turn <= 0:
            kq.turn = kq.key.weight
        kheap, tasks = kq.heap, self._tasks
        task = heapq.heappop(kheap)
        task_id = task[1]
        while tasks.get(task_id) is not task:
            task = heapq.heappop(kheap)
            task_id = task[1]
        kq.turn -= 1
        del tasks[task_id]
        self._unlink(kq)
        self._running[task_id] = task
        kq.key.running += 1
        lane.queue.running += 1
        self._global_running += 1
        if lane.count:
            self._refresh(lane)
        return task_id

    def _unpark_key(self, key: _Key) -> None:
        lanes: dict[_Lane, None] = {}
        for kq in key.parked:
            self._ring(kq)
            lanes[kq.level.lane] = None
        key.parked.clear()
        for lane in lanes:
            self._refresh(lane)

    def _unpark_queue(self, q: _Queue) -> None:
        lanes = list(q.parked)
        q.parked.clear()
        for lane in lanes:
            lane.parked = False
            self._refresh(lane)
