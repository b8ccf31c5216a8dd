"""Rules every route shares, written once: the API key, the lease, request bodies within limits, turns.

The key itself is checked from the headers alone by ``identities.KeyGate`` (before routing and before any body is
read); ``caller`` hands routes the caller's name (``require_key``: the same as a FastAPI dependency),
``require_operator`` refuses (403) every key but an operator's, and a lease (``leased``, ``lookup``) answers only
to the user who claimed it (403 for anyone else).
Bodies are read by ``read_json`` / ``read_packed``: within ``Limits``, touching the lease as bytes arrive (a slow
upload is a sign of life), answering 408 when the client stalls longer than the liveness timeout or sends slower
than ``Limits.min_upload_rate`` over the whole body (a stalled upload holds memory and a connection), and decoding
packed arrays off the event loop in bounded batches (a small one on it), after ``accept`` has checked what the array
declares.

The dependencies here are ``async def``: FastAPI runs a plain ``def`` dependency in a worker thread, a hop there and
back on every request for a few attribute reads. The prompt path uses none (see ``leased``).
"""

import asyncio
import functools
import inspect
import json
import math

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from SlicerNNInteractiveLib import protocol as P
from SlicerNNInteractiveLib.wire import ArrayDecoder, WireFormatError

from .errors import Forbidden, Gone, OutOfMemory, Problem, TooLarge, Unauthorized, is_out_of_memory
from .identities import METRICS, OPERATOR
from .leases import UnknownLease
from .validate import BadInput

FEED_BYTES = 4 << 20  # received bytes handed to the decoder at a time (one worker-thread hop per batch)
# Work on at most this many bytes runs on the event loop (``sized``): a hop to a worker thread and back costs ~0.1 ms
# on a loaded 2-core machine, as much as checking, packing or unpacking 256 KiB.
INLINE_BYTES = 256 << 10


class Stalled(Problem):
    status = 408


def server(request: Request):
    return request.app.state.server


def caller(request):
    """The caller's name (``request.state.user``, set by ``identities.KeyGate``)."""
    user = request.scope.get("state", {}).get("user")
    if user is None:  # an app without the gate in front: refuse rather than serve anyone
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    return user


async def require_key(request: Request):
    """``caller`` as a dependency (routes off the prompt path)."""
    return caller(request)


def role(request):
    return getattr(request.state, "role", None)


async def require_operator(request: Request, user=Depends(require_key)):
    """The caller's name, when their key is an operator's (role=operator in the keys file; the shared key when it is
    the only key; everyone when the server needs no key); else 403."""
    if role(request) != OPERATOR:
        raise Forbidden("this needs an operator's key (role=operator in the server's keys file)")
    return user


async def require_metrics_reader(request: Request, user=Depends(require_key)):
    """As ``require_operator``, or a key of role ``metrics`` (a scraper's)."""
    if role(request) not in (OPERATOR, METRICS):
        raise Forbidden("this needs an operator's key or a metrics key (role=operator or role=metrics in the "
                        "server's keys file)")
    return user


def lookup(request, touch=True):
    """The request's lease (410 when unknown, 403 when another user claimed it); ``touch``: a sign of life."""
    try:
        return server(request).registry.get(request.headers.get(P.LEASE_HEADER), touch=touch, user=caller(request))
    except UnknownLease:
        raise Gone()


class leased:
    """``with leased(request) as lease_:`` the request's lease (``lookup``), kept from reaping until the block ends.

    Routes enter it themselves rather than declare it as a dependency: FastAPI solves every dependency recursively and
    one that yields inside an anyio cancel scope and an exit stack, 0.05-0.08 ms a call (overhead.py --layers)."""

    __slots__ = ("request", "lease")

    def __init__(self, request):
        self.request = request

    def __enter__(self):
        self.lease = lookup(self.request)
        self.lease.in_flight += 1
        return self.lease

    def __exit__(self, *exc):
        self.lease.in_flight -= 1
        self.lease.seen()


def meta(request):
    """The ``X-Meta`` header's JSON object ({} when absent)."""
    raw = request.headers.get(P.META_HEADER)
    if raw is None:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise BadInput("bad %s header: %s" % (P.META_HEADER, exc))
    if not isinstance(value, dict):
        raise BadInput("the %s header must hold a JSON object" % P.META_HEADER)
    return value


