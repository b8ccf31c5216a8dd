"""Hostile clients against real server processes on loopback (issue 16): whoever has no key cannot hurt the server,
and users with keys are kept apart. Each test runs one attack and checks what the server answers and that the valid
users beside it are unharmed. The figures (time, memory, descriptors under each attack) come from
``Testing/benchmark/hostile.py``; nothing here waits on a clock beyond the server's own short deadlines.

Two servers for the module: ``fortress`` (a keys file of named users with roles, a shared key, per-user limits,
short deadlines, an agent port, the balancer 127.0.0.1 trusted for X-Forwarded-For, run under ``ulimit -n 256``,
SIGHUP sent while it starts) and ``open_server`` (no key at all). Attackers connect from other loopback addresses
(127.0.0.2 and up: the whole of 127/8 is this machine), so the limits per address apply to them and not to the
tests' own requests from 127.0.0.1.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import requests

from conftest import REPO, SERVER_ENV, TORCH_THREADS, claim, free_port, running
from hostile_rig import Flood, first_bytes, image_body, open_idle, raw, read_answer, sigcgt, slow_headers, \
    stalled_upload, status_of

from SlicerNNInteractiveLib import protocol as P
from SlicerNNInteractiveLib.wire import pack_array

SHARED = "hostile-shared-Key-0123456789"
DESCRIPTORS = 256  # the fortress's open-file limit (soft = hard): its connection cap is 256 - 128
MiB = 1 << 20
HEADER_TIMEOUT = 1.0
UPLOAD_GRACE = 6.0
PER_ADDRESS = 8


def keys_command(keys_file, *args):
    p = subprocess.run([sys.executable, "-m", "nninteractive_slicer_server.identities", "--keys-file", str(keys_file),
                        *args], capture_output=True, text=True, env=SERVER_ENV, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


@pytest.fixture(scope="module")
def fortress(quiet_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    keys = tmp / "users.keys"
    tokens = {name: keys_command(keys, "add", name) for name in ("alice", "bob", "carl", "dave", "erin")}
    tokens["op"] = keys_command(keys, "add", "op", "--role", "operator")
    tokens["scraper"] = keys_command(keys, "add", "scraper", "--role", "metrics")
    # carl's line as written before the pre-check existed: every guess at it costs a slow hash
    keys.write_text(re.sub(r"^(carl:\S+) check=[0-9a-f]+$", r"\1", keys.read_text(), flags=re.M))
    shared = tmp / "shared.key"
    shared.write_text(SHARED)
    port, agent = free_port(), free_port()
    url = "http://127.0.0.1:%d" % port
    log_path = str(tmp / "fortress.log")
    server = [sys.executable, "-m", "nninteractive_slicer_server", "--model-dir", str(quiet_model), "--device", "cpu",
              "--port", str(port), "--torch-n-threads", TORCH_THREADS, "--no-autozoom", "--keys-file", str(keys),
              "--api-key-file", str(shared), "--max-sessions", "4", "--max-sessions-per-user", "2",
              "--memory-budget", "64M", "--max-image-voxels", "3M", "--header-timeout-seconds", str(HEADER_TIMEOUT),
              "--keep-alive-seconds", "1", "--max-connections-per-address", str(PER_ADDRESS),
              "--upload-grace-seconds", str(UPLOAD_GRACE), "--min-upload-rate", "4M", "--agent-port", str(agent),
              "--forwarded-allow-ips", "127.0.0.1", "--liveness-timeout-seconds", "60"]
    cmd = ["/bin/sh", "-c", 'ulimit -n %d && exec "$@"' % DESCRIPTORS, "sh"] + server
    hup = {}

    def ready():
        # SIGHUP as soon as the server catches it (the first thing it does), long before it serves: it must neither
        # die nor forget the signal
        if "pid" not in hup:
            pid = server_pid(port)
            if pid and sigcgt(pid) & (1 << (signal.SIGHUP - 1)):
                hup["pid"] = pid
                os.kill(pid, signal.SIGHUP)
                hup["serving_then"] = _answers(url)
        return requests.get(url + "/healthz", timeout=1).status_code == 200

    with running(cmd, url, log_path, ready=ready, what="fortress") as proc:
        yield SimpleNamespace(url=url, port=port, agent=agent, proc=proc, log=log_path, keys=keys, tokens=tokens,
                              hup=hup, model_dir=str(quiet_model), tmp=str(tmp), answers=[])


@pytest.fixture(scope="module")
def open_server(quiet_model, tmp_path_factory):
    """No key; started with a soft open-file limit of 200 under a higher hard one."""
    tmp = tmp_path_factory.mktemp("hostile-open")
    port = free_port()
    url = "http://127.0.0.1:%d" % port
    log_path = str(tmp / "open.log")
    cmd = ["/bin/sh", "-c", 'ulimit -S -n 200 && exec "$@"', "sh", sys.executable, "-m", "nninteractive_slicer_server",
           "--model-dir", str(quiet_model), "--device", "cpu", "--port", str(port), "--torch-n-threads",
           TORCH_THREADS, "--no-autozoom"]
    with running(cmd, url, log_path, what="open server") as proc:
        yield SimpleNamespace(url=url, proc=proc, log=log_path)


def server_pid(port):
    """The pid of our server process listening on ``port`` (found by its command line), or None."""
    for pid in os.listdir("/proc"):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"nninteractive_slicer_server" in args and b"--port" in args and str(port).encode() in args:
            return int(pid)
    return None


def _answers(url):
    try:
        requests.get(url + "/healthz", timeout=0.5)
        return True
    except requests.RequestException:
        return False


def auth(world, who, lease=None):
    h = {"Authorization": "Bearer " + (world.tokens[who] if who in world.tokens else who)}
    if lease:
        h[P.LEASE_HEADER] = lease
    return h


def call(world, method, path, who=None, lease=None, **kw):
    """A request from 127.0.0.1 whose answer is kept (for the no-server-path check)."""
    headers = dict(auth(world, who, lease) if who else {}, **kw.pop("headers", {}))
    r = requests.request(method, world.url + path, headers=headers, timeout=60, **kw)
    world.answers.append(r.content + json.dumps(dict(r.headers)).encode())
    return r


def log_text(world):
    with open(world.log) as f:
        return f.read()


def wait_for(condition, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


# ---------------------------------------------------------------- the key check cannot be turned against users


def first_request_during(flood, world, who):
    """``who``'s first request (its token not yet remembered) while ``flood`` runs: its status; checks that the
    flood went on for the whole request."""
    before = flood.count()
    status = call(world, "GET", P.PATH_CAPABILITIES, who).status_code
    after = flood.count()
    assert after > before, "the flood stopped before the valid request was answered: nothing was shown"
    return status


def test_a_flood_of_guessed_tokens_never_locks_out_a_valid_users_first_request(fortress):
    """The attack of the issue: 'Bearer <user>.<random>' as fast as the server answers, after a start (so no valid
    token is remembered). Guesses fail the pre-check (no slow hash), so bob's first request is served, and the
    flood gets 401s, never the 429 that would mean it occupied the slow path."""
    with Flood(fortress.port, "127.0.0.5", "bob") as flood:
        assert first_request_during(flood, fortress, "bob") == 200
        wait_for(lambda: flood.count() > 100, "the flood stalled")
    assert set(flood.statuses) == {401}, flood.statuses
    logged = len(re.findall(r"from 127\.0\.0\.5 -> 401", log_text(fortress)))
    assert 0 < logged <= 60, logged  # a flood of refusals writes a few log lines, not one each


def test_guesses_at_a_line_without_precheck_take_turns_with_everyone_else(fortress):
    """carl's line has no check= (written before it existed): each guess at it costs a slow hash. An attacker's
    address gets its turns and at most 2 checks waiting (then 429); dave's and carl's own first requests, from
    another address, are served between the attacker's checks."""
    with Flood(fortress.port, "127.0.0.6", "carl", threads=6) as flood:
        assert first_request_during(flood, fortress, "dave") == 200
        assert first_request_during(flood, fortress, "carl") == 200
    assert set(flood.statuses) <= {401, 429} and flood.statuses.get(401), flood.statuses
    assert flood.statuses.get(429), "six threads from one address never hit its limit of 2 slow checks: %s" % (
        flood.statuses,)


