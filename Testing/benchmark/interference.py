"""Benchmark: one user clicking points, one after another, while another user's automatic runs are in progress on the
same server; prompt latency against the same prompts alone, same run.

    python Testing/benchmark/interference.py                   # ~3-5 min on 2 CPU cores
    python Testing/benchmark/interference.py --write           # also append a section to Testing/benchmark/RESULTS.md
    python Testing/benchmark/interference.py --server-tree DIR # the server code of another checkout (e.g. before)

The server: ours on the CPU (``--torch-n-threads 2``), the committed trained interactive model
(``Testing/models/blobs``) and the committed trained automatic model (``Testing/models/auto_blobs``, patch 64^3).

* The automatic user holds the L phantom of ``run.py`` as Slicer holds it, ``[k, j, i]`` = 130 x 256 x 256 int16,
  spacing 1 mm (4 x 7 x 7 = 196 tiles a run), and runs ``/x/auto_segment`` in a loop during the "during" phases.
* The clicking user holds a 64^3 blob phantom (``Testing/models/phantoms.py``) and clicks points inside its blobs,
  one after another (a reset between blobs, not timed); a click's latency is the wall time of
  ``add_point_interaction`` in the client (a prediction every time), with the server's queue wait beside it.
* Phases alternate in the same run: alone, during, alone, during... (``--rounds``), the same clicks in each. A click
  counts as "during" when an automatic run was on the server's prediction thread when it was sent (the automatic
  user's ``/x/queue`` position: its pieces; on a server that runs it as one job, before this scheduler, a job in the
  queue while the clicking user has none).
  The automatic runs are stopped after each "during" phase (``/x/auto_segment/cancel`` where the server has it).

Figures are printed (mean, median, p90, max of each side, the ratios during / alone, the automatic runs' own times
and their longest piece), never asserted. Target on CPU: mean within 1.5x, max within 3x of alone.
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import threading
import time

import numpy as np
import requests

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "Testing"))
sys.path.insert(0, os.path.join(REPO, "Testing", "models"))
sys.path.insert(0, os.path.join(REPO, "SlicerNNInteractive"))

from conftest import SERVER_ENV, TORCH_THREADS, free_port, running  # noqa: E402
from phantoms import interior_voxel, make_phantom  # noqa: E402
from provenance import commit, machine, publish  # noqa: E402
from run import SIZES, phantom  # noqa: E402
from SlicerNNInteractiveLib import protocol as P  # noqa: E402
from SlicerNNInteractiveLib.client import RemoteSession  # noqa: E402

MODELS = os.path.join(REPO, "Testing", "models")
AUTO = "auto_blobs"


def spec_file(folder):
    path = os.path.join(folder, "model-serve-spec.yaml")
    with open(path, "w") as f:
        f.write("model_folder: %s\nmodels:\n  - id: %s\n    rel_path: auto_blobs\n    name: Blobs (tiny trained)\n"
                "    default_args: {use_folds: [0], tta: false}\n" % (MODELS, AUTO))
    return path


def server_env(tree):
    if tree is None:
        return SERVER_ENV
    tree = os.path.abspath(tree)
    return dict(SERVER_ENV, PYTHONPATH=os.pathsep.join([os.path.join(tree, "server"),
                                                        os.path.join(tree, "SlicerNNInteractive")]))


class AutoUser(threading.Thread):
    """Runs ``/x/auto_segment`` in a loop until ``stop``; records each run's times and the intervals it was in
    progress (client-side: from sending to the answer)."""

    def __init__(self, url, remote):
        super().__init__(daemon=True)
        self.url, self.remote = url, remote
        self.go, self.halt = threading.Event(), threading.Event()
        self.runs = []  # (sent, answered, status, server timings)
        self.busy_since = None  # a request of it is unanswered since
        self.lock = threading.Lock()
        self.start()

    def run(self):
        headers = {P.LEASE_HEADER: self.remote._lease_token}
        while True:
            self.go.wait()
            if self.halt.is_set():
                return
            sent = time.perf_counter()
            with self.lock:
                self.busy_since = sent
            r = requests.post(self.url + P.PATH_AUTO_SEGMENT, json={"model": AUTO}, headers=headers, timeout=3600)
            done = time.perf_counter()
            timings = json.loads(r.headers.get(P.META_HEADER, "{}")).get("timings", {}) if r.status_code == 200 \
                else {}
            with self.lock:
                self.busy_since = None
                self.runs.append((sent, done, r.status_code, timings))

    def in_progress(self):
        """Whether a run is on the server's prediction thread now: its pieces in the queue (``pieces`` in its
        position), or, on a server that runs it as one job, a job in the queue (asked between two clicks, when the
        clicking user has none)."""
        p = requests.get(self.url + P.PATH_QUEUE, headers={P.LEASE_HEADER: self.remote._lease_token}, timeout=60)
        assert p.status_code == 200, p.text
        position = p.json()
        return "pieces" in position or (not self.has_positions and position.get("queued", 0) >= 1)

    has_positions = False

    def begin(self):
        self.go.set()

    def end(self):
        """Stop after (or by cancelling) the run in progress."""
        self.go.clear()
        # a server without the cancel endpoint answers 404: the run in progress then runs to its end
        requests.post(self.url + P.PATH_AUTO_CANCEL, headers={P.LEASE_HEADER: self.remote._lease_token}, timeout=60)
        while True:
            with self.lock:
                if self.busy_since is None:
                    return
            time.sleep(0.05)


def clicks_of(ph, n):
    """``n`` (blob, point) clicks: the deepest voxel of each blob and points around it, blob after blob."""
    out = []
    for k in range(1, ph.n_blobs + 1):
        x, y, z = interior_voxel(ph.labels, k)
        for d in ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (-1, 0, 0), (0, -1, 0)):
            out.append((k, (x + d[0], y + d[1], z + d[2])))
    return [out[i % len(out)] for i in range(n)]


def click_phase(remote, clicks, auto=None, think=0.0):
    """Click (``think`` s between an answer and the next click); returns [(latency s, server queue wait ms, sent
    during an automatic run, the server's prediction ms)]."""
    rows, blob = [], None
    for k, point in clicks:
        time.sleep(think)
        if k != blob:
            remote.reset_interactions()
            blob = k
        during = auto.in_progress() if auto is not None else False
        t0 = time.perf_counter()
        remote.add_point_interaction(point, include_interaction=True)
        latency = time.perf_counter() - t0
        t = remote.last_timing
        rows.append((latency, t.get("server_queue_wait", float("nan")), during, t.get("server_predict", float("nan"))))
    return rows


def stats(xs):
    xs = sorted(xs)
    if not xs:
        return {"n": 0, "mean": float("nan"), "median": float("nan"), "p90": float("nan"), "max": float("nan")}
    return {"n": len(xs), "mean": statistics.mean(xs), "median": statistics.median(xs),
            "p90": xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))], "max": xs[-1]}


