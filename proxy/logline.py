"""The proxy's own log lines: their handler and format, and the access log's direct write.

``configure`` gives streamfold's loggers a handler writing logging's default
line to stderr, unless the host (gunicorn's log config, an operator's
``logging`` setup, pytest) configured logging first. ``AccessLog`` writes the
one line per request: while that line would reach only the handler made
here, it formats the same text and writes it to the same stream under the
handler's lock itself, skipping logging's record, caller lookup and handler
chain (most of a JSON request's log cost). Whenever anything else is
configured (another handler, a filter, a formatter, a level, a record
factory), the line goes through ``logging`` exactly as before.
"""
from __future__ import annotations

import logging
import os
import time

LINE_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s %(message)s"
# the handlers configure() made, each with its formatter (a LineFormatter of LINE_FORMAT)
_OWN: dict[logging.Handler, LineFormatter] = {}


class LineFormatter(logging.Formatter):
    """logging's default line, with the date and time part formatted once a second instead of on every line
    (each request writes one: the access log)."""

    _cached = (-1, "")  # (second, its text), replaced whole so threads never pair one's second with another's text

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return self.stamp(record.created, record.msecs)

    def stamp(self, created: float, msecs: float) -> str:
        """``asctime`` for a record made at ``created`` (``time.time()``) with ``msecs`` as LogRecord sets them."""
        second, text = self._cached
        if second != int(created):
            second = int(created)
            text = time.strftime(self.default_time_format, self.converter(second))
            self._cached = (second, text)
        return self.default_msec_format % (text, msecs)


def configure() -> None:
    """Give streamfold's loggers ("streamfold.*" and the "proxy" package) a handler unless the host did."""
    for name in ("streamfold", "proxy"):
        logger = logging.getLogger(name)
        if not logger.handlers and not logging.getLogger().handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(LineFormatter(LINE_FORMAT))
            logger.addHandler(handler)
            _OWN[handler] = handler.formatter
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)


class AccessLog:
    """INFO lines of one logger, written directly to this module's handler when that is all logging would do."""

    def __init__(self, name: str) -> None:
        self.logger = logging.getLogger(name)

    def info(self, message: str, *args: object) -> None:
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        handler = self._only_handler()
        if handler is None:
            logger.info(message, *args, stacklevel=2)  # the caller's place, as when it called logging itself
            return
        created = time.time()  # what a LogRecord holds (created, msecs), formatted as LineFormatter does
        stamp = handler.formatter.stamp(created, int((created - int(created)) * 1000) + 0.0)
        with handler.lock:  # as Handler.handle
            try:
                stream = handler.stream
                stream.write(f"{stamp} [{os.getpid()}] {logging.getLevelName(logging.INFO)} {logger.name} "
                             f"{message % args}{handler.terminator}")
                stream.flush()
            except RecursionError:  # as StreamHandler.emit
                raise
            except Exception:  # noqa: BLE001 - as StreamHandler.emit: logging's own report of a failed write
                handler.handleError(logger.makeRecord(logger.name, logging.INFO, "(access log)", 0, message, args,
                                                      None))

    def _only_handler(self) -> logging.StreamHandler | None:
        """The one handler an INFO line of this logger reaches when that is a handler ``configure`` made, with
        its formatter, unfiltered, and records are logging's own; else None (logging writes the line)."""
        if not _OWN or logging.logProcesses is not True or logging.getLogRecordFactory() is not logging.LogRecord:
            return None
        found = None
        logger: logging.Logger | None = self.logger
        if logger.filters:
            return None
        while logger is not None:
            for handler in logger.handlers:
                if found is not None:
                    return None
                found = handler
            logger = logger.parent if logger.propagate else None
        if found is None or found.filters or found.level > logging.INFO or _OWN.get(found) is not found.formatter:
            return None
        return found