def test_unknown_and_known_names_cost_the_same_work(tmp_path, monkeypatch):
    """What a refusal costs may not tell which names exist: a guess at a real name and at a missing one do the same
    work (one pre-check, no slow hash; a missing name is checked against a decoy line), also beside a line written
    without a pre-check, whose guesses alone cost a slow hash (and tell that its name exists: the start-up log
    names such users). Timings: Testing/benchmark/hostile.py."""
    import asyncio

    from nninteractive_slicer_server import identities as ids

    path = tmp_path / "k"
    keys_command(path, "add", "alice")
    work = []
    for fn in ("precheck", "check_token"):
        real = getattr(ids, fn)
        monkeypatch.setattr(ids, fn, lambda *a, _fn=fn, _real=real: work.append(_fn) or _real(*a))

    def cost(gate, token):
        del work[:]
        with pytest.raises(ids.Refused):
            asyncio.run(gate.authenticate(b"Bearer " + token, "127.0.0.1"))
        return sorted(work)

    gate = ids.Identities(None, str(path))
    assert cost(gate, b"alice.guess") == cost(gate, b"nobody.guess") == ["precheck"]
    gate.close()
    keys_command(path, "add", "carl")
    path.write_text(re.sub(r"^(carl:\S+) check=[0-9a-f]+$", r"\1", path.read_text(), flags=re.M))
    gate = ids.Identities(None, str(path))
    assert cost(gate, b"alice.guess") == cost(gate, b"nobody.guess") == ["precheck"]
    assert cost(gate, b"carl.guess") == ["check_token"] and gate.without_precheck() == ["carl"]
    gate.close()


