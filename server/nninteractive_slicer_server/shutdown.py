"""Signals, and the web server that runs the app: graceful shutdown on SIGTERM within a deadline
(``--shutdown-deadline-seconds``), SIGHUP handled from the first moment of start-up.

On the first SIGTERM the server, at once:

1. refuses new sessions (``/claim``: 503 with Retry-After; ``/healthz``: 503, so a balancer sends no one new) and new
   automatic work (``/infer``, ``/infer_file``, ``POST /jobs``: 503 with Retry-After; the queued jobs fail the same
   way), while the sessions it holds and the automatic studies running keep working;
2. waits until no request of any session is in progress, no prediction waits for or runs on the GPU and no
   automatic study runs (at most until 4/5 of the deadline, or 5 s before it); studies still running then are
   cancelled and marked failed (their job index says so), and get until the deadline to stop;
3. releases every session (a client that asks again gets 410, and its recovery claims elsewhere);
4. stops uvicorn (which closes the connections and waits for the answers still being sent) and exits 0.

A watchdog ends the process (exit status 1) at the deadline whatever is still running. A second SIGTERM, or
SIGINT (Ctrl+C), stops at once the way uvicorn does.

SIGHUP (what logrotate and ``systemctl reload`` send) never stops the server: ``HANGUP.install()`` is the first
thing ``main`` does; until the app runs, a SIGHUP is remembered, then handled once it does (on the event loop, never
inside whatever the signal interrupted): the keys file is reread, or, without one, a log line says there is nothing
to reload.
"""

import asyncio
import functools
import logging
import os
import signal
import sys
import threading
import time

import uvicorn

log = logging.getLogger("nninteractive_slicer_server")


class Hangup:
    """SIGHUP's one handler. ``attach(loop, action)`` while the app runs: each SIGHUP schedules ``action`` on
    ``loop``; before that (start-up) and after (shutdown) SIGHUPs are counted and the next ``attach`` runs the action
    once for them."""

    def __init__(self):
        self.loop = self.action = None
        self.pending = 0
        self.installed = False

    def install(self):
        if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGHUP, self._handle)
            self.installed = True

    def _handle(self, sig, frame):
        loop, action = self.loop, self.action  # no logging and no locks here: it runs inside interrupted code
        if loop is not None and action is not None and not loop.is_closed():
            loop.call_soon_threadsafe(action)
        else:
            self.pending += 1

    def attach(self, loop, action):
        self.loop, self.action = loop, action
        if self.pending:
            log.info("SIGHUP received %d time(s) during start-up: handled now", self.pending)
            self.pending = 0
            loop.call_soon(action)

    def detach(self):
        self.loop = self.action = None


HANGUP = Hangup()


