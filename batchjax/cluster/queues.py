"""Per-replica queues of whole prefix groups, with stealing when a replica runs dry.

The planner fills the queues once (`batchjax.schedule.replicas.assign_groups`: longest
estimated group first onto the least-loaded replica); a replica's batcher takes its next group
only when it has room to start one, so everything it has not taken can still move. A replica
that runs dry (its queue empty, nothing of its own running) takes the last group of the queue
with the most estimated work left.
Thread-safe; a Ray actor can hold one as is.
"""

from __future__ import annotations

import collections
import threading
from typing import Sequence

# group id, prefix tokens, request ids[, chain of (segment id, end)] (`Plan.group_work`)
GroupWork = tuple


class ReplicaQueues:
    def __init__(self, groups: Sequence[GroupWork], costs: Sequence[float],
                 assignment: Sequence[Sequence[int]]):
        """`groups[i]` with estimated cost `costs[i]`; `assignment[r]`: indices of replica
        r's groups in run order."""
        seen = sorted(i for queue in assignment for i in queue)
        if seen != list(range(len(groups))):
            raise ValueError("the assignment must place every group on exactly one replica")
        self._groups = list(groups)
        self._costs = list(costs)
        self._queues = [collections.deque(queue) for queue in assignment]
        self._left = [sum(self._costs[i] for i in queue) for queue in assignment]
        self._lock = threading.Lock()
        self.taken: list[list[int]] = [[] for _ in assignment]  # group indices, per replica
        self.stolen = [0] * len(assignment)  # groups each replica took from another's queue
        self.planned = [len(queue) for queue in assignment]  # groups the planner gave each

    @property
    def groups(self) -> list[GroupWork]:
        return list(self._groups)

    @property
    def num_replicas(self) -> int:
        return len(self._queues)

    def take(self, replica: int, dry: bool = True) -> GroupWork | None:
        """Replica `replica`'s next group; once its queue is empty and it is `dry` (nothing of
        its own left running), the last group of the queue with the most work left."""
        with self._lock:
            queue = self._queues[replica]
            if queue:
                i = queue.popleft()
                owner = replica
            elif not dry:
                return None
            else:
                others = [r for r in range(len(self._queues)) if self._queues[r]]
                if not others:
                    return None
                owner = max(others, key=lambda r: (self._left[r], -r))
                i = self._queues[owner].pop()  # the group its owner would have run last
                self.stolen[replica] += 1
            self._left[owner] -= self._costs[i]
            self.taken[replica].append(i)
            return self._groups[i]

    def put_back(self, replica: int, groups: Sequence[GroupWork]) -> None:
        """Work to run again on `replica` (a failed replica's unfinished groups)."""
        with self._lock:
            for group in groups:
                self._groups.append(group)
                self._costs.append(0.0)
                self._queues[replica].append(len(self._groups) - 1)

    def source(self, replica: int) -> "QueueSource":
        return QueueSource(self, replica)


class QueueSource:
    """`ReplicaQueues` seen by one replica's batcher (a `batchjax.schedule.batching.GroupSource`)."""

    def __init__(self, queues: ReplicaQueues, replica: int):
        self._queues, self._replica = queues, replica

    def take(self, dry: bool = True) -> GroupWork | None:
        return self._queues.take(self._replica, dry)
