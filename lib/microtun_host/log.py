"""Logging for host processes: one readable line per event on stderr,

    2026-07-05 12:00:01 pop-a INFO listening on 0.0.0.0:7000, 4 routes

never one per packet at info level (per-packet detail is debug only)."""
import logging
import sys

LEVELS = ("debug", "info", "warning", "error")
_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
_DATEFMT = "%Y-%m-%d %H:%M:%S"


def setup(name, level="info", stream=None):
    """The logger for one process named `name` (e.g. the PoP's config name)."""
    log = logging.getLogger("microtun." + name)
    log.propagate = False
    if not log.handlers:
        h = logging.StreamHandler(stream or sys.stderr)
        h.setFormatter(_Formatter(_FORMAT, _DATEFMT, name))
        log.addHandler(h)
    set_level(log, level)
    return log


def set_level(log, level):
    log.setLevel(getattr(logging, level.upper()))


class _Formatter(logging.Formatter):
    def __init__(self, fmt, datefmt, name):
        super().__init__(fmt, datefmt)
        self.short = name

    def format(self, record):
        record.name = self.short
        return super().format(record)
