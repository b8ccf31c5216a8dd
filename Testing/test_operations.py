"""Operations: /metrics (Prometheus), the request id in the answer's header and in every log line, JSON logs, the
queue position of a prompt waiting for the GPU, and graceful shutdown on SIGTERM.

One server process serves the module (JSON logs, an API key, two sessions, a model slow enough on one CPU thread
that a second session's prompt is seen waiting behind the first); the SIGTERM test stops a server of its own.
Nothing asserts on durations: waiting and draining are shown by what the server reports while they happen.
"""

import hashlib
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO, SERVER_ENV, official_server, our_server

sys.path.insert(0, os.path.join(REPO, "server"))  # this tree's server, not an installed copy

from SlicerNNInteractiveLib import protocol as P  # noqa: E402
from SlicerNNInteractiveLib.client import RemoteSession  # noqa: E402

KEY = "ops-key"
AUTH = {"Authorization": "Bearer " + KEY}
SHAPE = (64, 64, 64)
DEADLINE = 60.0


def image(seed=0):
    img = np.random.RandomState(seed).normal(100, 20, SHAPE)
    img[20:40, 20:40, 20:40] += 300
    return img.astype(np.int16)[None]


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    """Random weights, background-biased (never triggers autozoom), big enough (96^3 patch, 32-64-128 features) that
    a prediction takes a few seconds on one CPU thread: long enough to be seen running and waited for."""
    from tiny_models import make_random_model

    return make_random_model(str(tmp_path_factory.mktemp("slow")), features=(32, 64, 128), patch_size=(96, 96, 96))


