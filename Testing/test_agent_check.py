"""HAProxy's agent-check (``--agent-port``): the server answers each TCP connection with one line that tells the
balancer its free capacity (``up ready N%``), or ``up drain`` when it is full or shutting down; ``/healthz`` stays
200 when merely full (so sticky sessions keep their server); ``/x/info`` and ``/metrics`` report the same figure.

One server process (the quiet model, two session slots, an agent port) for the module; the draining line and the
weight's GPU-queue discount are checked on the listener itself, in this process, over a real socket; and the real
HAProxy (where the Debian package is installed) reads the server's agent: weight, drain, ready again.
"""

import asyncio
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from conftest import REPO, SERVER_ENV, free_port, our_server

sys.path.insert(0, os.path.join(REPO, "server"))  # this tree's server, not an installed copy

from SlicerNNInteractiveLib import protocol as P  # noqa: E402
from SlicerNNInteractiveLib.client import RemoteSession  # noqa: E402
from nninteractive_slicer_server import capacity  # noqa: E402

KEY = "agent-key"
AUTH = {"Authorization": "Bearer " + KEY}
# What HAProxy accepts (configuration manual, "agent-check"): words separated by spaces, tabs or commas, ended by the
# first \r or \n; ours are "up", "ready" / "drain" and a percentage.
LINE = re.compile(r"^(up ready (100|[1-9][0-9]?)%|up drain)\n$")


def agent_line(port, send=None):
    """Connect like HAProxy (optionally sending an agent-send string first), read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        if send is not None:
            s.sendall(send)
        data = b""
        while b"\n" not in data:
            chunk = s.recv(100)
            if not chunk:
                break
            data += chunk
        s.shutdown(socket.SHUT_WR)  # HAProxy closes once it has the line; the server then closes too
        while True:
            chunk = s.recv(100)
            if not chunk:
                break
            data += chunk
    text = data.decode("ascii")
    assert LINE.match(text), repr(text)
    return text


@pytest.fixture(scope="module")
def served(quiet_model, tmp_path_factory):
    agent = free_port()
    with our_server(quiet_model, tmp_path_factory.mktemp("agent"), "--api-key", KEY, "--max-sessions", "2",
                    "--agent-port", str(agent)) as (url, _):
        yield url, agent


def info(url):
    return requests.get(url + P.PATH_SERVER_INFO, headers=AUTH).json()["capacity"]


def metric(url, name):
    text = requests.get(url + P.PATH_METRICS, headers=AUTH).text
    return float(re.search(r"^%s (\S+)$" % name, text, re.M).group(1))


def test_free_then_full_then_free_again(served):
    url, agent = served
    assert agent_line(agent) == "up ready 100%\n"
    assert info(url) == {"free_sessions": 2, "max_sessions": 2, "gpu_queue": 0, "weight": 100, "state": "ready"}
    a = RemoteSession(url, api_key=KEY)
    b = None
    try:
        assert agent_line(agent) == "up ready 50%\n"
        assert agent_line(agent, send=b"backend/server1\n") == "up ready 50%\n"  # agent-send is read and ignored
        assert metric(url, "nninteractive_free_sessions") == 1
        assert metric(url, "nninteractive_capacity_weight") == 50
        b = RemoteSession(url, api_key=KEY)
        assert agent_line(agent) == "up drain\n"  # full: no new sessions, sticky ones continue
        assert info(url) == {"free_sessions": 0, "max_sessions": 2, "gpu_queue": 0, "weight": 0, "state": "full"}
        assert metric(url, "nninteractive_capacity_weight") == 0
        health = requests.get(url + P.PATH_HEALTHZ)
        assert health.status_code == 200 and health.json() == {"ok": True}  # full is not unhealthy
        a.lease_status()  # the sessions it holds keep working
        b.close(wait=True)
        b = None
        assert agent_line(agent) == "up ready 50%\n"  # "ready" cancels the drain in HAProxy
    finally:
        a.close(wait=True)
        if b is not None:
            b.close(wait=True)
    assert agent_line(agent) == "up ready 100%\n"


class _Registry:
    def __init__(self, max_sessions, held):
        self.max_sessions, self.held = max_sessions, held

    def free(self):
        return self.max_sessions - self.held


class _Srv:
    """What ``capacity`` reads of ``app.Server``: the registry, the GPU queue's length, draining."""

    def __init__(self, max_sessions=4, held=0, queued=0, draining=False):
        self.registry = _Registry(max_sessions, held)
        self.engine = type("Engine", (), {"queue": [None] * queued})()
        self.draining = draining