# ---------------------------------------------------------------- connections


def test_idle_connections_from_one_address_are_capped_and_closed_at_the_header_deadline(fortress):
    socks = open_idle(fortress.port, "127.0.0.7", 60)
    try:
        assert call(fortress, "GET", "/healthz").status_code == 200  # another address is served meanwhile
        answers = [first_bytes(s) for s in socks]  # the refused are answered at once; the rest at the deadline
        refused = [a for a in answers if status_of(a) == 503]
        assert len(refused) == 60 - PER_ADDRESS, [a[:40] for a in answers]
        assert b"too many open connections from your address" in refused[0]
        assert all(a == b"" for a in answers if status_of(a) != 503)  # sent nothing: closed without an answer
    finally:
        for s in socks:
            s.close()


def test_idle_connections_from_many_addresses_never_exhaust_descriptors(fortress):
    """300 idle connections from 60 addresses (5 each, under the per-address cap) at a 256-descriptor limit: the
    server holds at most its cap (256 - 128), answers the rest 503 at once, keeps its descriptors, closes the held
    ones at the header deadline and then serves again."""
    pid = fortress.proc.pid
    socks = []
    try:
        for i in range(60):
            socks += open_idle(fortress.port, "127.0.1.%d" % (i + 1), 5)
        fds = len(os.listdir("/proc/%d/fd" % pid))
        answers = [first_bytes(s) for s in socks]
        held = [a for a in answers if status_of(a) != 503]
        assert len(held) <= DESCRIPTORS - 128 and len(answers) - len(held) >= 300 - (DESCRIPTORS - 128)
        assert fds < DESCRIPTORS
        assert all(a == b"" for a in held)
    finally:
        for s in socks:
            s.close()
    assert wait_for(lambda: call(fortress, "GET", "/healthz").status_code == 200, "no service after the flood")
    assert fortress.proc.poll() is None


def test_headers_trickled_a_byte_at_a_time_get_408_at_the_deadline(fortress):
    out, _ = slow_headers(fortress.port, "127.0.0.8")  # one byte every 50 ms: 50 s if each byte moved the deadline
    assert status_of(out) == 408 and b"did not arrive in time" in out, out[:200]


def test_oversized_headers_get_431(fortress):
    answer = raw("127.0.0.8", fortress.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" +
                 b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 1000) for i in range(80)))
    assert status_of(answer) == 431


def test_an_idle_keep_alive_connection_is_closed(fortress):
    with socket.create_connection(("127.0.0.1", fortress.port), timeout=15, source_address=("127.0.0.8", 0)) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        out = b""
        while b'{"ok":true}' not in out:
            out += s.recv(4096)
        assert s.recv(4096) == b""  # then nothing more, and the server closes it


