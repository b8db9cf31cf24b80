"""Opt-in latency trace for the deployment benchmark: JSON lines appended to ``$FEDCARE_TIMING_LOG``.

Unset (the default), every call is a no-op. The benchmark sets it for the SuperLink and the
SuperNodes; their children (ServerApp, ClientApp processes) inherit it, and every process appends
one short line per event (``O_APPEND`` writes of one line are atomic), stamped with wall-clock
time so events from different processes on one machine line up. Never holds data: message types,
node ids, rounds and seconds only.
"""

from __future__ import annotations

import json
import os
import time

ENV = "FEDCARE_TIMING_LOG"


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def trace(event: str, **fields: object) -> None:
    """Append one event (``t`` = now unless given) to the trace file, if one is configured."""
    path = os.environ.get(ENV)
    if not path:
        return
    record = {"ev": event, "t": time.time(), "pid": os.getpid(), **fields}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (json.dumps(record, default=str) + "\n").encode())
        finally:
            os.close(fd)
    except OSError:
        pass  # a benchmark aid must never break a run


def process_started_at() -> float | None:
    """Wall-clock time this process was created (forked or exec'd), from /proc; None elsewhere."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        start_ticks = int(stat[stat.rindex(b")") + 2 :].split()[19])
        with open("/proc/uptime", "rb") as f:
            boot = time.time() - float(f.read().split()[0])  # /proc/stat's btime is whole seconds
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
