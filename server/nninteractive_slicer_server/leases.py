"""Leases: which client owns which inference session, and when a session is reaped.

Two clocks per lease: ``last_active`` (real actions: images, prompts, undo...) drives the idle timeout;
``last_seen`` (any request, heartbeats included) drives the much shorter liveness timeout that frees the
slot of a client that crashed or lost its network.
"""

import logging
import secrets
import threading
import time

log = logging.getLogger("nninteractive_slicer_server")


class ServerFull(Exception):
    pass


class UnknownLease(Exception):
    pass


class Lease:
    def __init__(self, token, session):
        self.token = token
        self.session = session
        self.lock = threading.Lock()  # one action at a time per session
        self.closed = False  # set under ``lock`` when the session is freed
        self.last_active = self.last_seen = time.monotonic()

    def seen(self):
        self.last_seen = time.monotonic()

    def active(self):
        self.last_active = self.last_seen = time.monotonic()


class LeaseRegistry:
    def __init__(self, new_session, close_session, max_sessions, idle_timeout, liveness_timeout):
        self._new_session = new_session
        self._close_session = close_session
        self.max_sessions = int(max_sessions)
        self.idle_timeout = float(idle_timeout)
        self.liveness_timeout = float(liveness_timeout)
        self._leases = {}
        self._mu = threading.Lock()
        self._claims_in_progress = 0

    def claim(self):
        with self._mu:
            if len(self._leases) + self._claims_in_progress >= self.max_sessions:
                raise ServerFull()
            self._claims_in_progress += 1
        try:
            session = self._new_session()  # outside the registry lock: other leases stay usable meanwhile
        finally:
            with self._mu:
                self._claims_in_progress -= 1
        lease = Lease(secrets.token_hex(16), session)
        with self._mu:
            self._leases[lease.token] = lease
            count = len(self._leases)
        log.info("claimed session %s... (%d/%d)", lease.token[:8], count, self.max_sessions)
        return lease

    def get(self, token, touch=True):
        with self._mu:
            lease = self._leases.get(token or "")
        if lease is None:
            raise UnknownLease()
        if touch:
            lease.seen()
        return lease

    def release(self, token):
        with self._mu:
            lease = self._leases.pop(token or "", None)
        if lease is None:
            return False
        self._close(lease, "released")
        return True

    def remaining(self, lease):
        return max(0.0, self.idle_timeout - (time.monotonic() - lease.last_active))

    def sweep(self):
        now = time.monotonic()
        reaped = []
        with self._mu:
            for token, lease in list(self._leases.items()):
                if now - lease.last_seen > self.liveness_timeout:
                    reaped.append((self._leases.pop(token), "no sign of life for %.0f s" % (now - lease.last_seen)))
                elif now - lease.last_active > self.idle_timeout:
                    reaped.append((self._leases.pop(token), "idle for %.0f s" % (now - lease.last_active)))
        for lease, why in reaped:
            self._close(lease, "reaped (%s)" % why)
        return len(reaped)

    def close_all(self):
        with self._mu:
            leases = list(self._leases.values())
            self._leases.clear()
        for lease in leases:
            self._close(lease, "closed at shutdown")

    def count(self):
        with self._mu:
            return len(self._leases)

    def _close(self, lease, why):
        # Wait for an action in flight on this session before freeing its buffers.
        with lease.lock:
            lease.closed = True
            self._close_session(lease.session)
        log.info("session %s... %s (%d/%d)", lease.token[:8], why, self.count(), self.max_sessions)
