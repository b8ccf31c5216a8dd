"""Benchmark: throughput of one server against two behind HAProxy, and how long a client of a killed server takes to
continue on the other. Everything on this computer (loopback), the tiny speckle model on the CPU, our client.

    python Testing/benchmark/scale_out.py                  # ~3 min on 2 CPU cores; prints a Markdown section
    python Testing/benchmark/scale_out.py --append-results # ... and appends it to Testing/benchmark/RESULTS.md

Throughput: ``--clients`` sessions prompt at once, each ``--prompts`` point prompts (every one a prediction) on its
own image, after its image upload and a first, unmeasured prompt; prompts per second = all measured prompts / the
wall time from the first to the last. Three set-ups in the same run, interleaved in a rotating order every
repetition (so that background load hits all alike): ``one`` (one server, no balancer), ``one+haproxy`` (the same
server behind HAProxy with the shipped configuration, both of its server lines naming it: HAProxy's cost) and
``two+haproxy`` (two servers behind HAProxy). Each server gets ``--threads`` torch threads: a server stands for one
GPU, so with 1 thread each two servers have twice the compute of one (on a machine with two cores free).

Failover (``--failover`` repetitions, two servers behind HAProxy, fresh each time): two ``SyncedSession`` clients
on the same server, one prompting in a loop, the other idle; that server is killed (SIGKILL) while a prompt of the
first is in flight; the first's prompt comes back from the other server (a new session, image and segment again,
the prompt once more): the time from the kill to that answer. The idle one prompts one second later (HAProxy sends
it to the other server, which answers 410, and it recovers): that prompt's time, against a normal prompt's.
"""

import argparse
import datetime
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "Testing"))
sys.path.insert(0, os.path.join(REPO, "Testing", "models"))
sys.path.insert(0, os.path.join(REPO, "SlicerNNInteractive"))

from haproxy_rig import Backend, balancer, haproxy_binary, our_servers  # noqa: E402
from provenance import commit, machine  # noqa: E402
from SlicerNNInteractiveLib.client import RemoteSession  # noqa: E402
from SlicerNNInteractiveLib.sync import SyncedSession  # noqa: E402

SHAPE = (64, 64, 32)


def image(seed):
    rng = np.random.RandomState(seed)
    img = rng.normal(100, 20, SHAPE)
    x, y, z = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij", sparse=True)
    img += 300 * (((x - 32) ** 2 + (y - 30) ** 2 + (z - 16) ** 2) < 120)
    return img.astype(np.int16)[None]


