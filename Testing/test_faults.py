"""Faults on one real server process (--max-sessions 1, a 2 s liveness timeout):

* a client process killed (SIGKILL) in the middle of streaming its image: while it uploads, the only slot is taken;
  once it is dead, the slot is free again after the liveness timeout (polled: the time it took is printed, not
  asserted), and the next user gets it and works;
* the server process killed and started again (same port) in the middle of a user's work: a ``SyncedSession``
  whose prompt failed while the server was down (a typed error, the segment untouched) claims a new session by
  itself, sends the image and the segment again, and its next result equals the in-process session's given the same
  image, that segment and that prompt; the segment is intact outside the region the prompt changed. A second restart
  lands in the middle of an image upload, with the same outcome.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests

from conftest import REPO, SERVER_ENV, TORCH_THREADS, free_port, running
from test_equivalence import local_session, make_image

from SlicerNNInteractiveLib import client as client_module
from SlicerNNInteractiveLib import protocol as P
from SlicerNNInteractiveLib.client import RemoteSession
from SlicerNNInteractiveLib.errors import ServerUnreachableError
from SlicerNNInteractiveLib.sync import SyncedSession

LIVENESS = 2.0
POLL_LIMIT = 60.0  # a bound for a broken build, not a timing assertion


class Server:
    """Our server as a process that can be killed and started again on the same port."""

    def __init__(self, model_dir, tmp):
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.tmp = str(tmp)
        self.starts = 0
        self.cmd = [sys.executable, "-m", "nninteractive_slicer_server", "--model-dir", str(model_dir), "--device",
                    "cpu", "--port", str(self.port), "--torch-n-threads", TORCH_THREADS, "--no-autozoom",
                    "--max-sessions", "1", "--liveness-timeout-seconds", str(LIVENESS)]
        self._running = None
        self.proc = None

    def start(self):
        self.starts += 1
        self._running = running(self.cmd, self.url, os.path.join(self.tmp, "server-%d.log" % self.starts))
        self.proc = self._running.__enter__()

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.stop()

    def stop(self):
        if self._running is not None:
            self._running.__exit__(None, None, None)
            self._running = None

    def logs(self):
        return "".join(open(os.path.join(self.tmp, "server-%d.log" % i)).read() for i in range(1, self.starts + 1))


@pytest.fixture(scope="module")
def server(speckle_model, tmp_path_factory):
    srv = Server(speckle_model, tmp_path_factory.mktemp("faults"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        log = srv.logs()
        assert "internal error" not in log, log[-3000:]


def claim_status(url):
    r = requests.post(url + P.PATH_CLAIM, timeout=10)
    if r.status_code == 200:
        requests.post(url + P.PATH_RELEASE, headers={P.LEASE_HEADER: r.json()["lease_token"]}, timeout=10)
    return r.status_code


# A client process: our RemoteSession streaming a 6.6 MB image in 64 KiB chunks, a few a second (a slow link, never
# silent for as long as the liveness timeout), telling the test once the upload is under way.
CLIENT = r"""
import sys, time
import numpy as np
from SlicerNNInteractiveLib import client
original = client.pack_chunks

def slow(arr, **kw):
    kw["chunk_bytes"] = 64 << 10
    for i, piece in enumerate(original(arr, **kw)):
        yield piece
        if i == 8:
            print("uploading", flush=True)
        time.sleep(0.05 if i < 8 else 0.2)  # then slower: about 20 s more, far longer than the test needs

