"""Benchmark: the attacks of issue 16 against one real server on loopback, and what each costs the server and its
valid users: the answers, time, descriptors, memory. Prints a Markdown section (``--append-results``: also appends
it to Testing/benchmark/RESULTS.md).

    python Testing/benchmark/hostile.py                    # this tree's server, ~2 min on 2 CPU cores
    python Testing/benchmark/hostile.py --tree /path/to/an/older/checkout   # the same attacks against another

The server: the tiny quiet model on the CPU, a keys file (alice, bob, dave with the pre-check; carl's line without
it, as written before the pre-check existed; an operator), 4 sessions, 2 per user, a 64 MiB memory budget, under
``ulimit -n --descriptors`` (default 256); flags a tree does not know are left out (and the table says which).

1. **key flood**: 8 threads send ``Bearer bob.<random>`` from 127.0.0.5 for ``--seconds``; meanwhile bob's first
   request (his token not remembered yet) from 127.0.0.1: its status and time. The same with guesses at carl's
   line (each one a slow hash) and dave's first request.
2. **name timing**: 401s for guesses at a real name and at a missing one, interleaved: median time of each.
3. **idle connections**: 300 connections from 60 addresses that send nothing: how many the server holds, refuses,
   its open descriptors, its RSS growth, /healthz from 127.0.0.1 during it, and how long until it closed them.
4. **slow headers**: one header byte every 0.5 s: the answer and when.
5. **stalled uploads**: alice's two sessions each start a 112^3 float32 upload (5.4 MiB), send 4.5 MiB and stall;
   bob then uploads the same size: his status; and when alice's stalled uploads are answered, with what.
6. **agent flood**: 100 connections to the agent-check port at once: replies, and whether it answers after.
7. **SIGHUP during start-up** (a second server without a keys file): whether it survives and serves.
"""

import argparse
import datetime
import json
import os
import platform
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import requests

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [os.path.join(REPO, "Testing"), os.path.join(REPO, "Testing", "models"),
                os.path.join(REPO, "SlicerNNInteractive")]

from conftest import SERVER_ENV, free_port  # noqa: E402
from hostile_rig import Flood, first_bytes, image_body, open_idle, read_answer, sigcgt, slow_headers, \
    stalled_upload, status_of  # noqa: E402

from SlicerNNInteractiveLib import protocol as P  # noqa: E402


def server_help(tree):
    env = dict(SERVER_ENV, PYTHONPATH=os.pathsep.join([os.path.join(tree, "server"),
                                                         os.path.join(tree, "SlicerNNInteractive")]))
    out = subprocess.run([sys.executable, "-m", "nninteractive_slicer_server", "--help"], capture_output=True,
                         text=True, env=env, timeout=120).stdout
    return env, out


def keys_command(env, keys, *args):
    p = subprocess.run([sys.executable, "-m", "nninteractive_slicer_server.identities", "--keys-file", keys, *args],
                       capture_output=True, text=True, env=env, timeout=60)
    if p.returncode != 0:
        raise RuntimeError(p.stderr)
    return p.stdout.strip()


def rss(pid):
    with open("/proc/%d/status" % pid) as f:
        return int(re.search(r"VmRSS:\s*(\d+)", f.read()).group(1)) * 1024


def fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


