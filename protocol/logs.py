"""Log hygiene both sides share: repeated lines are rate-limited, never repeated thousands of times;
the ``stager`` commands log as text or as JSON lines (``--log-format json``), to stderr or a file
that SIGHUP reopens.

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

import json
import logging
import re
import time


class RateLimit(logging.Filter):
    """A logging filter: at most ``burst`` records per (logger, template) every ``window`` seconds."""

    def __init__(self, burst: int = 5, window: float = 60.0, clock=time.monotonic):
        super().__init__()
        self.burst = burst
        self.window = window
        self._clock = clock
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


# ---------------------------------------------------------------------- output: text or JSON lines

TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
FIELDS = ("step", "rank", "peer", "code", "endpoint")  # structured fields, where a record has them
_STEP = re.compile(r"\bstep (\d+)\b")
_RANK = re.compile(r"\b(?:rank|trainer) (\d+)\b")
_PEER = re.compile(
    r"\b(trainer|reader|admin) (\d+)(?: connected)?\W+pid (\d+)"
)  # "trainer 1 (pid 4242" / "reader 0 pid 7"
_CODE = re.compile(r"\[([a-z_]+)\] ")  # a StagerError's text: "[memory_limit] ..."


def fields_from_message(msg: str) -> dict:
    """The structured fields a daemon or client message names, for records whose call site did not
    pass them as ``extra``.

    >>> fields_from_message("trainer 1 (pid 4242) dropped: rank 1 left during step 7")
    {'step': 7, 'rank': 1, 'peer': 'trainer 1 pid 4242'}
    """
    out: dict = {}
    if match := _STEP.search(msg):
        out["step"] = int(match.group(1))
    if match := _RANK.search(msg):
        out["rank"] = int(match.group(1))
    if match := _PEER.search(msg):
        out["peer"] = f"{match.group(1)} {match.group(2)} pid {match.group(3)}"
    if match := _CODE.search(msg):
        out["code"] = match.group(1)
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers: ``ts`` (UTC, ISO 8601), ``level``, ``logger``,
    ``msg``, ``pid``, then ``step`` / ``rank`` / ``peer`` / ``code`` / ``endpoint`` where they apply
    (given as ``extra=`` by the call site, else read from the message), ``exc`` for a traceback.

    >>> rec = logging.makeLogRecord({"name": "stager.daemon", "levelname": "WARNING", "levelno": 30,
    ...                              "msg": "step %d failed: %s", "args": (4, "rank 1 left"), "created": 0})
    >>> line = json.loads(JsonFormatter().format(rec))
    >>> line["ts"], line["level"], line["logger"], line["msg"], line["step"], line["rank"]
    ('1970-01-01T00:00:00.000Z', 'WARNING', 'stager.daemon', 'step 4 failed: rank 1 left', 4, 1)
    """

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.created % 1 * 1000):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": msg,
            "pid": record.process,
        }
        named = fields_from_message(msg)
        for field in FIELDS:
            value = getattr(record, field, None)
            value = named.get(field) if value is None else value
            if value is not None:
                out[field] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class ReopeningFileHandler(logging.FileHandler):
    """A log file that :func:`reopen` closes and opens again (after logrotate moved it: SIGHUP).
    A signal handler only calls :func:`request_reopen`; the next record written reopens the file
    (never from inside the handler, which may have interrupted a write holding the lock)."""

    reopen_requested = False  # class-wide: set by request_reopen(), e.g. from a SIGHUP handler

    def emit(self, record: logging.LogRecord) -> None:
        if ReopeningFileHandler.reopen_requested:
            ReopeningFileHandler.reopen_requested = False
            self.reopen()
        super().emit(record)

    def reopen(self) -> None:
        self.acquire()
        try:
            if self.stream is not None:
                self.stream.close()
            self.stream = self._open()
        finally:
            self.release()


def request_reopen() -> None:
    """Have every log file reopened before its next record (safe in a signal handler)."""
    ReopeningFileHandler.reopen_requested = True


def configure(level: str = "WARNING", fmt: str = "text", file: str | None = None) -> logging.Handler:
    """Set up the root logger for a ``stager`` command: ``fmt`` is ``text`` or ``json``; to stderr,
    or appended to ``file`` (reopened by :func:`reopen`). Returns the handler."""
    if fmt not in ("text", "json"):
        raise ValueError(f"--log-format {fmt!r}: choose text or json")
    handler: logging.Handler = ReopeningFileHandler(file, delay=False) if file else logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler


def reopen() -> int:
    """Reopen every log file the root logger writes to (SIGHUP); returns how many. Logs to
    stderr (systemd's journal, a container's log) need no reopening."""
    count = 0
    for handler in logging.getLogger().handlers:
        if isinstance(handler, ReopeningFileHandler):
            handler.reopen()
            count += 1
    return count