def test_the_agent_port_listens_on_loopback_only_and_sheds_a_flood(fortress):
    with pytest.raises(OSError):  # bound to 127.0.0.1 itself (--agent-host): another address reaches nothing
        socket.create_connection(("127.0.0.2", fortress.agent), timeout=5)
    flood = [socket.create_connection(("127.0.0.1", fortress.agent), timeout=10) for _ in range(80)]
    replies = [first_bytes(s) for s in flood]
    for s in flood:
        s.close()
    assert 0 < sum(r.startswith(b"up ") for r in replies) <= 32 + 8  # at most its cap held at once
    assert wait_for(lambda: raw("127.0.0.1", fortress.agent, b"").startswith(b"up "), "agent silent after a flood")


# ---------------------------------------------------------------- signals


def test_sighup_during_start_up_is_remembered_and_handled(fortress):
    assert fortress.hup and not fortress.hup["serving_then"], "the SIGHUP was not sent during start-up"
    log = log_text(fortress)
    assert "SIGHUP received 1 time(s) during start-up: handled now" in log
    assert re.search(r"keys file \S+ reloaded: 7 user\(s\)", log)


def test_sighup_without_a_keys_file_only_logs(open_server):
    for n in (1, 2):  # one at a time: two pending signals of one kind are delivered once
        open_server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: open(open_server.log).read().count("SIGHUP: no keys file to reread") == n, "no log line")
    assert open_server.proc.poll() is None and requests.get(open_server.url + "/healthz").status_code == 200


def test_a_reload_that_would_drop_most_users_waits_for_a_second_sighup(tmp_path, caplog, monkeypatch):
    """An emptied or truncated keys file must not lock everyone out on the next logrotate: a reload removing all, or
    more than half, of the users is refused with a warning and applied by a second SIGHUP within 5 minutes, the file
    unchanged; a file changed meanwhile starts over. (SIGHUP runs ``reload_logged`` on the server's event loop.)"""
    from nninteractive_slicer_server import identities as ids

    path = tmp_path / "k"
    for name in ("ann", "ben", "cid"):
        keys_command(path, "add", name)
    full = path.read_text()
    gate = ids.Identities(None, str(path))
    with caplog.at_level("INFO", logger="nninteractive_slicer_server"):
        path.write_text("")
        gate.reload_logged()
        assert gate.users() == ["ann", "ben", "cid"] and "NOT reloaded: it would remove 3 of the 3" in caplog.text
        path.write_text("\n".join(full.splitlines()[:2]))  # a different file: ann only (removes 2 of 3)
        gate.reload_logged()
        assert gate.users() == ["ann", "ben", "cid"] and "it would remove 2 of the 3" in caplog.text
        gate.reload_logged()  # the same file again: confirmed
        assert gate.users() == ["ann"] and "removed: ben, cid" in caplog.text
        path.write_text(full)
        gate.reload_logged()  # adding is never refused
        assert gate.users() == ["ann", "ben", "cid"]
        path.write_text("\n".join(line for line in full.splitlines() if not line.startswith("cid:")))
        gate.reload_logged()  # one of three: applied at once
        assert gate.users() == ["ann", "ben"]
        monkeypatch.setattr(ids, "CONFIRM_SECONDS", 0.0)  # a confirmation that comes too late starts over
        path.write_text("")
        gate.reload_logged()
        gate.reload_logged()
        assert gate.users() == ["ann", "ben"]
    gate.close()


def test_the_open_file_limit_is_raised_to_the_hard_limit(open_server):
    import resource

    with open("/proc/%d/limits" % open_server.proc.pid) as f:
        soft, hard = re.search(r"^Max open files\s+(\d+)\s+(\d+)", f.read(), re.M).groups()
    assert soft == hard == str(resource.getrlimit(resource.RLIMIT_NOFILE)[1]) and int(soft) > 200
    assert "open-file limit %s" % soft in open(open_server.log).read()


def test_head_healthz_and_no_key_means_everyone_is_the_operator(open_server):
    r = requests.head(open_server.url + "/healthz")
    assert r.status_code == 200 and r.content == b""
    info = requests.get(open_server.url + P.PATH_SERVER_INFO).json()
    assert info["user"] == "anonymous" and info["role"] == "operator" and "rss_bytes" in info


# ---------------------------------------------------------------- one user's share