class GracefulServer(uvicorn.Server):
    def __init__(self, config, srv, deadline, handshake_timeout=None):
        uvicorn.Server.__init__(self, config)
        self.srv = srv
        self.deadline = float(deadline)
        self.handshake_timeout = handshake_timeout
        self.drain_started = None
        self._drain_task = None
        self._watchdog = None

    async def startup(self, sockets=None):
        """uvicorn's start-up, its listening sockets made with ``ssl_handshake_timeout``: a TLS handshake ends within
        ``handshake_timeout`` s, not asyncio's 60 (the header deadline starts only once the handshake is done, and a
        connection in its handshake holds a descriptor). uvicorn has no setting for it; the loop's ``create_server``
        takes it, so it is added to uvicorn's calls for as long as uvicorn starts."""
        if self.config.ssl is None or self.handshake_timeout is None:
            return await uvicorn.Server.startup(self, sockets)
        loop = asyncio.get_running_loop()
        loop.create_server = functools.partial(loop.create_server, ssl_handshake_timeout=self.handshake_timeout)
        try:
            return await uvicorn.Server.startup(self, sockets)
        finally:
            del loop.create_server  # the loop's own method again

    def handle_exit(self, sig, frame):
        if sig == signal.SIGTERM and self.drain_started is None and not self.should_exit:
            self.drain_started = time.monotonic()
            self.srv.draining = True  # the very next claim is refused
            self._watchdog = threading.Timer(self.deadline, self._past_deadline)
            self._watchdog.daemon = True
            self._watchdog.start()
            return  # the drain starts on the next tick of uvicorn's main loop
        uvicorn.Server.handle_exit(self, sig, frame)

    async def on_tick(self, counter):
        if self.drain_started is not None and self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())
        return await uvicorn.Server.on_tick(self, counter)

    def busy(self):
        """Requests of sessions in progress, predictions queued or running, automatic studies queued or running."""
        auto = self.srv.auto
        return (sum(lease.in_flight for lease in self.srv.registry.snapshot()), len(self.srv.engine.queue),
                auto.runner.active() if auto is not None else 0)

    async def _drain(self):
        registry = self.srv.registry
        settle_by = self.drain_started + max(self.deadline * 0.8, self.deadline - 5.0)
        log.info("SIGTERM: shutting down within %.0f s; new sessions and automatic runs are refused; %d session(s), "
                 "%d request(s) in progress, %d prediction(s) queued or running, %d automatic run(s)", self.deadline,
                 registry.count(), *self.busy())
        loop = asyncio.get_running_loop()
        try:
            auto = self.srv.auto
            if auto is not None:
                failed = await loop.run_in_executor(None, auto.drain)
                if failed:
                    log.info("%d queued automatic job(s) failed: the server is shutting down", failed)
            while any(self.busy()) and time.monotonic() < settle_by:
                await asyncio.sleep(0.05)
            if auto is not None and auto.runner.running():
                stopped = await loop.run_in_executor(None, auto.runner.stop_running,
                                                     "the server shut down before the job finished (SIGTERM; "
                                                     "--shutdown-deadline-seconds %.0f)" % self.deadline)
                log.warning("cancelled %d automatic run(s) still running at the deadline; their jobs are failed",
                            stopped)
                while auto.runner.running() and time.monotonic() < self.drain_started + self.deadline - 1.0:
                    await asyncio.sleep(0.05)
            if any(self.busy()):
                log.warning("shutting down with %d request(s) in progress, %d prediction(s) queued or running, %d "
                            "automatic run(s)", *self.busy())
            sessions = registry.count()
            await loop.run_in_executor(None, registry.close_all)
            log.info("released %d session(s); stopping", sessions)
        except Exception:
            log.exception("error while draining; stopping")
        finally:
            remaining = self.drain_started + self.deadline - time.monotonic()
            self.config.timeout_graceful_shutdown = max(0.5, remaining - 1.0)
            self.should_exit = True

    def _past_deadline(self):
        log.error("the shutdown deadline (%.0f s) passed with work still in progress; exiting now", self.deadline)
        for handler in logging.getLogger().handlers:
            try:
                handler.flush()
            except Exception:
                pass
        os._exit(1)


def serve(app, deadline, guard=None, ssl_min_version=None, forwarded_allow_ips=None, **config):
    """``uvicorn.run(app, **config)`` with SIGTERM draining (see the module's docstring), the connection limits of
    ``guard`` (``connections.Guard``), TLS from ``ssl_min_version`` (an ``ssl.TLSVersion``) up, and proxy headers
    (the client's address in X-Forwarded-For) believed only from ``forwarded_allow_ips`` (a comma-separated list;
    none: never). Our own logging handler stays in charge (``log_config=None``); no websocket protocol (no route
    uses one: an upgrade request is an ordinary request, behind the key)."""
    if guard is not None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        config["http"] = guard.protocol(AutoHTTPProtocol)
        app.state.server.guard = guard
    if ssl_min_version is not None:
        def tls_context(_config, default_factory):
            context = default_factory()
            context.minimum_version = ssl_min_version
            return context

        config["ssl_context_factory"] = tls_context
    config.update(ws="none", proxy_headers=bool(forwarded_allow_ips), forwarded_allow_ips=forwarded_allow_ips or "")
    server = GracefulServer(uvicorn.Config(app, log_config=None, **config), app.state.server, deadline,
                            handshake_timeout=guard.header_timeout if guard is not None else None)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    if not server.started:
        sys.exit(3)  # uvicorn's STARTUP_FAILURE: it has logged why
    return server