client.pack_chunks = slow
s = client.RemoteSession(sys.argv[1])
print("claimed", flush=True)
image = (np.random.RandomState(3).normal(100, 30, (1, 160, 160, 130)) + 200).astype(np.int16)
s.set_image(image)
print("uploaded", flush=True)
"""


def test_a_client_killed_mid_upload_frees_its_slot_within_the_liveness_timeout(server):
    url = server.url
    assert claim_status(url) == 200
    child = subprocess.Popen([sys.executable, "-c", CLIENT, url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env=dict(SERVER_ENV, PYTHONPATH=os.path.join(REPO, "SlicerNNInteractive")), text=True)
    try:
        lines = []
        for line in child.stdout:
            lines.append(line.strip())
            if line.strip() == "uploading":
                break
        assert "claimed" in lines and lines[-1] == "uploading", lines
        assert claim_status(url) == 503  # its upload in progress holds the only slot
        child.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    status = None
    while time.monotonic() - killed_at < POLL_LIMIT:
        status = claim_status(url)
        if status == 200:
            break
        assert status == 503, status
        time.sleep(0.1)
    freed_after = time.monotonic() - killed_at
    print("\nclient SIGKILLed mid-upload: slot free again %.1f s after the kill (liveness timeout %.1f s)"
          % (freed_after, LIVENESS))
    assert status == 200
    log = server.logs()
    assert "disconnected before its request was read" in log and "internal error" not in log, log[-3000:]
    # the next user gets the slot and works
    image = make_image()
    with RemoteSession(url) as s:
        s.set_image(image)
        buf = np.zeros(image.shape[1:], np.uint8)
        s.set_target_buffer(buf)
        s.add_point_interaction((20, 30, 18), include_interaction=True)
        assert buf.any()


def oracle(model, image, segment, kind, args, positive):
    """In process: a fresh session given ``image``, ``segment`` as its starting mask, then one prompt."""
    s = local_session(model)
    buf = np.zeros(image.shape[1:], np.uint8)
    s.set_image(image)
    s.set_target_buffer(buf)
    if segment.any():
        s.add_initial_seg_interaction(segment, run_prediction=False)
    if kind == "point":
        s.add_point_interaction(args["coordinates"], include_interaction=positive)
    else:
        s.add_bbox_interaction(args["bbox"], include_interaction=positive)
    return buf


def steps_oracle(model, image, steps):
    s = local_session(model)
    buf = np.zeros(image.shape[1:], np.uint8)
    s.set_image(image)
    s.set_target_buffer(buf)
    for kind, args, positive in steps:
        if kind == "point":
            s.add_point_interaction(args["coordinates"], include_interaction=positive)
        else:
            s.add_bbox_interaction(args["bbox"], include_interaction=positive)
    return buf


def test_a_synced_session_recovers_from_a_server_restart_with_its_segment_intact(server, speckle_model):
    url = server.url
    image = make_image()
    segment = np.zeros(image.shape[1:], np.uint8)
    synced = SyncedSession(lambda: RemoteSession(url))
    first = [("point", {"coordinates": (20, 30, 18)}, True),
             ("bbox", {"bbox": [[10, 30], [20, 40], [18, 19]]}, True)]
    for kind, args, positive in first:
        synced.prompt_and_apply(kind, args, image, segment, positive)
    assert np.array_equal(segment, steps_oracle(speckle_model, image, first))
    assert segment.any()
    before = segment.copy()
    generation = synced.server_generation
    faults = 0

    # 1. The server dies between prompts. A prompt while it is down fails with a typed error and writes nothing.
    server.kill()
    faults += 1
    nxt = ("point", {"coordinates": (25, 35, 20)}, False)
    with pytest.raises(ServerUnreachableError):
        synced.prompt_and_apply(*nxt[:2], image, segment, nxt[2])
    assert np.array_equal(segment, before)
    server.start()
    # Back (a new process that knows no lease): the same prompt claims a new session, resends image and segment.
    result = synced.prompt_and_apply(*nxt[:2], image, segment, nxt[2])
    assert synced.uploads == {"image": 2, "segment": 2} and synced.server_generation > generation
    assert np.array_equal(segment, oracle(speckle_model, image, before, *nxt))
    outside = np.ones(segment.shape, bool)
    outside[result.slices] = False
    assert np.array_equal(segment[outside], before[outside])  # intact where the prompt changed nothing
    assert not np.array_equal(segment, before)  # and the prompt did change something

    # 2. The server dies in the middle of an upload (a new image version, sent slowly in small chunks).
    before = segment.copy()
    image2 = image.copy()
    image2[0, :5] += 7  # a new version of the image: the next prompt uploads it
    uploading, killed = threading.Event(), threading.Event()
    original = client_module.pack_chunks

    def slow(arr, **kw):  # a few chunks, then nothing more until the server is dead
        kw["chunk_bytes"] = 16 << 10
        for i, piece in enumerate(original(arr, **kw)):
            yield piece
            if i == 3:
                uploading.set()
                killed.wait(60)

    stream_bytes = client_module.STREAM_CHUNK_BYTES
    client_module.pack_chunks = slow
    client_module.STREAM_CHUNK_BYTES = 1 << 10  # stream even this small image
    failed = []

    def prompt_while_uploading():
        try:
            synced.prompt_and_apply(*nxt[:2], image2, segment, True)
        except ServerUnreachableError as exc:
            failed.append(exc)

    worker = threading.Thread(target=prompt_while_uploading)
    try:
        worker.start()
        assert uploading.wait(60)
        server.kill()
        killed.set()
        faults += 1
        worker.join(60)
    finally:
        killed.set()
        client_module.pack_chunks = original
        client_module.STREAM_CHUNK_BYTES = stream_bytes
    assert failed and not worker.is_alive()
    assert np.array_equal(segment, before)
    server.start()
    result = synced.prompt_and_apply(*nxt[:2], image2, segment, True)
    assert synced.uploads == {"image": 3, "segment": 3}, synced.uploads  # the cut upload is not counted
    assert np.array_equal(segment, oracle(speckle_model, image2, before, nxt[0], nxt[1], True))
    outside = np.ones(segment.shape, bool)
    outside[result.slices] = False
    assert np.array_equal(segment[outside], before[outside])
    synced.close()
    print("\nserver killed and restarted %d times mid-work (between prompts, mid-upload): the SyncedSession "
          "recovered each time; image uploads %d, segment uploads %d" % (faults, synced.uploads["image"],
                                                                          synced.uploads["segment"]))
