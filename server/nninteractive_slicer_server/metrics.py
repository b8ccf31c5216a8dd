"""Prometheus metrics (``GET /metrics``, behind the key when one is set), one registry per app.

Only an operator's key or a metrics key reads it. Labels stay bounded: ``endpoint`` is the route template
(``/add_point_interaction``; ``unmatched`` for paths the app does not serve), ``user`` is ``named`` for every user
of the keys file (their names only with ``--metrics-user-labels``: a scrape must not tell who works when), ``shared``
(the server's one key), ``anonymous`` (no key) or ``unauthenticated`` (no valid key: never counted as anyone's),
``reason`` is the kind of refusal.

* ``nninteractive_http_requests_total{endpoint,method,status,user}``
* ``nninteractive_http_request_duration_seconds{endpoint,method,status}`` (histogram)
* ``nninteractive_http_request_bytes_total{endpoint}``, ``nninteractive_http_response_bytes_total{endpoint}``
* ``nninteractive_rejections_total{reason}``: every refused request (``bad_input``, ``unauthorized``, ``gone``,
  ``too_large``, ``busy``, ``at_capacity``, ``budget_full``, ``draining``, ``stalled``, ``out_of_memory``,
  ``not_found``...)
* ``nninteractive_prediction_seconds``, ``nninteractive_gpu_queue_wait_seconds`` (histograms, prompts)
* ``nninteractive_gpu_queue_length`` (what a prompt sent now waits behind: prompts waiting or running and the
  automatic piece running), ``nninteractive_automatic_runs`` and ``nninteractive_automatic_pieces_remaining``
  (automatic runs in progress on the prediction thread, and the pieces they have left),
  ``nninteractive_sessions{user}``, ``nninteractive_max_sessions``, ``nninteractive_memory_budget_bytes``,
  ``nninteractive_memory_reserved_bytes``, ``nninteractive_draining``, ``nninteractive_free_sessions`` and
  ``nninteractive_capacity_weight`` (the free capacity HAProxy's agent-check reads, see capacity.py),
  ``nninteractive_server_info{version,model,device}``;
  ``nninteractive_open_connections`` and ``nninteractive_refused_connections_total{reason}`` (connections.py:
  ``max_connections``, ``max_connections_per_address``, ``header_timeout``, ``header_bytes``); and the
  ``process_*`` metrics (``process_resident_memory_bytes``, ``process_open_fds``...).
"""

import re
import time

from starlette.routing import Match

from fastapi.exceptions import RequestValidationError
import prometheus_client
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, ProcessCollector, \
    generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException  # FastAPI's is a subclass; the router's 404 and 405 are this one

from SlicerNNInteractiveLib.wire import WireFormatError

from . import __version__
from .capacity import free_capacity
from .identities import ANONYMOUS, SHARED_USER
from .validate import BadInput

PREFIX = "nninteractive_"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
PREDICTION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
UNMATCHED = "unmatched"
NAMED = "named"  # the user label of every keys-file user, unless --metrics-user-labels
REFUSED_REASONS = ("max_connections", "max_connections_per_address", "header_timeout", "header_bytes")


