"""Who is calling: the shared key, a keys file of named users, and the gate that checks them before anything else.

Keys file: one user per line, ``NAME:SCHEME$PARAMS$SALT$HASH`` (``#`` starts a comment; a name may have several
lines, one per token, to rotate a token without a gap). ``nninteractive-slicer-server-keys add NAME`` writes a
line and prints the new token once; the server keeps only the salted hash, and rereads the file on SIGHUP. The
schemes (standard library only; salt and hash in hex, the hash of the whole token's UTF-8 bytes, 32 bytes):

* ``scrypt$N$R$P$SALT$HASH``: ``hashlib.scrypt(token, salt=SALT, n=N, r=R, p=P, dklen=32)`` (what ``add`` writes);
* ``pbkdf2_sha256$ITERATIONS$SALT$HASH``: ``hashlib.pbkdf2_hmac("sha256", token, SALT, ITERATIONS, 32)``.

A token of the keys file reads ``NAME.SECRET``: its name says which line to check, so one slow hash is computed per
new token, never one per user, and a token naming no user costs nothing. A token that passed is remembered under
an HMAC of it with a key made at start-up (never the token itself), so later requests cost one fast digest; the
memory is emptied when the file is reread. Hashes and the shared key are compared with ``hmac.compare_digest``.

The gate (``KeyGate``, an ASGI middleware) runs before routing: when a key is required, every path but
``/healthz`` (unknown paths included) answers 401 from the headers alone, before any byte of the body is received,
and closes the connection, so an unauthenticated upload is never read. It sets ``request.state.user``: the
user's name, ``"shared"`` for the shared key, ``"anonymous"`` when the server requires no key (for the logs and
metrics; leases are bound to it). No key or token is ever logged or answered.
"""

import argparse
import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import signal
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

from SlicerNNInteractiveLib import protocol as P

log = logging.getLogger("nninteractive_slicer_server")

SHARED_USER = "shared"  # who presents the shared key (--api-key / --api-key-file / NN_INTERACTIVE_API_KEY)
ANONYMOUS = "anonymous"  # everyone, when the server requires no key
RESERVED = (SHARED_USER, ANONYMOUS)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_@+-]{0,63}\Z")
OPEN_PATHS = frozenset([P.PATH_HEALTHZ])  # the only paths a request may reach without a key
KEYS_FILE_ENV = "NN_INTERACTIVE_KEYS_FILE"

SCRYPT = {"n": 1 << 14, "r": 8, "p": 1}  # ~16 MiB and tens of ms per check, once per new token
PBKDF2_ITERATIONS = 600_000
MAX_TOKEN_BYTES = 1024
MAX_PENDING_CHECKS = 8  # slow checks waiting at once; beyond: 429 (one thread computes them, one at a time)
MAX_REFUSED_MEMORY = 4096


class KeysFileError(ValueError):
    pass


class Refused(Exception):
    def __init__(self, detail, status=401, retry_after=None):
        Exception.__init__(self, detail)
        self.detail = detail
        self.status = status
        self.retry_after = retry_after


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