@pytest.fixture(scope="module")
def served(slow_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("operations")
    with our_server(slow_model, tmp, "--api-key", KEY, "--max-sessions", "2", "--torch-n-threads", "1",
                    "--no-autozoom", "--log-json", "--verbose") as (url, _):
        yield url, os.path.join(str(tmp), "server-%s.log" % url.rsplit(":", 1)[1])


def session(url, seed=0):
    s = RemoteSession(url, api_key=KEY)
    s.set_image(image(seed))
    s.set_target_buffer(np.zeros(SHAPE, np.uint8))
    return s


def scrape(url, headers=AUTH):
    r = requests.get(url + P.PATH_METRICS, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):  # the official parser: the exposition is well formed
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def log_lines(path):
    with open(path) as f:
        return f.read().splitlines()


def wait_for(predicate, while_alive):
    """Poll ``predicate`` until it returns something true, as long as ``while_alive`` runs; its last value."""
    while True:
        found = predicate()
        if found or not while_alive.is_alive():
            return found
        time.sleep(0.02)


class Prompt(threading.Thread):
    """A prompt sent from another thread (as the Slicer module's worker does); keeps its answer or error."""

    def __init__(self, s, point=(30, 30, 30)):
        threading.Thread.__init__(self, daemon=True)
        self.s, self.point, self.result, self.error = s, list(point), None, None
        self.start()

    def run(self):
        try:
            self.result = self.s.add_point_interaction(self.point, include_interaction=True)
        except Exception as exc:  # reported by the test
            self.error = exc


# ---------------------------------------------------------------- metrics


def test_metrics_count_what_happened(served):
    url, _ = served
    assert requests.get(url + P.PATH_METRICS).status_code == 401  # operators scrape with the key
    before = scrape(url)
    s = session(url)
    try:
        s.add_point_interaction([30, 30, 30], include_interaction=True)
        bad = requests.post(url + P.PATH_ADD_POINT, headers=dict(AUTH, **{P.LEASE_HEADER: s._lease_token}),
                            json={"coordinates": [999, 0, 0], "include_interaction": True})
        assert bad.status_code == 400
        assert requests.post(url + P.PATH_CLAIM, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert requests.get(url + "/no/such/path/42", headers=AUTH).status_code == 404
        after = scrape(url)
    finally:
        s.close(wait=True)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    req = "nninteractive_http_requests_total"
    assert delta(req, endpoint="/claim", method="POST", status="200", user="shared") == 1
    assert delta(req, endpoint="/claim", method="POST", status="401", user="unauthenticated") == 1
    assert delta(req, endpoint="/set_image", method="POST", status="200", user="shared") == 1
    assert delta(req, endpoint="/add_point_interaction", method="POST", status="200", user="shared") == 1
    assert delta(req, endpoint="/add_point_interaction", method="POST", status="400", user="shared") == 1
    assert delta(req, endpoint="unmatched", method="GET", status="404", user="shared") == 1  # no raw paths
    assert not any(name == req and "/no/such" in str(labels) for name, labels in after)
    lat = "nninteractive_http_request_duration_seconds_count"
    assert delta(lat, endpoint="/add_point_interaction", method="POST", status="200") == 1
    rej = "nninteractive_rejections_total"
    assert delta(rej, reason="bad_input") == 1 and delta(rej, reason="unauthorized") == 1
    assert delta(rej, reason="not_found") == 1
    assert delta("nninteractive_prediction_seconds_count") == 1
    assert delta("nninteractive_prediction_seconds_sum") > 0
    assert delta("nninteractive_gpu_queue_wait_seconds_count") == 1
    assert delta("nninteractive_http_request_bytes_total", endpoint="/set_image") > 1000
    assert delta("nninteractive_http_response_bytes_total", endpoint="/claim") > 0
    assert value(after, "nninteractive_sessions", user="shared") == 1  # the session open at the scrape
    assert value(after, "nninteractive_max_sessions") == 2
    assert 0 < value(after, "nninteractive_memory_reserved_bytes") < value(after, "nninteractive_memory_budget_bytes")
    assert value(after, "process_resident_memory_bytes") > 0
    assert value(after, "nninteractive_draining") == 0
    assert not any(name.endswith("_created") for name, _ in after)


# ---------------------------------------------------------------- request ids and logs


def test_request_id_in_the_header_and_in_every_log_line_of_the_request(served):
    url, log_path = served
    s = session(url)
    try:
        r = requests.post(url + P.PATH_ADD_POINT, headers=dict(AUTH, **{P.LEASE_HEADER: s._lease_token}),
                          json={"coordinates": [30, 30, 30], "include_interaction": True})
        assert r.status_code == 200
        rid = r.headers["X-Request-ID"]
        claim = requests.post(url + P.PATH_CLAIM, headers=AUTH)
        claim_rid = claim.headers["X-Request-ID"]
        requests.post(url + P.PATH_RELEASE, headers=dict(AUTH, **{P.LEASE_HEADER: claim.json()["lease_token"]}))
    finally:
        s.close(wait=True)
    assert rid != claim_rid
    entries = [json.loads(line) for line in log_lines(log_path) if line.startswith("{")]
    mine = [e for e in entries if e["request_id"] == rid]
    # the access log line (uvicorn's) and what the library printed while predicting (on the prediction thread)
    assert any('"POST /add_point_interaction HTTP/1.1" 200' in e["message"] for e in mine), mine
    assert any(e["logger"] == "nnInteractive" for e in mine), mine
    claimed = [e for e in entries if e["message"].startswith("claimed session ")]
    assert any(e["request_id"] == claim_rid for e in claimed)
    assert all(e["request_id"] != "-" for e in claimed)


def test_json_logs_are_one_object_per_line(served):
    _, log_path = served
    lines = [line for line in log_lines(log_path) if line.strip()]
    assert len(lines) > 10
    for line in lines:
        entry = json.loads(line)  # every line, the library's prints and uvicorn's lines included
        assert {"time", "level", "logger", "message", "request_id"} <= set(entry), entry
    entries = [json.loads(line) for line in lines]
    assert any(e["logger"].startswith("uvicorn") for e in entries)
    started = next(i for i, e in enumerate(entries) if e["message"].startswith("Uvicorn running on"))
    served_ = entries[started + 1:]
    assert len(served_) > 10
    # after start-up every line was written while serving a request, and names it: ours, uvicorn's access log, and
    # what the library printed on the prediction thread and in its own background preprocessing thread
    assert [e for e in served_ if e["request_id"] == "-"] == []


def test_text_logs_carry_the_request_id_and_prints_become_lines():
    from nninteractive_slicer_server import logs

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.RequestContextFilter())
    handler.setFormatter(logging.Formatter(logs.TEXT_FORMAT))
    logger = logging.getLogger("test_operations.text")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        token = logs.request_id_var.set("abc123")
        try:
            logger.warning("inside")
            printed = logs.PrintsToLog(logger, logging.WARNING)
            printed.write("half a ")
            printed.write("line\nand another\n")
        finally:
            logs.request_id_var.reset(token)
        logger.warning("outside")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert [line.split(" WARNING ", 1)[1] for line in lines] == [
        "[abc123] inside", "[abc123] half a line", "[abc123] and another", "[-] outside"]


# ---------------------------------------------------------------- queue position


def test_queue_position_of_a_prompt_waiting_for_the_gpu(served):
    url, _ = served
    a, b = session(url, 0), session(url, 1)
    try:
        a.add_point_interaction([30, 30, 30], include_interaction=True)  # one timed prediction: an expected wait
        idle = b.queue_position()
        assert idle["ahead"] == 0 and not idle["waiting"] and not idle["running"]

        first = Prompt(a, (25, 30, 30))
        running = wait_for(lambda: (a.queue_position() or {}).get("running"), first)
        assert running, "a's prediction was never seen running (%r)" % first.error

        second = Prompt(b, (30, 30, 30))
        waiting = wait_for(lambda: (lambda q: q if q and q.get("waiting") else None)(b.queue_position()), second)
        first.join()
        second.join()
        assert first.error is None and second.error is None, (first.error, second.error)
        assert waiting is not None, "b's prompt was never seen waiting"
        assert waiting["ahead"] == 1 and not waiting["running"] and waiting["queued"] == 2
        assert waiting["expected_wait_seconds"] is not None and waiting["expected_wait_seconds"] >= 0
        assert b.queue_position()["queued"] == 0
    finally:
        a.close(wait=True)
        b.close(wait=True)


def test_the_modules_controller_reports_its_prompt_waiting_for_the_gpu(served):
    """What the Slicer module shows on its busy bar: the controller's watcher asks beside the prompt in flight."""
    from SlicerNNInteractiveLib.controller import Controller
    from SlicerNNInteractiveLib.scene import ArrayScene

    url, _ = served
    a = session(url, 0)
    c = Controller(ArrayScene(image(1)[0]), lambda: RemoteSession(url, api_key=KEY))
    try:
        first = Prompt(a, (25, 30, 30))
        assert wait_for(lambda: (a.queue_position() or {}).get("running"), first), first.error
        c.submit("point", {"coordinates": (30, 30, 30)})
        seen = []
        while c.busy:
            c.tick()
            position = c.queue_position()
            if position and position.get("waiting"):
                seen.append(position)
            time.sleep(0.02)
        first.join()
        assert seen and seen[0]["ahead"] == 1, "the controller never reported its prompt waiting behind a's"
        assert c.queue_position() is None  # idle: nothing to report
    finally:
        c.close()
        a.close(wait=True)


def test_a_prediction_longer_than_the_liveness_timeout_keeps_its_session(slow_model, tmp_path):
    """A request in progress keeps its lease alive on the server, heartbeats or not: a client without a heartbeat
    whose prediction runs for several liveness timeouts keeps its session (and its image)."""
    with our_server(slow_model, tmp_path, "--api-key", KEY, "--torch-n-threads", "1", "--no-autozoom",
                    "--liveness-timeout-seconds", "1") as (url, _):
        s = RemoteSession(url, api_key=KEY, heartbeat=False)
        try:
            s.set_image(image(0))
            s.set_target_buffer(np.zeros(SHAPE, np.uint8))
            s.add_point_interaction([25, 30, 30], include_interaction=True)
            # What makes this test mean something: the prediction ran for longer than the liveness timeout.
            assert s.last_timing["exchange_ms"] > 1000, s.last_timing
            s.lease_status()  # the session is still there, with its image: a second prompt needs no upload
            s.add_point_interaction([30, 30, 30], include_interaction=True)
        finally:
            s.close(wait=True)


def test_queue_position_is_none_against_the_official_server(quiet_model, tmp_path):
    with official_server(quiet_model, tmp_path) as (url, _):
        s = RemoteSession(url)
        try:
            assert s.queue_position() is None
            assert s.queue_position() is None  # not asked again
        finally:
            s.close(wait=True)


# ---------------------------------------------------------------- graceful shutdown


def test_sigterm_finishes_the_prediction_refuses_claims_releases_and_exits(slow_model, tmp_path):
    with our_server(slow_model, tmp_path, "--api-key", KEY, "--torch-n-threads", "1", "--no-autozoom",
                    "--shutdown-deadline-seconds", str(DEADLINE)) as (url, proc):
        s = session(url)
        token = s._lease_token
        try:
            prompt = Prompt(s)
            assert wait_for(lambda: (s.queue_position() or {}).get("running"), prompt), prompt.error
            proc.send_signal(signal.SIGTERM)
            refused = requests.post(url + P.PATH_CLAIM, headers=AUTH)
            health = requests.get(url + P.PATH_HEALTHZ)
            prompt.join()
            rc = proc.wait(DEADLINE + 30)
        finally:
            s.close()
    assert prompt.error is None, prompt.error  # the prediction in progress finished and was answered
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 0, refused.text
    assert "shutting down" in refused.json()["detail"]
    assert health.status_code == 503 and health.json()["draining"] is True
    assert rc == 0  # drained and stopped by itself (the deadline's watchdog exits with 1)
    log = open(os.path.join(str(tmp_path), "server-%s.log" % url.rsplit(":", 1)[1])).read()
    assert "SIGTERM: shutting down within 60 s" in log
    sid = hashlib.sha256(token.encode()).hexdigest()[:8]  # logs name a session by a hash of its token
    assert re.search(r"session %s of \S+ closed at shutdown" % sid, log)  # the lease was released
    assert "released 1 session(s); stopping" in log
    assert "deadline" not in log.split("SIGTERM", 1)[1].replace("shutting down within", "")
    lines = [line for line in log.splitlines() if "POST /claim -> 503" in line]
    assert lines and "[%s]" % refused.headers["X-Request-ID"] in lines[0]  # text logs carry the request id


def test_shutdown_deadline_must_be_positive(quiet_model):
    p = subprocess.run([sys.executable, "-m", "nninteractive_slicer_server", "--model-dir", quiet_model, "--device",
                        "cpu", "--shutdown-deadline-seconds", "0"], capture_output=True, text=True, env=SERVER_ENV,
                       timeout=120)
    assert p.returncode == 2 and "--shutdown-deadline-seconds" in p.stderr and "Traceback" not in p.stderr
