"""Our server with a time stamp at every layer boundary of a request, for ``overhead.py --layers``.

    python Testing/benchmark/overhead_probe.py OUT.json SERVER-ARGUMENTS...

Runs ``nninteractive-slicer-server`` with SERVER-ARGUMENTS, and wraps (from outside, without changing the server's
code) the places a request passes: the bytes' arrival in the HTTP protocol, each ASGI middleware, the router,
FastAPI's dependency solving, every hop to a worker thread and back, the decode pool, the prediction queue, the
library's calls, the response's encoding and its sending. Each request records ``(stamp, perf_counter())`` in order;
on exit (SIGTERM) the time between consecutive stamps is written to OUT.json as ``{"steps": {kind: {"a > b": [ms,
...]}}, "order": [...]}`` with ``kind`` the call (point, bbox, scribble, lasso, set_image), and the same steps summed
per request into the layers of ``GROUPS`` (``"groups": {kind: {group: [ms per request]}}``). A stamp costs well under a
microsecond; the server it measures is otherwise the one that ships. Meant for one client at a time.
"""

import atexit
import collections
import contextvars
import functools
import json
import sys
import time

now = time.perf_counter
STAMPS = contextvars.ContextVar("overhead_probe_stamps", default=None)
RECORDS = []  # (path, [(stamp, t), ...]) per request
LAST_BYTES = [0.0]  # when the HTTP protocol last received bytes (one client at a time)
KIND = {"/add_point_interaction": "point", "/add_bbox_interaction": "bbox", "/add_scribble_interaction": "scribble",
        "/add_lasso_interaction": "lasso", "/set_image": "set_image"}


def stamp(name):
    s = STAMPS.get()
    if s is not None:
        s.append((name, now()))


# ---------------------------------------------------------------------------------------------- wrappers

