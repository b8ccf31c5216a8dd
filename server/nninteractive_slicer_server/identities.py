"""Who is calling: the shared key, a keys file of named users, and the gate that checks them before anything else.

Keys file: one token a line, ``NAME:SCHEME$PARAMS$SALT$HASH [role=ROLE] [check=CHECK]`` (``#`` starts a comment; a
name may have several lines, one per token, to rotate a token without a gap). ``nninteractive-slicer-server-keys add
NAME [--role ROLE]`` writes a line and prints the new token once; the server keeps only the salted hash, and rereads
the file on SIGHUP. The schemes (standard library only; salt and hash in hex, the hash of the whole token's UTF-8
bytes, 32 bytes):

* ``scrypt$N$R$P$SALT$HASH``: ``hashlib.scrypt(token, salt=SALT, n=N, r=R, p=P, dklen=32)`` (what ``add`` writes);
* ``pbkdf2_sha256$ITERATIONS$SALT$HASH``: ``hashlib.pbkdf2_hmac("sha256", token, SALT, ITERATIONS, 32)``.

``role``: ``user`` (the default: sessions and automatic models), ``operator`` (also ``/metrics``, ``/expire`` and
the details of ``/x/info``) or ``metrics`` (``/metrics`` only: a scraper's key). ``check``: 8 hex digits, the first 4
bytes of ``sha256(b"nninteractive-precheck\\0" + SALT + token)``, a cheap pre-check written by ``add``: a guessed
secret fails it in microseconds (all but one guess in 2**32), so guesses never reach the slow hash that a real
user's first request needs. It tells an offline attacker 32 bits about a 256-bit random token: nothing usable.

A token of the keys file reads ``NAME.SECRET``: its name says which lines to check. A guess costs the same work
whether its name exists or not (a name that does not exist is checked against a decoy line), so the time of a
refusal tells no names; except a line without a pre-check (written before it existed), whose every guess costs a
slow hash: the start-up log names those users, to be given new tokens. A slow hash runs on one thread, taking
turns between client addresses, at most ``SLOW_PER_ADDRESS`` waiting per address and ``SLOW_TOTAL`` in all (beyond:
429), so one address (an attacker guessing at lines without a check) cannot keep another's first request waiting.
A token that passed is remembered under an HMAC of it with a key made at start-up (never the token itself), so later
requests cost one fast digest; a reload keeps what it remembered for the lines that did not change.

A reload that would remove all the users, or more than half of them, is refused with a warning (an emptied or
truncated file must not lock everyone out): sending SIGHUP again within ``CONFIRM_SECONDS`` with the same file
applies it. A broken file is refused whole, naming the line.

The gate (``KeyGate``, an ASGI middleware) runs before routing: when a key is required, every path but
``/healthz`` (unknown paths and websocket requests included) answers 401 from the headers alone, before any byte of
the body is received, and closes the connection, so an unauthenticated upload is never read; a refusal is logged
(at most ``LineBudget.per_window`` lines per client address a minute, then a count). It sets
``request.state.user`` (the user's name, ``"shared"`` for the shared key, ``"anonymous"`` when the server requires
no key: for the logs and metrics; leases are bound to it) and ``request.state.role``. No key or token is ever logged
or answered.
"""

import argparse
import asyncio
import collections
import concurrent.futures
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sys
import tempfile
import threading
import time

from SlicerNNInteractiveLib import protocol as P

from .logs import LineBudget

log = logging.getLogger("nninteractive_slicer_server")

SHARED_USER = "shared"  # who presents the shared key (--api-key / --api-key-file / NN_INTERACTIVE_API_KEY)
ANONYMOUS = "anonymous"  # everyone, when the server requires no key
RESERVED = (SHARED_USER, ANONYMOUS)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_@+-]{0,63}\Z")
OPEN_PATHS = frozenset([P.PATH_HEALTHZ])  # the only paths a request may reach without a key
KEYS_FILE_ENV = "NN_INTERACTIVE_KEYS_FILE"

USER, OPERATOR, METRICS = "user", "operator", "metrics"
ROLES = (USER, OPERATOR, METRICS)
METRICS_PATHS = frozenset([P.PATH_METRICS])  # all that a ``metrics`` key may read

