"""The application: shared state, routers by concern, one error mapping, the reaper.

Routes live in ``routes/`` (``protocol``: nnInteractive 2.6's remote protocol; ``extensions``: ours under /x/;
``operations``: health, metrics; ``auto``: automatic nnU-Net models, the established model server's endpoints and
ours); the rules they share (key, lease, body limits, turns) in ``deps.py``; every exception's HTTP answer in
``errors.py``; every size limit and the memory budget in ``limits.py``; leases in ``leases.py``, the model and the
GPU queue in ``engine.py``, input checks in ``validate.py`` and the wire codec in ``SlicerNNInteractiveLib.wire``
(shared with the client). Operations: ``metrics.py`` (Prometheus), ``logs.py`` (request ids in log lines, JSON
logs), ``shutdown.py`` (the web server and signals: SIGTERM drains, SIGHUP rereads the keys file), ``connections.py``
(header deadline, connection caps).
"""

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI

from . import __version__, capacity, errors, metrics
from .identities import Identities, KeyGate
from .leases import LeaseRegistry
from .limits import Limits, shared_budget
from .routes import auto as auto_routes
from .routes import extensions, operations, protocol
from .routes import orthanc as orthanc_routes
from .shutdown import HANGUP

log = logging.getLogger("nninteractive_slicer_server")


class Server:
    """What every route reaches through ``request.app.state.server``."""

    def __init__(self, engine, max_sessions, idle_timeout, liveness_timeout, identities, limits,
                 max_sessions_per_user=None, auto=None, budget=None):
        self.engine = engine
        self.auto = auto  # auto.service.AutoService: the model registry and its endpoints (None: no registry)
        self.keep_source_images = auto is not None  # sessions keep the image as received, for /x/auto_segment
        self.identities = identities
        self.limits = limits
        # Memory is shared per user the way sessions are (--max-sessions-per-user of --max-sessions).
        self.budget = budget if budget is not None else shared_budget(limits, max_sessions,
                                                                      max_sessions_per_user)
        if auto is not None and auto.budget is None:
            auto.budget = self.budget  # automatic runs reserve their reading from the same budget as sessions
        self.registry = LeaseRegistry(engine.new_session, engine.close_session, max_sessions, idle_timeout,
                                      liveness_timeout, limits.max_waiting_per_lease, max_sessions_per_user)
        self.caps = engine.capabilities
        self.model = model_label(getattr(engine, "model_name", None))  # what answers call the model: never a path
        self.supports_3d_box = bool(self.caps["supported_interactions"].get("bbox3d"))
        self.image_channels = len(engine.artifacts["dataset_json"]["channel_names"])
        self.num_interaction_channels = int(self.caps.get("num_interaction_channels") or 7)
        # Decompressing request bodies: blosc2 releases the GIL, so these run beside the event loop.
        self.decode_pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2),
                                              thread_name_prefix="nninteractive-decode")
        self.sweep_every = max(0.05, min(15.0, idle_timeout / 4, liveness_timeout / 4))
        self.draining = False  # SIGTERM: no new sessions (shutdown.py)
        self.metrics = None  # metrics.Metrics, made by metrics.install
        self.guard = None  # connections.Guard, when served by shutdown.serve
        self.metrics_user_labels = False  # metrics name users only when the operator says so (--metrics-user-labels)


def model_label(name):
    """An official model id as it is; a local model folder by its last part (the rest of its path is the
    server's business)."""
    name = str(name)
    return os.path.basename(name.rstrip("/" + os.sep)) if os.sep in name or "/" in name else name


def make_app(engine, max_sessions=1, idle_timeout=600.0, liveness_timeout=60.0, api_key=None, limits=None,
             identities=None, max_sessions_per_user=None, auto=None, agent_port=None, agent_host="127.0.0.1",
             budget=None, metrics_user_labels=False):
    """``identities`` (shared key and keys file) replaces ``api_key`` when given; ``auto`` (an
    ``auto.service.AutoService``) serves automatic models; ``agent_port``: answer HAProxy's agent-check there
    (``capacity.py``; None: off); ``budget``: the ``MemoryBudget`` shared with ``auto``'s runs (default: a new one,
    ``limits.shared_budget``); ``metrics_user_labels``: name users in /metrics."""
    srv = Server(engine, max_sessions, idle_timeout, liveness_timeout, identities or Identities(api_key),
                 limits or Limits.defaults(), max_sessions_per_user, auto, budget)
    srv.metrics_user_labels = bool(metrics_user_labels)

    @asynccontextmanager
    async def lifespan(_app):
        async def reap():
            while True:
                await asyncio.sleep(srv.sweep_every)
                try:
                    srv.registry.sweep()  # takes leases out at once; their sessions are freed on the reaper's thread
                except Exception:
                    log.exception("error while reaping sessions")
                if srv.auto is not None:
                    try:  # predictors past their TTL, expired jobs' folders: off the event loop
                        await asyncio.to_thread(srv.auto.sweep)
                    except Exception:
                        log.exception("error while sweeping predictors and jobs")

        agent = await capacity.start_agent(srv, agent_host, agent_port) if agent_port else None
        task = asyncio.create_task(reap())
        HANGUP.attach(asyncio.get_running_loop(), srv.identities.reload_logged if srv.identities.keys_file else
                      lambda: log.info("SIGHUP: no keys file to reread (--keys-file); nothing to reload"))
        try:
            yield
        finally:
            HANGUP.detach()
            task.cancel()
            if agent is not None:
                agent.close()
            srv.registry.close_all()
            srv.decode_pool.shutdown(wait=False)
            srv.identities.close()
            if srv.auto is not None:
                srv.auto.close()

    app = FastAPI(title="nninteractive-slicer-server", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url="/x/openapi.json")
    app.state.server = srv
    app.state.registry = srv.registry
    app.add_middleware(KeyGate, identities=srv.identities)  # inside the request-id middleware errors adds
    errors.install(app)
    metrics.install(app)  # after errors: it counts what their handlers refuse
    # One flat route table, the protocol's prompts first: FastAPI (0.13x on) keeps an included router as one entry and
    # matches a request against its routes twice, a cost on every call; each route already carries its router's
    # dependencies.
    for router in (protocol.router, operations.router, extensions.router, auto_routes.router, orthanc_routes.router):
        app.router.routes.extend(router.routes)
    return app
