"""Connection failures that explain themselves, each against the real thing: what Test connection (``check_server``)
and a new session (``RemoteSession``) say, in one sentence with what to do.

* a server of another protocol version: the official nnInteractive server, run as it ships but reporting
  nnInteractive 3.0 (the version it reports is the installed package's; here the class attribute it reads is set);
* a real HAProxy (a minimal configuration, no health checks) in front of: a TLS server it talks plain HTTP to (502),
  a port nothing listens on (503), a socket that never answers (504, ``timeout server 1s``);
* our server under a URL with a path it does not have (404 to /healthz);
* another web server (Python's own ``http.server``): a 404 page, and a web page where /healthz should be;
* a refused connection. (TLS certificate failures: Testing/test_tls.py.)
"""

import http.server
import os
import socket
import subprocess
import sys
import threading

import pytest
import requests

from conftest import SERVER_ENV, TORCH_THREADS, free_port, our_server, running
from haproxy_rig import haproxy_binary
from test_tls import pki, server_cmd  # noqa: F401 (pki: the test certificate authority fixture)

from SlicerNNInteractiveLib.client import RemoteSession, check_server
from SlicerNNInteractiveLib.compat import version_problem
from SlicerNNInteractiveLib.errors import (
    IncompatibleServerError,
    NotAServerError,
    ServerAtCapacityError,
    ServerCertificateError,
    ServerUnreachableError,
)

OFFICIAL_AS_VERSION = (
    "import runpy, sys\n"
    "from nnInteractive.inference.inference_session import nnInteractiveInferenceSession\n"
    "nnInteractiveInferenceSession.INFERENCE_SESSION_VERSION = sys.argv.pop(1)\n"
    "sys.argv[0] = 'nnInteractive.inference.server.main'\n"
    "runpy.run_module('nnInteractive.inference.server.main', run_name='__main__')\n")


@pytest.fixture(autouse=True)
def loopback_without_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def ours(quiet_model, tmp_path_factory):
    with our_server(quiet_model, tmp_path_factory.mktemp("errors-ours"), "--no-autozoom") as (url, _):
        yield url


@pytest.fixture(scope="module")
def official_v3(quiet_model, tmp_path_factory):
    port = free_port()
    url = "http://127.0.0.1:%d" % port
    cmd = [sys.executable, "-c", OFFICIAL_AS_VERSION, "3.0.0", "--model-dir", str(quiet_model), "--fold", "0",
           "--device", "cpu", "--port", str(port), "--torch-n-threads", TORCH_THREADS, "--max-sessions", "1"]
    with running(cmd, url, str(tmp_path_factory.mktemp("errors-official") / "official.log")):
        yield url


def test_a_server_of_another_protocol_version_says_which_side_to_update(official_v3):
    with pytest.raises(IncompatibleServerError) as err:
        check_server(official_v3)
    assert "nnInteractive 3.0.0" in str(err.value) and "update the Slicer extension" in str(err.value)
    with pytest.raises(IncompatibleServerError):
        RemoteSession(official_v3)
    # the lease went back: the official server's only slot is free at once
    assert requests.post(official_v3 + "/claim", timeout=10).status_code == 200
    older = version_problem("2.5.1", "http://x:1")
    assert "older than the 2.6 remote protocol" in older and "update the server" in older
    assert version_problem("2.7.0", "http://x:1") is None and version_problem(None, "http://x:1") is None


@pytest.fixture(scope="module")
def tls_backend(quiet_model, pki, tmp_path_factory):  # noqa: F811
    port = free_port()
    url = "https://127.0.0.1:%d" % port
    cmd = server_cmd(quiet_model, port, "--ssl-certfile", pki["server.pem"], "--ssl-keyfile", pki["server.key"])
    with running(cmd, url, str(tmp_path_factory.mktemp("errors-tls") / "server.log"),
                 ready=lambda: requests.get(url + "/healthz", timeout=1, verify=pki["ca.pem"]).status_code == 200):
        yield url


