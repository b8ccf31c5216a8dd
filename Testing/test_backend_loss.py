"""Recovery from a lost backend: a prompt in flight when the server holding its session dies (its connection dropped,
or a balancer's 502 / 503 / 504) is recovered like an expired session: a new session, the image and the segment
again, the prompt once more. The user sees one slower prompt, not an error; no prompt is applied twice to a session.

Two server processes (A, the victim, and B, the survivor; a model slow enough on one CPU thread that a prompt is seen
running) sit behind ``Forwarder``, a TCP proxy this module runs in place of a balancer (HAProxy itself is tested by
the loopback scale-out test): each client connection goes to the first backend that accepts it, a backend that
refused a connection or was cut is never tried again, and a connection whose backend ends while the client waits is
closed or answered 502, as HAProxy does. Every mask is compared with an in-process session given the same image,
segment and prompt. The last test kills A. Error mapping and the one-recovery rule are also checked without servers.
"""

import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import our_server

from SlicerNNInteractiveLib import protocol as P
from SlicerNNInteractiveLib.client import RemoteSession, _Http
from SlicerNNInteractiveLib.controller import Controller
from SlicerNNInteractiveLib.errors import (BackendLostError, ServerAtCapacityError, ServerError,
                                           ServerUnreachableError, SessionExpiredError)
from SlicerNNInteractiveLib.scene import ArrayScene
from SlicerNNInteractiveLib.sync import SyncedSession

SHAPE = (64, 64, 64)
POINT = (30, 30, 30)
SECOND = (24, 36, 30)
DEADLINE = 120.0  # for waits that normally end in seconds; never asserted on


def make_image():
    img = np.random.RandomState(0).normal(100, 20, SHAPE)
    img[20:40, 20:40, 20:40] += 300
    return img.astype(np.int16)


def make_segment():
    seg = np.zeros(SHAPE, np.uint8)
    seg[25:35, 25:35, 25:35] = 1  # drawn by hand before the prompt: must survive the recovery
    return seg


# ---------------------------------------------------------------- the stand-in balancer


_PAGE = (b"<html><body><h1>502 Bad Gateway</h1>\nThe server returned an invalid or incomplete response.\n"
         b"</body></html>\n")
BAD_GATEWAY = (b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
               % len(_PAGE)) + _PAGE


class Forwarder:
    """A loopback TCP proxy standing in for a balancer (see the module docstring). ``mode``: "close" (the client's
    connection is closed when its backend's ends) or "502" (a client waiting for an answer gets 502 Bad Gateway
    first). ``conns``: one ``[backend index, bytes the client sent]`` per connection."""

    def __init__(self, backends, mode="close"):
        self.backends = [("127.0.0.1", int(url.rsplit(":", 1)[1])) for url in backends]
        self.mode = mode
        self.dead = set()
        self.conns = []
        self._upstream = {}  # backend index -> its live sockets
        self._mu = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        self._listener.close()

    def cut(self, index):
        """Take backend ``index`` out and break its connections (a network failure; the process lives on)."""
        with self._mu:
            self.dead.add(index)
            socks = list(self._upstream.get(index, ()))
        for s in socks:
            _quietly(s.shutdown, socket.SHUT_RDWR)

    def _accept(self):
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _connect(self):
        for i, address in enumerate(self.backends):
            if i in self.dead:
                continue
            try:
                return i, socket.create_connection(address, timeout=10)
            except OSError:
                with self._mu:
                    self.dead.add(i)  # refused: its process is gone
        return None, None

    def _serve(self, client):
        index, upstream = self._connect()
        if upstream is None:
            client.close()
            return
        upstream.settimeout(None)
        record = [index, bytearray()]
        state = {"waiting": False}
        with self._mu:
            self.conns.append(record)
            self._upstream.setdefault(index, set()).add(upstream)

        def client_to_backend():
            try:
                while True:
                    data = client.recv(65536)
                    if not data:
                        break
                    record[1] += data
                    state["waiting"] = True
                    upstream.sendall(data)
            except OSError:
                pass
            _quietly(upstream.shutdown, socket.SHUT_WR)

        threading.Thread(target=client_to_backend, daemon=True).start()
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                state["waiting"] = False
                client.sendall(data)
        except OSError:
            pass
        if self.mode == "502" and state["waiting"]:
            _quietly(client.sendall, BAD_GATEWAY)
        with self._mu:
            self._upstream[index].discard(upstream)
        _quietly(client.shutdown, socket.SHUT_RDWR)
        client.close()
        upstream.close()

    def sent_to(self, index):
        """What clients sent to backend ``index``, one bytes per connection."""
        with self._mu:
            return [bytes(data) for i, data in self.conns if i == index]