class Server:
    def __init__(self, tree, tmp, model, descriptors, flags, with_keys=True, hup_early=False):
        self.tree = tree
        self.env, help_text = server_help(tree)
        self.skipped = []
        wanted = []
        for flag in flags:  # ("--flag", value) pairs; flags this tree lacks are left out
            if flag[0] in help_text:
                wanted += list(flag)
            else:
                self.skipped.append(flag[0])
        self.keys = os.path.join(tmp, "users.keys")
        self.tokens = {}
        if with_keys:
            roles = "--role" in subprocess.run([sys.executable, "-m", "nninteractive_slicer_server.identities",
                                                "--keys-file", self.keys, "add", "--help"], capture_output=True,
                                               text=True, env=self.env).stdout
            for name in ("alice", "bob", "carl", "dave"):
                self.tokens[name] = keys_command(self.env, self.keys, "add", name)
            if roles:
                self.tokens["op"] = keys_command(self.env, self.keys, "add", "op", "--role", "operator")
            with open(self.keys) as f:
                text = f.read()
            with open(self.keys, "w") as f:
                f.write(re.sub(r"^(carl:\S+) check=[0-9a-f]+$", r"\1", text, flags=re.M))
            wanted += ["--keys-file", self.keys]
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.log = os.path.join(tmp, "server-%d.log" % self.port)
        cmd = [sys.executable, "-m", "nninteractive_slicer_server", "--model-dir", model, "--device", "cpu",
               "--port", str(self.port), "--torch-n-threads", "1", "--no-autozoom"] + wanted
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(["/bin/sh", "-c", 'ulimit -n %d && exec "$@"' % descriptors, "sh"] + cmd,
                                         stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self.hup_sent = False
        python_since = None
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                break
            if hup_early and not self.hup_sent:
                caught = sigcgt(self.proc.pid)
                python_since = python_since or (time.monotonic() if caught else None)
                # as soon as it catches SIGHUP; a tree that never does gets it 2 s into its Python start-up
                if caught & (1 << (signal.SIGHUP - 1)) or (python_since and time.monotonic() - python_since > 2):
                    os.kill(self.proc.pid, signal.SIGHUP)
                    self.hup_sent = True
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start:\n" + open(self.log).read()[-2000:])
            time.sleep(0.05)

    def auth(self, who, lease=None):
        h = {"Authorization": "Bearer " + self.tokens[who]}
        if lease:
            h[P.LEASE_HEADER] = lease
        return h

    def claim(self, who):
        r = requests.post(self.url + P.PATH_CLAIM, headers=self.auth(who))
        r.raise_for_status()
        return r.json()["lease_token"]

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


WAIT_S = 30  # how long an attack is watched for the server to end it


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def key_flood(srv, seconds, name, victim, source):
    with Flood(srv.port, source, name, threads=8) as flood:
        time.sleep(seconds / 2)
        r, took = timed(lambda: requests.get(srv.url + P.PATH_CAPABILITIES, headers=srv.auth(victim), timeout=120))
        time.sleep(seconds / 2)
    total = sum(flood.statuses.values())
    return {"victim": r.status_code, "victim_ms": took * 1e3, "flood": dict(flood.statuses),
            "flood_rate": total / (seconds + took)}


def name_timing(srv, n=1000):
    """Over HTTP (a new connection each, the order alternating) and in the server's own code (``authenticate`` in
    this process, on the same keys file, blocks of 2000 alternating): median ms / mean us of a refusal."""
    import http.client

    times = {"known": [], "unknown": []}
    for i in range(n):
        pairs = (("known", "alice"), ("unknown", "nobody"))
        for kind, name in pairs if i % 2 else pairs[::-1]:
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
            t0 = time.perf_counter()
            conn.request("GET", P.PATH_CAPABILITIES, headers={"Authorization": "Bearer %s.guess%d" % (name, i)})
            conn.getresponse().read()
            times[kind].append(time.perf_counter() - t0)
            conn.close()
    out = {"http_ms_" + k: statistics.median(v) * 1e3 for k, v in times.items()}
    code = INPROCESS_TIMING % {"keys": srv.keys}  # in the tree's own code: a process with its PYTHONPATH
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=srv.env, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(p.stderr)
    out.update(json.loads(p.stdout.strip().splitlines()[-1]))
    return out


INPROCESS_TIMING = """
import asyncio, inspect, json, statistics, time
from nninteractive_slicer_server import identities as ids
gate = ids.Identities(None, %(keys)r)
two = len(inspect.signature(gate.authenticate).parameters) > 1

async def block(name, n=2000, budget=1.0):
    t0 = time.perf_counter()
    done = 0
    while done < n and time.perf_counter() - t0 < budget:  # an older tree's slow checks: fewer, same seconds
        done += 1
        try:
            await (gate.authenticate(b"Bearer %%s.guess%%d" %% (name, done), "127.0.0.1") if two else
                   gate.authenticate(b"Bearer %%s.guess%%d" %% (name, done)))
        except ids.Refused:
            pass
    return (time.perf_counter() - t0) / done * 1e6

times = {"known": [], "unknown": []}
for i in range(6):
    for kind, name in (("known", b"alice"), ("unknown", b"nobody"))[::1 if i %% 2 else -1]:
        times[kind].append(asyncio.run(block(name)))
gate.close()
print(json.dumps({"inprocess_us_" + k: statistics.median(v) for k, v in times.items()}))
"""


def idle_flood(srv):
    pid = srv.proc.pid
    before_rss, before_fds = rss(pid), fds(pid)
    socks, failed = [], 0
    for i in range(60):
        try:
            socks += open_idle(srv.port, "127.0.1.%d" % (i + 1), 5)
        except OSError:
            failed += 5
    time.sleep(0.5)
    during_fds, during_rss = fds(pid), rss(pid)
    try:
        health, took = timed(lambda: requests.get(srv.url + "/healthz", timeout=10).status_code)
    except requests.RequestException as exc:
        health, took = type(exc).__name__, 10.0
    t0 = time.monotonic()
    refused = held = 0
    closed_at = []
    pending = list(socks)
    while pending and time.monotonic() - t0 < WAIT_S:  # whichever the server answers or closes first
        ready, _, _ = select.select(pending, [], [], 1.0)
        for s in ready:
            if status_of(first_bytes(s)) == 503:
                refused += 1
            else:
                held += 1
                closed_at.append(time.monotonic() - t0)
            pending.remove(s)
    for s in socks:
        s.close()
    t1, recovered = time.monotonic(), None
    while recovered is None and time.monotonic() - t1 < WAIT_S:  # the next attack starts on a server that serves
        try:
            if requests.get(srv.url + "/healthz", timeout=2).status_code == 200:
                recovered = time.monotonic() - t1
        except requests.RequestException:
            time.sleep(0.2)
    return {"connections": len(socks), "connect_failed": failed, "held": held, "refused_503": refused,
            "still_open_after_s": "%d after %d" % (len(pending), WAIT_S), "fds_before": before_fds,
            "fds_during": during_fds, "rss_growth_mb": (during_rss - before_rss) / 2 ** 20, "healthz": health,
            "healthz_ms": took * 1e3, "closed_within_s": max(closed_at) if closed_at else None,
            "serving_again_s_after_the_attacker_left": recovered}


def stalled(srv, op):
    alice = [srv.claim("alice") for _ in range(2)]
    bob = srv.claim("bob")
    t0 = time.monotonic()
    socks = [stalled_upload(srv.port, srv.tokens["alice"], lease) for lease in alice]
    time.sleep(2)
    info = requests.get(srv.url + P.PATH_SERVER_INFO, headers=srv.auth(op)).json()
    r = requests.post(srv.url + P.PATH_SET_IMAGE, data=image_body(4), headers=dict(srv.auth("bob", bob),
                                                                                    **{"X-Meta": "{}"}))
    answers = []
    pending = list(socks)
    while pending and time.monotonic() - t0 < WAIT_S * 3:  # whichever is answered first
        ready, _, _ = select.select(pending, [], [], 1.0)
        for s in ready:
            a = read_answer(s)
            answers.append((status_of(a), round(time.monotonic() - t0, 1)))
            pending.remove(s)
    answers += [("none", ">%d" % (WAIT_S * 3))] * len(pending)
    for s in socks:
        s.close()
    for lease in alice:
        requests.post(srv.url + P.PATH_RELEASE, headers=srv.auth("alice", lease))
    requests.post(srv.url + P.PATH_RELEASE, headers=srv.auth("bob", bob))
    return {"reserved_mb_while_stalled": info.get("memory_reserved", 0) / 2 ** 20, "bob": r.status_code,
            "bob_detail": r.json().get("detail", "")[:90] if r.status_code != 200 else "",
            "alice_answers": answers}


def agent_flood(port, n=100):
    import socket

    socks = []
    for _ in range(n):
        socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
    replies = sum(first_bytes(s).startswith(b"up ") for s in socks)
    for s in socks:
        s.close()
    time.sleep(1.5)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        after = first_bytes(s).decode().strip()
    return {"connections": n, "replies": replies, "after": after}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", default=REPO, help="the checkout whose server to attack (default: this one)")
    p.add_argument("--descriptors", type=int, default=256)
    p.add_argument("--seconds", type=float, default=6.0, help="length of each key flood")
    p.add_argument("--append-results", action="store_true")
    args = p.parse_args()
    from tiny_models import make_random_model

    tmp = tempfile.mkdtemp(prefix="hostile-bench-")
    model = make_random_model(os.path.join(tmp, "quiet"))
    agent = free_port()
    flags = [("--max-sessions", "4"), ("--max-sessions-per-user", "2"), ("--memory-budget", "64M"),
             ("--max-image-voxels", "3M"), ("--agent-port", str(agent)), ("--forwarded-allow-ips", "127.0.0.1"),
             ("--min-upload-rate", "1M"), ("--upload-grace-seconds", "5")]
    srv = Server(args.tree, tmp, model, args.descriptors, flags)
    results = {}
    try:
        results["key flood (guesses at bob, with pre-check)"] = key_flood(srv, args.seconds, "bob", "bob", "127.0.0.5")
        results["key flood (guesses at carl, no pre-check)"] = key_flood(srv, args.seconds, "carl", "dave",
                                                                         "127.0.0.6")
        results["name timing (a refusal)"] = name_timing(srv)
        results["idle connections"] = idle_flood(srv)
        out, took = slow_headers(srv.port, "127.0.0.8", interval=0.5, limit=WAIT_S * 2, timeout=5)
        results["slow headers"] = {"answer": status_of(out) if out else "none", "ended_after_s": round(took, 1)}
        results["stalled uploads"] = stalled(srv, "op" if "op" in srv.tokens else "alice")
        results["agent flood"] = agent_flood(agent)
    finally:
        srv.close()
    skipped = srv.skipped
    early = Server(args.tree, tmp, model, args.descriptors, [], with_keys=False, hup_early=True)
    try:
        alive = early.proc.poll() is None
        results["SIGHUP during start-up"] = {"sent": early.hup_sent, "serving_after": alive,
                                             "exit_status": early.proc.returncode}
    finally:
        early.close()

    commit = subprocess.run(["git", "-C", args.tree, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    lines = ["", "## Hostile clients (Testing/benchmark/hostile.py)", "",
             "%s, %s, %d CPU cores, commit %s of %s%s; `ulimit -n %d`." % (
                 datetime.date.today().isoformat(), platform.platform(), os.cpu_count(), commit or "?",
                 "this tree" if os.path.abspath(args.tree) == REPO else args.tree,
                 "; flags it lacks, left out: %s" % ", ".join(skipped) if skipped else "", args.descriptors),
             "", "| attack | measured |", "|---|---|"]
    for name, value in results.items():
        lines.append("| %s | %s |" % (name, ", ".join("%s %s" % (k, round(v, 2) if isinstance(v, float) else v)
                                                      for k, v in value.items())))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.append_results:
        with open(os.path.join(HERE, "RESULTS.md"), "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
