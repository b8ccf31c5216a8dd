"""Identities: a keys file of named users beside the shared key, leases bound to who claimed them, a per-user cap,
SIGHUP reload, every route but /healthz behind the key (answered from the headers, the body never read), and no key
or token in the log, the process's arguments or any response."""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from types import SimpleNamespace
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests

from conftest import SERVER_ENV, our_server
from test_equivalence import make_image

from SlicerNNInteractiveLib import protocol as P
from SlicerNNInteractiveLib.client import RemoteSession
from SlicerNNInteractiveLib.errors import ServerAtCapacityError, UnauthorizedError
from SlicerNNInteractiveLib.wire import pack_array

SHARED = "shared-Key-0123456789abcdef"


def keys_command(keys_file, *args):
    p = subprocess.run([sys.executable, "-m", "nninteractive_slicer_server.identities", "--keys-file", str(keys_file),
                        *args], capture_output=True, text=True, env=SERVER_ENV, timeout=60)
    return p.returncode, p.stdout.strip(), p.stderr


def add_user(keys_file, name):
    rc, out, err = keys_command(keys_file, "add", name)
    assert rc == 0, err
    return out


@pytest.fixture(scope="module")
def world(quiet_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("identities")
    keys_file = tmp / "users.keys"
    tokens = {"alice": add_user(keys_file, "alice"), "bob": add_user(keys_file, "bob")}
    key_file = tmp / "shared.key"
    key_file.write_text(SHARED + "\n")
    with our_server(quiet_model, tmp, "--no-autozoom", "--max-sessions", "5", "--max-sessions-per-user", "2",
                    "--keys-file", str(keys_file), "--api-key-file", str(key_file), "--verbose",
                    "--log-level", "debug") as (url, proc):
        yield SimpleNamespace(url=url, proc=proc, keys_file=keys_file, tokens=tokens, secrets=[SHARED],
                              lease_tokens=[], responses=[],
                              log=os.path.join(str(tmp), "server-%d.log" % urlsplit(url).port))


def headers(key, lease=None):
    h = {"Authorization": "Bearer " + key}
    if lease:
        h[P.LEASE_HEADER] = lease
    return h


def call(world, method, path, key, lease=None, **kw):
    """A raw request whose answer is kept for the no-secret-in-any-response check."""
    r = requests.request(method, world.url + path, headers={**headers(key, lease), **kw.pop("headers", {})}, **kw)
    world.responses.append(r)
    return r


def claim(world, key):
    r = call(world, "POST", P.PATH_CLAIM, key)
    assert r.status_code == 200, r.text
    world.lease_tokens.append(r.json()["lease_token"])
    return r.json()["lease_token"]


# ---------------------------------------------------------------- the keys command and the file


def test_keys_file_holds_salted_hashes_only(world):
    text = world.keys_file.read_text()
    assert stat.S_IMODE(os.stat(world.keys_file).st_mode) == 0o600
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert [line.split(":")[0] for line in lines] == ["alice", "bob"]
    for line, token in zip(lines, world.tokens.values()):
        assert line.split(":", 1)[1].startswith("scrypt$16384$8$1$")
        assert token not in text and token.split(".", 1)[1] not in text
    assert world.tokens["alice"].startswith("alice.") and len(world.tokens["alice"]) > 40
    rc, _, err = keys_command(world.keys_file, "add", "alice")
    assert rc == 2 and "already" in err
    rc, _, err = keys_command(world.keys_file, "add", "shared")
    assert rc == 2 and "not shared" in err
    rc, out, _ = keys_command(world.keys_file, "list")
    assert rc == 0 and out.split() == ["alice", "1", "token(s)", "user", "bob", "1", "token(s)", "user"]


def test_hashes_round_trip_in_both_schemes_and_compare_in_constant_time():
    from nninteractive_slicer_server.identities import check_token, hash_token

    for scheme in ("scrypt", "pbkdf2_sha256"):
        text = hash_token("carol.abc", scheme)
        assert check_token(b"carol.abc", text) and not check_token(b"carol.abd", text)
        assert hash_token("carol.abc", scheme) != text  # salted
    import inspect

    import nninteractive_slicer_server.identities as ids

    src = inspect.getsource(ids)
    assert "compare_digest(given, digest)" in src and "compare_digest(token, self._shared)" in src


def test_one_slow_check_per_new_token_remembered_by_a_keyed_digest(tmp_path, monkeypatch):
    """A token costs one slow hash the first time (one line's: its name picks the line), nothing after; a guessed
    secret fails the cheap pre-check and costs no slow hash, whether its name exists or not; what is remembered is
    an HMAC of the token, never the token; a reload keeps what it remembered for unchanged lines only."""
    import asyncio

    from nninteractive_slicer_server import identities as ids

    path = tmp_path / "k"
    tokens = {name: add_user(path, name) for name in ("erin", "frank")}
    checks = []
    real = ids.check_token
    monkeypatch.setattr(ids, "check_token", lambda token, text: checks.append(token) or real(token, text))
    gate = ids.Identities("the-shared-one", str(path))

    def who(token):
        try:
            return asyncio.run(gate.authenticate(b"Bearer " + token.encode(), "127.0.0.1")).name
        except ids.Refused as exc:
            return exc.status

    assert [who(tokens["erin"]), who(tokens["erin"]), who(tokens["frank"])] == ["erin", "erin", "frank"]
    assert len(checks) == 2
    assert [who("erin.guessed"), who("erin.guessed"), who("nobody.x"), who("no-dot")] == [401] * 4
    assert len(checks) == 2  # refused by the pre-check: no slow hash for a guess
    assert who("the-shared-one") == "shared" and len(checks) == 2
    remembered = list(gate._known) + list(gate._refused)
    assert len(remembered) == 2 and not any(t.encode() in remembered for t in tokens.values())
    gate.reload()
    assert who(tokens["erin"]) == "erin" and who(tokens["frank"]) == "frank" and len(checks) == 2  # kept
    lines = path.read_text().splitlines()
    path.write_text("\n".join(line + " role=operator" if line.startswith("frank:") else line for line in lines))
    gate.reload()  # frank's line changed (his role): his token is checked again, erin's is still remembered
    assert who(tokens["erin"]) == "erin" and len(checks) == 2
    assert asyncio.run(gate.authenticate(b"Bearer " + tokens["frank"].encode())) == ("frank", "operator")
    assert len(checks) == 3
    gate.close()


def test_a_broken_keys_file_is_named_by_line_and_never_quoted(tmp_path, quiet_model):
    from nninteractive_slicer_server.identities import KeysFileError, read_keys_file

    path = tmp_path / "k"
    path.write_text("# users\n\nalice.pasted-Token-By-Mistake-123\n")
    with pytest.raises(KeysFileError) as err:
        read_keys_file(str(path))
    assert "line 3" in str(err.value) and "pasted" not in str(err.value)
    path.write_text("alice:scrypt$16384$8$1$zz$zz\n")
    with pytest.raises(KeysFileError) as err:
        read_keys_file(str(path))
    assert "line 1" in str(err.value)
    env = dict(SERVER_ENV, NN_INTERACTIVE_API_KEY="")
    p = subprocess.run([sys.executable, "-m", "nninteractive_slicer_server", "--model-dir", str(quiet_model),
                        "--device", "cpu", "--keys-file", str(path)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "line 1" in p.stderr, p.stderr


# ---------------------------------------------------------------- who may use what


def test_two_users_each_with_their_own_sessions(world):
    alice, bob = world.tokens["alice"], world.tokens["bob"]
    for key, name in ((alice, "alice"), (bob, "bob"), (SHARED, "shared")):
        r = call(world, "GET", P.PATH_SERVER_INFO, key)
        assert r.status_code == 200 and r.json()["user"] == name
    lease = claim(world, alice)
    for key in (bob, SHARED):  # a valid key, but not the one that claimed the lease
        for method, path in (("POST", P.PATH_HEARTBEAT), ("GET", P.PATH_LEASE_STATUS),
                             ("POST", P.PATH_SET_DO_AUTOZOOM), ("POST", P.PATH_RELEASE)):
            r = call(world, method, path, key, lease, json={"do_autozoom": False})
            assert r.status_code == 403, (path, r.status_code, r.text)
            assert "another user" in r.json()["detail"]
    r = call(world, "POST", P.PATH_SET_DO_AUTOZOOM, alice, lease, json={"do_autozoom": False})
    assert r.status_code == 200  # the refused release released nothing
    assert call(world, "POST", P.PATH_RELEASE, alice, lease).status_code == 200
    assert call(world, "POST", P.PATH_HEARTBEAT, alice, lease).status_code == 410
    with open(world.log) as f:
        log = f.read()
    assert "for alice" in log and "of alice released" in log


def test_a_session_life_through_the_raw_protocol(world):
    """Every kind of answer once (images, prompts, errors), for the no-secret check below."""
    key = world.tokens["bob"]
    lease = claim(world, key)
    image = make_image()
    r = call(world, "POST", P.PATH_SET_IMAGE, key, lease, data=pack_array(image),
             headers={P.META_HEADER: json.dumps({"image_properties": {"spacing": [1, 1, 1]}}),
                      "Content-Type": P.OCTET_STREAM})
    assert r.status_code == 200, r.text
    assert call(world, "POST", P.PATH_SET_TARGET_BUFFER, key, lease,
                json={"shape": list(image.shape[1:]), "dtype": "uint8"}).status_code == 200
    r = call(world, "POST", P.PATH_ADD_POINT, key, lease, json={"coordinates": [10, 10, 10],
                                                                "include_interaction": True})
    assert r.status_code == 200, r.text
    assert call(world, "POST", P.PATH_ADD_POINT, key, lease, json={"coordinates": [1e9, 0, 0],
                                                                   "include_interaction": True}).status_code == 400
    assert call(world, "POST", P.PATH_UNDO, key, lease).status_code == 200
    assert call(world, "GET", P.PATH_CAPABILITIES, key).status_code == 200
    assert call(world, "POST", P.PATH_HEARTBEAT, key, lease).status_code == 200
    assert call(world, "POST", P.PATH_HEARTBEAT, key, "no-such-lease").status_code == 410
    assert call(world, "POST", P.PATH_CLAIM, "bob.wrong").status_code == 401
    assert call(world, "POST", P.PATH_RELEASE, key, lease).status_code == 200


def test_each_user_has_at_most_max_sessions_per_user(world):
    alice, bob = world.tokens["alice"], world.tokens["bob"]
    held = [RemoteSession(world.url, api_key=alice), RemoteSession(world.url, api_key=alice)]
    with pytest.raises(ServerAtCapacityError) as err:
        RemoteSession(world.url, api_key=alice)
    assert "--max-sessions-per-user" in str(err.value) and "alice already holds 2" in str(err.value)
    assert "You hold as many sessions" in str(err.value) and "raise --max-sessions." not in str(err.value)
    r = call(world, "POST", P.PATH_CLAIM, alice)
    assert r.status_code == 503 and r.headers["Retry-After"] == "10"
    other = RemoteSession(world.url, api_key=bob)  # another user is not held back by alice's cap
    shared = RemoteSession(world.url, api_key=SHARED)
    held.pop().close(wait=True)
    again = RemoteSession(world.url, api_key=alice)  # a freed slot is alice's again
    for s in held + [other, shared, again]:
        s.close(wait=True)


def test_the_shared_key_serves_the_official_client_and_ours(world):
    from nnInteractive.inference.remote import nnInteractiveRemoteInferenceSession

    image = make_image()
    for make in (lambda key: nnInteractiveRemoteInferenceSession(world.url, api_key=key),
                 lambda key: RemoteSession(world.url, api_key=key)):
        for key in (SHARED, world.tokens["alice"]):
            s = make(key)
            try:
                s.set_image(image)
                buf = np.zeros(image.shape[1:], np.uint8)
                s.set_target_buffer(buf)
                s.add_point_interaction((10, 10, 10), include_interaction=True)
            finally:
                s.close()
    with pytest.raises(UnauthorizedError):
        RemoteSession(world.url, api_key="alice.not-her-token")


# ---------------------------------------------------------------- the key in front of every route


def route_table():
    """Every (method, path) of the app, from the app's own route table (an app made on a stand-in engine)."""
    from nninteractive_slicer_server.app import make_app

    engine = SimpleNamespace(new_session=None, close_session=None, artifacts={"dataset_json": {"channel_names": {}}},
                             capabilities={"supported_interactions": {}}, queue=SimpleNamespace(listeners=[]))
    app = make_app(engine, api_key="x")
    found = []

    def walk(routes, prefix):
        for route in routes:
            if hasattr(route, "original_router"):  # FastAPI >= 0.13x keeps an included router as one entry
                walk(route.original_router.routes, prefix + (getattr(route.include_context, "prefix", "") or ""))
            else:
                for method in sorted(getattr(route, "methods", None) or ["GET"]):
                    found.append((method, prefix + route.path))

    walk(app.routes, "")
    return found


def raw_exchange(url, method, path, authorization=None, declared=64 << 20):
    """Send the request line and headers, declaring ``declared`` body bytes but sending none; return the answer
    and whether the server then closed the connection (it waited for no body)."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    lines = ["%s %s HTTP/1.1" % (method, path), "Host: %s:%d" % (host, port),
             "Content-Type: application/octet-stream", "Content-Length: %d" % declared]
    if authorization:
        lines.append("Authorization: " + authorization)
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break  # the server closed the connection: it will not read the body
                data += chunk
        except socket.timeout:
            raise AssertionError("%s %s: the server waited for the body instead of answering (got %r)"
                                 % (method, path, data[:200]))
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
    return status, {k.lower().decode(): v.decode() for k, v in fields.items()}, body


def test_every_route_but_healthz_needs_a_key_and_no_unauthenticated_body_is_read(world):
    routes = route_table()
    paths = {path for _, path in routes}
    assert {P.PATH_CLAIM, P.PATH_SET_IMAGE, P.PATH_ADD_SCRIBBLE, P.PATH_SERVER_INFO, "/x/openapi.json"} <= paths
    for method, path in routes + [("POST", "/no-such-route"), ("GET", "/healthz/")]:
        if path == P.PATH_HEALTHZ:
            status, _, body = raw_exchange(world.url, method, path, declared=0)
            assert status == 200
            continue
        for authorization in (None, "Bearer wrong", "Bearer alice.wrong", "Basic " + SHARED, world.tokens["bob"]):
            status, fields, body = raw_exchange(world.url, method, path, authorization)
            assert status == 401, (method, path, authorization, status, body)
            assert fields["www-authenticate"] == "Bearer" and fields["connection"] == "close"
            assert "x-request-id" in fields
            world.responses.append(SimpleNamespace(content=body, headers=fields))
    with open(world.log) as f:
        assert "/x/openapi.json from 127.0.0.1 -> 401" in f.read()


# ---------------------------------------------------------------- reload on SIGHUP (changes the users: runs late)


def wait_for(condition, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def status_of(world, key):
    return requests.get(world.url + P.PATH_CAPABILITIES, headers=headers(key)).status_code


def test_sighup_rereads_the_keys_file(world):
    carol = add_user(world.keys_file, "carol")
    world.tokens["carol"] = carol
    assert status_of(world, carol) == 401  # not before the reload
    alice_lease = claim(world, world.tokens["alice"])
    world.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: status_of(world, carol) == 200, "carol was not let in after SIGHUP")
    assert call(world, "POST", P.PATH_HEARTBEAT, world.tokens["alice"], alice_lease).status_code == 200
    assert status_of(world, SHARED) == 200

    rc, _, err = keys_command(world.keys_file, "remove", "bob")
    assert rc == 0, err
    assert status_of(world, world.tokens["bob"]) == 200  # remembered until the reload
    world.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: status_of(world, world.tokens["bob"]) == 401, "bob was still let in after SIGHUP")
    assert status_of(world, carol) == 200 and status_of(world, world.tokens["alice"]) == 200

    good = world.keys_file.read_text()
    world.keys_file.write_text(good + "dave:not-a-hash\n")  # a broken file changes nothing
    world.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "keys file not reloaded" in open(world.log).read(), "no error logged for a broken file")
    assert status_of(world, carol) == 200 and status_of(world, world.tokens["bob"]) == 401
    assert world.proc.poll() is None
    assert call(world, "POST", P.PATH_RELEASE, world.tokens["alice"], alice_lease).status_code == 200
    log = open(world.log).read()
    assert "added: carol" in log and "removed: bob" in log


# ---------------------------------------------------------------- nothing secret anywhere (runs last)


def test_no_key_or_token_in_the_log_the_arguments_or_any_response(world):
    secrets_ = world.secrets + list(world.tokens.values()) + [t.split(".", 1)[1] for t in world.tokens.values()]
    assert len(world.lease_tokens) >= 3 and len(world.responses) > 50
    with open("/proc/%d/cmdline" % world.proc.pid, "rb") as f:
        argv = f.read().decode()
    assert "--api-key-file" in argv
    for s in secrets_:
        assert s not in argv
    with open(world.log) as f:
        log = f.read()
    assert "GET /capabilities" in log  # the access log was on
    for s in secrets_ + world.lease_tokens + [t[:12] for t in world.lease_tokens]:
        assert s not in log, "a secret is in the server's log"
    for r in world.responses:
        text = r.content.decode("latin-1") + json.dumps(dict(r.headers))
        for s in secrets_:
            assert s not in text, "a key is in a response"