SCRYPT = {"n": 1 << 14, "r": 8, "p": 1}  # ~16 MiB and tens of ms per check, once per new token
PBKDF2_ITERATIONS = 600_000
PRECHECK_PREFIX = b"nninteractive-precheck\0"
PRECHECK_BYTES = 4
MAX_TOKEN_BYTES = 1024
SLOW_PER_ADDRESS = 2  # slow checks of one client address waiting or running at once; beyond: 429
SLOW_TOTAL = 32  # slow checks waiting or running at once, all addresses together; beyond: 429
MAX_REFUSED_MEMORY = 4096
CONFIRM_SECONDS = 300.0  # a refused reload is applied by a second SIGHUP within this long, the file unchanged


class KeysFileError(ValueError):
    pass


class ReloadRefused(Exception):
    """The new keys file would remove all or most users; ``fingerprint`` identifies its content."""

    def __init__(self, removed, remaining, fingerprint):
        Exception.__init__(self, "it would remove %d of the %d user(s) (%s), leaving %d"
                           % (len(removed), len(removed) + remaining, ", ".join(sorted(removed)), remaining))
        self.removed, self.remaining, self.fingerprint = sorted(removed), remaining, fingerprint


class Refused(Exception):
    def __init__(self, detail, status=401, retry_after=None):
        Exception.__init__(self, detail)
        self.detail = detail
        self.status = status
        self.retry_after = retry_after


Identity = collections.namedtuple("Identity", "name role")
Line = collections.namedtuple("Line", "name hashed role check salt key")  # key: what identifies the line on reload


# ---------------------------------------------------------------- hashes


def hash_token(token, scheme="scrypt"):
    """The ``SCHEME$...`` text that ``check_token`` accepts for ``token`` (a new random salt each time)."""
    salt = secrets.token_bytes(16)
    data = token.encode("utf-8")
    if scheme == "scrypt":
        digest = hashlib.scrypt(data, salt=salt, dklen=32, **SCRYPT)
        return "scrypt$%d$%d$%d$%s$%s" % (SCRYPT["n"], SCRYPT["r"], SCRYPT["p"], salt.hex(), digest.hex())
    if scheme == "pbkdf2_sha256":
        digest = hashlib.pbkdf2_hmac("sha256", data, salt, PBKDF2_ITERATIONS, 32)
        return "pbkdf2_sha256$%d$%s$%s" % (PBKDF2_ITERATIONS, salt.hex(), digest.hex())
    raise ValueError("unknown scheme %r (scrypt or pbkdf2_sha256)" % scheme)


def precheck(token, salt):
    """The cheap pre-check value of ``token`` (bytes) for a line with ``salt``."""
    return hashlib.sha256(PRECHECK_PREFIX + salt + token).digest()[:PRECHECK_BYTES]


def key_line(name, token, scheme="scrypt", role=USER):
    """The keys-file line for ``token``: its salted hash, its role (when not ``user``) and its pre-check."""
    hashed = hash_token(token, scheme)
    salt = _parse_hash(hashed)[2]
    return "%s:%s%s check=%s" % (name, hashed, "" if role == USER else " role=%s" % role,
                                 precheck(token.encode("utf-8"), salt).hex())


def _parse_hash(text):
    """(scheme, params, salt, hash) of a ``SCHEME$...`` text; ValueError when malformed."""
    parts = text.split("$")
    if parts[0] == "scrypt" and len(parts) == 6:
        n, r, p = (int(v) for v in parts[1:4])
        if n < 2 or n & (n - 1) or n > 1 << 20 or not 1 <= r <= 32 or not 1 <= p <= 16 or 128 * n * r > 1 << 30:
            raise ValueError("scrypt parameters out of range")
        params = {"n": n, "r": r, "p": p}
    elif parts[0] == "pbkdf2_sha256" and len(parts) == 4:
        iterations = int(parts[1])
        if not 1000 <= iterations <= 10_000_000:
            raise ValueError("pbkdf2 iterations out of range")
        params = {"iterations": iterations}
    else:
        raise ValueError("unknown scheme")
    salt, digest = bytes.fromhex(parts[-2]), bytes.fromhex(parts[-1])
    if len(salt) < 8 or len(digest) < 16:
        raise ValueError("salt or hash too short")
    return parts[0], params, salt, digest


