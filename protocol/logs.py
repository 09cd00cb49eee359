"""Log hygiene both sides share: repeated lines are rate-limited, never repeated thousands of times.

A daemon with a full /dev/shm, or a trainer whose daemon is down, would otherwise log the same
warning at every step or retry. :class:`RateLimit` lets the first ``burst`` records of each
(logger, message template) through per ``window`` seconds and counts the rest; the next record of
that kind after the window says how many were suppressed.

The daemon and the client put one on the loggers they log through (a filter on a logger sees
the records created on it, wherever they are handled).

>>> import logging
>>> logging.getLogger("stager.doc").addFilter(RateLimit(burst=1, window=60))
"""

from __future__ import annotations

import logging
import time


class RateLimit(logging.Filter):
    """A logging filter: at most ``burst`` records per (logger, template) every ``window`` seconds."""

    def __init__(self, burst: int = 5, window: float = 60.0, clock=time.monotonic):
        super().__init__()
        self.burst, self.window, self._clock = burst, window, clock
        self._seen: dict[tuple[str, str], list] = {}  # key -> [window start, passed, suppressed]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.exc_info:
            return True  # tracebacks are rare and each one matters
        key = (record.name, str(record.msg))
        now = self._clock()
        entry = self._seen.get(key)
        if entry is None or now - entry[0] >= self.window:
            suppressed = entry[2] if entry else 0
            self._seen[key] = [now, 1, 0]
            if len(self._seen) > 4096:  # many distinct templates: forget the oldest windows
                self._seen = dict(list(self._seen.items())[-2048:])
            if suppressed:
                record.msg = f"{record.msg} (and {suppressed} more like it in the last {self.window:.0f}s)"
            return True
        if entry[1] < self.burst:
            entry[1] += 1
            return True
        entry[2] += 1
        return False

