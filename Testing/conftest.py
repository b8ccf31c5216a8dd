"""Fixtures: real server processes on loopback (ours and the official one) and the tiny models they serve.

Servers run from this working tree (PYTHONPATH), one per test module or configuration: importing nnInteractive
takes seconds, so a server is started once and shared.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "SlicerNNInteractive"))
sys.path.insert(0, os.path.join(REPO, "server"))  # this tree's server in-process too, never an installed copy
sys.path.insert(0, os.path.join(REPO, "Testing", "models"))
SERVER_ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [os.path.join(REPO, "server"), os.path.join(REPO, "SlicerNNInteractive"), os.environ.get("PYTHONPATH", "")]),
    PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", NO_PROXY="127.0.0.1,localhost")
BLOB_MODEL = os.path.join(REPO, "Testing", "models", "blobs")
TORCH_THREADS = "2"


def pytest_configure(config):
    # Slicer's VTKObservationMixin warns and ignores a second observer of the same method: in the module that is a
    # bookkeeping mistake (an observer never removed), so a test that makes one fails.
    config.addinivalue_line("filterwarnings", "error:already has observer:UserWarning")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(cmd, url, log_path, timeout=120.0, env=None, ready=None, what="server", cwd=None):
    """Start ``cmd`` (in folder ``cwd``), wait until ``ready()`` is true (default: ``url``/healthz answers 200), yield
    the process, then stop it. Fails with the end of its log when it exits or never gets ready."""
    if ready is None:
        ready = lambda: requests.get(url + "/healthz", timeout=1).status_code == 200  # noqa: E731
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env or SERVER_ENV, cwd=cwd)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError("%s exited with %s:\n%s" % (what, proc.returncode, open(log_path).read()[-3000:]))
            try:
                if ready():
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("%s did not answer in %.0f s:\n%s" % (what, timeout, open(log_path).read()[-3000:]))
            time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def serve_in_process(app):
    """Our app served by uvicorn in this process on a free loopback port (for tests that reach into its state):
    yields the URL; stops it afterwards."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = "http://127.0.0.1:%d" % port
    for _ in range(200):
        try:
            if requests.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


def claim(url, headers=None):
    """A raw /claim: the lease token."""
    r = requests.post(url + "/claim", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["lease_token"]


def post(url, lease, path, body=b"", meta=None, headers=None, **kw):
    """A raw POST on a lease (``meta``: the X-Meta header; a dict body is sent as JSON)."""
    headers = dict(headers or {}, **{"X-Lease-Token": lease})
    if meta is not None:
        headers["X-Meta"] = json.dumps(meta)
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    return requests.post(url + path, data=body, headers=headers, **kw)


@contextlib.contextmanager
def our_server(model_dir, tmp_dir, *flags):
    port = free_port()
    url = "http://127.0.0.1:%d" % port
    cmd = [sys.executable, "-m", "nninteractive_slicer_server", "--model-dir", str(model_dir), "--device", "cpu",
           "--port", str(port), "--torch-n-threads", TORCH_THREADS, *flags]
    with running(cmd, url, os.path.join(str(tmp_dir), "server-%d.log" % port)) as proc:
        yield url, proc


@contextlib.contextmanager
def official_server(model_dir, tmp_dir, *flags):
    port = free_port()
    url = "http://127.0.0.1:%d" % port
    cmd = [sys.executable, "-m", "nnInteractive.inference.server.main", "--model-dir", str(model_dir), "--fold", "0",
           "--device", "cpu", "--port", str(port), "--torch-n-threads", TORCH_THREADS, *flags]
    with running(cmd, url, os.path.join(str(tmp_dir), "official-%d.log" % port)) as proc:
        yield url, proc


@pytest.fixture(scope="session")
def speckle_model(tmp_path_factory):
    """Random weights that predict input-dependent speckle: the voxel-for-voxel oracle (autozoom off)."""
    from tiny_models import make_random_model

    return make_random_model(str(tmp_path_factory.mktemp("speckle")), background_bias=None)


@pytest.fixture(scope="session")
def quiet_model(tmp_path_factory):
    """Random weights biased to background: fast, predicts nothing, exercises every code path."""
    from tiny_models import make_random_model

    return make_random_model(str(tmp_path_factory.mktemp("quiet")))


@pytest.fixture(scope="session")
def blob_model():
    # committed: a missing model is a broken checkout, not a reason to skip
    assert os.path.isfile(os.path.join(BLOB_MODEL, "fold_0", "checkpoint_final.pth")), (
        "Testing/models/blobs is missing; rebuild it with Testing/models/train_blobs.py")
    return BLOB_MODEL


@pytest.fixture(params=["array", "mrml"])
def Scene(request):
    """The scene class a test builds: ``ArrayScene`` (numpy) or ``MrmlScene`` (the module's SlicerScene on real
    Slicer MRML nodes, from the slicer-core wheel). Both take ``(image, segments=None, shared=False)``."""
    if request.param == "array":
        from SlicerNNInteractiveLib.scene import ArrayScene

        return ArrayScene
    from mrml import MrmlScene

    return MrmlScene