def read_keys_file(path):
    """{name: [hash text, ...]} of the keys file at ``path``. KeysFileError names the line, never quotes it (a
    token pasted by mistake must not reach the log)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeysFileError("the keys file %s cannot be read (%s)" % (path, getattr(exc, "strerror", None) or exc))
    users = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, hashed = line.partition(":")
        name, hashed = name.strip(), hashed.strip()
        where = "%s, line %d" % (path, number)
        if not sep or not NAME_RE.match(name):
            raise KeysFileError("%s: not 'NAME:SCHEME$...' with a name of letters, digits, _ @ + - (at most 64)"
                                % where)
        if name in RESERVED:
            raise KeysFileError("%s: the name %r is reserved" % (where, name))
        try:
            _parse_hash(hashed)
        except ValueError as exc:
            raise KeysFileError("%s: the hash is not 'scrypt$N$R$P$SALT$HASH' or 'pbkdf2_sha256$ITERATIONS$SALT$HASH' "
                                "(%s)" % (where, exc))
        users.setdefault(name, []).append(hashed)
    return users


# ---------------------------------------------------------------- who is calling


class Identities:
    """The shared key and the keys file's users; ``authenticate`` turns an Authorization header into a name."""

    def __init__(self, api_key=None, keys_file=None):
        self._shared = api_key.encode("utf-8") if api_key else None
        self.keys_file = keys_file
        self._users = {}
        self._generation = 0
        self._mac_key = secrets.token_bytes(32)
        self._known = {}  # hmac(token) -> name, tokens that passed
        self._refused = {}  # hmac(token) -> True, tokens that failed (bounded)
        self._pending = 0  # slow checks waiting or running (event loop only)
        self._checker = None
        self._mu = threading.Lock()
        if keys_file:
            self.reload()

    @property
    def required(self):
        return self._shared is not None or bool(self.keys_file)

    def users(self):
        return sorted(self._users)

    def describe(self):
        if not self.required:
            return "no API key"
        parts = (["the shared key"] if self._shared else []) + (
            ["%d user(s) of %s" % (len(self._users), self.keys_file)] if self.keys_file else [])
        return "API key required: " + " and ".join(parts)

    def reload(self):
        """Reread the keys file; returns (added, removed) names. On a KeysFileError nothing changes."""
        users = read_keys_file(self.keys_file)
        with self._mu:
            before = self._users
            self._users = users
            self._generation += 1
            self._known = {}
            self._refused = {}
        return sorted(set(users) - set(before)), sorted(set(before) - set(users))

    def reload_logged(self):
        try:
            added, removed = self.reload()
        except KeysFileError as exc:
            log.error("keys file not reloaded, the previous users stay: %s", exc)
            return
        log.info("keys file %s reloaded: %d user(s)%s%s", self.keys_file, len(self._users),
                 "; added: %s" % ", ".join(added) if added else "", "; removed: %s" % ", ".join(removed) if removed
                 else "")

    def watch_sighup(self):
        """Reread the keys file on SIGHUP (from the running event loop, in the main thread). Returns an undo."""
        if not self.keys_file or not hasattr(signal, "SIGHUP"):
            return lambda: None
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, self.reload_logged)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (an app under a test client)
            return lambda: None
        return lambda: loop.remove_signal_handler(signal.SIGHUP)

    def _mac(self, token):
        return hmac.new(self._mac_key, token, hashlib.sha256).digest()

    async def authenticate(self, header):
        """The name behind ``header`` (the raw Authorization value, bytes); Refused when there is none."""
        if not header:
            raise Refused("missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            raise Refused("missing API key: send 'Authorization: Bearer <key>'")
        if len(token) > MAX_TOKEN_BYTES:
            raise Refused("wrong API key")
        if self._shared is not None and hmac.compare_digest(token, self._shared):
            return SHARED_USER
        name, dot, _ = token.partition(b".")
        try:
            name = name.decode("ascii") if dot else ""
        except UnicodeDecodeError:
            name = ""
        with self._mu:
            hashes, generation = self._users.get(name), self._generation
            digest = self._mac(token)
            known = self._known.get(digest)  # a lookup by a keyed digest: its timing tells nothing about the token
            refused = digest in self._refused
        if known is not None:
            return known
        if hashes is None or refused:
            raise Refused("wrong API key")
        if self._pending >= MAX_PENDING_CHECKS:
            raise Refused("too many new keys are being checked; try again in a second", status=429, retry_after=1)
        if self._checker is None:
            self._checker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nninteractive-keys")
        self._pending += 1
        try:
            ok = await asyncio.get_running_loop().run_in_executor(
                self._checker, lambda: any([check_token(token, h) for h in hashes]))  # every line: no early exit
        finally:
            self._pending -= 1
        with self._mu:
            if generation == self._generation:  # not reread meanwhile
                if ok:
                    self._known[digest] = name
                else:
                    if len(self._refused) >= MAX_REFUSED_MEMORY:
                        self._refused.clear()
                    self._refused[digest] = True
        if not ok:
            raise Refused("wrong API key")
        return name

    def close(self):
        if self._checker is not None:
            self._checker.shutdown(wait=False)


class KeyGate:
    """ASGI middleware: authenticate every HTTP request but ``OPEN_PATHS`` from its headers, before the app (and
    before any of the body) sees it; ``scope["state"]["user"]`` is the caller's name."""

    def __init__(self, app, identities):
        self.app = app
        self.identities = identities

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        ids = self.identities
        if not ids.required:
            state["user"] = ANONYMOUS
        elif scope["path"] not in OPEN_PATHS:
            header = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
            try:
                state["user"] = await ids.authenticate(header)
            except Refused as exc:
                log.info("[%s] %s %s from %s -> %d: %s", state.get("request_id", "-"), scope.get("method"),
                         scope.get("path"), (scope.get("client") or ("?",))[0], exc.status, exc.detail)
                srv = getattr(getattr(scope.get("app"), "state", None), "server", None)
                if getattr(srv, "metrics", None) is not None:  # refused before the exception handlers count it
                    srv.metrics.rejections.labels("unauthorized" if exc.status == 401 else "busy").inc()
                return await _refuse(send, exc)
        return await self.app(scope, receive, send)


async def _refuse(send, exc):
    body = json.dumps({"detail": exc.detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]  # the body, if any, is never read: the connection ends here
    if exc.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if exc.retry_after is not None:
        headers.append((b"retry-after", str(int(exc.retry_after)).encode()))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


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
    r = sub.add_parser("remove", help="remove a user (all of their tokens)")
    r.add_argument("name")
    sub.add_parser("list", help="list the users and how many tokens each has")
    args = p.parse_args(argv)
    if not args.keys_file:
        p.error("give --keys-file PATH (or set %s)" % KEYS_FILE_ENV)
    path = args.keys_file
    try:
        users = read_keys_file(path) if os.path.exists(path) or args.command != "add" else {}
    except KeysFileError as exc:
        print("nninteractive-slicer-server-keys: %s" % exc, file=sys.stderr)
        return 2
    if args.command == "list":
        for name in sorted(users):
            print("%s\t%d token(s)" % (name, len(users[name])))
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
            "# nninteractive-slicer-server keys file: NAME:SCHEME$PARAMS$SALT$HASH, one token per line"]
        _write_lines(path, lines + ["%s:%s" % (name, hash_token(token, args.scheme))])
        print(token)
        print("added %s to %s: give them the token above (shown only this once); reload a running server with "
              "kill -HUP <pid>" % (name, path), file=sys.stderr)
        return 0
    if name not in users:
        print("nninteractive-slicer-server-keys: no user %s in %s" % (name, path), file=sys.stderr)
        return 2
    kept = [line for line in open(path, encoding="utf-8").read().splitlines()
            if line.strip().startswith("#") or line.partition(":")[0].strip() != name]
    _write_lines(path, kept)
    print("removed %s from %s; reload a running server with kill -HUP <pid>" % (name, path), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(keys_main())