def check_token(token, text):
    """Whether ``token`` (bytes) hashes to ``text``; compared in constant time."""
    scheme, params, salt, digest = _parse_hash(text)
    if scheme == "scrypt":
        given = hashlib.scrypt(token, salt=salt, dklen=len(digest), maxmem=256 * params["n"] * params["r"]
                               * params["p"] + (1 << 20), **params)
    else:
        given = hashlib.pbkdf2_hmac("sha256", token, salt, params["iterations"], len(digest))
    return hmac.compare_digest(given, digest)


# ---------------------------------------------------------------- the keys file


def parse_keys(text, path):
    """{name: [Line, ...]} of a keys file's ``text``. KeysFileError names the line, never quotes it (a token pasted
    by mistake must not reach the log)."""
    users = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, rest = line.partition(":")
        name = name.strip()
        hashed, *attributes = rest.split() or [""]
        where = "%s, line %d" % (path, number)
        if not sep or not NAME_RE.match(name):
            raise KeysFileError("%s: not 'NAME:SCHEME$...' with a name of letters, digits, _ @ + - (at most 64)"
                                % where)
        if name in RESERVED:
            raise KeysFileError("%s: the name %r is reserved" % (where, name))
        try:
            salt = _parse_hash(hashed)[2]
        except ValueError as exc:
            raise KeysFileError("%s: the hash is not 'scrypt$N$R$P$SALT$HASH' or 'pbkdf2_sha256$ITERATIONS$SALT$HASH' "
                                "(%s)" % (where, exc))
        fields = {}
        for attribute in attributes:
            key, eq, value = attribute.partition("=")
            if not eq or key not in ("role", "check") or key in fields:
                raise KeysFileError("%s: after the hash only 'role=ROLE' and 'check=HEX' may follow, once each" % where)
            fields[key] = value
        role = fields.get("role", USER)
        if role not in ROLES:
            raise KeysFileError("%s: role=%s is not one of %s" % (where, role, ", ".join(ROLES)))
        check = None
        if "check" in fields:
            try:
                check = bytes.fromhex(fields["check"])
            except ValueError:
                check = b""
            if len(check) != PRECHECK_BYTES:
                raise KeysFileError("%s: check= must be %d hex digits" % (where, 2 * PRECHECK_BYTES))
        users.setdefault(name, []).append(Line(name, hashed, role, check, salt, (hashed, role, check)))
    return users


def read_keys_file(path):
    """(users as ``parse_keys`` gives them, a fingerprint of the file's content)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeysFileError("the keys file %s cannot be read (%s)" % (path, getattr(exc, "strerror", None) or exc))
    return parse_keys(text, path), hashlib.sha256(data).hexdigest()


def _decoy():
    """A line of a name nobody has, checked in place of a missing name's lines: the same work as a real one."""
    hashed = hash_token(secrets.token_urlsafe(32))
    salt = _parse_hash(hashed)[2]
    return Line("", hashed, USER, precheck(secrets.token_bytes(32), salt), salt, None)


# ---------------------------------------------------------------- the slow path, shared fairly


class SlowChecks:
    """One thread computes slow hashes, taking turns between client addresses: each address has at most
    ``per_address`` checks waiting or running, all together at most ``total``; beyond, ``Refused`` (429)."""

    def __init__(self, per_address=SLOW_PER_ADDRESS, total=SLOW_TOTAL):
        self.per_address, self.total = per_address, total
        self._cv = threading.Condition()
        self._queues = collections.OrderedDict()  # address -> deque of (function, future), in turn order
        self._pending = collections.Counter()  # address -> checks waiting or running
        self._thread = None
        self._closed = False

    def submit(self, address, fn):
        """A ``concurrent.futures.Future`` of ``fn()``, run in this address's turn."""
        with self._cv:
            if self._pending[address] >= self.per_address or sum(self._pending.values()) >= self.total:
                raise Refused("too many new keys are being checked; try again in a second", status=429, retry_after=1)
            future = concurrent.futures.Future()
            self._queues.setdefault(address, collections.deque()).append((fn, future))
            self._pending[address] += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="nninteractive-keys", daemon=True)
                self._thread.start()
            self._cv.notify()
        return future

    def _run(self):
        while True:
            with self._cv:
                while not self._queues and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                address, queue = next(iter(self._queues.items()))
                fn, future = queue.popleft()
                if queue:
                    self._queues.move_to_end(address)  # its next check waits for every other address's
                else:
                    del self._queues[address]
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:
                        future.set_exception(exc)
            finally:
                with self._cv:
                    self._pending[address] -= 1
                    if not self._pending[address]:
                        del self._pending[address]

    def close(self):
        with self._cv:
            self._closed = True
            self._cv.notify_all()


