"""Starting a real local server from the module's library, waiting until it answers, talking to it, stopping it."""

import os
import sys

import pytest
import requests

from conftest import SERVER_ENV

from SlicerNNInteractiveLib.client import check_server
from SlicerNNInteractiveLib.errors import UnauthorizedError
from SlicerNNInteractiveLib.localserver import LocalServer, python_module_command, split_arguments


def test_start_answer_stop(quiet_model, tmp_path):
    srv = LocalServer(python_module_command(), ["--model-dir", quiet_model, "--device", "cpu", "--torch-n-threads", "1"],
                      log_path=str(tmp_path / "server.log"), env=SERVER_ENV)
    srv.start()
    try:
        assert srv.wait_ready(timeout=180), srv.status()
        state, message = srv.status()
        assert state == "ready" and srv.url in message
        info = check_server(srv.url, api_key=srv.api_key)
        assert "points" in info["supported_interactions"]
        with pytest.raises(UnauthorizedError):
            check_server(srv.url, api_key="wrong")
        assert srv.url.startswith("http://127.0.0.1:")
    finally:
        srv.stop()
    assert srv.status()[0] == "stopped"
    with pytest.raises(requests.RequestException):
        requests.get(srv.url + "/healthz", timeout=1)


def test_failure_is_reported_with_the_log(tmp_path):
    srv = LocalServer([sys.executable, "-c", "import sys; print('no model here'); sys.exit(3)"],
                      log_path=str(tmp_path / "bad.log"))
    srv.start()
    assert not srv.wait_ready(timeout=30)
    state, message = srv.status()
    assert state == "failed" and "code 3" in message and "no model here" in message
    srv.stop()


def test_arguments():
    assert split_arguments(' --device mps --model-dir "/a b/c" ') == ["--device", "mps", "--model-dir", "/a b/c"]
    with pytest.raises(ValueError, match="--port"):
        LocalServer("x", ["--port=5"]).argv()
    with pytest.raises(ValueError, match="does not exist"):
        LocalServer(os.path.join("no", "such", "server")).start()
    s = LocalServer("server")
    assert s.argv()[:3] == ["server", "--host", "127.0.0.1"] and len(s.api_key) >= 24


def test_key_and_environment(monkeypatch):
    """The key travels in the environment, never on the command line; a given environment (Slicer's startup
    environment) is used as it is, so the launcher's Python variables do not reach the server."""
    monkeypatch.setenv("PYTHONPATH", "/slicer/lib/python")
    s = LocalServer("server", env={"PATH": "/usr/bin", "HOME": "/home/u"})
    assert s.api_key not in " ".join(s.argv()) and "--api-key" not in s.argv()
    env = s.environment()
    assert env["NN_INTERACTIVE_API_KEY"] == s.api_key and "PYTHONPATH" not in env and env["HOME"] == "/home/u"
    assert "127.0.0.1" in env["NO_PROXY"]