def _declared_length(request):
    value = request.headers.get("content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        raise BadInput("Content-Length %r is not a number" % value)


if hasattr(asyncio, "timeout"):  # Python 3.11+: a timer on the loop, where wait_for makes a task per message
    async def _within(receive, seconds):
        async with asyncio.timeout(seconds):
            return await receive()
else:  # pragma: no cover (Python 3.10)
    async def _within(receive, seconds):
        return await asyncio.wait_for(receive(), seconds)


async def _pieces(request, lease_, stall_after):
    """The body's pieces as they arrive; each touches the lease. 408 after ``stall_after`` s without bytes, or when
    the body falls behind the minimum rate over its whole length (``Limits.upload_due``)."""
    receive = request.receive
    limits = server(request).limits
    loop = asyncio.get_running_loop()
    started, received = loop.time(), 0
    while True:
        due = started + limits.upload_due(received) - loop.time()  # when the bytes so far fall behind the rate
        try:  # (at least a moment: what already arrived but was not read yet is never counted against the client)
            message = await _within(receive, max(0.1, min(stall_after, due)))
        except asyncio.TimeoutError:
            elapsed = loop.time() - started
            if due < stall_after:
                raise Stalled("the request body arrived too slowly: %d bytes in %.0f s; this server needs at least %d "
                              "bytes per second (after the first %.0f s); send it again over a faster connection"
                              % (received, elapsed, limits.min_upload_rate, limits.upload_grace_s))
            raise Stalled("no part of the request body arrived for %.0f s; send it again" % stall_after)
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        if lease_ is not None:
            lease_.seen()
        body = message.get("body", b"")
        received += len(body)
        if body:
            yield body
        if not message.get("more_body", False):
            return


async def _read(request, lease_, what, consume, keep=0):
    """Feed the body to ``consume(list_of_pieces)`` in the decode pool, one batch at a time, overlapping the next
    batch's transfer; stop at the first problem (over the body limit, or raised by ``consume``). The server's HTTP
    layer reads and discards the rest of a refused body, so the client still receives the answer. A whole body of at
    most ``keep`` bytes is returned instead (its pieces, not consumed); else None."""
    srv = server(request)
    declared = _declared_length(request)
    srv.limits.check_body(declared, what)  # nothing read yet: a body declared too large is refused
    loop = asyncio.get_running_loop()
    received, batch, batch_bytes, pending, fed = 0, [], 0, None, False
    pieces = _pieces(request, lease_, srv.registry.liveness_timeout).__aiter__()
    try:
        while True:
            # With a declared length (checked above) nothing but the decoder can refuse the body now: its refusal is
            # answered at once. A chunked body may still turn out too large: that check keeps its place.
            piece = await _next_piece(pieces, pending if declared is not None else None)
            if piece is None:
                break
            received += len(piece)
            srv.limits.check_body(received, what)
            batch.append(piece)
            batch_bytes += len(piece)
            if batch_bytes >= FEED_BYTES:
                if pending is not None:
                    await pending
                pending = loop.run_in_executor(srv.decode_pool, consume, batch)
                batch, batch_bytes, fed = [], 0, True
        if pending is not None:
            await pending
            pending = None
        if not fed and batch_bytes <= keep:
            return batch
        if batch:
            await loop.run_in_executor(srv.decode_pool, consume, batch)
    finally:
        if pending is not None:  # never leave a batch decoding behind a refused request
            await asyncio.wait([pending])
    return None


async def _next_piece(pieces, pending):
    """The body's next piece (None at its end), or at once what the batch decoding beside it (``pending``) raised:
    an array refused from its header (too large, over the budget) is answered without waiting for bytes that may
    never come."""
    if pending is not None and not pending.done():
        step = asyncio.ensure_future(pieces.__anext__())
        await asyncio.wait([step, pending], return_when=asyncio.FIRST_COMPLETED)
        if pending.done() and pending.exception() is not None:
            step.cancel()
            raise pending.exception()
        try:
            return await step
        except StopAsyncIteration:
            return None
    if pending is not None and pending.exception() is not None:
        raise pending.exception()
    try:  # nothing decoding beside it: no task needed
        return await pieces.__anext__()
    except StopAsyncIteration:
        return None


async def read_json(request, lease_=None):
    """The JSON object of the body ({} when empty), at most ``max_json_bytes``."""
    srv = server(request)
    limit = srv.limits.max_json_bytes
    declared = _declared_length(request)
    if declared is not None and declared > limit:
        raise TooLarge("the JSON body is %d bytes; this server accepts at most %d" % (declared, limit))
    pieces, size = [], 0
    async for piece in _pieces(request, lease_, srv.registry.liveness_timeout):
        size += len(piece)
        if size > limit:
            raise TooLarge("the JSON body is more than %d bytes; this server accepts at most %d" % (size - 1, limit))
        pieces.append(piece)
    body = b"".join(pieces)
    if not body:
        return {}
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise BadInput("the request body is not valid JSON (%s)" % exc)
    if not isinstance(payload, dict):
        raise BadInput("the request body must be a JSON object")
    return payload


class _Large(Exception):
    """A small body declares an array of more than ``INLINE_BYTES``: it is decoded in the pool after all."""


async def read_packed(request, lease_, accept, what):
    """Decode the body's packed array; ``accept(shape, dtype)`` checks what it declares before anything is
    allocated for it. Returns the array. A small body declaring a small array (both at most ``INLINE_BYTES``) is
    decoded here on the event loop (a hop to the pool would cost more); any other in the decode pool."""
    decoder = ArrayDecoder(accept=accept)

    def consume(batch):
        for piece in batch:
            decoder.feed(piece)

    small = await _read(request, lease_, what, consume, keep=INLINE_BYTES)
    if small is not None:
        def accept_small(shape, dtype):  # called before anything is allocated or decompressed
            if math.prod(shape) * dtype.itemsize > INLINE_BYTES:
                raise _Large()
            accept(shape, dtype)

        try:
            here = ArrayDecoder(accept=accept_small)
            for piece in small:
                here.feed(piece)
            return here.finish()
        except _Large:
            await asyncio.get_running_loop().run_in_executor(server(request).decode_pool, consume, small)
    return decoder.finish()  # checks only: no work in proportion to the array


def finish_preprocessing(session):
    """Wait for the session's image preprocessing. When it failed, the session forgets that image (so the failure
    is reported once, and the next set_image starts clean) and the failure is raised."""
    try:
        session._finish_preprocessing_and_initialize_interactions()
    except BaseException:
        session.preprocess_future = None
        session._reset_session()
        raise


async def preprocessed(session):
    """``finish_preprocessing`` from the event loop: in a worker thread when there is something to wait for (only
    the first action after an image)."""
    if session.preprocess_future is not None:
        await run_in_threadpool(finish_preprocessing, session)


async def sized(nbytes, fn, *args):
    """``fn(*args)``, work in proportion to ``nbytes`` (checking, packing or unpacking an array): on the event loop
    up to ``INLINE_BYTES``, where a hop to a worker thread and back would cost more than the work; else in a worker
    thread."""
    if nbytes <= INLINE_BYTES:
        return fn(*args)
    return await run_in_threadpool(fn, *args)


async def finished(future):
    """The result of ``future`` (a ``concurrent.futures.Future``: work queued on the prediction thread), awaited on
    the event loop. When the awaiting task is cancelled, work not yet started never starts, and work already running
    is waited for before the cancellation goes on (as Starlette's thread hops do): a lease's turn is never given
    back while its session is still in use. (The thread that finishes the work wakes this task with one callback:
    asyncio.wrap_future and shield take three turns of the event loop more, 0.02-0.03 ms.)"""
    loop = asyncio.get_running_loop()
    if not await _done(future, loop):
        if not future.cancel():  # it started: its session is in use until it ends
            while not await _done(future, loop):
                pass
        raise asyncio.CancelledError()
    return future.result()


async def _done(future, loop):
    """Wait until ``future`` is done: True, or False when this task was cancelled meanwhile."""
    waiter = loop.create_future()

    def wake(_future):  # on the thread that finished it
        try:
            loop.call_soon_threadsafe(_settle, waiter)
        except RuntimeError:  # the event loop is closed: nobody waits any more
            pass

    future.add_done_callback(wake)
    try:
        await waiter
    except asyncio.CancelledError:
        return False
    return True


def _settle(waiter):
    if not waiter.done():
        waiter.set_result(None)


def _forget_image(session, lease_):
    try:
        session.preprocess_future = None
        session._reset_session()
    finally:
        lease_.drop_all()


async def act(request, lease_, work):
    """Run ``work(session)`` as the lease's next action (see ``LeaseRegistry.run``), with the library's way of
    refusing input (ValueError, AssertionError) turned into 400 and running out of memory into 507 (the session is
    reset, its memory given back, and it takes a new image). ``work`` is a plain function, run in a worker thread,
    or a coroutine function, run on the event loop (a prompt: it sends to threads only what would block there)."""
    call = work if inspect.iscoroutinefunction(work) else functools.partial(run_in_threadpool, work)

    async def guarded(session):
        try:
            return await call(session)
        except (Problem, BadInput, WireFormatError):
            raise
        except (ValueError, AssertionError) as exc:
            raise BadInput(str(exc) or type(exc).__name__)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            await run_in_threadpool(_forget_image, session, lease_)
            raise OutOfMemory("the server ran out of memory (or its device failed) on this request (%s); the session "
                              "was reset: send the image again, or a smaller one" % type(exc).__name__)
        finally:
            if session.original_image_shape is None:  # the session holds no image (never had one, or was reset)
                lease_.drop_all()

    return await server(request).registry.run(lease_, guarded)