# ---------------------------------------------------------------- who is calling


class Identities:
    """The shared key and the keys file's users; ``authenticate`` turns an Authorization header into an
    ``Identity``."""

    def __init__(self, api_key=None, keys_file=None):
        self._shared = api_key.encode("utf-8") if api_key else None
        self.keys_file = keys_file
        # The shared key is everyone's when it is the only key; beside a keys file the operators are named there.
        self.shared_role = USER if keys_file else OPERATOR
        self._users = {}
        self._fingerprint = None
        self._mac_key = secrets.token_bytes(32)
        self._known = {}  # hmac(token) -> (Identity, the line's key), tokens that passed
        self._refused = {}  # hmac(token) -> True, tokens that failed the slow check (bounded)
        self._decoy = _decoy() if keys_file else None
        self._unconfirmed = None  # (fingerprint, time) of the last refused reload
        self._slow = SlowChecks()
        self._mu = threading.Lock()
        if keys_file:
            users, fingerprint = read_keys_file(keys_file)
            self._apply(users, fingerprint)

    @property
    def required(self):
        return self._shared is not None or bool(self.keys_file)

    def users(self):
        return sorted(self._users)

    def has_shared_key(self):
        return self._shared is not None

    def role_of(self, name):
        """The roles ``name``'s lines carry (for the start-up log)."""
        return sorted({line.role for line in self._users.get(name, ())})

    def without_precheck(self):
        return sorted(name for name, lines in self._users.items() if any(line.check is None for line in lines))

    def describe(self):
        if not self.required:
            return "no API key"
        parts = (["the shared key (%s)" % self.shared_role] if self._shared else []) + (
            ["%d user(s) of %s" % (len(self._users), self.keys_file)] if self.keys_file else [])
        return "API key required: " + " and ".join(parts)

    def _apply(self, users, fingerprint):
        with self._mu:
            keep = {name: {line.key for line in lines} for name, lines in users.items()}
            self._known = {digest: (ident, key) for digest, (ident, key) in self._known.items()
                           if key in keep.get(ident.name, ())}
            self._refused = {}
            self._users = users
            self._fingerprint = fingerprint

    def reload(self, force=False, confirmed=None):
        """Reread the keys file; returns (added, removed) names. On a KeysFileError nothing changes; ReloadRefused
        when it would remove all or most users, unless ``force`` or the file's fingerprint is ``confirmed``."""
        users, fingerprint = read_keys_file(self.keys_file)
        before = self._users
        removed = set(before) - set(users)
        if before and len(removed) * 2 > len(before) and not force and fingerprint != confirmed:
            raise ReloadRefused(removed, len(set(before) - removed), fingerprint)
        self._apply(users, fingerprint)
        return sorted(set(users) - set(before)), sorted(removed)

    def reload_logged(self):
        """SIGHUP: reload, logging what changed (a refused reload is applied by the next SIGHUP within
        ``CONFIRM_SECONDS``, the file unchanged)."""
        pending = self._unconfirmed
        confirmed = pending[0] if pending and time.monotonic() - pending[1] < CONFIRM_SECONDS else None
        self._unconfirmed = None
        try:
            added, removed = self.reload(confirmed=confirmed)
        except KeysFileError as exc:
            log.error("keys file not reloaded, the previous users stay: %s", exc)
            return
        except ReloadRefused as exc:
            self._unconfirmed = (exc.fingerprint, time.monotonic())
            log.warning("keys file %s NOT reloaded: %s. If that is what you want, send SIGHUP again within %.0f s "
                        "(the file unchanged); the previous users stay until then", self.keys_file, exc,
                        CONFIRM_SECONDS)
            return
        log.info("keys file %s reloaded: %d user(s)%s%s", self.keys_file, len(self._users),
                 "; added: %s" % ", ".join(added) if added else "", "; removed: %s" % ", ".join(removed) if removed
                 else "")

    def _mac(self, token):
        return hmac.new(self._mac_key, token, hashlib.sha256).digest()

    async def authenticate(self, header, address=None):
        """The ``Identity`` behind ``header`` (the raw Authorization value, bytes), from ``address`` (the client's,
        for taking turns on the slow path); Refused when there is none."""
        if not header:
            raise Refused("missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            raise Refused("missing API key: send 'Authorization: Bearer <key>'")
        if len(token) > MAX_TOKEN_BYTES:
            raise Refused("wrong API key")
        if self._shared is not None and hmac.compare_digest(token, self._shared):
            return Identity(SHARED_USER, self.shared_role)
        name, dot, _ = token.partition(b".")
        try:
            name = name.decode("ascii") if dot else ""
        except UnicodeDecodeError:
            name = ""
        with self._mu:
            lines = self._users.get(name)
            digest = self._mac(token)
            known = self._known.get(digest)  # a lookup by a keyed digest: its timing tells nothing about the token
            refused = digest in self._refused
        if known is not None:
            return known[0]
        if refused or not self.keys_file:
            raise Refused("wrong API key")
        # The cheap pre-check, the same work for a name that does not exist (checked against a decoy line). Only a
        # line written without a pre-check costs a slow hash per guess, which tells that its name exists: the
        # start-up log names those users (give them new tokens).
        candidates = lines if lines is not None else [self._decoy]
        passed = [line for line in candidates if line.check is None
                  or hmac.compare_digest(precheck(token, line.salt), line.check)]
        if not passed:
            raise Refused("wrong API key")
        future = self._slow.submit(address, lambda: [check_token(token, line.hashed) for line in passed])
        results = await asyncio.wrap_future(future)  # every candidate line: no early exit
        match = next((line for line, ok in zip(passed, results) if ok and line.key is not None), None)
        with self._mu:
            if match is not None:
                if match.key in {line.key for line in self._users.get(match.name, ())}:  # not removed meanwhile
                    self._known[digest] = (Identity(match.name, match.role), match.key)
            else:
                if len(self._refused) >= MAX_REFUSED_MEMORY:
                    self._refused.clear()
                self._refused[digest] = True
        if match is None:
            raise Refused("wrong API key")
        return Identity(match.name, match.role)

    def close(self):
        self._slow.close()


REFUSALS_LOGGED = LineBudget()  # a flood of refusals writes a few log lines, not one each


class KeyGate:
    """ASGI middleware: authenticate every HTTP and websocket request but ``OPEN_PATHS`` from its headers, before
    the app (and before any of the body) sees it; ``scope["state"]["user"]`` and ``["role"]`` say who it is."""

    def __init__(self, app, identities):
        self.app = app
        self.identities = identities

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        ids = self.identities
        if not ids.required:
            state["user"], state["role"] = ANONYMOUS, OPERATOR
        elif scope["path"] not in OPEN_PATHS or scope["type"] != "http":
            header = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
            address = (scope.get("client") or ("?",))[0]
            try:
                state["user"], state["role"] = await ids.authenticate(header, address)
                if state["role"] == METRICS and (scope["type"] != "http" or scope["path"] not in METRICS_PATHS):
                    raise Refused("this key may only read %s" % ", ".join(sorted(METRICS_PATHS)), status=403)
            except Refused as exc:
                logged, left_out = REFUSALS_LOGGED.take(address)
                if logged:
                    log.info("[%s] %s %s from %s -> %d: %s%s", state.get("request_id", "-"),
                             scope.get("method", "WEBSOCKET"), scope.get("path"), address, exc.status, exc.detail,
                             " (%d more refusal(s) of this address not logged)" % left_out if left_out else "")
                srv = getattr(getattr(scope.get("app"), "state", None), "server", None)
                if getattr(srv, "metrics", None) is not None:  # refused before the exception handlers count it
                    srv.metrics.rejections.labels({401: "unauthorized", 403: "forbidden"}.get(exc.status, "busy")
                                                  ).inc()
                return await _refuse(scope, send, exc)
        return await self.app(scope, receive, send)


async def _refuse(scope, send, exc):
    body = json.dumps({"detail": exc.detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]  # the body, if any, is never read: the connection ends here
    if exc.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if exc.retry_after is not None:
        headers.append((b"retry-after", str(int(exc.retry_after)).encode()))
    if scope["type"] == "websocket":  # refused before the handshake: an HTTP answer where the server can send one
        if "websocket.http.response" not in scope.get("extensions") or {}:
            return await send({"type": "websocket.close", "code": 1008})
        prefix = "websocket.http.response"
    else:
        prefix = "http.response"
    await send({"type": prefix + ".start", "status": exc.status, "headers": headers})
    await send({"type": prefix + ".body", "body": body})


# ---------------------------------------------------------------- nninteractive-slicer-server-keys


def _write_lines(path, lines):
    """Replace ``path`` with ``lines`` atomically, keeping its mode (0600 for a new file)."""
    try:
        mode = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        mode = 0o600
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".keys-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def keys_main(argv=None):
    p = argparse.ArgumentParser(
        prog="nninteractive-slicer-server-keys",
        description="Manage the named users of a keys file (nninteractive-slicer-server --keys-file). The server "
                    "rereads the file on SIGHUP (kill -HUP PID): no restart.")
    p.add_argument("--keys-file", default=os.environ.get(KEYS_FILE_ENV), metavar="PATH",
                   help="the keys file (default: $%s)" % KEYS_FILE_ENV)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("add", help="add a user: prints a new random token once, keeps only its salted hash")
    a.add_argument("name")
    a.add_argument("--also", action="store_true", help="give an existing user one more token (to rotate: add, "
                   "hand out, then remove the old line)")
    a.add_argument("--scheme", default="scrypt", choices=["scrypt", "pbkdf2_sha256"])
    a.add_argument("--role", default=USER, choices=ROLES, help="user (default): sessions and automatic models; "
                   "operator: also /metrics, /expire and the details of /x/info; metrics: /metrics only (a scraper)")
    r = sub.add_parser("remove", help="remove a user (all of their tokens)")
    r.add_argument("name")
    sub.add_parser("list", help="list the users, how many tokens each has and their roles")
    args = p.parse_args(argv)
    if not args.keys_file:
        p.error("give --keys-file PATH (or set %s)" % KEYS_FILE_ENV)
    path = args.keys_file
    try:
        users = read_keys_file(path)[0] if os.path.exists(path) or args.command != "add" else {}
    except KeysFileError as exc:
        print("nninteractive-slicer-server-keys: %s" % exc, file=sys.stderr)
        return 2
    if args.command == "list":
        for name in sorted(users):
            print("%s\t%d token(s)\t%s" % (name, len(users[name]), ",".join(sorted({x.role for x in users[name]}))))
        return 0
    name = args.name
    if args.command == "add":
        if not NAME_RE.match(name) or name in RESERVED:
            print("nninteractive-slicer-server-keys: a name is 1-64 letters, digits, _ @ + - (starting with a letter "
                  "or digit), and not %s" % " or ".join(RESERVED), file=sys.stderr)
            return 2
        if name in users and not args.also:
            print("nninteractive-slicer-server-keys: %s already has a token; pass --also to add another, or remove "
                  "it first" % name, file=sys.stderr)
            return 2
        token = "%s.%s" % (name, secrets.token_urlsafe(32))
        lines = open(path, encoding="utf-8").read().splitlines() if os.path.exists(path) else [
            "# nninteractive-slicer-server keys file: NAME:SCHEME$PARAMS$SALT$HASH [role=ROLE] [check=HEX], one token "
            "per line"]
        _write_lines(path, lines + [key_line(name, token, args.scheme, args.role)])
        print(token)
        print("added %s (%s) to %s: give them the token above (shown only this once); reload a running server with "
              "kill -HUP <pid>" % (name, args.role, path), file=sys.stderr)
        return 0
    if name not in users:
        print("nninteractive-slicer-server-keys: no user %s in %s" % (name, path), file=sys.stderr)
        return 2
    kept = [line for line in open(path, encoding="utf-8").read().splitlines()
            if line.strip().startswith("#") or line.partition(":")[0].strip() != name]
    _write_lines(path, kept)
    print("removed %s from %s; reload a running server with kill -HUP <pid>%s" % (
        name, path, " twice (a reload that removes the last user is applied only when confirmed by a second SIGHUP)"
        if len(users) == 1 else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(keys_main())
