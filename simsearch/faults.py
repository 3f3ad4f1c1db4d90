"""Deterministic crash points, so that crash safety can be tested by killing a real process.

`crash_point(name)` does nothing unless the environment asks for it:
- SIMSEARCH_CRASH_AT=N kills the process with SIGKILL at the N-th crash point it reaches (1-based),
  exactly as a power cut would stop it: no exception handlers, no atexit, no flush.
- SIMSEARCH_CRASH_TRACE=FILE appends the name of every crash point reached, one per line, so a test can
  count the points of a run and then kill it at each of them.
"""
from __future__ import annotations

import os
import signal

_CRASH_AT = int(os.environ.get("SIMSEARCH_CRASH_AT", "0") or 0)
_TRACE = os.environ.get("SIMSEARCH_CRASH_TRACE")
_reached = 0


def crash_point(name: str) -> None:
    global _reached
    if not _CRASH_AT and not _TRACE:
        return
    _reached += 1
    if _TRACE:
        with open(_TRACE, "a") as fh:
            fh.write(f"{_reached} {name}\n")
    if _reached == _CRASH_AT:
        os.kill(os.getpid(), signal.SIGKILL)
