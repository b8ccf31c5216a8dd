"""Fairness, liveness during long requests, and failures that leave the session usable, on an in-process server
(the real app and engine, served by uvicorn on 127.0.0.1) so that a test can hold a session's work at a known point
(a prompt that waits on an Event) or make it fail (MemoryError, CUDA out-of-memory, an unexpected exception).

Nothing here asserts on durations: the flood test shows by ordering that another user's claim, a heartbeat, /healthz
and reaping all complete while one lease's requests are still queued behind its blocked prompt."""

import os
import sys
import threading
import time

import pytest
import requests

from conftest import REPO, claim, post, serve_in_process
from test_equivalence import make_image

sys.path.insert(0, os.path.join(REPO, "server"))  # this tree's server, not an installed copy

from SlicerNNInteractiveLib import protocol as P  # noqa: E402
from SlicerNNInteractiveLib.wire import pack_array, pack_chunks  # noqa: E402

LIVENESS = 2.0
WAITING = 3  # --max-waiting-per-lease


@pytest.fixture(scope="module")
def served(quiet_model):
    from nninteractive_slicer_server.app import make_app
    from nninteractive_slicer_server.engine import Engine
    from nninteractive_slicer_server.limits import Limits

    engine = Engine(quiet_model, 0, "checkpoint_final.pth", "cpu", 1, False, do_autozoom=False)
    limits = Limits.defaults(memory_budget=1 << 30)
    limits.max_waiting_per_lease = WAITING
    app = make_app(engine, max_sessions=6, idle_timeout=600.0, liveness_timeout=LIVENESS, limits=limits)
    try:
        with serve_in_process(app) as url:
            yield url, app.state.server
    finally:
        engine.shutdown()


def ready(url, lease):
    image = make_image()
    assert post(url, lease, P.PATH_SET_IMAGE, pack_array(image), meta={}).status_code == 200
    assert post(url, lease, P.PATH_SET_TARGET_BUFFER, {"shape": list(image.shape[1:]), "dtype": "uint8"}
                ).status_code == 200


POINT = {"coordinates": [20, 30, 18], "include_interaction": True}


def until(cond, tries=400, every=0.05):
    for _ in range(tries):
        if cond():
            return True
        time.sleep(every)
    return False


def test_flood_on_one_lease_never_delays_another_users_claim(served):
    url, srv = served
    a = claim(url)
    ready(url, a)
    lease = srv.registry.get(a, touch=False, user="anonymous")
    gate, entered = threading.Event(), threading.Event()
    original = lease.session.add_point_interaction

    def blocked(*args, **kw):
        entered.set()
        gate.wait(120)
        return original(*args, **kw)

    lease.session.add_point_interaction = blocked
    flood = 48  # more than the 40 worker threads a waiting request used to hold each
    statuses = [None] * flood

    def send(i):
        r = post(url, a, P.PATH_ADD_POINT, POINT)
        statuses[i] = (r.status_code, r.headers.get("Retry-After"))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(flood)]
    for t in threads:
        t.start()
    assert entered.wait(60)
    refused = lambda: sum(1 for s in statuses if s is not None and s[0] == 429)  # noqa: E731
    assert until(lambda: refused() == flood - 1 - WAITING and lease.queued == 1 + WAITING), (statuses, lease.queued)
    assert all(s[1] for s in statuses if s is not None)  # every 429 says when to retry

    # While one prompt of A is held and WAITING more are queued behind it:
    assert requests.get(url + P.PATH_HEALTHZ).status_code == 200
    b = claim(url)  # another user's claim
    assert post(url, b, P.PATH_HEARTBEAT).status_code == 200
    assert post(url, a, P.PATH_HEARTBEAT).status_code == 200  # A's own heartbeat does not queue behind its work
    dead = claim(url)  # a client that vanished: reaped although A's session is busy
    assert until(lambda: requests.get(url + P.PATH_LEASE_STATUS, headers={P.LEASE_HEADER: dead}).status_code == 410)
    assert not gate.is_set() and lease.queued == 1 + WAITING  # all of that happened while the flood was queued

    # Released while its prompt runs: the release answers at once, the session is freed when that prompt ends.
    assert post(url, a, P.PATH_RELEASE).status_code == 200
    assert lease.closed and lease.session.original_image_shape is not None and lease.held
    gate.set()
    for t in threads:
        t.join(60)
    codes = sorted(s[0] for s in statuses)
    assert codes == [200] + [410] * WAITING + [429] * (flood - 1 - WAITING), codes
    assert until(lambda: lease.freed and lease.session.original_image_shape is None and not lease.held)
    post(url, b, P.PATH_RELEASE)