def ms(x):
    return "%.0f" % (x * 1e3)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clicks", type=int, default=24, help="clicks per phase (default 24)")
    p.add_argument("--rounds", type=int, default=2, help="alone/during pairs (default 2)")
    p.add_argument("--think", type=float, default=0.0, help="seconds between an answer and the next click (default 0: "
                   "one after another; a person takes a second or more)")
    p.add_argument("--server-tree", help="run the server of this checkout (its server/ and SlicerNNInteractive/)")
    p.add_argument("--write", action="store_true", help="append the section to Testing/benchmark/RESULTS.md")
    args = p.parse_args()

    tmp = tempfile.mkdtemp(prefix="interference-")
    spec = spec_file(tmp)
    big = np.ascontiguousarray(phantom(SIZES["L"], noisy=True).transpose(2, 1, 0))[None]  # [x,y,z] -> [k,j,i]
    ph = make_phantom(seed=101)
    clicks = clicks_of(ph, args.clicks)
    port = free_port()
    url = "http://127.0.0.1:%d" % port
    cmd = [sys.executable, "-m", "nninteractive_slicer_server", "--model-dir", os.path.join(MODELS, "blobs"),
           "--device", "cpu", "--port", str(port), "--torch-n-threads", TORCH_THREADS, "--max-sessions", "4",
           "--model-serve-spec", spec, "--idle-timeout-seconds", "3600", "--liveness-timeout-seconds", "3600"]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    alone, during, runs, outside = [], [], [], 0
    waits = {"alone": [], "during": []}  # the server's queue wait of each click (ms)
    predicts = {"alone": [], "during": []}  # the server's prediction time of each click (ms)
    with running(cmd, url, os.path.join(tmp, "server.log"), env=server_env(args.server_tree)):
        # the clicker waits as long as it takes (the client's default gives up after 60 s, which a prompt behind a
        # whole automatic run, before this scheduler, exceeds on a CPU)
        with RemoteSession(url, read_timeout=3600) as clicker, RemoteSession(url) as autos:
            clicker.set_image(ph.image[None], image_properties={"spacing": [1.0, 1.0, 1.0]})
            clicker.set_target_buffer(np.zeros(ph.image.shape, np.uint8))
            autos.set_image(big, image_properties={"spacing": [1.0, 1.0, 1.0]})
            user = AutoUser(url, autos)
            click_phase(clicker, clicks[:3])  # warm-up, not counted
            user.begin()  # one warm-up run (the predictor loads), not counted
            while not user.runs:
                time.sleep(0.1)
            user.end()
            user.has_positions = any("longest_piece" in r[3] for r in user.runs)  # a server with the scheduler
            first_runs = len(user.runs)
            warm = user.runs[0]
            print("server %s; automatic runs %s positions" % (args.server_tree or "this tree",
                                                              "with" if user.has_positions else "without"), flush=True)
            for rnd in range(args.rounds):
                rows = click_phase(clicker, clicks, think=args.think)
                alone += [r[0] for r in rows]
                waits["alone"] += [r[1] for r in rows]
                predicts["alone"] += [r[3] for r in rows]
                print("round %d alone: mean %s ms, max %s ms" % (rnd + 1, ms(stats([r[0] for r in rows])["mean"]),
                                                                ms(stats([r[0] for r in rows])["max"])), flush=True)
                user.begin()
                while not user.in_progress():
                    time.sleep(0.02)
                rows = click_phase(clicker, clicks, user, think=args.think)
                user.end()
                during += [r[0] for r in rows if r[2]]
                waits["during"] += [r[1] for r in rows if r[2]]
                predicts["during"] += [r[3] for r in rows if r[2]]
                outside += sum(1 for r in rows if not r[2])
                got = [r[0] for r in rows if r[2]]
                print("round %d during: %d clicks during a run, mean %s ms, max %s ms" % (
                    rnd + 1, len(got), ms(stats(got)["mean"]), ms(stats(got)["max"])), flush=True)
            runs = user.runs[first_runs:]
            user.halt.set()
            user.go.set()
    elapsed = time.perf_counter() - started
    a, d = stats(alone), stats(during)
    finished = [r for r in runs if r[2] == 200]
    info = {"date": datetime.date.today().isoformat(), "machine": machine(TORCH_THREADS),
            "commit": commit(args.server_tree or REPO), "load": (load_before, os.getloadavg()[0])}
    lines = [
        "## Prompts during automatic runs (`Testing/benchmark/interference.py`, %s, %s)" % (info["date"],
                                                                                            info["commit"]),
        "",
        "Produced by `python Testing/benchmark/interference.py%s%s%s%s` on %s; load average %.1f before, %.1f after; "
        "%.0f s." % (" --clicks %d" % args.clicks if args.clicks != 24 else "",
                     " --rounds %d" % args.rounds if args.rounds != 2 else "",
                     " --think %g" % args.think if args.think else "",
                     " --server-tree %s" % args.server_tree if args.server_tree else "", info["machine"],
                     info["load"][0], info["load"][1], elapsed),
        "One user clicks points (trained blobs model, 64^3 phantom, a prediction each) one after another%s; another "
        "user's automatic runs (trained auto_blobs model, 130 x 256 x 256 image, 196 tiles of 64^3) are in progress "
        "during the \"during\" phases. %d rounds of %d clicks alone then %d clicks during, interleaved. "
        "Milliseconds, client wall time per click." % (" (%g s between an answer and the next click)" % args.think
                                                        if args.think else "", args.rounds, args.clicks, args.clicks),
        "",
        "| clicks | n | mean | median | p90 | max |",
        "|---|---|---|---|---|---|",
        "| alone | %d | %s | %s | %s | %s |" % (a["n"], ms(a["mean"]), ms(a["median"]), ms(a["p90"]), ms(a["max"])),
        "| during automatic runs | %d | %s | %s | %s | %s |" % (d["n"], ms(d["mean"]), ms(d["median"]), ms(d["p90"]),
                                                                 ms(d["max"])),
        "| during / alone | | **%.2fx** | %.2fx | %.2fx | **%.2fx** |" % (
            d["mean"] / a["mean"], d["median"] / a["median"], d["p90"] / a["p90"], d["max"] / a["max"]),
        "",
        "The server's own timings of a click (ms): queue wait alone median %.1f, max %.1f; during median %.1f, max "
        "%.1f. Its prediction alone median %.0f, during median %.0f." % (
            stats(waits["alone"])["median"], stats(waits["alone"])["max"], stats(waits["during"])["median"],
            stats(waits["during"])["max"], stats(predicts["alone"])["median"], stats(predicts["during"])["median"]),
        "An automatic run alone (the warm-up run, no clicks) took %.1f s: preprocessing %.1f s, sliding window %.1f s, "
        "export %.1f s%s. During the clicks: %d run(s) finished, %d stopped at the end of a phase (%s). %d clicks of "
        "the \"during\" phases fell outside a run (between runs) and are not counted." % (
            warm[1] - warm[0], warm[3].get("preprocess", 0), warm[3].get("predict", 0), warm[3].get("postprocess", 0),
            ", its longest piece %s ms" % ms(warm[3]["longest_piece"]) if "longest_piece" in warm[3] else
            " (one job on the prediction thread)", len(finished), len(runs) - len(finished),
            "cancelled" if user.has_positions else "run to their end: this server cannot cancel", outside),
        "",
    ]
    text = "\n".join(lines)
    publish(text, args.write)



if __name__ == "__main__":
    main()