@pytest.fixture(scope="module")
def listener():
    """``capacity.start_agent`` on an event loop in a thread, answering for whichever ``_Srv`` is in ``box``."""
    box = {}

    class Proxy:
        def __getattr__(self, name):
            return getattr(box["srv"], name)

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    port = free_port()
    server = asyncio.run_coroutine_threadsafe(capacity.start_agent(Proxy(), "127.0.0.1", port), loop).result(30)
    yield box, port
    loop.call_soon_threadsafe(server.close)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_draining_answers_drain_even_with_free_slots(listener):
    box, port = listener
    box["srv"] = _Srv(max_sessions=4, held=1, draining=True)
    assert agent_line(port) == "up drain\n"
    assert capacity.free_capacity(box["srv"])["state"] == "draining"


def test_a_long_gpu_queue_lowers_the_weight(listener):
    box, port = listener
    box["srv"] = _Srv(max_sessions=4, held=0, queued=1)  # one running, none waiting: no discount
    assert agent_line(port) == "up ready 100%\n"
    box["srv"] = _Srv(max_sessions=4, held=2, queued=3)  # half the slots, two waiting behind the running one
    assert agent_line(port) == "up ready 17%\n"
    box["srv"] = _Srv(max_sessions=100, held=99, queued=50)  # never below 1 while a slot is free
    assert agent_line(port) == "up ready 1%\n"
    box["srv"] = _Srv(max_sessions=4, held=4, queued=0)
    assert agent_line(port) == "up drain\n"


def test_agent_port_is_checked_before_the_model_loads(quiet_model):
    p = subprocess.run([sys.executable, "-m", "nninteractive_slicer_server", "--model-dir", quiet_model, "--device",
                        "cpu", "--port", "1600", "--agent-port", "1600"], capture_output=True, text=True,
                       env=SERVER_ENV, timeout=120)
    assert p.returncode == 2 and "--agent-port must be between 1 and 65535, and not --port" in p.stderr, p.stderr


HAPROXY = "/usr/sbin/haproxy"


@pytest.mark.skipif(not os.access(HAPROXY, os.X_OK), reason="HAProxy (the Debian package) is not installed")
def test_haproxy_reads_the_agent(served, tmp_path):
    """The real HAProxy (the loopback scale-out test runs the shipped configuration; this one only the agent-check):
    the weight follows the free slots, a full server is put in drain (admin state: forced drain) and back."""
    url, agent = served
    sock = str(tmp_path / "stats.sock")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text("global\n    stats socket %s level admin\ndefaults\n    mode http\n    timeout connect 1s\n"
                   "    timeout client 5s\n    timeout server 5s\nbackend gpus\n    balance leastconn\n"
                   "    server gpu0 127.0.0.1:%s weight 100 check inter 100ms agent-check agent-port %d "
                   "agent-inter 100ms\nfrontend fe\n    bind 127.0.0.1:%d\n    default_backend gpus\n"
                   % (sock, url.rsplit(":", 1)[1], agent, free_port()))
    proc = subprocess.Popen([HAPROXY, "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def state():
        """(user weight, forced drain) of gpu0, from HAProxy's "show servers state"."""
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(sock)
                s.sendall(b"show servers state gpus\n")
                data = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        except OSError:
            return None
        for line in data.decode().splitlines():
            f = line.split()
            if len(f) > 8 and f[3] == "gpu0":  # be_id be_name srv_id srv_name srv_addr op_state admin_state uweight
                return int(f[7]), bool(int(f[6]) & 0x08)  # SRV_ADMF_FDRAIN
        return None

    def until(expected):
        for _ in range(600):  # polled, never timed: HAProxy asks the agent every 100 ms
            if state() == expected:
                return True
            assert proc.poll() is None, "haproxy exited with %s" % proc.returncode
            time.sleep(0.05)
        raise AssertionError("HAProxy's view of gpu0 stayed %s, expected %s" % (state(), expected))

    sessions = []
    try:
        until((100, False))
        sessions.append(RemoteSession(url, api_key=KEY))
        until((50, False))
        sessions.append(RemoteSession(url, api_key=KEY))
        until((50, True))  # full: drained, the weight as it was
        sessions.pop().close(wait=True)
        until((50, False))  # "ready" took it out of drain
    finally:
        for s in sessions:
            s.close(wait=True)
        proc.terminate()
        proc.wait(10)
