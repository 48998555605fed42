"""Which replica a request goes to on a Ray Serve cluster: the one whose KV cache already holds its
conversation, unless that one is dead, full or far busier than the rest.

A :class:`ray.serve.request_router.RequestRouter` of ours (Ray Serve's request-router API), set on
the model deployment by :mod:`jmoss.server.ray_app`; Ray builds one in every process that holds a
handle to it (the front) and calls it for each request. The front names, per request, the keys the
router matches (:class:`Routed`): a uid conversation's ``uid:<uid>``, an OpenAI request's prefix
keys (hashes of its prompt up to each earlier reply, longest first). The router remembers which
replica each key was last sent to (:meth:`AffinityRouter.on_request_routed`) in a bounded LRU
table, and ranks that replica first; Ray's own machinery then probes queue lengths, skips replicas
at ``max_ongoing_requests``, drops dead ones and backs off. Affinity is a hint, never a
correctness condition: the front ships a uid conversation's history with every turn, so any
replica can answer it.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica


@dataclass
class Routed:
    """What the router reads from a request (the first argument of the handle call)."""

    keys: list[str] = field(default_factory=list)  # affinity keys to look up, the most specific first
    record: list[str] = field(default_factory=list)  # keys this request leaves in its replica's cache
    sticky: bool = False  # a uid conversation: its replica is preferred however busy (up to Ray's limit)


class AffinityRouter(RequestRouter):
    """Ranks the replica that last served one of a request's keys first, the others after it.

    ``imbalance`` (requests): a prefix match is ignored when its replica's queue is longer than the
    shortest one by more than this (re-reading a prompt is cheaper than waiting behind others); a
    uid conversation keeps its replica unless that replica is at ``max_ongoing_requests``.
    ``table_size``: keys remembered (least recently used forgotten first).
    """

    def initialize_state(self, imbalance: int = 4, table_size: int = 65536, **_: Any) -> None:
        self.imbalance, self.table_size = imbalance, table_size
        self.table: OrderedDict[str, ReplicaID] = OrderedDict()
        self.hits = self.misses = 0

    def _preferred(self, request: PendingRequest | None) -> tuple[ReplicaID | None, bool]:
        routed = _routed(request)
        if routed is None:
            return None, False
        for key in routed.keys:
            replica = self.table.get(key)
            if replica is not None:
                self.table.move_to_end(key)
                return replica, routed.sticky
        return None, False

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        preferred, sticky = self._preferred(pending_request)
        by_id = {r.replica_id: r for r in candidate_replicas}
        # Two random others, as Ray's default (power of two choices), after the preferred one.
        others = [r for r in candidate_replicas if r.replica_id != preferred]
        others = random.sample(others, min(2, len(others)))
        if preferred is None or preferred not in by_id:
            if pending_request is not None and _routed(pending_request) is not None:
                self.misses += 1
            return [others] if others else []
        if not sticky and self._busier(by_id[preferred], others):
            self.misses += 1
            return [others]
        self.hits += 1
        return [[by_id[preferred]], others] if others else [[by_id[preferred]]]

    def _busier(self, preferred: RunningReplica, others: list[RunningReplica]) -> bool:
        """The preferred replica's queue (as last probed) exceeds the shortest other by ``imbalance``."""
        cache = self.replica_queue_len_cache
        mine = cache.get(preferred.replica_id)
        theirs = [q for r in others if (q := cache.get(r.replica_id)) is not None]
        return mine is not None and bool(theirs) and mine - min(theirs) > self.imbalance

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        routed = _routed(pending_request)
        if routed is None:
            return
        for key in routed.record:
            self.table[key] = replica_id
            self.table.move_to_end(key)
        while len(self.table) > self.table_size:
            self.table.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for key in [k for k, r in self.table.items() if r == replica_id]:  # its cache died with it
            del self.table[key]


def _routed(request: PendingRequest | None) -> Routed | None:
    if request is None or not request.args:
        return None
    first = request.args[0]
    return getattr(first, "routed", None)
