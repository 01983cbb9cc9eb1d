"""Which process runs a flow run, recorded in Prefect itself (the flow run's
``infrastructure_pid``) so that any client can later tell whether it still runs.

alignflow writes ``HOST:PID:START``: the start time tells a live process from a
later one that was given the same pid. Prefect's process worker writes ``HOST:PID``
(older releases) or a bare ``PID``, which name no host."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import psutil

START_TOLERANCE_S = 0.5  # START is written rounded to 10 ms; pid reuse within half a second is not a concern


@dataclass(frozen=True)
class RecordedProcess:
    host: str | None
    pid: int
    start: float | None


def this_process() -> str:
    """``HOST:PID:START`` of the calling process."""
    me = psutil.Process()
    return f"{socket.gethostname()}:{me.pid}:{me.create_time():.2f}"


def parse_process(label: str | None) -> RecordedProcess | None:
    """A recorded ``infrastructure_pid`` in any of the three forms; None if absent or not one of them."""
    parts = (label or "").strip().split(":")
    try:
        if len(parts) == 1 and parts[0]:
            return RecordedProcess(None, int(parts[0]), None)
        if len(parts) in (2, 3):
            start = float(parts[2]) if len(parts) == 3 else None
            return RecordedProcess(parts[0], int(parts[1]), start)
    except ValueError:
        return None
    return None


def process_gone(label: str | None) -> bool | None:
    """True if the recorded process has ended (or its pid now belongs to a later
    process), False if it still runs, None where this host cannot tell: nothing
    recorded, or a process of another (or an unnamed) host."""
    recorded = parse_process(label)
    if recorded is None or recorded.host != socket.gethostname():
        return None
    try:
        process = psutil.Process(recorded.pid)
        if process.status() == psutil.STATUS_ZOMBIE:  # killed, not yet reaped by its parent
            return True
        started = process.create_time()
    except psutil.NoSuchProcess:
        return True
    return recorded.start is not None and abs(started - recorded.start) > START_TOLERANCE_S