def reason_of(exc):
    """The ``reason`` label of a refused request, from the exception that refused it."""
    if isinstance(exc, (BadInput, WireFormatError, RequestValidationError)):
        return "bad_input"
    if isinstance(exc, HTTPException):
        return {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_%d" % exc.status_code)
    if isinstance(exc, MemoryError):
        return "out_of_memory"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()  # TooLarge -> too_large


class Metrics:
    def __init__(self, srv):
        self.srv = srv
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(PREFIX + "http_requests", "HTTP requests answered, by route template, method, status "
                                "and user", ["endpoint", "method", "status", "user"], registry=r)
        self.latency = Histogram(PREFIX + "http_request_duration_seconds", "Time from a request's arrival to the end "
                                 "of its answer", ["endpoint", "method", "status"], buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.bytes_in = Counter(PREFIX + "http_request_bytes", "Request body bytes received", ["endpoint"],
                                registry=r)
        self.bytes_out = Counter(PREFIX + "http_response_bytes", "Response body bytes sent", ["endpoint"],
                                 registry=r)
        self.rejections = Counter(PREFIX + "rejections", "Requests refused, by reason", ["reason"], registry=r)
        self.prediction = Histogram(PREFIX + "prediction_seconds", "Time a prediction ran on the prediction thread",
                                    buckets=PREDICTION_BUCKETS, registry=r)
        self.queue_wait = Histogram(PREFIX + "gpu_queue_wait_seconds", "Time a prediction waited for the "
                                    "prediction thread (the GPU) behind other sessions' predictions",
                                    buckets=QUEUE_BUCKETS, registry=r)
        ProcessCollector(registry=r)
        r.register(_StateCollector(srv))
        srv.engine.queue.listeners.append(self._predicted)
        self._children = {}  # (metric, label values) -> its child

    def _child(self, metric, *values):
        """``metric.labels(*values)``, remembered (labels() takes a lock and checks every value on each call); as many
        as the label values' combinations, which are bounded (see the module docstring)."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def answered(self, endpoint, method, status, user, seconds, bytes_in, bytes_out):
        """Count one answer."""
        self._child(self.requests, endpoint, method, status, user).inc()
        self._child(self.latency, endpoint, method, status).observe(seconds)
        if bytes_in:
            self._child(self.bytes_in, endpoint).inc(bytes_in)
        if bytes_out:
            self._child(self.bytes_out, endpoint).inc(bytes_out)

    def _predicted(self, waited, ran):
        self.queue_wait.observe(waited)
        self.prediction.observe(ran)

    def user_of(self, state):
        user = state.get("user") if isinstance(state, dict) else None
        return user_label(self.srv, user) if user else "unauthenticated"

    def exposition(self):
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def user_label(srv, user):
    """The ``user`` label of ``user`` (a name the key gave)."""
    if user in (SHARED_USER, ANONYMOUS) or srv.metrics_user_labels:
        return str(user)
    return NAMED


class _StateCollector:
    """Gauges read when scraped: sessions by user, the GPU queue, the memory budget, draining."""

    def __init__(self, srv):
        self.srv = srv

    def describe(self):
        return []  # collected at scrape time only

    def collect(self):
        srv = self.srv
        sessions = GaugeMetricFamily(PREFIX + "sessions", "Sessions (leases) held, by user", labels=["user"])
        default = SHARED_USER if srv.identities.required else ANONYMOUS
        counts = {}
        for lease in srv.registry.snapshot():
            user = user_label(srv, getattr(lease, "user", None) or default)
            counts[user] = counts.get(user, 0) + 1
        for user, n in sorted(counts.items()):
            sessions.add_metric([str(user)], n)
        if not counts:
            sessions.add_metric([default], 0)
        yield sessions
        yield GaugeMetricFamily(PREFIX + "max_sessions", "Session slots (--max-sessions)",
                                value=srv.registry.max_sessions)
        yield GaugeMetricFamily(PREFIX + "gpu_queue_length", "What a prompt sent now waits behind: prompts waiting "
                                "for or running on the prediction thread, and the automatic piece running",
                                value=len(srv.engine.queue))
        runs, pieces = srv.engine.queue.automatic_runs()
        yield GaugeMetricFamily(PREFIX + "automatic_runs", "Automatic runs in progress on the prediction thread (in "
                                "pieces, between prompts)", value=runs)
        yield GaugeMetricFamily(PREFIX + "automatic_pieces_remaining", "Pieces (tiles, export steps) the automatic "
                                "runs in progress have left", value=pieces)
        yield GaugeMetricFamily(PREFIX + "memory_budget_bytes", "Memory all sessions may hold together "
                                "(--memory-budget)", value=srv.budget.total)
        yield GaugeMetricFamily(PREFIX + "memory_reserved_bytes", "Memory reserved now by sessions and requests in "
                                "progress, against the budget", value=srv.budget.used)
        yield GaugeMetricFamily(PREFIX + "draining", "1 while shutting down (SIGTERM): no new sessions",
                                value=1 if getattr(srv, "draining", False) else 0)
        cap = free_capacity(srv)
        yield GaugeMetricFamily(PREFIX + "free_sessions", "Session slots nobody holds or is claiming",
                                value=cap["free_sessions"])
        yield GaugeMetricFamily(PREFIX + "capacity_weight", "The weight (0-100) the agent-check gives HAProxy: free "
                                "slots, less while the GPU queue is long; 0 when full or draining", value=cap["weight"])
        guard = getattr(srv, "guard", None)
        if guard is not None:
            yield GaugeMetricFamily(PREFIX + "open_connections", "Client connections open now (--max-connections)",
                                    value=guard.open)
            refused = CounterMetricFamily(PREFIX + "refused_connections", "Connections closed by the connection "
                                          "limits, by reason", labels=["reason"])
            for reason in REFUSED_REASONS:
                refused.add_metric([reason], guard.refused[reason])
            yield refused
        info = GaugeMetricFamily(PREFIX + "server_info", "The server's version, model and device",
                                 labels=["version", "model", "device"])
        info.add_metric([__version__, srv.model, str(srv.engine.device)], 1)
        yield info


class MetricsMiddleware:
    """Counts every answer (status, latency, bytes) by route template; the outermost layer, so that it also sees
    the 500s the request-id middleware makes."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        metrics = scope["app"].state.server.metrics if "app" in scope else None
        started = time.perf_counter()
        seen = {"in": 0, "out": 0, "status": 500}

        async def counting_receive():
            message = await receive()
            if message["type"] == "http.request":
                seen["in"] += len(message.get("body", b""))
            return message

        async def counting_send(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            elif message["type"] == "http.response.body":
                seen["out"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            if metrics is not None:
                metrics.answered(_route_template(scope), scope.get("method", ""), str(seen["status"]),
                                 metrics.user_of(scope.get("state")), time.perf_counter() - started, seen["in"],
                                 seen["out"])


def _route_template(scope):
    """The template of the route the request reached, or would have reached when it was refused before routing
    (a 401 from the key check): matched against the app's routes, so a raw path never becomes a label."""
    route = scope.get("route")
    if route is None and "app" in scope:
        route = _match(scope["app"].routes, scope)
    return getattr(route, "path", None) or UNMATCHED


def _match(routes, scope):
    for route in routes:
        if hasattr(route, "original_router"):  # FastAPI keeps an included router as one entry
            found = _match(route.original_router.routes, scope)
            if found is not None:
                return found
        elif route.matches(scope)[0] == Match.FULL:
            return route
    return None


def install(app):
    """Create the app's metrics, count every refusal the exception handlers answer (call after
    ``errors.install``), and add the counting middleware (outermost)."""
    srv = app.state.server
    disable_created = getattr(prometheus_client, "disable_created_metrics", None)
    if disable_created is not None:
        disable_created()  # no *_created series beside each counter and histogram (process-wide)
    srv.metrics = Metrics(srv)

    def counting(handler):
        async def handle(request, exc):
            srv.metrics.rejections.labels(reason_of(exc)).inc()
            return await handler(request, exc)

        return handle

    for cls, handler in list(app.exception_handlers.items()):
        if isinstance(cls, type):
            app.exception_handlers[cls] = counting(handler)
    app.add_middleware(MetricsMiddleware)