def _quietly(fn, *args):
    try:
        fn(*args)
    except OSError:
        pass


# ---------------------------------------------------------------- servers, the oracle


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    """Random weights predicting input-dependent speckle (so a prompt applied twice shows), big enough (96^3 patch,
    32-64-128 features) that a prediction takes seconds on one CPU thread: it is seen running when the backend dies."""
    from tiny_models import make_random_model

    return make_random_model(str(tmp_path_factory.mktemp("slow")), features=(32, 64, 128), patch_size=(96, 96, 96),
                             background_bias=None)


FLAGS = ("--torch-n-threads", "1", "--no-autozoom", "--liveness-timeout-seconds", "5")  # orphans are soon reaped


@pytest.fixture(scope="module")
def servers(slow_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("backends")
    with our_server(slow_model, tmp, "--max-sessions", "3", *FLAGS) as (a, proc_a):
        with our_server(slow_model, tmp, "--max-sessions", "4", *FLAGS) as (b, _):
            yield a, proc_a, b


@pytest.fixture(scope="module")
def expected(slow_model):
    """The oracle, from in-process sessions given the image, a segment as the initial segmentation, and prompts:
    ``[0]``: the drawn segment and POINT; ``[1]``: that result and SECOND; ``[2]``: the drawn segment, POINT and
    SECOND in one session (the controller replays its segment's prompts on a new session: history.py)."""
    import torch
    from nnInteractive.inference.inference_session import nnInteractiveInferenceSession

    def run(segment, points):
        s = nnInteractiveInferenceSession(device=torch.device("cpu"), use_torch_compile=False, verbose=False,
                                          torch_n_threads=1, do_autozoom=False)
        s.initialize_from_trained_model_folder(slow_model)
        s.set_image(make_image()[None])
        buf = np.zeros(SHAPE, np.uint8)
        s.set_target_buffer(buf)
        s.add_initial_seg_interaction(segment, run_prediction=False)
        for point in points:
            s.add_point_interaction(point, include_interaction=True)
        return buf.copy()

    first = run(make_segment(), [POINT])
    second = run(first, [SECOND])
    both = run(make_segment(), [POINT, SECOND])
    # each prompt changes the segment (applying one twice would show), and so does the replayed first prompt
    assert (first != make_segment()).sum() > 1000 and (second != first).sum() > 1000
    assert not np.array_equal(both, second)
    return [first, second, both]


def scrape(url):
    samples = {}
    for family in text_string_to_metric_families(requests.get(url + P.PATH_METRICS).text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def requests_to(samples, endpoint):
    """Answered requests to ``endpoint`` with status 200, from a scrape."""
    return sum(v for (name, labels), v in samples.items() if name == "nninteractive_http_requests_total"
               and dict(labels).get("endpoint") == endpoint and dict(labels).get("status") == "200")


def gpu_queue(url):
    try:
        return scrape(url).get(("nninteractive_gpu_queue_length", ()), 0)
    except requests.RequestException:
        return 0


def wait_until(predicate, what):
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("gave up waiting for " + what)
        time.sleep(0.02)


class Background(threading.Thread):
    """``fn()`` on another thread (as the module's worker runs prompts); keeps its result or error."""

    def __init__(self, fn):
        threading.Thread.__init__(self, daemon=True)
        self.fn, self.result, self.error = fn, None, None
        self.start()

    def run(self):
        try:
            self.result = self.fn()
        except Exception as exc:  # reported by the test
            self.error = exc


# ---------------------------------------------------------------- through the stand-in balancer


def test_a_502_from_the_balancer_is_recovered_on_another_server_without_the_old_cookie(servers, expected):
    a, _, b = servers
    fwd = Forwarder([a, b], mode="502")
    made = []

    def connect():
        made.append(RemoteSession(fwd.url))
        return made[-1]

    sync = SyncedSession(connect)
    try:
        sync.session  # claimed on A
        # A balancer's stickiness cookie, as HAProxy's "cookie SERVERID insert" sets it at claim time.
        made[0]._http._session.cookies.set("SERVERID", "a")
        made[0].heartbeat()  # on the heartbeat's own connection, which shares the jar
        before, before_a = scrape(b), scrape(a)
        image, segment = make_image(), make_segment()
        prompt = Background(lambda: sync.prompt_and_apply("point", {"coordinates": POINT}, image, segment))

        def predicting():  # the segment was sent (it too waits in the GPU queue), then the prompt runs
            now = scrape(a)
            seg = "/add_initial_seg_interaction"
            sent = requests_to(now, seg) > requests_to(before_a, seg)
            return sent and now.get(("nninteractive_gpu_queue_length", ()), 0) >= 1

        wait_until(lambda: predicting() or not prompt.is_alive(), "the prompt to run on A")
        assert prompt.is_alive(), prompt.error
        fwd.cut(0)  # A unreachable: the waiting prompt gets 502 Bad Gateway
        prompt.join(DEADLINE)
        after = scrape(b)
    finally:
        sync.close()
        fwd.close()
    assert prompt.error is None, prompt.error  # recovered: no error for the user
    assert np.array_equal(segment, expected[0]), "%d voxels differ" % (segment != expected[0]).sum()
    assert sync.recoveries == 1 and "HTTP 502 to /add_point_interaction" in sync.last_recovery, sync.last_recovery
    assert len(made) == 2 and sync.uploads == {"image": 2, "segment": 2}  # a new session got both again
    assert requests_to(after, "/claim") - requests_to(before, "/claim") == 1
    assert requests_to(after, "/add_point_interaction") - requests_to(before, "/add_point_interaction") == 1
    assert requests_to(after, "/add_initial_seg_interaction") - requests_to(before, "/add_initial_seg_interaction") == 1
    # The cookie went to A (the heartbeat's connection too); the claim on B did not carry it.
    assert any(b"POST /add_point_interaction" in data and b"SERVERID=a" in data for data in fwd.sent_to(0))
    assert any(b"POST /heartbeat" in data and b"SERVERID=a" in data for data in fwd.sent_to(0))
    claims = [data for data in fwd.sent_to(1) if b"POST /claim" in data]
    assert claims and not any(b"SERVERID=a" in data for data in claims)
    assert not made[1]._http._session.cookies.get("SERVERID")


def test_a_killed_server_s_clients_continue_on_the_other_one(servers, expected):
    """A SyncedSession and the library's Controller each made a first prompt on A; each has its second in flight
    (one running, one waiting in A's GPU queue) when A's process is killed: both finish on B, with the segment as
    the first prompt left it (the controller also with the first prompt, replayed from its history), and the second
    prompt applied once."""
    a, proc_a, b = servers
    fwd = Forwarder([a, b])
    image = make_image()
    sync = SyncedSession(lambda: RemoteSession(fwd.url))
    scene = ArrayScene(image, {"drawn": make_segment()})
    scene.select_segment("drawn")
    errors, log = [], []
    controller = Controller(scene, lambda: RemoteSession(fwd.url), on_error=lambda exc, job, n: errors.append(exc),
                            log=log.append)
    try:
        segment = make_segment()
        sync.prompt_and_apply("point", {"coordinates": POINT}, image, segment)
        controller.submit("point", {"coordinates": POINT}, positive=True)
        controller.wait(DEADLINE)
        assert not errors and np.array_equal(segment, expected[0])
        assert np.array_equal(scene.read_segment("drawn"), expected[0])
        before = scrape(b)
        # Both servers' state is in step: the second prompts send nothing but the prompt.
        controller.submit("point", {"coordinates": SECOND}, positive=True)
        wait_until(lambda: gpu_queue(a) >= 1 or not controller.busy, "the controller's prompt to run on A")
        prompt = Background(lambda: sync.prompt_and_apply("point", {"coordinates": SECOND}, image, segment))
        wait_until(lambda: gpu_queue(a) >= 2 or not prompt.is_alive(), "the second prompt to wait on A")
        assert controller.busy and prompt.is_alive(), (errors, prompt.error)
        proc_a.send_signal(signal.SIGKILL)
        proc_a.wait(30)
        prompt.join(DEADLINE)
        controller.wait(DEADLINE)
        after = scrape(b)
    finally:
        controller.close()
        sync.close()
        fwd.close()
    assert prompt.error is None and not errors, (prompt.error, errors)
    assert np.array_equal(segment, expected[1]), "%d voxels differ" % (segment != expected[1]).sum()
    drawn = scene.read_segment("drawn")
    assert np.array_equal(drawn, expected[2]), "%d voxels differ" % (drawn != expected[2]).sum()
    assert sync.recoveries == 1 and controller.sync.recoveries == 1 and controller.sync.replays == 1
    for why in (sync.last_recovery, controller.sync.last_recovery):  # the dropped connection, not a later 410
        assert "broke during /add_point_interaction" in why, why
    assert sync.uploads == {"image": 2, "segment": 2}  # the image and the segment again, to B
    assert isinstance(controller.timings[-1].get("recovered"), str)
    assert any("continued on a new one" in line for line in log), log
    assert requests_to(after, "/claim") - requests_to(before, "/claim") == 2
    assert requests_to(after, "/add_initial_seg_interaction") - requests_to(before, "/add_initial_seg_interaction") == 2
    # the two second prompts, and the controller's first one replayed (without a prediction)
    assert requests_to(after, "/add_point_interaction") - requests_to(before, "/add_point_interaction") == 3
    assert fwd.dead == {0}


# ---------------------------------------------------------------- the mapping, without servers


class _Stub(BaseHTTPRequestHandler):
    """Answers every request with ``server.answer``: (status, content type, body)."""

    def _answer(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, ctype, body = self.server.answer
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def http(url, lease=True):
    h = _Http(url, None, 5.0, 5.0)
    if lease:
        h.headers[P.LEASE_HEADER] = "some-lease"
    return h


@pytest.mark.parametrize("status", [502, 503, 504])
def test_a_balancer_s_gateway_error_on_a_session_request_is_a_lost_backend(stub, status):
    url = "http://127.0.0.1:%d" % stub.server_address[1]
    stub.answer = (status, "text/html", b"<html><body><h1>%d</h1>No server is available</body></html>" % status)
    with pytest.raises(BackendLostError) as e:
        http(url).call("POST", P.PATH_ADD_POINT, data=b"{}", json_type=True)
    assert "HTTP %d" % status in str(e.value)
    assert isinstance(e.value, SessionExpiredError) and isinstance(e.value, ServerUnreachableError)
    # Without a session (the claim, a connection test) it is not a session that was lost.
    with pytest.raises(ServerAtCapacityError if status == 503 else ServerUnreachableError) as e:
        http(url).call("POST", P.PATH_CLAIM)
    assert not isinstance(e.value, BackendLostError)
    with pytest.raises(ServerUnreachableError) as e:
        http(url, lease=False).call("GET", P.PATH_CAPABILITIES)
    assert not isinstance(e.value, BackendLostError)


def test_our_server_s_own_503_is_not_a_lost_backend(stub):
    url = "http://127.0.0.1:%d" % stub.server_address[1]
    stub.answer = (503, "application/json", b'{"detail":"the memory budget is held by other sessions"}')
    with pytest.raises(ServerError) as e:
        http(url).call("POST", P.PATH_SET_IMAGE, data=b"x", meta={})
    assert not isinstance(e.value, SessionExpiredError)


def test_a_refused_or_dropped_connection_of_a_session_is_a_lost_backend():
    listener = socket.create_server(("127.0.0.1", 0))
    url = "http://127.0.0.1:%d" % listener.getsockname()[1]

    def drop():  # accept, read the request, close without an answer (a server killed mid-request)
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.close()

    t = threading.Thread(target=drop, daemon=True)
    t.start()
    with pytest.raises(BackendLostError) as e:
        http(url).call("POST", P.PATH_ADD_POINT, data=b"{}", json_type=True)
    assert "broke during /add_point_interaction" in str(e.value)
    t.join(10)
    listener.close()  # now nothing listens: refused
    with pytest.raises(BackendLostError):
        http(url).call("POST", P.PATH_ADD_POINT, data=b"{}", json_type=True)
    with pytest.raises(ServerUnreachableError) as e:
        http(url).call("POST", P.PATH_CLAIM)
    assert not isinstance(e.value, BackendLostError)


class FakeSession:
    """What SyncedSession uses of a RemoteSession; ``fail`` raises on the prompt. Records every call."""

    supports_undo = True

    def __init__(self, fail=None):
        self.fail, self.calls, self.closed = fail, [], False
        self.last_timing, self.last_bbox, self.last_region = {}, None, None

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)

        def record(*args, **kwargs):
            self.calls.append(name)
            if name == "add_point_interaction" and self.fail is not None:
                raise self.fail
            if name == "add_point_interaction":
                self.last_bbox, self.last_region = [[0, 1]] * 3, np.ones((1, 1, 1), np.uint8)
            return False

        return record

    def close(self):
        self.closed = True


def test_at_most_one_recovery_per_call_and_never_a_retry_on_the_same_session():
    lost = BackendLostError("lost")
    sessions = []

    def connect(plan):
        fail = plan[len(sessions)]
        sessions.append(FakeSession(fail))
        return sessions[-1]

    image, segment = make_image(), make_segment()
    sync = SyncedSession(lambda: connect([lost, None]))
    result = sync.prompt("point", {"coordinates": POINT}, image, segment)
    assert result.region is not None and result.timings["recovered"] == "lost"
    assert [s.calls.count("add_point_interaction") for s in sessions] == [1, 1]  # once per session, never twice
    assert sessions[0].closed and not sessions[1].closed
    assert sessions[1].calls[:3] == ["set_image", "declare_target_buffer", "add_initial_seg_interaction"]

    sessions.clear()
    sync = SyncedSession(lambda: connect([lost, lost, None]))
    with pytest.raises(BackendLostError):
        sync.prompt("point", {"coordinates": POINT}, image, segment)
    assert len(sessions) == 2 and sync.recoveries == 1
    # undo and reset on a lost session only drop it: the next prompt claims anew and sends the segment
    sync = SyncedSession(lambda: connect([None, None, None]))
    sessions.clear()
    sync.prompt("point", {"coordinates": POINT}, image, segment)
    sessions[0].undo = lambda: (_ for _ in ()).throw(BackendLostError("lost during undo"))
    assert sync.undo() is None and sessions[0].closed and not sync.connected
    sync.prompt("point", {"coordinates": POINT}, image, segment)
    assert len(sessions) == 2 and sync.uploads["segment"] == 2


def test_the_claim_after_a_recovery_is_tried_again_while_no_server_answers(monkeypatch):
    """While a server dies a balancer may still send a claim there (accepted, then reset): after a recovery the claim
    is tried again; the first claim of all is not (the user learns at once that no server answers)."""
    import SlicerNNInteractiveLib.sync as sync_module

    monkeypatch.setattr(sync_module, "RECLAIM_DELAYS", (0.0, 0.0))
    image, segment = make_image(), make_segment()
    plan = [BackendLostError("lost"), ServerUnreachableError("reset"), ServerUnreachableError("502"), None]
    sessions = []

    def connect():
        step = plan.pop(0)
        if isinstance(step, ServerUnreachableError) and not isinstance(step, BackendLostError):
            raise step
        sessions.append(FakeSession(step))
        return sessions[-1]

    sync = SyncedSession(connect)
    sync.prompt("point", {"coordinates": POINT}, image, segment)
    assert not plan and len(sessions) == 2 and sync.recoveries == 1
    assert [s.calls.count("add_point_interaction") for s in sessions] == [1, 1]

    plan[:] = [ServerUnreachableError("refused"), None]
    with pytest.raises(ServerUnreachableError):
        SyncedSession(connect).prompt("point", {"coordinates": POINT}, image, segment)
    assert plan == [None]