def reserved(world):
    return call(world, "GET", P.PATH_SERVER_INFO, "op").json()["memory_reserved"]


def test_one_users_stalled_uploads_never_take_another_users_session_memory(fortress):
    """The attack of the issue: alice's stalled uploads reserve memory. She may hold at most her share (64 MiB x 2
    of 4 sessions): her second 112^3 image gets 503 naming her share, and bob's image of the same size is accepted
    while her first still holds its reservation; the stalled upload then gets 408 for its rate."""
    alice = [claim(fortress.url, auth(fortress, "alice")) for _ in range(2)]
    bob = claim(fortress.url, auth(fortress, "bob"))
    first = stalled_upload(fortress.port, fortress.tokens["alice"], alice[0])
    try:
        wait_for(lambda: reserved(fortress) > 20 * MiB, "alice's upload reserved nothing")
        second = stalled_upload(fortress.port, fortress.tokens["alice"], alice[1])
        answer = read_answer(second)
        second.close()
        assert status_of(answer) == 503 and b"alice already holds" in answer and b"--max-sessions-per-user" in answer
        r = requests.post(fortress.url + P.PATH_SET_IMAGE, data=image_body(4),
                          headers=dict(auth(fortress, "bob", bob), **{"X-Meta": "{}"}))
        assert r.status_code == 200, r.text
        first.setblocking(False)
        assert first_bytes(first) == b"", "alice's upload ended before bob's was accepted: nothing was shown"
        first.setblocking(True)
        answer = read_answer(first)  # then the minimum rate: 4.5 MiB, then nothing while the grace and its due ran
        assert status_of(answer) == 408 and b"bytes per second" in answer, answer[-300:]
    finally:
        first.close()
        for lease, who in ((alice[0], "alice"), (alice[1], "alice"), (bob, "bob")):
            call(fortress, "POST", P.PATH_RELEASE, who, lease)
    wait_for(lambda: reserved(fortress) == 0, "memory not given back")


# ---------------------------------------------------------------- operators and users


def test_operators_metrics_keys_and_users_see_what_their_role_allows(fortress):
    for path in (P.PATH_METRICS, P.PATH_EXPIRE):
        r = call(fortress, "GET", path, "alice")
        assert r.status_code == 403 and "operator" in r.json()["detail"]
    assert call(fortress, "GET", P.PATH_METRICS, SHARED).status_code == 403  # beside a keys file, a user
    assert call(fortress, "GET", P.PATH_METRICS, "op").status_code == 200
    assert call(fortress, "GET", P.PATH_EXPIRE, "op").status_code == 404  # allowed; no automatic models here
    assert call(fortress, "GET", P.PATH_METRICS, "scraper").status_code == 200
    for method, path in (("GET", P.PATH_CAPABILITIES), ("POST", P.PATH_CLAIM), ("GET", P.PATH_SERVER_INFO)):
        r = call(fortress, method, path, "scraper")
        assert r.status_code == 403 and "only read /metrics" in r.json()["detail"]
    user = call(fortress, "GET", P.PATH_SERVER_INFO, "alice").json()
    op = call(fortress, "GET", P.PATH_SERVER_INFO, "op").json()
    assert user["role"] == "user" and op["role"] == "operator"
    hidden = {"rss_bytes", "memory_budget", "memory_reserved", "sessions", "torch_compile"}
    assert not hidden & set(user) and hidden <= set(op)
    assert user["model"] == os.path.basename(fortress.model_dir)


def test_metrics_name_no_user_and_count_no_refusal_as_anyones(fortress):
    call(fortress, "GET", P.PATH_CAPABILITIES, "alice")
    call(fortress, "GET", P.PATH_CAPABILITIES, SHARED)
    call(fortress, "GET", P.PATH_CAPABILITIES, "alice.wrong")
    call(fortress, "GET", "/healthz")
    text = call(fortress, "GET", P.PATH_METRICS, "scraper").text
    series = re.findall(r'^nninteractive_http_requests_total\{(.*)\} ', text, re.M)
    labels = [dict(re.findall(r'(\w+)="([^"]*)"', s)) for s in series]
    users = {x["user"] for x in labels}
    assert users <= {"named", "shared", "unauthenticated"} and {"named", "shared", "unauthenticated"} <= users
    for name in fortress.tokens:
        assert '"%s"' % name not in text
    for x in labels:
        if x["status"] in ("401", "429") or x["endpoint"] == "/healthz":
            assert x["user"] == "unauthenticated", x
    assert re.search(r"^nninteractive_open_connections \d", text, re.M)
    assert re.search(r'^nninteractive_refused_connections_total\{reason="max_connections_per_address"\} [1-9]', text,
                     re.M)


