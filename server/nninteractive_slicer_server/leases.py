"""Leases: which client owns which inference session, whose turn it is, and when a session is reaped.

Two clocks per lease: ``last_active`` (real actions: images, prompts, undo...) drives the idle timeout;
``last_seen`` (any request, heartbeats included) drives the much shorter liveness timeout that frees the
slot of a client that crashed or lost its network. A lease with a request in progress (being received, waiting
for its turn, or running) is never reaped for either: the request itself is the sign of life.

Nothing here waits on a session's work while holding anything another lease needs:

* a request waits for its lease's turn on the event loop (``asyncio.Lock``), not in a worker thread, and at most
  ``max_waiting`` wait per lease (``Busy``, 429, beyond);
* releasing or reaping a lease takes it out of the registry at once and marks it closed; its session is freed by
  the reaper's own thread, or, when a request of that lease is running, by that request as it ends.
"""

import asyncio
import hashlib
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .errors import Busy, Forbidden, Gone

log = logging.getLogger("nninteractive_slicer_server")


class ServerFull(Exception):
    pass


class UserFull(ServerFull):
    """The user already holds ``max_per_user`` sessions."""


class UnknownLease(Exception):
    pass


class Lease:
    def __init__(self, token, session, user=None):
        self.token = token
        self.id = hashlib.sha256(token.encode()).hexdigest()[:8]  # for the logs: names the lease, reveals no token
        self.user = user  # who claimed it; only they may use it
        self.session = session
        self.turn = asyncio.Lock()  # one action at a time per session; waited for on the event loop
        self.queued = 0  # requests holding or waiting for the turn (event loop only)
        self.in_flight = 0  # requests being received, waiting or running (event loop only)
        self.mu = threading.Lock()  # guards closed / running / freed; never held while working
        self.closed = False
        self.running = False
        self.freed = False
        self.held = {}  # name -> limits.Reservation held by the session (image, target buffer)
        # The image as set_image received it (before the library normalises its own copy) and its image_properties,
        # kept only on servers with automatic models (POST /x/auto_segment runs them on it); budgeted with "image".
        self.source_image = None
        self.image_properties = {}
        self.auto_runs = set()  # cancel.CancelToken of its /x/auto_segment requests in progress (routes/auto.py)
        self.last_active = self.last_seen = time.monotonic()

    def seen(self):
        self.last_seen = time.monotonic()

    def active(self):
        self.last_active = self.last_seen = time.monotonic()

    def hold(self, name, reservation):
        """Let the session keep ``reservation`` as its ``name`` (replacing and giving back the previous one)."""
        old = self.held.pop(name, None)
        if reservation is not None:
            self.held[name] = reservation
        if old is not None:
            old.release()

    def keep_source(self, image, properties):
        self.source_image = image
        self.image_properties = dict(properties) if isinstance(properties, dict) else {}

    def drop_all(self):
        self.keep_source(None, None)
        for name in list(self.held):
            self.hold(name, None)


