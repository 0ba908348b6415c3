"""Counters the configuration server's health rules read: cache use, backlog, rates."""
from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class HealthReport:
    cache_total_bytes: int
    cache_used_bytes: int
    cache_free_fraction: float
    backlog_bytes: int
    backlog_segments: int
    ingest_bytes_per_s: float
    upload_bytes_per_s: float
    ingested_bytes: int
    uploaded_bytes: int
    throttled: bool
    throttle_events: int
    connections: int
    upload_failures: int
    last_upload_error: str
    recovered_torn_bytes: int
    updated_at: float
    # sealed segments that can never be uploaded (corrupt on the cache disk): kept for the operator
    kept_segments: list[str] = field(default_factory=list)


class _Rate:
    def __init__(self, window: float = 10.0) -> None:
        self._events: deque[tuple[float, int]] = deque()
        self._window = window

    def add(self, n: int) -> None:
        self._events.append((time.monotonic(), n))

    def per_second(self) -> float:
        now = time.monotonic()
        while self._events and self._events[0][0] < now - self._window:
            self._events.popleft()
        return sum(n for _, n in self._events) / self._window


class Stats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ingest = _Rate()
        self._upload = _Rate()
        self.ingested = 0
        self.uploaded = 0
        self.upload_failures = 0
        self.last_upload_error = ""
        self.throttle_events = 0
        self.throttled = False
        self.connections = 0
        self.recovered_torn_bytes = 0
        self.kept_segments: list[str] = []

    def ingest(self, n: int) -> None:
        with self._lock:
            self.ingested += n
            self._ingest.add(n)

    def upload_ok(self, n: int) -> None:
        with self._lock:
            self.uploaded += n
            self._upload.add(n)
            self.last_upload_error = ""

    def upload_failed(self, message: str) -> None:
        with self._lock:
            self.upload_failures += 1
            self.last_upload_error = message

    def segment_kept(self, path: Path, message: str) -> None:
        with self._lock:
            self.kept_segments.append(str(path))
            self.upload_failures += 1
            self.last_upload_error = message

    def set_throttled(self, on: bool) -> None:
        with self._lock:
            if on and not self.throttled:
                self.throttle_events += 1
            self.throttled = on

    def connection(self, delta: int) -> None:
        with self._lock:
            self.connections += delta

    def report(self, cache_total: int, cache_used: int, free_fraction: float, backlog: int, segments: int) -> HealthReport:
        with self._lock:
            return HealthReport(cache_total, cache_used, round(free_fraction, 4), backlog, segments,
                                round(self._ingest.per_second(), 1), round(self._upload.per_second(), 1),
                                self.ingested, self.uploaded, self.throttled, self.throttle_events, self.connections,
                                self.upload_failures, self.last_upload_error, self.recovered_torn_bytes, time.time(),
                                list(self.kept_segments))


def write_report(path: Path, report: HealthReport) -> None:
    """Publish `report` for readers outside the server. Windows refuses to replace a file
    someone has open: then this report is skipped, the next scan's takes its place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(report), indent=1))
    try:
        os.replace(tmp, path)
    except PermissionError:
        tmp.unlink(missing_ok=True)


def read_report(path: Path) -> HealthReport | None:
    try:
        return HealthReport(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
