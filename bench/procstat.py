"""CPU seconds of a process and everything it started, from /proc.

A proxy's cost is measured as the delta of user+system CPU seconds over one
load run, read from ``/proc/PID/stat`` before and after.  Some proxies are
more than one process (nginx: master + worker), so the sample walks the
process tree under the root PID and adds up each live process's own
``utime + stime`` plus ``cutime + cstime`` (children it already reaped, so a
worker that exits mid-run is not lost).  All threads of a process are
included in its own counters, which covers stunnel's thread per connection.
"""

from __future__ import annotations

import os
from pathlib import Path

_TICK = float(os.sysconf("SC_CLK_TCK"))


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may contain spaces or ')':
    # everything after the last ')' is space separated, starting at field 3 (state).
    return raw[raw.rindex(")") + 2 :].split()


def _children(root: int) -> list[int]:
    """All live descendants of root (one scan of /proc)."""
    parent_of: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            parent_of[int(entry.name)] = int(fields[1])  # field 4: ppid
    out: list[int] = []
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        kids = [child for child, parent in parent_of.items() if parent == pid]
        out.extend(kids)
        frontier.extend(kids)
    return out


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds used so far by pid and its descendants (live and reaped)."""
    total = 0
    for p in (pid, *_children(pid)):
        fields = _stat_fields(p)
        if fields is None:
            continue
        # After the split at ')': index 11..14 are utime, stime, cutime, cstime (fields 14-17).
        total += sum(int(x) for x in fields[11:15])
    return total / _TICK


def cpu_of(pids: list[int]) -> float:
    return sum(cpu_seconds(p) for p in pids)