def points(seed, n):
    rng = np.random.RandomState(1000 + seed)
    return [tuple(int(rng.randint(8, s - 8)) for s in SHAPE) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- throughput

def throughput(url, clients, prompts):
    """Prompts per second of ``clients`` sessions prompting at once through ``url``; and where they were placed."""
    sessions = [RemoteSession(url) for _ in range(clients)]
    placed = [s._http._session.cookies.get("NNISERVER") for s in sessions]
    try:
        work = []
        for i, s in enumerate(sessions):
            s.set_image(image(i))
            s.set_target_buffer(np.zeros(SHAPE, np.uint8))
            s.add_point_interaction(points(i, 1)[0], include_interaction=True)  # warm: preprocessing done
            work.append(points(i + 100, prompts))
        start, stamps, errors = threading.Barrier(clients + 1), [None] * clients, []

        def run(i):
            try:
                start.wait(60)
                t0 = time.perf_counter()
                for p in work[i]:
                    sessions[i].add_point_interaction(p, include_interaction=True)
                stamps[i] = (t0, time.perf_counter())
            except Exception as exc:
                errors.append(repr(exc))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        start.wait(60)
        for t in threads:
            t.join(600)
        if errors:
            raise RuntimeError(errors)
        wall = max(b for _, b in stamps) - min(a for a, _ in stamps)
        return clients * prompts / wall, placed
    finally:
        for s in sessions:
            s.close(wait=True)


def run_throughput(model, tmp, args):
    results = {"one": [], "one+haproxy": [], "two+haproxy": []}
    placements = {}
    flags = ("--no-autozoom", "--max-sessions", str(args.clients))
    with our_servers(model, tmp, 2, *flags, threads=args.threads) as (s1, s2):
        same = Backend("gpu2", s1.url, s1.agent_port, s1.proc, s1.log_path)  # both server lines on one server
        with balancer([s1, s2], tmp) as two, balancer([s1, same], tmp) as one_lb:
            urls = {"one": s1.url, "one+haproxy": one_lb.url, "two+haproxy": two.url}
            order = list(results)
            for rep in range(args.repetitions):
                for name in order[rep % 3:] + order[:rep % 3]:
                    time.sleep(1.5)  # the agents report the released sessions
                    rate, placed = throughput(urls[name], args.clients, args.prompts)
                    results[name].append(rate)
                    placements.setdefault(name, []).append(placed)
                    print("  %-12s rep %d: %6.2f prompts/s  sessions on %s" % (name, rep, rate, placed), flush=True)
    return results, placements


# ---------------------------------------------------------------------------------------------- failover

def failover_once(model, tmp, threads):
    flags = ("--no-autozoom", "--max-sessions", "4")
    with our_servers(model, tmp, 2, *flags, threads=threads) as backends, balancer(backends, tmp) as lb:
        holders = {}

        def connect():
            s = RemoteSession(lb.url)
            holders[s] = s._http._session.cookies.get("NNISERVER")
            return s

        busy = SyncedSession(connect)
        busy.session
        target = holders[busy.session]
        others, idle = [], None
        for _ in range(6):  # leastconn takes turns between idle servers: claim until one lands beside the first
            candidate = SyncedSession(connect)
            if holders[candidate.session] == target:
                idle = candidate
                break
            others.append(candidate)
        for o in others:
            o.close()
        if idle is None:
            raise RuntimeError("no second session landed on %s" % target)
        imgs = {busy: image(1), idle: image(2)}
        segs = {busy: np.zeros(SHAPE, np.uint8), idle: np.zeros(SHAPE, np.uint8)}
        normal = []
        for s in (busy, idle):
            for p in points(7, 3):
                t0 = time.perf_counter()
                s.prompt_and_apply("point", {"coordinates": p}, imgs[s], segs[s])
                normal.append(time.perf_counter() - t0)
        victim = next(b for b in backends if b.name == target)
        stop, answers, errors = threading.Event(), [], []

        def loop():
            try:
                for p in points(11, 1000):
                    if stop.is_set():
                        return
                    sent = time.perf_counter()
                    answers.append((sent, "start"))
                    busy.prompt_and_apply("point", {"coordinates": p}, imgs[busy], segs[busy])
                    answers.append((time.perf_counter(), sent))
            except Exception as exc:
                errors.append(repr(exc))

        t = threading.Thread(target=loop)
        t.start()
        time.sleep(1.0)
        while answers and answers[-1][1] != "start":  # kill while a prompt is in flight
            time.sleep(0.001)
        time.sleep(0.02)
        victim.proc.send_signal(signal.SIGKILL)
        t_kill = time.perf_counter()
        deadline = t_kill + 60
        while busy.recoveries == 0 or not any(a > t_kill and s != "start" for a, s in answers):
            if time.perf_counter() > deadline or errors:
                break
            time.sleep(0.005)
        first_after = min((a for a, s in answers if a > t_kill and s != "start"), default=None)
        stop.set()
        t.join(60)
        if errors or first_after is None:
            raise RuntimeError("the busy client did not continue: %s" % errors)
        in_flight = first_after - t_kill
        time.sleep(max(0.0, 1.0 - (time.perf_counter() - t_kill)))
        t0 = time.perf_counter()
        idle.prompt_and_apply("point", {"coordinates": points(12, 1)[0]}, imgs[idle], segs[idle])
        idle_prompt = time.perf_counter() - t0
        assert busy.recoveries == 1 and idle.recoveries == 1, (busy.recoveries, idle.recoveries)
        assert holders[busy.session] != target and holders[idle.session] != target
        why = (busy.last_recovery or "")[:60], (idle.last_recovery or "")[:60]
        busy.close()
        idle.close()
        return in_flight, idle_prompt, statistics.median(normal), why


# ---------------------------------------------------------------------------------------------- report

def report(args, results, placements, failovers, started, load_before, seconds):
    med = {k: statistics.median(v) for k, v in results.items()}
    lines = [
        "", "## Scale-out: one server against two behind HAProxy (`Testing/benchmark/scale_out.py`)", "",
        "* Date: %s UTC, %.0f s; commit `%s`; command `python Testing/benchmark/scale_out.py %s`." % (
            started.strftime("%Y-%m-%d %H:%M"), seconds, commit(), " ".join(sys.argv[1:])),
        "* Machine: %s, no GPU; HAProxy %s; load average %.1f before, %.1f after (the machine is shared)." % (
            machine(), haproxy_version(), load_before, os.getloadavg()[0]),
        "* Tiny speckle model (every prompt a prediction), CPU, %d torch thread(s) per server, autozoom off; images "
        "%s int16; our `RemoteSession`, point prompts; all on 127.0.0.1." % (args.threads, "x".join(map(str, SHAPE))),
        "", "Throughput, %d clients prompting at once, %d prompts each, %d repetitions (median; all runs):" % (
            args.clients, args.prompts, args.repetitions), "",
        "| set-up | prompts/s | runs | sessions per server |", "|---|---|---|---|"]
    for name, rates in results.items():
        spread = sorted({"/".join(str(p.count(b)) for b in ("gpu1", "gpu2")) for p in placements[name]})
        lines.append("| %s | **%.2f** | %s | %s |" % (
            name, med[name], ", ".join("%.2f" % r for r in rates),
            "n/a (no balancer)" if name == "one" else ", ".join(spread) + " (gpu1/gpu2)"
            + (" (both lines: one server)" if name == "one+haproxy" else "")))
    lines += ["", "Two servers behind HAProxy / one server alone: **%.2fx**; HAProxy's own cost (one+haproxy / one): "
              "%.2fx." % (med["two+haproxy"] / med["one"], med["one+haproxy"] / med["one"])]
    if failovers:
        fl = [f[0] for f in failovers]
        idle = [f[1] for f in failovers]
        normal = [f[2] for f in failovers]
        lines += ["", "Failover, %d repetitions (SIGKILL of the server holding two sessions; two servers behind "
                  "HAProxy):" % len(failovers), "",
                  "| | median | all runs |", "|---|---|---|",
                  "| prompt in flight at the kill: kill -> its answer from the other server | **%.2f s** | %s |" % (
                      statistics.median(fl), ", ".join("%.2f" % x for x in fl)),
                  "| idle at the kill, prompting 1 s later: that prompt's time | **%.2f s** | %s |" % (
                      statistics.median(idle), ", ".join("%.2f" % x for x in idle)),
                  "| a normal prompt before the kill | %.3f s | %s |" % (
                      statistics.median(normal), ", ".join("%.3f" % x for x in normal)),
                  "", "Why the clients recovered (first run): in flight: %s...; idle: %s..." % failovers[0][3]]
    return "\n".join(lines) + "\n"


def haproxy_version():
    try:
        out = subprocess.run([haproxy_binary(), "-v"], capture_output=True, text=True).stdout
        return out.split()[2]
    except Exception:
        return "?"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--prompts", type=int, default=10, help="measured prompts per client (default %(default)s)")
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per server (default %(default)s)")
    p.add_argument("--failover", type=int, default=3, metavar="N", help="failover repetitions (0: none)")
    p.add_argument("--append-results", action="store_true", help="append the section to Testing/benchmark/RESULTS.md")
    args = p.parse_args()
    if haproxy_binary() is None:
        sys.exit("haproxy is not installed (Debian/Ubuntu: apt-get install -y haproxy)")
    from tiny_models import make_random_model

    started, t0, load_before = datetime.datetime.utcnow(), time.monotonic(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="scale_out_") as tmp:
        model = make_random_model(os.path.join(tmp, "speckle"), background_bias=None)
        print("throughput (%d clients x %d prompts, %d repetitions)" % (args.clients, args.prompts, args.repetitions))
        results, placements = run_throughput(model, tmp, args)
        failovers = []
        for rep in range(args.failover):
            failovers.append(failover_once(model, tmp, args.threads))
            print("  failover rep %d: in flight %.2f s, idle %.2f s, normal prompt %.3f s" % ((rep,) + failovers[-1][:3]),
                  flush=True)
    text = report(args, results, placements, failovers, started, load_before, time.monotonic() - t0)
    print(text)
    if args.append_results:
        with open(os.path.join(HERE, "RESULTS.md"), "a") as f:
            f.write(text)
        print("appended to %s" % os.path.join(HERE, "RESULTS.md"))


if __name__ == "__main__":
    main()
