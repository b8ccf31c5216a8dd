"""Native TLS: the server serves https with --ssl-certfile / --ssl-keyfile; clients trust it through a CA bundle.

The test makes its own certificate authority and a server certificate for localhost / 127.0.0.1 with the openssl
command, starts one server with them (liveness 2 s, so a heartbeat that failed its TLS check would lose the
session within the test), and talks to it with our client and with the official one.
"""

import http.server
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests

from conftest import SERVER_ENV, TORCH_THREADS, free_port, running

from SlicerNNInteractiveLib.client import RemoteSession, check_server
from SlicerNNInteractiveLib.errors import ServerCertificateError, ServerUnreachableError
from SlicerNNInteractiveLib.urls import answers_healthz

LIVENESS = 2.0
TLS_ENV = ("NN_INTERACTIVE_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """ca.pem (a CA), server.pem + server.key (signed by it, for localhost and 127.0.0.1), other.key (no match),
    encrypted.key (server.key under the password "secret")."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=nnInteractive test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=localhost", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                               "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)
    openssl("genrsa", "-out", "other.key", "2048", cwd=d)
    openssl("rsa", "-in", "server.key", "-aes256", "-passout", "pass:secret", "-out", "encrypted.key", cwd=d)
    return {name: str(d / name) for name in ("ca.pem", "server.pem", "server.key", "other.key", "encrypted.key")}


def server_cmd(model_dir, port, *flags):
    return [sys.executable, "-m", "nninteractive_slicer_server", "--model-dir", str(model_dir), "--device", "cpu",
            "--port", str(port), "--torch-n-threads", TORCH_THREADS, *flags]


@pytest.fixture(scope="module")
def server(quiet_model, pki, tmp_path_factory):
    """(https URL, log path) of one TLS server for the module."""
    port = free_port()
    url = "https://127.0.0.1:%d" % port
    log_path = str(tmp_path_factory.mktemp("tls-server") / "server.log")
    cmd = server_cmd(quiet_model, port, "--ssl-certfile", pki["server.pem"], "--ssl-keyfile", pki["server.key"],
                     "--liveness-timeout-seconds", str(LIVENESS), "--ssl-min-version", "1.3")
    with running(cmd, url, log_path, ready=lambda: requests.get(url + "/healthz", timeout=1,
                                                             verify=pki["ca.pem"]).status_code == 200):
        yield url, log_path


@pytest.fixture(autouse=True)
def no_ca_from_environment(monkeypatch):
    """Each test says which CA bundle the client gets (this machine may set REQUESTS_CA_BUNDLE and the like)."""
    for name in TLS_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def image():
    rng = np.random.RandomState(0)
    return rng.normal(100, 20, (1, 24, 40, 40)).astype(np.float32)


def segment_one_point(s):
    img = image()
    s.set_image(img)
    s.set_target_buffer(np.zeros(img.shape[1:], np.uint8))
    return s.add_point_interaction((12, 20, 20), include_interaction=True)


def test_startup_log_says_https(server):
    url, log_path = server
    assert "on %s " % url in open(log_path).read()


def test_older_tls_than_the_minimum_is_refused(server, pki):
    """--ssl-min-version 1.3: a client that offers at most TLS 1.2 fails the handshake; TLS 1.3 is served."""
    import socket
    import ssl
    from urllib.parse import urlsplit

    port = urlsplit(server[0]).port

    def handshake(maximum):
        ctx = ssl.create_default_context(cafile=pki["ca.pem"])
        ctx.maximum_version = maximum
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                return tls.version()

    assert handshake(ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
    with pytest.raises(ssl.SSLError):
        handshake(ssl.TLSVersion.TLSv1_2)


def test_a_client_that_never_starts_its_handshake_is_closed_at_the_header_deadline(server):
    """A connection in its TLS handshake holds a descriptor before any request deadline applies: the server ends it
    after --header-timeout-seconds (10 s by default; asyncio's own bound, which uvicorn leaves as it is, is 60 s)."""
    import socket
    from urllib.parse import urlsplit

    with socket.create_connection(("127.0.0.1", urlsplit(server[0]).port), timeout=10) as raw:
        raw.settimeout(40)  # the server's deadline is 10 s; without it this read would time out here
        try:
            data = raw.recv(1)
        except ConnectionResetError:
            data = b""
    assert data == b"", "the server sent bytes to a client that never said hello: %r" % data


def test_our_client_with_the_ca_bundle(server, pki):
    url, _ = server
    # Heartbeats and the release go on companion connections: with a 2 s liveness timeout the session survives
    # an idle wait only if the beats pass the TLS check, and with one session slot the next claim succeeds only
    # if the release did.
    for rep in range(2):
        with RemoteSession(url, ca_bundle=pki["ca.pem"]) as s:
            assert s.liveness_timeout_seconds == LIVENESS
            assert segment_one_point(s) is not None
            if rep == 0:
                time.sleep(1.5 * LIVENESS)
                assert s.lease_status()["remaining_seconds"] > 0
                assert segment_one_point(s) is not None
    info = check_server(url, ca_bundle=pki["ca.pem"])
    assert "points" in info["supported_interactions"]
    # localhost is in the certificate too
    assert check_server(url.replace("127.0.0.1", "localhost"), ca_bundle=pki["ca.pem"])["supported_interactions"]


def test_ca_bundle_from_the_environment(server, pki, monkeypatch):
    url, _ = server
    monkeypatch.setenv("NN_INTERACTIVE_CA_BUNDLE", pki["ca.pem"])
    # ours wins over requests' variable (which requests would otherwise let override any verify setting)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", pki["server.key"])
    with RemoteSession(url) as s:
        assert segment_one_point(s) is not None
    assert check_server(url)["supported_interactions"]
    monkeypatch.delenv("NN_INTERACTIVE_CA_BUNDLE")
    # requests' own variable keeps working, also on loopback (where our client ignores the rest of the environment)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", pki["ca.pem"])
    with RemoteSession(url) as s:
        assert segment_one_point(s) is not None


def test_without_the_ca_a_clear_typed_error(server, pki):
    url, _ = server
    for call in (lambda: RemoteSession(url), lambda: check_server(url)):
        with pytest.raises(ServerCertificateError) as err:
            call()
        msg = str(err.value)
        assert "could not be verified" in msg and url in msg, msg
        assert "NN_INTERACTIVE_CA_BUNDLE" in msg and "ca_bundle" in msg, msg
        assert "SSLError" not in msg and "HTTPSConnectionPool" not in msg, msg
    # a CA bundle that is not the server's CA
    with pytest.raises(ServerCertificateError) as err:
        check_server(url, ca_bundle=requests.certs.where())
    assert "with the CA bundle %s" % requests.certs.where() in str(err.value)
    # a CA bundle that is not there
    with pytest.raises(ServerCertificateError) as err:
        RemoteSession(url, ca_bundle=pki["ca.pem"] + ".missing")
    assert "does not exist" in str(err.value) and "ca.pem.missing" in str(err.value)


def test_answers_healthz_over_https(server, pki, monkeypatch):
    """The standard-library check the module makes before the client's packages are installed."""
    url, _ = server
    assert not answers_healthz(url)
    assert answers_healthz(url, ca_bundle=pki["ca.pem"])
    monkeypatch.setenv("NN_INTERACTIVE_CA_BUNDLE", pki["ca.pem"])
    assert answers_healthz(url)


def test_host_name_not_in_the_certificate(server, pki):
    url, _ = server
    # "127.1" reaches 127.0.0.1 but is a host name to TLS, and the certificate does not name it
    with pytest.raises(ServerCertificateError) as err:
        check_server(url.replace("127.0.0.1", "127.1"), ca_bundle=pki["ca.pem"])
    msg = str(err.value)
    assert "not made for the host name 127.1" in msg, msg


def test_wrong_scheme(server, pki):
    url, _ = server
    # http:// to the https server: no answer an HTTP client understands
    with pytest.raises(ServerUnreachableError) as err:
        check_server(url.replace("https://", "http://"))
    assert "must start with https://" in str(err.value), str(err.value)
    # https:// to a plain HTTP server
    plain = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ServerCertificateError) as err:
            check_server("https://127.0.0.1:%d" % plain.server_port, ca_bundle=pki["ca.pem"])
        assert "serves plain HTTP" in str(err.value) and "http://127.0.0.1" in str(err.value)
    finally:
        plain.shutdown()
        plain.server_close()


def test_official_client_over_https(server, pki, monkeypatch):
    """nninteractive-client speaks httpx, which reads SSL_CERT_FILE (not REQUESTS_CA_BUNDLE) when it is made."""
    from nnInteractive.inference.remote import nnInteractiveRemoteInferenceSession

    url, _ = server
    monkeypatch.setenv("SSL_CERT_FILE", pki["ca.pem"])
    s = nnInteractiveRemoteInferenceSession(url)
    try:
        assert s.ping() is True
        segment_one_point(s)  # raises on any failure
    finally:
        s.close()


@pytest.mark.parametrize("flags, words", [
    (("--ssl-certfile", "server.pem"), ("both", "--ssl-keyfile")),
    (("--ssl-keyfile", "server.key"), ("both", "--ssl-certfile")),
    (("--ssl-certfile", "server.pem", "--ssl-keyfile", "missing.key"), ("missing.key", "cannot be read")),
    (("--ssl-certfile", "server.pem", "--ssl-keyfile", "other.key"), ("other.key", "not the private key")),
    (("--ssl-certfile", "server.key", "--ssl-keyfile", "server.key"), ("could not be loaded", "PEM")),
    (("--ssl-certfile", "server.pem", "--ssl-keyfile", "encrypted.key"),
     ("encrypted", "NN_INTERACTIVE_SSL_KEYFILE_PASSWORD")),
    (("--ssl-certfile", "server.pem", "--ssl-keyfile", "encrypted.key", "--ssl-keyfile-password", "wrong"),
     ("could not be loaded", "password")),
])
def test_startup_errors(quiet_model, pki, flags, words):
    folder = os.path.dirname(pki["ca.pem"])
    flags = [f if f.startswith("--") else os.path.join(folder, f) for f in flags]
    p = subprocess.run(server_cmd(quiet_model, free_port(), *flags), capture_output=True, text=True,
                       env=SERVER_ENV, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("nninteractive-slicer-server:"), p.stderr
    for w in words:
        assert w in last, last



def test_encrypted_key_with_its_password(pki):
    """The password from the environment opens the key (the same three values then go to uvicorn)."""
    code = ("from nninteractive_slicer_server.cli import build_parser, check_tls; import sys; "
            "a = build_parser().parse_args(sys.argv[1:]); check_tls(a); print(a.ssl_keyfile_password)")
    p = subprocess.run([sys.executable, "-c", code, "--ssl-certfile", pki["server.pem"],
                        "--ssl-keyfile", pki["encrypted.key"]], capture_output=True, text=True, timeout=60,
                       env=dict(SERVER_ENV, NN_INTERACTIVE_SSL_KEYFILE_PASSWORD="secret"))
    assert p.returncode == 0 and p.stdout.strip() == "secret", p.stderr