class LeaseRegistry:
    def __init__(self, new_session, close_session, max_sessions, idle_timeout, liveness_timeout, max_waiting=4,
                 max_per_user=None):
        self._new_session = new_session
        self._close_session = close_session
        self.max_sessions = int(max_sessions)
        self.idle_timeout = float(idle_timeout)
        self.liveness_timeout = float(liveness_timeout)
        self.max_waiting = int(max_waiting)
        self.max_per_user = int(max_per_user) if max_per_user else None
        self._leases = {}
        self._mu = threading.Lock()
        self._claims_in_progress = 0
        self._claiming = {}  # user -> claims in progress
        # Freeing a session waits for its background preprocessing: a thread of its own, so neither the event loop
        # nor the request pool ever waits on it.
        self._reaper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nninteractive-reaper")

    # ------------------------------------------------------------ claim / look up / release

    def claim(self, user=None):
        """Make a new session for ``user`` (in a worker thread: it takes a moment). Raises UserFull, ServerFull."""
        with self._mu:
            if self.max_per_user and self.held_by(user) + self._claiming.get(user, 0) >= self.max_per_user:
                raise UserFull()
            if len(self._leases) + self._claims_in_progress >= self.max_sessions:
                raise ServerFull()
            self._claims_in_progress += 1
            self._claiming[user] = self._claiming.get(user, 0) + 1
        try:
            session = self._new_session()  # outside the registry lock: other leases stay usable meanwhile
        finally:
            with self._mu:
                self._claims_in_progress -= 1
                self._claiming[user] -= 1
                if not self._claiming[user]:
                    del self._claiming[user]
        lease = Lease(secrets.token_hex(16), session, user)
        with self._mu:
            self._leases[lease.token] = lease
            count = len(self._leases)
        log.info("claimed session %s for %s (%d/%d)", lease.id, user, count, self.max_sessions)
        return lease

    def held_by(self, user):
        """Sessions ``user`` holds (call with ``_mu`` held, or accept a moment's staleness)."""
        return sum(1 for lease in self._leases.values() if lease.user == user)

    def get(self, token, touch=True, user=None):
        """The lease of ``token``: UnknownLease when there is none, Forbidden (403) when ``user`` did not claim it."""
        with self._mu:
            lease = self._leases.get(token or "")
        if lease is None:
            raise UnknownLease()
        if lease.user != user:
            raise Forbidden("this session was claimed by another user")
        if touch:
            lease.seen()
        return lease

    def release(self, token, user=None):
        with self._mu:
            lease = self._leases.get(token or "")
            if lease is None:
                return False
            if lease.user != user:
                raise Forbidden("this session was claimed by another user")
            del self._leases[lease.token]
        self._retire(lease, "released")
        return True

    def remaining(self, lease):
        return max(0.0, self.idle_timeout - (time.monotonic() - lease.last_active))

    def count(self):
        with self._mu:
            return len(self._leases)

    def free(self):
        """Session slots nobody holds or is claiming now."""
        with self._mu:
            return self.max_sessions - len(self._leases) - self._claims_in_progress

    def snapshot(self):
        """The leases held now (a copy: for metrics and shutdown)."""
        with self._mu:
            return list(self._leases.values())

    # ------------------------------------------------------------ turns

    async def run(self, lease, work):
        """Await ``work(session)`` (a coroutine function) as this lease's next action (one at a time per lease).

        Waits for the turn on the event loop; ``Busy`` when ``max_waiting`` requests already wait; ``Gone`` when the
        lease was released or reaped meanwhile. When it was closed while this ran, the session is freed here."""
        if lease.queued > self.max_waiting:
            raise Busy("%d requests of this session are already waiting; wait for their answers before sending more"
                       % (lease.queued - 1), retry_after=1)
        lease.queued += 1
        try:
            async with lease.turn:
                with lease.mu:
                    if lease.closed:
                        raise Gone()
                    lease.running = True
                lease.active()
                try:
                    return await work(lease.session)
                finally:
                    with lease.mu:
                        lease.running = False
                        free = lease.closed and not lease.freed
                        lease.freed = lease.freed or free
                    lease.active()
                    if free:
                        self._free_later(lease, "freed after its last request")
        finally:
            lease.queued -= 1

    # ------------------------------------------------------------ reaping

    def sweep(self):
        """Take out every lease past a timeout (none with a request in progress). Never waits on a session."""
        now = time.monotonic()
        reaped = []
        with self._mu:
            for token, lease in list(self._leases.items()):
                if lease.in_flight:
                    continue
                if now - lease.last_seen > self.liveness_timeout:
                    reaped.append((self._leases.pop(token), "no sign of life for %.0f s" % (now - lease.last_seen)))
                elif now - lease.last_active > self.idle_timeout:
                    reaped.append((self._leases.pop(token), "idle for %.0f s" % (now - lease.last_active)))
        for lease, why in reaped:
            self._retire(lease, "reaped (%s)" % why)
        return len(reaped)

    def close_all(self):
        with self._mu:
            leases = list(self._leases.values())
            self._leases.clear()
        for lease in leases:
            self._retire(lease, "closed at shutdown")
        self._reaper.shutdown(wait=True)

    def _retire(self, lease, why):
        with lease.mu:
            lease.closed = True
            free = not lease.running and not lease.freed
            lease.freed = lease.freed or free
        log.info("session %s of %s %s (%d/%d)%s", lease.id, lease.user, why, self.count(), self.max_sessions,
                 "" if free else "; freed when its request in progress ends")
        if free:
            self._free_later(lease, None)

    def _free_later(self, lease, why):
        try:
            self._reaper.submit(self._free, lease, why)
        except RuntimeError:  # shutting down: free it here
            self._free(lease, why)

    def _free(self, lease, why):
        try:
            self._close_session(lease.session)
        finally:
            lease.drop_all()
        if why:
            log.info("session %s of %s %s", lease.id, lease.user, why)
