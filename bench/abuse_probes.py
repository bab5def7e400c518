"""What bench/abuse.py measures from outside the server: ``/health`` from a process of its own,
CPU pinning of whole process trees, and quantiles of the server's Prometheus histograms.

The ``/health`` prober is a process of its own so that neither the legitimate stream's event loop
nor the attacker's delays a poll: what it measures is the server's answer. Pinning sets the
affinity of every thread of a process and of its descendants (a thread's affinity is its own on
Linux, and threads and children inherit it when they start).
"""

import collections
import http.client
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from typing import Counter, Dict, Iterable, List, Optional, Set, Tuple
from urllib.parse import urlparse

import psutil

HEALTH_INTERVAL = 0.05
HEALTH_TIMEOUT = 60.0
CLOSE_TIMEOUT = 5.0


def process_threads(pid: int) -> List[int]:
    """The thread ids of process ``pid`` (none if it is gone)."""
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def pin_process(pid: int, cpus: Set[int]) -> int:
    """Puts every thread of process ``pid`` on ``cpus``; returns how many were elsewhere."""
    moved = 0
    for tid in process_threads(pid):
        try:
            if os.sched_getaffinity(tid) != cpus:
                os.sched_setaffinity(tid, cpus)
                moved += 1
        except (ProcessLookupError, PermissionError):
            pass  # the thread ended meanwhile
    return moved


def pin_tree(pid: int, cpus: Set[int], skip: Iterable[int] = ()) -> Tuple[int, int]:
    """Puts process ``pid`` and its descendants, but for ``skip`` and theirs, on ``cpus``;
    returns (processes seen, threads that were elsewhere and were moved)."""
    skipped = set(skip)
    pending, seen, moved = [psutil.Process(pid)], 0, 0
    while pending:
        process = pending.pop()
        if process.pid in skipped:
            continue
        seen += 1
        moved += pin_process(process.pid, cpus)
        try:
            pending.extend(process.children())
        except psutil.NoSuchProcess:
            pass
    return seen, moved


def pin_self(cpus: Set[int]) -> None:
    """Puts every thread of this process on ``cpus`` (a pool worker's initializer, among others)."""
    pin_process(os.getpid(), set(cpus))


@dataclass
class HealthResult:
    """The ``/health`` polls of one row: each one's time in ms (failed ones included) and the failures."""

    ms: List[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=collections.Counter)


def _poll_once(host: str, port: int) -> Optional[str]:
    """One ``GET /health`` on a new connection; None if it answered 200, else what went wrong."""
    connection = http.client.HTTPConnection(host, port, timeout=HEALTH_TIMEOUT)
    try:
        connection.request("GET", "/health")
        response = connection.getresponse()
        response.read()
        return None if response.status == 200 else f"HTTP {response.status}"
    except Exception as error:
        return f"{type(error).__name__}: {str(error)[:80]}".rstrip(": ")
    finally:
        connection.close()


def _prober(commands, base_url: str) -> None:
    """The prober process: on each "start", polls every 50 ms until "stop", then sends its result;
    ends on anything else."""
    url = urlparse(base_url)
    while commands.recv() == "start":
        result = HealthResult()
        while not commands.poll():
            started = time.monotonic()
            failure = _poll_once(url.hostname, url.port)
            elapsed = time.monotonic() - started
            result.ms.append(1000 * elapsed)
            if failure:
                result.failures[failure] += 1
            time.sleep(max(0.0, HEALTH_INTERVAL - elapsed))
        if commands.recv() != "stop":
            return
        commands.send(result)


class HealthProber:
    """``GET /health`` every 50 ms from a process of its own, between ``start`` and ``stop``
    (on the CPUs of the process that makes it)."""

    def __init__(self, base_url: str):
        self._commands, child_end = multiprocessing.get_context("spawn").Pipe()
        self.process = multiprocessing.get_context("spawn").Process(
            target=_prober, args=(child_end, base_url), name="health-prober", daemon=True)
        self.process.start()

    def start(self) -> None:
        """Starts polling."""
        self._commands.send("start")

    def stop(self) -> HealthResult:
        """Stops polling; returns the polls since ``start``."""
        self._commands.send("stop")
        return self._commands.recv()

    def close(self) -> None:
        """Ends the prober process, polling or not."""
        try:
            self._commands.send("exit")
        except OSError:
            pass  # it has ended already
        self.process.join(CLOSE_TIMEOUT)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def buckets_of(family, labels: Optional[Dict[str, str]] = None) -> Dict[float, float]:
    """A histogram's cumulative bucket counts by upper bound (of the series matching ``labels``, summed)."""
    buckets: Dict[float, float] = collections.defaultdict(float)
    for sample in family.samples:
        if sample.name.endswith("_bucket") and all(sample.labels.get(key, value) == value
                                                    for key, value in (labels or {}).items()):
            buckets[float(sample.labels["le"])] += sample.value
    return dict(buckets)


def bucket_quantile(now: Dict[float, float], earlier: Dict[float, float], fraction: float) -> Optional[float]:
    """The bucket bound under which ``fraction`` of the observations between two scrapes of a
    histogram fell (``fraction`` 1: every one); None if there was none."""
    new = {bound: count - earlier.get(bound, 0.0) for bound, count in now.items()}
    total = new.get(float("inf"), 0.0)
    if not total:
        return None
    return min(bound for bound, count in new.items() if count >= fraction * total)


def describe_cpus(cpus: Iterable[int]) -> str:
    """``core 0`` or ``cores 0-2``."""
    ordered = sorted(cpus)
    if len(ordered) == 1:
        return f"core {ordered[0]}"
    return f"cores {ordered[0]}-{ordered[-1]}" if ordered == list(range(ordered[0], ordered[-1] + 1)) else \
        "cores " + ",".join(map(str, ordered))


def listen_overflows() -> int:
    """Connections this machine's kernel dropped so far because a listening socket's accept queue
    was full (TcpExt ListenOverflows: their client retries the handshake a second later)."""
    with open("/proc/net/netstat") as netstat:
        lines = [line.split() for line in netstat if line.startswith("TcpExt:")]
    return int(dict(zip(lines[0], lines[1]))["ListenOverflows"])


@dataclass(frozen=True)
class CpuSample:
    """A process's CPU time so far, of its main thread (the server's event loop) and of all its
    threads, and the machine's listen queue overflows so far."""

    at: float
    main_thread_seconds: float
    process_seconds: float
    listen_overflows: int

    @classmethod
    def of(cls, pid: int) -> "CpuSample":
        """The figures of process ``pid`` now."""
        process = psutil.Process(pid)
        times = process.cpu_times()
        main = next((thread.user_time + thread.system_time for thread in process.threads() if thread.id == pid), 0.0)
        return cls(time.monotonic(), main, times.user + times.system, listen_overflows())

    def since(self, earlier: "CpuSample") -> str:
        """What the process did between ``earlier`` and this sample, in words."""
        return (f"{self.main_thread_seconds - earlier.main_thread_seconds:.1f} s CPU in its event loop's thread, "
                f"{self.process_seconds - earlier.process_seconds:.1f} s in all, in {self.at - earlier.at:.1f} s; "
                f"{self.listen_overflows - earlier.listen_overflows} connections dropped from a full accept queue")