def test_a_500_carries_a_request_id_and_no_internals(served):
    url, srv = served
    a = claim(url)
    ready(url, a)
    session = srv.registry.get(a, touch=False, user="anonymous").session

    def broken(*_args, **_kw):
        raise RuntimeError("secret internals /etc/passwd 0xdeadbeef")

    session.reset_interactions = broken
    r = post(url, a, P.PATH_RESET_INTERACTIONS)
    assert r.status_code == 500
    assert "secret" not in r.text and "RuntimeError" not in r.text
    assert r.json()["request_id"] == r.headers["X-Request-ID"] and r.headers["X-Request-ID"] in r.json()["detail"]
    del session.reset_interactions
    assert post(url, a, P.PATH_RESET_INTERACTIONS).status_code == 200
    assert post(url, a, P.PATH_ADD_POINT, POINT).status_code == 200
    post(url, a, P.PATH_RELEASE)


@pytest.mark.parametrize("where", ["preprocessing", "prediction"])
def test_out_of_memory_is_507_and_the_next_set_image_works(served, where):
    import torch

    url, srv = served
    a = claim(url)
    lease = srv.registry.get(a, touch=False, user="anonymous")
    session = lease.session
    if where == "preprocessing":  # in the session's background thread, seen by the next request that waits for it
        name, error = "_background_set_image", MemoryError()
    else:  # on the prediction thread
        name, error = "add_point_interaction", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    def failing(*_args, **_kw):
        raise error

    setattr(session, name, failing)
    ready(url, a)
    r = post(url, a, P.PATH_ADD_POINT, POINT)
    assert r.status_code == 507 and "send the image again" in r.json()["detail"], r.text
    assert not lease.held  # its memory went back to the budget
    delattr(session, name)
    r = post(url, a, P.PATH_ADD_POINT, POINT)
    assert r.status_code == 400 and "set_image" in r.json()["detail"]  # the session forgot the failed image
    ready(url, a)
    assert post(url, a, P.PATH_ADD_POINT, POINT).status_code == 200
    post(url, a, P.PATH_RELEASE)


def test_a_slow_upload_keeps_its_lease_alive(served):
    url, srv = served
    a, control = claim(url), claim(url)  # neither heartbeats
    image = make_image()
    pieces = list(pack_chunks(image, codec="lz4", clevel=1, chunk_bytes=16 << 10))
    delay = 4 * LIVENESS / len(pieces)  # the whole upload takes four liveness timeouts, no gap as long as one

    def throttled():
        for piece in pieces:
            yield piece
            time.sleep(delay)

    started = time.monotonic()
    r = post(url, a, P.PATH_SET_IMAGE, throttled(), meta={})
    took = time.monotonic() - started
    print("throttled upload: %d pieces in %.1f s, liveness timeout %.1f s (%.1fx)"
          % (len(pieces), took, LIVENESS, took / LIVENESS))
    assert r.status_code == 200, r.text
    assert took > 2 * LIVENESS
    lease_status = lambda t: requests.get(url + P.PATH_LEASE_STATUS, headers={P.LEASE_HEADER: t}).status_code  # noqa
    assert lease_status(control) == 410  # reaping ran meanwhile: an idle lease without heartbeats was taken
    assert lease_status(a) == 200
    assert post(url, a, P.PATH_SET_TARGET_BUFFER, {"shape": list(image.shape[1:]), "dtype": "uint8"}
                ).status_code == 200
    assert post(url, a, P.PATH_ADD_POINT, POINT).status_code == 200

    def stalled():  # nothing for longer than the liveness timeout: 408, not a request that hangs forever
        yield pieces[0]
        time.sleep(LIVENESS * 1.5)
        yield from pieces[1:]

    r = post(url, a, P.PATH_SET_IMAGE, stalled(), meta={})
    assert r.status_code == 408, r.text
    post(url, a, P.PATH_RELEASE)