def test_metrics_user_labels_only_when_the_operator_turns_them_on():
    from nninteractive_slicer_server.metrics import user_label

    for on, expected in ((False, ["named", "shared", "anonymous"]), (True, ["alice", "shared", "anonymous"])):
        srv = SimpleNamespace(metrics_user_labels=on)
        assert [user_label(srv, u) for u in ("alice", "shared", "anonymous")] == expected


# ---------------------------------------------------------------- the small items


def test_another_users_lease_is_refused_and_logged(fortress):
    lease = claim(fortress.url, auth(fortress, "erin"))
    try:
        r = call(fortress, "POST", P.PATH_HEARTBEAT, "bob", lease)
        assert r.status_code == 403
        wait_for(lambda: re.search(r"POST /heartbeat -> 403: this session was claimed by another user \(user bob\)",
                                   log_text(fortress)), "the 403 was not logged")
    finally:
        call(fortress, "POST", P.PATH_RELEASE, "erin", lease)


def test_a_path_with_a_line_break_cannot_forge_a_log_line(fortress):
    forged = "1999-01-01 00:00:00,000 INFO [-] FORGED"
    call(fortress, "GET", "/x%0A" + forged.replace(" ", "%20") + "%0D%0A")
    wait_for(lambda: "FORGED" in log_text(fortress), "the refusal was not logged")
    assert not any(line.startswith("1999-") for line in log_text(fortress).splitlines())
    assert "/x\\n1999-01-01" in log_text(fortress)


def test_the_balancers_forwarded_address_is_believed_and_no_one_elses(fortress):
    call(fortress, "GET", "/from-the-balancer", headers={"X-Forwarded-For": "203.0.113.9"})
    answer = raw("127.0.0.9", fortress.port, b"GET /from-elsewhere HTTP/1.1\r\nHost: x\r\n"
                 b"X-Forwarded-For: 203.0.113.10\r\n\r\n")
    assert status_of(answer) == 401
    log = wait_for(lambda: "/from-elsewhere" in log_text(fortress) and log_text(fortress), "not logged")
    assert "GET /from-the-balancer from 203.0.113.9 -> 401" in log
    assert "GET /from-elsewhere from 127.0.0.9 -> 401" in log and "203.0.113.10" not in log


