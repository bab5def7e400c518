"""How fast each swarm server has been lately, across every session's steps.

Fed by the route traces (``swarm.route_trace``) from the executor's threads; read by
``/api/v1/swarm`` (recent figures per server) and ``/metrics`` (a histogram per server). Both
are bounded: the servers heard from most recently, and a fixed number of metric labels.
"""

import collections
import statistics
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Tuple

# Servers remembered for /api/v1/swarm, and recent steps kept per server.
MAX_SERVERS = 64
RECENT_STEPS = 128
# Servers with a histogram of their own in /metrics; later ones share the label "other".
MAX_LABELED_SERVERS = 32
OTHER_SERVERS = "other"


class ServerLatency:
    """Recent step times per server; ``observe`` is safe to call from any thread.

    ``observe_metric(label, seconds)`` records into the per-server histogram.
    """

    def __init__(self, observe_metric: Callable[[str, float], None], clock: Callable[[], float] = time.monotonic):
        self._observe_metric = observe_metric
        self._clock = clock
        self._lock = threading.Lock()
        self._recent: "collections.OrderedDict[str, Tuple[Deque[float], List[float]]]" = collections.OrderedDict()
        self._labeled: set = set()

    def observe(self, peer_id: str, seconds: float) -> None:
        """One server ran its part of one step in ``seconds``."""
        with self._lock:
            entry = self._recent.pop(peer_id, None) or (collections.deque(maxlen=RECENT_STEPS), [0.0])
            entry[0].append(seconds)
            entry[1][0] = self._clock()
            self._recent[peer_id] = entry  # most recently heard from last
            while len(self._recent) > MAX_SERVERS:
                self._recent.popitem(last=False)
            if peer_id not in self._labeled and len(self._labeled) < MAX_LABELED_SERVERS:
                self._labeled.add(peer_id)
            label = peer_id if peer_id in self._labeled else OTHER_SERVERS
        self._observe_metric(label, seconds)

    def describe(self) -> List[Dict[str, Any]]:
        """Per server, most recent first: its recent steps' median and 95th percentile in ms."""
        now = self._clock()
        with self._lock:
            entries = [(peer_id, list(times), seen[0]) for peer_id, (times, seen) in self._recent.items()]
        described = []
        for peer_id, times, seen in reversed(entries):
            ordered = sorted(times)
            described.append({"peer_id": peer_id, "recent_steps": len(ordered),
                              "median_ms": round(1000 * statistics.median(ordered), 2),
                              "p95_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2),
                              "seconds_since_last": round(now - seen, 1)})
        return described
