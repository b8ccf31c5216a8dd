"""Leases: capacity, release, idle and liveness reaping, isolation between sessions, API keys."""

import signal
import threading
import time

import numpy as np
import pytest
import requests

from conftest import our_server
from test_equivalence import make_image

from SlicerNNInteractiveLib.client import RemoteSession
from SlicerNNInteractiveLib.errors import ServerAtCapacityError, SessionExpiredError, UnauthorizedError

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def served(speckle_model, tmp_path_factory):
    with our_server(speckle_model, tmp_path_factory.mktemp("leases"), "--no-autozoom", "--max-sessions", "2",
                    "--idle-timeout-seconds", "4", "--liveness-timeout-seconds", "1.5", "--api-key", KEY) as served:
        yield served


@pytest.fixture
def server(served):
    return served[0]


def test_capacity_and_release(server):
    a = RemoteSession(server, api_key=KEY)
    b = RemoteSession(server, api_key=KEY)
    with pytest.raises(ServerAtCapacityError) as err:
        RemoteSession(server, api_key=KEY)
    assert err.value.retry_after == 10
    assert "max-sessions" in str(err.value)
    raw = requests.post(server + "/claim", headers={"Authorization": "Bearer " + KEY})
    assert raw.status_code == 503 and raw.headers["Retry-After"] == "10"
    a.close()  # returns at once; the release runs in the background
    c = claim_when_free(server)  # the released slot is free again (a retry or two at most)
    # release is idempotent
    assert requests.post(server + "/release", headers={"Authorization": "Bearer " + KEY,
                                                        "X-Lease-Token": "no-such-lease"}).status_code == 200
    b.close(wait=True)
    c.close(wait=True)


def claim_when_free(server, attempts=50):
    for _ in range(attempts):
        try:
            return RemoteSession(server, api_key=KEY)
        except ServerAtCapacityError:
            time.sleep(0.05)
    raise AssertionError("the released slot never became free")


def test_close_waits_for_nothing_and_never_claims_again(served):
    """A client closed while its upload is in flight and its server cannot answer (stopped with SIGSTOP): close()
    returns all the same, the lease is released once the server answers again, and the upload's failure claims no
    new session (both slots come back free)."""
    server, proc = served
    from SlicerNNInteractiveLib.sync import SyncedSession

    claims = []

    def connect():
        claims.append(RemoteSession(server, api_key=KEY))
        return claims[-1]

    sync = SyncedSession(connect)
    image = np.random.default_rng(0).random((64, 64, 64), dtype=np.float32)

    worker = threading.Thread(target=lambda: _swallow(sync.prompt, "point", {"coordinates": (5, 5, 5)}, image,
                                                      np.zeros(image.shape, np.uint8)))
    worker.start()
    while not claims:
        time.sleep(0.01)
    proc.send_signal(signal.SIGSTOP)  # the server answers nothing until SIGCONT: a release that waited would hang
    try:
        closing = threading.Thread(target=sync.close)
        closing.start()
        closing.join(2.0)  # well under the release's own 5 s read timeout
        assert not closing.is_alive(), "close() waited for the server"
    finally:
        proc.send_signal(signal.SIGCONT)
    worker.join(30)
    assert len(claims) == 1
    a = claim_when_free(server)
    b = claim_when_free(server)  # both slots are free again: nothing was leaked
    a.close(wait=True)
    b.close(wait=True)


def _swallow(fn, *args):
    try:
        fn(*args)
    except Exception:
        pass


def test_wrong_or_missing_key_is_401_at_construction(server):
    with pytest.raises(UnauthorizedError):
        RemoteSession(server, api_key="wrong")
    with pytest.raises(UnauthorizedError):
        RemoteSession(server, api_key="")
    assert requests.get(server + "/healthz").status_code == 200  # health needs no key
    assert requests.get(server + "/capabilities").status_code == 401


def test_liveness_reaping_frees_a_dead_clients_slot(server):
    dead = RemoteSession(server, api_key=KEY, heartbeat=False)  # a client that crashed: no heartbeats
    alive = RemoteSession(server, api_key=KEY)  # heartbeats every liveness/3
    time.sleep(3.0)
    with pytest.raises(SessionExpiredError):
        dead.lease_status()
    alive.lease_status()  # still there: heartbeats kept it alive
    dead.close(wait=True)
    alive.close(wait=True)


def test_idle_reaping_ignores_heartbeats_but_actions_postpone_it(server):
    s = RemoteSession(server, api_key=KEY)
    s.set_do_autozoom(False)  # a real action
    before = s.lease_status()["remaining_seconds"]
    time.sleep(1.0)
    after = s.lease_status()["remaining_seconds"]
    assert after < before  # heartbeats (running meanwhile) do not refresh the idle clock, lease_status neither
    s.set_do_autozoom(False)
    assert s.lease_status()["remaining_seconds"] > after
    time.sleep(5.0)  # > idle timeout, heartbeats still flowing
    with pytest.raises(SessionExpiredError):
        s.set_do_autozoom(False)
    s.close()


def three_points(server, image, point):
    """The segment after three identical positive clicks in a fresh session."""
    with RemoteSession(server, api_key=KEY) as s:
        s.set_image(image)
        buf = np.zeros(image.shape[1:], np.uint8)
        s.set_target_buffer(buf)
        for _ in range(3):
            s.add_point_interaction(point, include_interaction=True)
    return buf


def test_two_concurrent_sessions_never_see_each_others_state(server):
    cases = {"a": (make_image(seed=1), (20, 30, 18)),
             "b": (np.ascontiguousarray(make_image(seed=2)[:, ::-1]), (25, 20, 10))}
    results = {}
    threads = [threading.Thread(target=lambda n=name: results.__setitem__(n, three_points(server, *cases[n])))
               for name in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, (image, point) in cases.items():  # each equals what the same session gives alone on the server
        assert np.array_equal(results[name], three_points(server, image, point))
    assert not np.array_equal(results["a"], results["b"])
