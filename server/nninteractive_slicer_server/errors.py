"""The one mapping from exceptions to HTTP answers, and the request id every answer carries.

Routes raise; they never build error responses. Bad input of any kind (our checks, the packed-array codec,
FastAPI's own validation, the library's ValueError/AssertionError on input it refuses) is the client's fault:
4xx with a message. Running out of memory or of the device is a 507 that leaves the session usable. Anything else
is a 500 that says only "internal error" and a request id; the exception and its traceback go to the log. The
request id is in the ``X-Request-ID`` header of every answer and in every log line written while serving it.
"""

import json
import logging
import secrets

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse

from SlicerNNInteractiveLib.wire import WireFormatError

from .logs import request_id_var
from .validate import BadInput

log = logging.getLogger("nninteractive_slicer_server")

REQUEST_ID_HEADER = "X-Request-ID"


class Problem(Exception):
    """An answer other than 200, with its status, message and headers."""

    status = 500

    def __init__(self, detail, retry_after=None, extra=None):
        Exception.__init__(self, detail)
        self.detail = detail
        self.headers = {"Retry-After": str(int(retry_after))} if retry_after is not None else None
        self.extra = extra  # more fields of the JSON answer beside "detail" (the established /infer failure fields)


class Invalid(Problem):
    """Bad input (400) whose answer carries more fields than ``detail``; plain bad input raises ``BadInput``."""

    status = 400


class Unauthorized(Problem):
    status = 401


class Forbidden(Problem):
    """A valid key, but not the one this lease belongs to."""

    status = 403


class NotFound(Problem):
    status = 404


class Gone(Problem):
    status = 410

    def __init__(self, detail="lease expired or unknown: claim a new session"):
        Problem.__init__(self, detail)


class TooLarge(Problem):
    status = 413


class Busy(Problem):
    """Too many requests of one lease waiting, or a user's share (of jobs, of the jobs folder) used up."""

    status = 429


class Unavailable(Problem):
    status = 503


class AtCapacity(Unavailable):
    """Every session slot is taken."""


class Draining(Unavailable):
    """The server is shutting down (SIGTERM): no new sessions."""


class BudgetFull(Unavailable):
    """The memory budget is momentarily full (other sessions hold it); retry later."""


class Unimplemented(Problem):
    """This server cannot do that (yet): 501."""

    status = 501


class OutOfMemory(Problem):
    """Memory or the device failed while working on a request; the session was reset and can be used again."""

    status = 507


def is_out_of_memory(exc):
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "CUDA error" in text
                                              or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def request_id(request):
    return getattr(request.state, "request_id", None) or "-"


def _answer(request, status, detail, headers=None, extra=None):
    body = dict(extra or {}, detail=detail)
    return JSONResponse(body, status_code=status, headers=headers)  # the middleware adds the id


async def _problem(request, exc):
    if exc.status >= 500 or exc.status == 403:  # server trouble, and a valid key used where it may not go
        cause = exc.__cause__ if exc.status >= 500 else None  # a failure turned into an answer: its traceback
        log.warning("%s %s -> %d: %s%s", request.method, request.url.path, exc.status, exc.detail, _by(request),
                    exc_info=(type(cause), cause, cause.__traceback__) if cause is not None else None)
    return _answer(request, exc.status, exc.detail, exc.headers, exc.extra)


def _by(request):
    user = getattr(request.state, "user", None)
    return " (user %s)" % user if user else ""


async def _http_exception(request, exc):
    return _answer(request, exc.status_code, exc.detail, getattr(exc, "headers", None))


async def _bad_input(request, exc):
    return _answer(request, 400, str(exc) or type(exc).__name__)


async def _undecodable(request, exc):
    return _answer(request, 400, "could not decode the packed array: %s" % exc)


async def _invalid_request(request, exc):
    return _answer(request, 400, "invalid request: %s" % "; ".join(
        "%s: %s" % (".".join(str(p) for p in e.get("loc", ())), e.get("msg", "")) for e in exc.errors()))


async def _client_gone(request, exc):
    # The client went away before its request was read (killed, network lost, upload cancelled): nobody reads an
    # answer, and it is no fault of the server. 499 is the usual status for this in logs ("client closed request").
    log.info("%s %s: the client disconnected before its request was read", request.method, request.url.path)
    return _answer(request, 499, "the client disconnected before its request was read")


async def _out_of_memory(request, exc):
    log.error("out of memory in %s: %s", request.url.path, exc)
    return _answer(request, 507, "the server ran out of memory (or its device failed) on this request; the session "
                                 "was reset: send the image again, or a smaller one")


def install(app):
    """Register the handlers and the request-id middleware on ``app``."""
    app.add_exception_handler(Problem, _problem)
    app.add_exception_handler(HTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(WireFormatError, _undecodable)  # before BadInput: both are ValueErrors
    app.add_exception_handler(BadInput, _bad_input)
    app.add_exception_handler(MemoryError, _out_of_memory)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_middleware(RequestIdMiddleware)


class RequestIdMiddleware:
    """Give each request an id (``request.state.request_id``), echo it in ``X-Request-ID``, and turn any
    exception no handler took into a 500 that carries the id and nothing of the exception."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = secrets.token_hex(6)
        scope.setdefault("state", {})["request_id"] = rid
        request_id_var.set(rid)  # every log line of this request carries it (logs.py); the task's own context
        header = (REQUEST_ID_HEADER.lower().encode(), rid.encode())
        started = []

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                started.append(True)
                message = dict(message, headers=list(message.get("headers", [])) + [header])
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("internal error in %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            body = json.dumps({"detail": "internal server error; request id %s (the server log has the details)"
                               % rid, "request_id": rid}).encode()
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()), header]})
            await send({"type": "http.response.body", "body": body})