def test_websocket_requests_are_behind_the_key(fortress):
    upgrade = (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")
    assert status_of(raw("127.0.0.10", fortress.port, upgrade + b"\r\n")) == 401
    answer = raw("127.0.0.10", fortress.port, upgrade + b"Authorization: Bearer %s\r\nConnection: close\r\n\r\n"
                 % fortress.tokens["alice"].encode())
    assert status_of(answer) == 404  # no websocket anywhere: an ordinary request, refused as unknown


def test_the_gate_refuses_websocket_scopes_where_a_server_speaks_websocket():
    """Our server runs no websocket protocol; the gate still checks websocket scopes, for a server that does
    (uvicorn with websockets, in this process)."""
    import asyncio

    import websockets

    from conftest import serve_in_process
    from nninteractive_slicer_server.app import make_app

    engine = SimpleNamespace(new_session=None, close_session=None, artifacts={"dataset_json": {"channel_names": {}}},
                             capabilities={"supported_interactions": {}}, queue=SimpleNamespace(listeners=[]))
    with serve_in_process(make_app(engine, api_key=SHARED)) as url:
        ws = url.replace("http://", "ws://") + "/ws"

        async def status(headers):
            try:
                async with websockets.connect(ws, additional_headers=headers, open_timeout=10):
                    return 101
            except websockets.exceptions.InvalidStatus as exc:
                return exc.response.status_code

        assert asyncio.run(status({})) == 401
        assert asyncio.run(status({"Authorization": "Bearer " + SHARED})) == 403  # past the gate: no such route


def test_the_start_up_log_warns_of_a_shared_key_or_plain_http_beyond_loopback(tmp_path, caplog):
    from argparse import Namespace

    from nninteractive_slicer_server.cli import warn_exposure
    from nninteractive_slicer_server.identities import Identities

    keys = tmp_path / "k"
    keys_command(keys, "add", "alice")
    cases = [("127.0.0.1", Identities(SHARED), None, []),
             ("0.0.0.0", Identities(SHARED), None, ["a SHARED key", "each of them is an operator", "plain HTTP"]),
             ("0.0.0.0", Identities(SHARED, str(keys)), "c.pem", ["a SHARED key"]),
             ("0.0.0.0", Identities(None, str(keys)), "c.pem", []),
             ("0.0.0.0", Identities(None, str(keys)), "balancer", []),  # plain HTTP behind a declared balancer
             ("0.0.0.0", Identities(None), None, ["NO API KEY"])]
    for host, ids, cert, words in cases:
        caplog.clear()
        with caplog.at_level("INFO", logger="nninteractive_slicer_server"):
            warn_exposure(Namespace(host=host, port=1527, ssl_certfile=None if cert == "balancer" else cert,
                                    forwarded_allow_ips="10.0.0.2" if cert == "balancer" else None, agent_port=None,
                                    agent_host="127.0.0.1"), ids)
        warnings = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
        for w in words:
            assert w in warnings, (host, cert, w, warnings)
        if not words:
            assert not warnings, warnings
        if cert:  # TLS, or a balancer declared in front
            assert "plain HTTP" not in warnings
        ids.close()


def test_a_server_failure_is_logged_with_its_cause(caplog):
    """A 5xx raised from another exception (what /infer does with a study that fails) logs that exception's
    traceback; the answer says only 'internal error'."""
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    from nninteractive_slicer_server import errors

    app = FastAPI()
    errors.install(app)

    @app.get("/fails")
    def fails():
        try:
            {}["the-real-cause"]
        except KeyError as exc:
            raise errors.Problem("the automatic segmentation failed: internal error") from exc

    with caplog.at_level("WARNING", logger="nninteractive_slicer_server"):
        r = TestClient(app).get("/fails")
    assert r.status_code == 500 and "the-real-cause" not in r.text
    assert "KeyError: 'the-real-cause'" in caplog.text and "Traceback" in caplog.text


def test_no_answer_names_a_server_path(fortress):
    """Every answer kept by this module (users', operators', refusals), and one request with a user's and an
    operator's key to every route of the app (most of them refused: no lease, no body, wrong input), is free of the
    server's paths."""
    from test_identities import route_table

    lease = claim(fortress.url, auth(fortress, "alice"))
    try:
        for who in ("alice", "op"):
            for method, path in route_table():
                call(fortress, method, path.replace("{job_id}", "0" * 32), who, lease, data=b"{not json",
                     headers={"X-Meta": "{not json either"})
        call(fortress, "POST", P.PATH_RELEASE, "alice", lease)  # (the sweep released it already: 410 or 200)
        lease = claim(fortress.url, auth(fortress, "alice"))
        image = np.random.RandomState(5).normal(100, 20, (1, 32, 32, 32)).astype(np.float32)
        assert call(fortress, "POST", P.PATH_SET_IMAGE, "alice", lease, data=pack_array(image),
                    headers={"X-Meta": "{}"}).status_code == 200
        call(fortress, "POST", P.PATH_SET_TARGET_BUFFER, "alice", lease, json={"shape": [32, 32, 32], "dtype": "u1"})
        call(fortress, "POST", P.PATH_ADD_POINT, "alice", lease, json={"coordinates": [5, 5, 5],
                                                                       "include_interaction": True})
        call(fortress, "POST", P.PATH_ADD_POINT, "alice", lease, json={"coordinates": [99, 5, 5],
                                                                       "include_interaction": True})
    finally:
        call(fortress, "POST", P.PATH_RELEASE, "alice", lease)
    assert len(fortress.answers) > 60
    paths = {fortress.model_dir, fortress.tmp, str(fortress.keys), REPO, sys.prefix, os.path.dirname(sys.executable)}
    for answer in fortress.answers:
        for path in paths:
            assert path.encode() not in answer, (path, answer[:300])
