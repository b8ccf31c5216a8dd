"""Log lines that carry the request id (and the user, when known), as text or one JSON object per line.

Text lines never carry a line break from what they quote (``TextFormatter``; JSON escapes it anyway). The request
id is set by ``errors.RequestIdMiddleware`` in ``request_id_var`` for the task that serves the request;
work handed to threads carries it along (Starlette's thread pool copies the context, and so does the prediction
thread's queue, ``scheduler.DeviceQueue``). A filter on the one handler adds it to every record, whichever logger
wrote it (ours, uvicorn's, the access log): ``-`` outside a request. What the nnInteractive library prints (it
prints rather than logs) becomes log records of the ``nnInteractive`` logger too (INFO with ``--verbose``, else
DEBUG), so that a JSON log stays one JSON object per line and those lines carry the request id as well.
"""

import collections
import contextvars
import io
import json
import logging
import sys
import threading
import time

request_id_var = contextvars.ContextVar("nninteractive_request_id", default="-")
user_var = contextvars.ContextVar("nninteractive_user", default=None)  # set where the key names a user

TEXT_FORMAT = "%(asctime)s %(levelname)s [%(request_id)s] %(message)s"


class RequestContextFilter(logging.Filter):
    def filter(self, record):
        record.request_id = request_id_var.get()
        record.user = user_var.get()
        return True


def escape_controls(text):
    """``text`` with line breaks and other control characters written as escapes (``\\n``, ``\\x1b``), so that
    nothing a client sends (a path with %0A) can start a forged line in a text log."""
    if not any(ord(c) < 32 or c == "\x7f" for c in text):
        return text
    return "".join(c if ord(c) >= 32 and c != "\x7f" else repr(c)[1:-1] for c in text)


class TextFormatter(logging.Formatter):
    """The text log's lines: a message is one line whatever it quotes (a traceback follows on lines of its own)."""

    def formatMessage(self, record):
        record.message = escape_controls(record.message)
        return logging.Formatter.formatMessage(self, record)


class LineBudget:
    """At most ``per_window`` log lines per key (a client address) in each ``window`` seconds, so that a flood of
    refused requests cannot fill the disk through the log; what was left out is counted and said on that key's next
    line. Remembers at most ``max_keys`` keys (the oldest forgotten first)."""

    def __init__(self, per_window=60, window=60.0, max_keys=1024):
        self.per_window, self.window, self.max_keys = per_window, window, max_keys
        self._keys = collections.OrderedDict()  # key -> [window start, lines logged, lines left out]
        self._mu = threading.Lock()

    def take(self, key):
        """(whether to log this line, how many lines of ``key`` were left out before it)."""
        now = time.monotonic()
        with self._mu:
            entry = self._keys.get(key)
            if entry is None or now - entry[0] >= self.window:
                left_out = entry[2] if entry is not None else 0
                entry = self._keys[key] = [now, 0, left_out]
            self._keys.move_to_end(key)
            while len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
            if entry[1] >= self.per_window:
                entry[2] += 1
                return False, 0
            entry[1] += 1
            left_out, entry[2] = entry[2], 0
            return True, left_out


class Budgeted(logging.Filter):
    """Let each distinct message of a logger through at most ``LineBudget.per_window`` times a minute: uvicorn warns
    once per request about what any client can send (garbage, websocket upgrades), which must not fill the disk."""

    def __init__(self):
        logging.Filter.__init__(self)
        self.budget = LineBudget()

    def filter(self, record):
        logged, left_out = self.budget.take(record.msg)
        if logged and left_out:
            record.msg = "%s (%d more like it not logged)" % (record.msg, left_out)
        return logged


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, request_id, user (when known),
    exception (when there is one)."""

    def format(self, record):
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + ".%03dZ" % record.msecs,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        if getattr(record, "user", None):
            entry["user"] = record.user
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, default=str)


class PrintsToLog(io.TextIOBase):
    """A stand-in for ``sys.stdout``: each complete line written becomes one record of ``logger``."""

    def __init__(self, logger, level, original=None):
        io.TextIOBase.__init__(self)
        self.logger = logger
        self.level = level
        self.original = original  # what needs a real file descriptor (a child process's output) gets this one's
        self._pending = threading.local()  # per thread, so that two threads' prints never mix within a line

    def writable(self):
        return True

    def fileno(self):
        if self.original is None:
            raise io.UnsupportedOperation("fileno")
        return self.original.fileno()

    @property
    def encoding(self):
        return getattr(self.original, "encoding", None) or "utf-8"

    def write(self, text):
        pending = getattr(self._pending, "text", "") + str(text)
        *lines, pending = pending.split("\n")
        self._pending.text = pending
        for line in lines:
            if line.strip():
                self.logger.log(self.level, line.rstrip())
        return len(text)


def configure(level="info", json_lines=False, stream=None, verbose=False, capture_prints=True):
    """Send every logger's records to one handler on the root logger (uvicorn's included: start uvicorn with
    ``log_config=None`` so that it keeps none of its own), warnings and (``capture_prints``) the library's prints
    included."""
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestContextFilter())
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(str(level).upper())
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, Budgeted) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(Budgeted())
    logging.captureWarnings(True)
    if capture_prints and not isinstance(sys.stdout, PrintsToLog):
        sys.stdout = PrintsToLog(logging.getLogger("nnInteractive"), logging.INFO if verbose else logging.DEBUG,
                                 sys.stdout)
    return handler
