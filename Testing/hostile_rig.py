"""The attacks of issue 16, as tools: used by ``test_hostile.py`` (what the server answers) and
``benchmark/hostile.py`` (what each attack costs). Everything on loopback: an attacker connects from another
address of 127/8 (all of it is this machine), so per-address limits tell it from the tests' own 127.0.0.1.
"""

import http.client
import os
import re
import socket
import threading
import time

import numpy as np

from SlicerNNInteractiveLib import protocol as P
from SlicerNNInteractiveLib.wire import LOOPBACK_IMAGE_CODEC, pack_array

IMAGE = (112, 112, 112)  # float32, stored: 5.4 MiB on the wire (more than the 4 MiB the server reads before decoding)


def sigcgt(pid):
    """The signals process ``pid`` catches (a bit mask), or 0 while it is not a Python process yet."""
    try:
        with open("/proc/%d/status" % pid) as f:
            status = f.read()
    except OSError:
        return 0
    if not re.search(r"^Name:\s*python", status, re.M):
        return 0
    return int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M).group(1), 16)


def raw(source, port, data, read=True, timeout=10.0):
    """Connect from ``source`` (a loopback address), send ``data``, and read until the server closes: the bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as s:
        if data:
            s.sendall(data)
        out = b""
        while read:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        return out


def status_of(answer):
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else None


def open_idle(port, source, count):
    """``count`` connections from ``source`` that send nothing."""
    return [socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
            for _ in range(count)]


def first_bytes(s):
    """What the server sends first on ``s`` (b"" when it closes without a word)."""
    try:
        return s.recv(4096)
    except OSError:
        return b""


def read_answer(s):
    """One HTTP answer from ``s`` (until its Content-Length, or the close)."""
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return out
        out += chunk
        head, sep, body = out.partition(b"\r\n\r\n")
        length = re.search(rb"content-length: (\d+)", head, re.I)
        if sep and length and len(body) >= int(length.group(1)):
            return out


def image_body(seed):
    """A 112^3 float32 image, packed as our client sends one to a server on the same machine (stored)."""
    return pack_array(np.random.RandomState(seed).normal(100, 20, IMAGE).astype(np.float32)[None],
                      **LOOPBACK_IMAGE_CODEC)


def stalled_upload(port, token, lease, sent=4608 << 10):
    """A set_image whose packed header and first ``sent`` bytes are sent, the rest never: it holds its memory
    reservation until the server gives up on it. Returns the open socket."""
    body = image_body(3)
    head = ("POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n%s: %s\r\nX-Meta: {}\r\n"
            "Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n"
            % (P.PATH_SET_IMAGE, token, P.LEASE_HEADER, lease, len(body))).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=120)
    s.sendall(head + body[:sent])
    return s


def slow_headers(port, source, interval=0.05, limit=1000, timeout=120):
    """Send a request's headers one byte every ``interval`` s (at most ``limit`` bytes), then wait up to ``timeout``
    s: (what the server answered, seconds until it closed or the wait ended)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        out = b""
        try:
            for c in b"X-Slow: " + b"a" * limit:
                s.sendall(bytes([c]))
                time.sleep(interval)
        except OSError:
            pass  # closed by the server
        try:
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                out += chunk
        except OSError:
            pass
    return out, time.monotonic() - started


class Flood(threading.Thread):
    """Requests with guessed tokens (``NAME.<random>``) from ``source``, in ``threads`` threads, until stopped;
    counts the answers by status."""

    def __init__(self, port, source, name, threads=4):
        threading.Thread.__init__(self, daemon=True)
        self.port, self.source, self.name, self.threads = port, source, name, threads
        self.stop, self.statuses, self.mu = threading.Event(), {}, threading.Lock()

    def count(self):
        with self.mu:
            return sum(self.statuses.values())

    def _connection(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60, source_address=(self.source, 0))

    def one(self, i):
        n = 0
        while not self.stop.is_set():
            n += 1
            conn = self._connection()  # the gate closes a refused connection: a new one each time
            try:
                conn.request("GET", P.PATH_CAPABILITIES, headers={
                    "Authorization": "Bearer %s.guess-%d-%d-%s" % (self.name, i, n, os.urandom(8).hex())})
                r = conn.getresponse()
                r.read()
                status = r.status
            except (OSError, http.client.HTTPException):
                status = "dropped"
            finally:
                conn.close()
            with self.mu:
                self.statuses[status] = self.statuses.get(status, 0) + 1

    def run(self):
        workers = [threading.Thread(target=self.one, args=(i,), daemon=True) for i in range(self.threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    def __enter__(self):
        self.start()
        deadline = time.monotonic() + 60
        while self.count() < 20:
            if time.monotonic() > deadline:
                raise AssertionError("the flood did not start: %s" % self.statuses)
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.join(60)