def probe_app(app):
    """The outermost ASGI layer: starts a request's record, stamps the response's start and end."""

    async def probed(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        record = [("bytes in", LAST_BYTES[0]), ("asgi in", now())]
        STAMPS.set(record)

        async def sending(message):
            if message["type"] == "http.response.start":
                stamp("response start")
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                stamp("response sent")

        try:
            await app(scope, receive, sending)
        finally:
            stamp("asgi out")
            RECORDS.append((scope["path"], record))

    return probed


def wrap_middleware(cls, label):
    """Stamp as ``cls`` (an ASGI middleware) is entered and as it calls the app inside it."""
    init = cls.__init__

    def __init__(self, app, *a, **kw):
        async def inner(scope, receive, send):
            stamp("%s > inner" % label)
            return await app(scope, receive, send)

        init(self, inner, *a, **kw)

    call = cls.__call__

    async def __call__(self, scope, receive, send):
        stamp(label)
        return await call(self, scope, receive, send)

    cls.__init__, cls.__call__ = __init__, __call__


def wrap_async(owner, name, label):
    fn = getattr(owner, name)

    @functools.wraps(fn)
    async def wrapped(*a, **kw):
        stamp(label + " in")
        try:
            return await fn(*a, **kw)
        finally:
            stamp(label + " out")

    setattr(owner, name, wrapped)


def wrap_sync(owner, name, label):
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapped(*a, **kw):
        stamp(label + " in")
        try:
            return fn(*a, **kw)
        finally:
            stamp(label + " out")

    setattr(owner, name, wrapped)


def threadpool_hop(original):
    """``run_in_threadpool`` with stamps: submitted, started in the worker, ended there, back on the event loop."""

    async def run_in_threadpool(func, *args, **kwargs):
        label = getattr(func, "__name__", "fn")
        stamp("pool %s submit" % label)

        def in_thread():
            stamp("pool %s start" % label)
            try:
                return func(*args, **kwargs)
            finally:
                stamp("pool %s end" % label)

        try:
            return await original(in_thread)
        finally:
            stamp("pool %s back" % label)

    return run_in_threadpool


class ProbedExecutor:
    """The decode pool with stamps (``loop.run_in_executor`` calls ``submit``)."""

    def __init__(self, inner):
        self._inner = inner

    def submit(self, fn, *args, **kwargs):
        label = getattr(fn, "__name__", "fn")
        stamp("decode %s submit" % label)
        context = contextvars.copy_context()

        def in_thread():
            context.run(stamp, "decode %s start" % label)
            try:
                return fn(*args, **kwargs)
            finally:
                context.run(stamp, "decode %s end" % label)

        return self._inner.submit(in_thread)

    def __getattr__(self, name):
        return getattr(self._inner, name)


# ---------------------------------------------------------------------------------------------- install

LIBRARY = {"add_point_interaction": "library add", "add_bbox_interaction": "library add",
           "add_scribble_interaction": "library add", "add_lasso_interaction": "library add",
           "set_image": "library set_image",
           "_finish_preprocessing_and_initialize_interactions": "library wait preprocessing"}


def install():
    import fastapi.dependencies.utils as fdu
    import fastapi.routing as fr
    import starlette.concurrency as sc
    import starlette.routing as sr
    from fastapi._body_limit import AppBodyLimitMiddleware
    from fastapi.middleware.asyncexitstack import AsyncExitStackMiddleware
    from fastapi.telemetry._asgi import ExceptionTelemetryMiddleware
    from nnInteractive.inference.inference_session import nnInteractiveInferenceSession as Session
    from starlette.middleware.errors import ServerErrorMiddleware
    from starlette.middleware.exceptions import ExceptionMiddleware

    from nninteractive_slicer_server import app as app_module
    from fastapi.routing import APIRoute

    from nninteractive_slicer_server import connections, deps, errors, identities, leases, metrics, scheduler
    from nninteractive_slicer_server.routes import protocol

    hop = threadpool_hop(sc.run_in_threadpool)
    for module in (sc, fdu, fr, leases, protocol, deps):
        if hasattr(module, "run_in_threadpool"):
            module.run_in_threadpool = hop
    for cls, label in ((ServerErrorMiddleware, "server errors"), (ExceptionTelemetryMiddleware, "telemetry"),
                       (AppBodyLimitMiddleware, "body limit"), (metrics.MetricsMiddleware, "metrics"),
                       (errors.RequestIdMiddleware, "request id"), (identities.KeyGate, "key gate"),
                       (ExceptionMiddleware, "exceptions"), (AsyncExitStackMiddleware, "exit stack")):
        wrap_middleware(cls, label)
    wrap_async(sr.Router, "__call__", "router")
    wrap_async(fr, "solve_dependencies", "dependencies")  # the route's call (not its recursion into sub-dependencies)
    for name in ("read_json", "read_packed", "act"):
        if hasattr(protocol, name):
            wrap_async(protocol, name, name.replace("_", " "))
    if hasattr(protocol, "predict_response"):
        wrap_sync(protocol, "predict_response", "response encode")
    for name, label in LIBRARY.items():
        wrap_sync(Session, name, label)

    # The prediction thread's hand-off: submit (and deps.finished awaiting it) since the prompt path runs on the event
    # loop; run (waiting in a worker thread) before that, so that the probe also measures older commits.
    hand_off = "submit" if hasattr(scheduler.DeviceQueue, "submit") else "run"
    original = getattr(scheduler.DeviceQueue, hand_off)

    def queued(self, fn, *args, owner=None):
        stamp("queue submit")

        def on_thread(*a):
            stamp("queue start")
            try:
                return fn(*a)
            finally:
                stamp("queue end")

        try:
            return original(self, on_thread, *args, owner=owner)
        finally:
            if hand_off == "run":
                stamp("queue back")

    setattr(scheduler.DeviceQueue, hand_off, queued)
    if hasattr(deps, "finished"):
        wrap_async(deps, "finished", "queue wait")
        protocol.finished = deps.finished
    wrap_async(APIRoute, "handle", "route")

    protocol_of = connections.Guard.protocol

    def guarded(self, base):
        cls = protocol_of(self, base)
        received = cls.data_received

        def data_received(proto, data):
            LAST_BYTES[0] = now()
            return received(proto, data)

        cls.data_received = data_received
        return cls

    connections.Guard.protocol = guarded

    make_app = app_module.make_app

    def probed_make_app(*a, **kw):
        app = make_app(*a, **kw)
        srv = app.state.server
        srv.decode_pool = ProbedExecutor(srv.decode_pool)
        original = app.build_middleware_stack

        def build():
            return probe_app(original())

        app.build_middleware_stack = build
        return app

    app_module.make_app = probed_make_app


MIDDLEWARES_IN = {"server errors", "server errors > inner", "telemetry", "telemetry > inner", "body limit",
                  "body limit > inner", "metrics", "metrics > inner", "request id", "request id > inner", "key gate",
                  "key gate > inner", "exceptions", "exceptions > inner", "exit stack", "exit stack > inner",
                  "router in"}
GROUPS = ["HTTP server: headers to the app", "middlewares (Starlette's, FastAPI's, metrics, request id, key gate)",
          "routing", "dependencies, lease, X-Meta", "body: waiting for it, decoding", "checks, turn, worker threads",
          "hand-off to the prediction thread and back", "library", "answer built (and worker thread back)",
          "answer sent", "after the answer (exit stacks, metrics)"]


HAND_OFF = {"queue wait in", "queue start", "queue end", "queue wait out", "queue back"}
ANSWER = {"act out", "response start", "response encode in", "response encode out", "pool guarded end",
          "pool guarded back", "pool work end", "pool work back"}


def group_of(a, b):
    """The group (of ``GROUPS``) of the step from stamp ``a`` to stamp ``b``: mostly by the stamp that ends it."""
    if b == "asgi in":
        return GROUPS[0]
    if b in MIDDLEWARES_IN:
        return GROUPS[1]
    if b == "route in":
        return GROUPS[2]
    if b.startswith(("dependencies", "pool require_key", "pool meta")) or b in ("read json in", "read packed in"):
        return GROUPS[3]
    if b in ("read json out", "read packed out") or b.startswith("decode"):
        return GROUPS[4]
    if a.startswith("library") and b.startswith("library"):
        return GROUPS[7]
    if b in HAND_OFF or (a == "queue start" and b.startswith("library")):
        return GROUPS[6]
    if b in ANSWER:
        return GROUPS[8]
    if b == "response sent":
        return GROUPS[9]
    if b in ("route out", "router out", "asgi out"):
        return GROUPS[10]
    return GROUPS[5]  # up to the hand-off: checks, the lease's turn, preprocessing, worker threads


def write(path):
    steps, groups, orders = {}, {}, collections.Counter()
    for url_path, record in RECORDS:
        kind = KIND.get(url_path)
        if kind is None or len(record) < 3:
            continue
        by_kind = steps.setdefault(kind, {})
        summed = dict.fromkeys(GROUPS, 0.0)
        labels = []
        for (a, ta), (b, tb) in zip(record, record[1:]):
            label = "%s > %s" % (a, b)
            by_kind.setdefault(label, []).append((tb - ta) * 1e3)
            summed[group_of(a, b)] += (tb - ta) * 1e3
            labels.append(label)
        by_kind.setdefault("total (bytes in > asgi out)", []).append((record[-1][1] - record[0][1]) * 1e3)
        for group, ms in summed.items():
            groups.setdefault(kind, {}).setdefault(group, []).append(ms)
        orders[(kind, tuple(labels))] += 1
    order = []
    for kind in KIND.values():  # each kind's most common path, the steps in the order they happen
        common = [labels for (k, labels), _n in orders.most_common() if k == kind]
        for label in (common[0] if common else ()):
            if label not in order:
                order.append(label)
    order.append("total (bytes in > asgi out)")
    with open(path, "w") as f:
        json.dump({"steps": steps, "order": order, "groups": groups, "group_order": GROUPS}, f)


def main():
    out, argv = sys.argv[1], sys.argv[2:]
    install()
    atexit.register(write, out)
    from nninteractive_slicer_server.cli import main as server_main

    return server_main(argv)


if __name__ == "__main__":
    sys.exit(main())
