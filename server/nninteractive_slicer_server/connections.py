"""Connections, below HTTP: what a client that connects and never sends a request can hold.

* **A deadline for each request's headers** (``--header-timeout-seconds``): from the moment a connection opens, or
  its previous answer ends, the next request's headers must be complete within the deadline, and within
  ``MAX_HEADER_BYTES``; otherwise the connection is closed (with a 408 or 431 when part of a request came). Bytes
  trickled one at a time do not extend it. An idle keep-alive connection is closed after ``--keep-alive-seconds``
  (uvicorn's own timer).
* **A cap on open connections** (``--max-connections``, all together; ``--max-connections-per-address``, from one
  client address, the trusted balancers' addresses excepted): one more is answered 503 and closed at once, before
  it can send anything, so descriptors never run out for the clients already served.
* **The descriptor limit** is raised to the hard limit at start-up, and the default connection cap is derived from
  it, leaving ``RESERVED_DESCRIPTORS`` for the model, logs, the agent port and automatic jobs.

It wraps uvicorn's HTTP protocol class (httptools or h11, whichever uvicorn picked) by subclassing it: the class is
uvicorn's choice, the hooks are the ones both share (``connection_made``, ``data_received``,
``on_response_complete``, ``connection_lost``, ``cycle``). A TLS handshake happens before ``connection_made``,
uncounted; it ends within the header deadline too (``shutdown.GracefulServer.startup``).
"""

import collections
import ipaddress
import logging
import resource

log = logging.getLogger("nninteractive_slicer_server")

MAX_HEADER_BYTES = 64 * 1024  # a request line and headers: ours are well under 8 KiB (X-Meta at most 48 KiB)
RESERVED_DESCRIPTORS = 128  # kept for everything but client connections: model files, logs, agent, jobs, pipes
DEFAULT_MAX_CONNECTIONS = 4096


def raise_descriptor_limit():
    """Raise this process's soft limit on open files to its hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d (%s)", soft, target, exc)
    return soft


def default_max_connections(descriptors):
    """The connection cap that leaves ``RESERVED_DESCRIPTORS`` of ``descriptors`` for the rest."""
    return max(8, min(DEFAULT_MAX_CONNECTIONS, descriptors - RESERVED_DESCRIPTORS))


def parse_networks(text):
    """``--forwarded-allow-ips`` (comma-separated addresses or networks) as ip_network objects; ValueError."""
    return [ipaddress.ip_network(part.strip(), strict=False) for part in (text or "").split(",") if part.strip()]


def _status(code, reason, detail, retry_after=None):
    body = ('{"detail": "%s"}' % detail).encode()
    head = "HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n%s\r\n" % (
        code, reason, len(body), "retry-after: %d\r\n" % retry_after if retry_after else "")
    return head.encode() + body


FULL = _status(503, "Service Unavailable", "too many open connections; try again in a second", retry_after=1)
FULL_FOR_ADDRESS = _status(503, "Service Unavailable", "too many open connections from your address; close some, "
                           "or try again in a second", retry_after=1)
SLOW_HEADERS = _status(408, "Request Timeout", "the request headers did not arrive in time; send them again")
LARGE_HEADERS = _status(431, "Request Header Fields Too Large", "the request line and headers exceed %d bytes"
                        % MAX_HEADER_BYTES)


class Guard:
    """The limits above and the counts they need, shared by every connection of one server."""

    def __init__(self, header_timeout, max_connections, max_per_address, trusted=()):
        self.header_timeout = float(header_timeout)
        self.max_connections = int(max_connections)
        self.max_per_address = int(max_per_address)
        self.trusted = list(trusted)
        self.per_address = collections.Counter()
        self.open = 0
        self.refused = collections.Counter()  # reason -> connections closed by this guard (for the log and tests)

    def exempt(self, host):
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in net for net in self.trusted)

    def protocol(self, base):
        """A subclass of uvicorn's HTTP protocol class ``base`` that keeps these limits."""
        guard = self

        class Guarded(base):
            _guard_host = None
            _guard_timer = None
            _guard_bytes = 0
            _guard_cycle = None

            def connection_made(self, transport):
                base.connection_made(self, transport)
                host = self.client[0] if self.client else "?"
                if guard.open >= guard.max_connections:
                    return self._guard_refuse(FULL, "max_connections")
                if guard.per_address[host] >= guard.max_per_address and not guard.exempt(host):
                    return self._guard_refuse(FULL_FOR_ADDRESS, "max_connections_per_address")
                guard.open += 1
                guard.per_address[host] += 1
                self._guard_host = host
                self._guard_arm()

            def _guard_refuse(self, answer, reason):
                guard.refused[reason] += 1
                self.transport.write(answer)
                self.transport.close()

            def _guard_arm(self):
                self._guard_disarm()
                self._guard_bytes = 0
                self._guard_cycle = self.cycle
                self._guard_timer = self.loop.call_later(guard.header_timeout, self._guard_expired)

            def _guard_disarm(self):
                if self._guard_timer is not None:
                    self._guard_timer.cancel()
                    self._guard_timer = None

            def _guard_expired(self):
                self._guard_timer = None
                if self.transport.is_closing():
                    return
                guard.refused["header_timeout"] += 1
                if self._guard_bytes:
                    self.transport.write(SLOW_HEADERS)
                self.transport.close()

            def data_received(self, data):
                base.data_received(self, data)
                if self._guard_timer is None:
                    return
                if self.cycle is not self._guard_cycle:  # a request's headers are complete: it is the app's now
                    self._guard_disarm()
                    return
                self._guard_bytes += len(data)
                if self._guard_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
                    self._guard_disarm()
                    guard.refused["header_bytes"] += 1
                    self.transport.write(LARGE_HEADERS)
                    self.transport.close()

            def on_response_complete(self):
                base.on_response_complete(self)
                if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                    return  # closing, or a pipelined request already started
                self._guard_arm()  # the next request's headers are due within the deadline too

            def connection_lost(self, exc):
                self._guard_disarm()
                if self._guard_host is not None:
                    guard.open -= 1
                    guard.per_address[self._guard_host] -= 1
                    if not guard.per_address[self._guard_host]:
                        del guard.per_address[self._guard_host]
                    self._guard_host = None
                base.connection_lost(self, exc)

        Guarded.__name__ = Guarded.__qualname__ = "Guarded" + base.__name__
        return Guarded