@pytest.fixture(scope="module")
def silent():
    """A TCP port that accepts connections and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield "127.0.0.1:%d" % s.getsockname()[1]
    s.close()


@pytest.fixture(scope="module")
def balancer(tls_backend, silent, tmp_path_factory):
    """A real HAProxy with three frontends: to the TLS server spoken to in plain HTTP, to a closed port, to the
    silent socket. Yields {502: url, 503: url, 504: url}."""
    binary = haproxy_binary()
    if binary is None:
        if os.environ.get("CI"):
            raise RuntimeError("haproxy is not installed (apt-get install haproxy)")
        pytest.skip("needs haproxy")
    ports = {code: free_port() for code in (502, 503, 504)}
    backends = {502: tls_backend.split("://", 1)[1], 503: "127.0.0.1:%d" % free_port(), 504: silent}
    cfg = ["global", "    maxconn 100", "defaults", "    mode http", "    timeout connect 1s",
           "    timeout client 10s", "    timeout server 1s", "    retries 1"]
    for code in ports:
        cfg += ["frontend f%d" % code, "    bind 127.0.0.1:%d" % ports[code], "    default_backend b%d" % code,
                "backend b%d" % code, "    server s%d %s" % (code, backends[code])]
    tmp = tmp_path_factory.mktemp("errors-haproxy")
    (tmp / "haproxy.cfg").write_text("\n".join(cfg) + "\n")
    urls = {code: "http://127.0.0.1:%d" % port for code, port in ports.items()}

    def ready():
        requests.get(urls[503] + "/healthz", timeout=5)
        return True

    with running([binary, "-db", "-f", str(tmp / "haproxy.cfg")], urls[503], str(tmp / "haproxy.log"), timeout=20,
                 env=dict(os.environ), ready=ready, what="haproxy"):
        yield urls


@pytest.mark.parametrize("code,says", [
    (502, "speaks another protocol than the proxy expects"),
    (503, "no server available behind it"),
    (504, "did not answer within the proxy's time limit"),
])
def test_a_balancers_502_503_504_each_say_what_happened(balancer, code, says):
    with pytest.raises(ServerUnreachableError) as err:
        check_server(balancer[code])
    assert "answered HTTP %d" % code in str(err.value) and says in str(err.value), str(err.value)
    # The claim gets the same answer; a balancer's 503 to a claim stays a capacity error (HAProxy answers so when
    # every server is full: try again later), with the same explanation.
    with pytest.raises(ServerAtCapacityError if code == 503 else ServerUnreachableError) as err:
        RemoteSession(balancer[code], heartbeat=False)
    assert says in str(err.value)


def test_a_url_with_a_path_the_server_does_not_have(ours):
    with pytest.raises(NotAServerError) as err:
        check_server(ours + "/nninteractive")
    text = str(err.value)
    assert "404" in text and "remove /nninteractive from the URL" in text and ours in text
    with pytest.raises(NotAServerError, match="remove /nninteractive"):
        RemoteSession(ours + "/nninteractive", heartbeat=False)


@pytest.fixture(scope="module")
def web_server(tmp_path_factory):
    """Python's own http.server on a folder with a web page where /healthz would be, and nothing else."""
    root = tmp_path_factory.mktemp("web")
    (root / "healthz").mkdir()
    (root / "healthz" / "index.html").write_text("<html><body>Sign in to the proxy</body></html>")
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **kw)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield "http://127.0.0.1:%d" % httpd.server_address[1], root
    httpd.shutdown()


def test_another_web_server_is_told_apart(web_server):
    url, root = web_server
    with pytest.raises(NotAServerError) as err:
        check_server(url)  # a web page at /healthz (a proxy's sign-in page, say)
    assert "with a web page" in str(err.value) and "NO_PROXY" in str(err.value)
    with pytest.raises(NotAServerError) as err:
        check_server(url + "/other")  # nothing there: a 404 page
    assert "404" in str(err.value) and "/other" in str(err.value)
    os.rename(str(root / "healthz"), str(root / "moved"))
    try:
        with pytest.raises(NotAServerError) as err:
            check_server(url)
        assert "not an nnInteractive server" in str(err.value) and "host and port" in str(err.value)
    finally:
        os.rename(str(root / "moved"), str(root / "healthz"))


def test_refused_and_tls_failures(tls_backend):
    with pytest.raises(ServerUnreachableError, match="Cannot reach an nnInteractive server .* is it running"):
        check_server("http://127.0.0.1:%d" % free_port(), timeout=2)
    with pytest.raises(ServerCertificateError, match="could not be verified"):
        check_server(tls_backend)  # a private authority this computer was not given
