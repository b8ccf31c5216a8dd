"""Eight clients at once on one server (--max-sessions 8): four official ``nnInteractiveRemoteInferenceSession``s and
four of ours (two ``RemoteSession``, two ``SyncedSession``), each with its own image (each of another shape) and its
own prompt sequence, all started together. After every step each client's mask must equal, voxel for voxel, what an
in-process ``nnInteractiveInferenceSession`` gives for the same image and prompts; no answer may be a 5xx (every
HTTP answer each client received is counted, and the server's log must name no 5xx or internal error).

The speckle model predicts input-dependent masks, so a region written into the wrong session, or computed on
another session's image or interactions, shows as a difference."""

import collections
import os
import threading
import warnings

import numpy as np
import pytest

from conftest import our_server
from test_equivalence import local_session, make_image

from SlicerNNInteractiveLib.client import RemoteSession
from SlicerNNInteractiveLib.sync import SyncedSession

CLIENTS = ["official", "ours", "official", "synced", "official", "ours", "official", "synced"]


@pytest.fixture(scope="module")
def server(speckle_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("concurrent")
    with our_server(speckle_model, tmp, "--no-autozoom", "--max-sessions", str(len(CLIENTS))) as (url, _):
        yield url, os.path.join(str(tmp), "server-%s.log" % url.rsplit(":", 1)[1])


def client_image(i):
    return make_image(shape=(36 + 2 * i, 44 - i, 32 + (i % 3) * 3), seed=10 + i)


def prompts(i, spatial, with_undo):
    """Client ``i``'s own sequence: (kind, args, positive) in array order; 'undo' for clients whose API has it."""
    rng = np.random.RandomState(100 + i)
    inside = lambda: tuple(int(rng.randint(4, s - 4)) for s in spatial)  # noqa: E731
    steps = [("point", {"coordinates": inside()}, True)]
    lo = [int(rng.randint(2, s // 2)) for s in spatial]
    hi = [int(rng.randint(s // 2 + 2, s - 1)) for s in spatial]
    thin = i % 3
    lo[thin], hi[thin] = spatial[thin] // 2, spatial[thin] // 2 + 1  # the official weights take 2D boxes only
    steps.append(("bbox", {"bbox": [[a, b] for a, b in zip(lo, hi)]}, True))
    mask = np.zeros(spatial, np.uint8)
    z = int(rng.randint(3, spatial[2] - 3))
    a, b = int(rng.randint(3, spatial[0] // 2)), int(rng.randint(3, spatial[1] // 2))
    mask[a:a + 8, b, z] = 1
    mask[a + 4, b:b + 8, z] = 1
    steps.append(("scribble", {"mask": mask, "interaction_bbox": None}, bool(i % 2)))
    if with_undo:
        steps.append(("undo", {}, None))
    lasso = np.zeros(spatial, np.uint8)
    lasso[a:a + 10, b:b + 12, z] = 1
    steps.append(("lasso", {"mask": lasso, "interaction_bbox": None}, False))
    steps.append(("point", {"coordinates": inside()}, False))
    return steps


def call(session, kind, args, positive):
    """One step on a session with the official API (in-process, official remote, our RemoteSession)."""
    if kind == "point":
        session.add_point_interaction(args["coordinates"], include_interaction=positive)
    elif kind == "bbox":
        session.add_bbox_interaction(args["bbox"], include_interaction=positive)
    elif kind == "scribble":
        session.add_scribble_interaction(args["mask"], include_interaction=positive)
    elif kind == "lasso":
        session.add_lasso_interaction(args["mask"], include_interaction=positive)
    else:
        session.undo()


def oracle(model, image, steps):
    s = local_session(model)
    buf = np.zeros(image.shape[1:], np.uint8)
    s.set_image(image)
    s.set_target_buffer(buf)
    out = []
    for kind, args, positive in steps:
        call(s, kind, args, positive)
        out.append(buf.copy())
    return out


class Statuses:
    """HTTP answers a client received, by status (thread-safe: the heartbeats answer on their own threads)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = collections.Counter()

    def add(self, status):
        with self.lock:
            self.counts[status] += 1

    def watch_requests(self, session):  # requests.Session of our client
        session.hooks["response"].append(lambda r, *a, **k: self.add(r.status_code))

    def watch_httpx(self, client):  # httpx.Client of the official client
        client.event_hooks["response"].append(lambda r: self.add(r.status_code))


def run_client(i, kind, url, image, steps, statuses, results, start):
    masks = []
    start.wait(60)
    if kind == "synced":
        def connect():
            s = RemoteSession(url)
            statuses.watch_requests(s._http._session)
            statuses.watch_requests(s._beat._session)
            return s

        synced = SyncedSession(connect)
        segment = np.zeros(image.shape[1:], np.uint8)
        try:
            for kind_, args, positive in steps:
                synced.prompt_and_apply(kind_, args, image, segment, positive)
                masks.append(segment.copy())
            assert synced.uploads == {"image": 1, "segment": 1}  # one session, image and segment sent once
        finally:
            synced.close()
    else:
        if kind == "official":
            from nnInteractive.inference.remote import nnInteractiveRemoteInferenceSession

            session = nnInteractiveRemoteInferenceSession(url)
            statuses.watch_httpx(session._http)
        else:
            session = RemoteSession(url)
            statuses.watch_requests(session._http._session)
            statuses.watch_requests(session._beat._session)
        with session:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                session.set_do_autozoom(False)
            session.set_image(image)
            buf = np.zeros(image.shape[1:], np.uint8)
            session.set_target_buffer(buf)
            for kind_, args, positive in steps:
                call(session, kind_, args, positive)
                masks.append(buf.copy())
    results[i] = masks


def test_eight_concurrent_clients_each_get_the_in_process_masks(server, speckle_model):
    url, log_path = server
    images = [client_image(i) for i in range(len(CLIENTS))]
    sequences = [prompts(i, img.shape[1:], with_undo=kind != "synced") for i, (kind, img) in
                 enumerate(zip(CLIENTS, images))]
    statuses = [Statuses() for _ in CLIENTS]
    results, errors = [None] * len(CLIENTS), []
    start = threading.Barrier(len(CLIENTS))

    def guarded(i):
        try:
            run_client(i, CLIENTS[i], url, images[i], sequences[i], statuses[i], results, start)
        except BaseException as exc:  # reported below, with the client it happened to
            errors.append((i, CLIENTS[i], repr(exc)))

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(len(CLIENTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors

    calls, answers, nonempty = 0, collections.Counter(), 0
    for i, (kind, image, steps, masks) in enumerate(zip(CLIENTS, images, sequences, results)):
        expected = oracle(speckle_model, image, steps)
        assert len(masks) == len(expected) == len(steps)
        for step, (got, want) in enumerate(zip(masks, expected)):
            assert np.array_equal(got, want), "client %d (%s), step %d (%s): %d voxels differ" % (
                i, kind, step, steps[step][0], int((got != want).sum()))
        nonempty += sum(bool(m.any()) for m in expected)
        calls += len(steps)
        answers.update(statuses[i].counts)
    log = open(log_path).read()
    print("\n%d concurrent clients (%s), %d prompt calls compared with in-process, HTTP answers %s"
          % (len(CLIENTS), ", ".join("%d %s" % (CLIENTS.count(k), k) for k in ("official", "ours", "synced")),
             calls, dict(sorted(answers.items()))))
    assert not [s for s in answers if s >= 500], answers
    assert "internal error" not in log and " -> 5" not in log, log[-3000:]
    assert nonempty >= calls // 2  # the oracle means something only if the model predicted something
