"""Benchmark: what a server adds to a call, ours against the official one (issue 19 point 1).

The established comparison: nnInteractive's own client (``nnInteractiveRemoteInferenceSession``) on both sides,
predictions off (``run_prediction=False``), our server and the official ``nninteractive-server`` started in the same
run from the same tiny model, every call also made in-process (``nnInteractiveInferenceSession``). For each call type
(point, 2D box, scribble, lasso, set_image):

    overhead = time of the call through a server - time of the same call in-process   (paired per repetition)
    ratio    = our overhead / the official server's overhead                           (same run, interleaved)

"prompts" is the ratio of the sums of the four prompt kinds' median overheads (one call of each). Every
repetition makes every call on every side, in an order shuffled each time, so that background load hits all sides
alike; the spread is the range of the ratio over blocks of repetitions.

    python Testing/benchmark/overhead.py                    # under a minute on 2 cores
    python Testing/benchmark/overhead.py --before REF       # also our server as of git REF: before/after in one run
    python Testing/benchmark/overhead.py --layers           # also where our server's time goes, layer by layer
    python Testing/benchmark/overhead.py --key none         # servers without a key (default: a shared key, as shipped)

``--layers`` starts one more server of ours with stamps at every layer boundary (``overhead_probe.py``: it perturbs
the timings a little, so it is never one of the compared sides) and prints the median of each step of one call.
Timings are printed, never asserted.
"""

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "Testing"))
sys.path.insert(0, os.path.join(REPO, "Testing", "models"))
sys.path.insert(0, HERE)

from conftest import SERVER_ENV, TORCH_THREADS, free_port, running  # noqa: E402
from provenance import cpu_name  # noqa: E402
from run import SIZES, _load, phantom, prompts  # noqa: E402  (the prompts run.py sends)

KINDS = ("point", "bbox", "scribble", "lasso", "set_image")
PROMPTS = KINDS[:4]
KEY = "overhead-benchmark-key"


# ---------------------------------------------------------------------------------------------- the calls

def call(s, kind, p, img):
    """One call of ``kind`` without a prediction; returns its time (ms)."""
    t0 = time.perf_counter()
    if kind == "point":
        s.add_point_interaction(p["point"]["coordinates"], True, run_prediction=False)
    elif kind == "bbox":
        s.add_bbox_interaction(p["bbox"]["bbox"], True, run_prediction=False)
    elif kind == "scribble":
        s.add_scribble_interaction(p["scribble"]["mask"], True, run_prediction=False,
                                   interaction_bbox=p["scribble"]["interaction_bbox"])
    elif kind == "lasso":
        s.add_lasso_interaction(p["lasso"]["mask"], True, run_prediction=False,
                                interaction_bbox=p["lasso"]["interaction_bbox"])
    else:
        s.set_image(img[None])
    return (time.perf_counter() - t0) * 1e3


class Side:
    """One way of making the calls: in-process, or the official client against a server."""

    def __init__(self, name, session, img, probed=False):
        self.name, self.s, self.probed = name, session, probed
        self.shape = img.shape
        self.s.set_image(img[None])
        self.ready()

    def ready(self):
        """After set_image: a target buffer, and preprocessing finished (unmeasured, so that no side's background
        work overlaps another side's call)."""
        self.s.set_target_buffer(np.zeros(self.shape, np.uint8))
        if self.name == "inproc":
            self.s._finish_preprocessing_and_initialize_interactions()
        elif not self.probed:  # the first interaction waits for the server's preprocessing
            self.s.add_point_interaction([n // 2 for n in self.shape], True, run_prediction=False)
        self.s.reset_interactions()  # our server waits for it there too: a probed server counts only measured calls

    def after(self, kind):
        """What follows a measured call: ready again after set_image, no interactions left after a prompt."""
        self.ready() if kind == "set_image" else self.s.reset_interactions()

    def close(self):
        if self.name == "inproc":
            self.s._reset_session()
        else:
            self.s.close()


def experiment(sides, img, p, reps, log):
    """{kind: {side: [ms per repetition]}}: every repetition, every kind, every side, in an order shuffled each time
    (seeded). Not a rotation: a rotation keeps each side behind the same one, and a call right after an in-process
    one shares the CPU with the library's threads still spinning in this process (5-10 % slower, measured)."""
    times = {k: {s.name: [] for s in sides} for k in KINDS}
    rng = random.Random(0)
    for rep in range(reps):
        for kind in KINDS:
            for side in rng.sample(sides, len(sides)):
                times[kind][side.name].append(call(side.s, kind, p, img))
                side.after(kind)
        if (rep + 1) % 10 == 0:
            log("  %d/%d repetitions" % (rep + 1, reps))
    return times


def overheads(times, side, ref="inproc"):
    """{kind: [side - ref per repetition]}"""
    return {k: [a - b for a, b in zip(times[k][side], times[k][ref])] for k in KINDS}


def ratios(times, side, base, blocks):
    """{kind or 'prompts': (ratio over all repetitions, [ratio per block])} of ``side``'s overhead to ``base``'s."""
    o_side, o_base = overheads(times, side), overheads(times, base)
    n = len(o_side[KINDS[0]])
    blocks = max(1, min(blocks, n))
    cuts = [range(i * n // blocks, (i + 1) * n // blocks) for i in range(blocks)]

    def ratio(kinds, idx):
        a = sum(statistics.median([o_side[k][i] for i in idx]) for k in kinds)
        b = sum(statistics.median([o_base[k][i] for i in idx]) for k in kinds)
        return a / b if b > 0 else float("nan")

    out = {}
    for name, kinds in [(k, [k]) for k in KINDS] + [("prompts", list(PROMPTS))]:
        out[name] = (ratio(kinds, range(n)), [ratio(kinds, c) for c in cuts])
    return out


# ---------------------------------------------------------------------------------------------- servers

def snapshot(ref, into):
    """The server and library of git ``ref``, extracted into ``into``; returns its PYTHONPATH."""
    archive = subprocess.run(["git", "-C", REPO, "archive", ref, "server", "SlicerNNInteractive"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    return os.pathsep.join([os.path.join(into, "server"), os.path.join(into, "SlicerNNInteractive")])


@contextlib.contextmanager
def server(kind, model, tmp, key, pythonpath=None, probe_out=None):
    """One server on a free loopback port: ``ours`` (this tree, or ``pythonpath``), ``official``, or ``probe`` (ours
    with layer stamps written to ``probe_out`` when it stops)."""
    port = free_port()
    url = "http://127.0.0.1:%d" % port
    common = ["--device", "cpu", "--port", str(port), "--torch-n-threads", TORCH_THREADS, "--no-autozoom",
              "--no-torch-compile", "--max-sessions", "8"]
    env = dict(SERVER_ENV, NN_INTERACTIVE_API_KEY=key or "")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    if kind == "official":
        cmd = [sys.executable, "-m", "nnInteractive.inference.server.main", "--model-dir", model, "--fold", "0"]
        cmd += common + (["--api-key", key] if key else [])
    elif kind == "probe":
        cmd = [sys.executable, os.path.join(HERE, "overhead_probe.py"), probe_out, "--model-dir", model] + common
    else:
        cmd = [sys.executable, "-m", "nninteractive_slicer_server", "--model-dir", model] + common
    with running(cmd, url, os.path.join(tmp, "%s-%d.log" % (kind, port)), env=env) as proc:
        yield url, proc


def official_client(url, key):
    from nnInteractive.inference.remote import nnInteractiveRemoteInferenceSession

    s = nnInteractiveRemoteInferenceSession(url, api_key=key)
    s._stop_heartbeat.set()  # no heartbeat thread competing with the calls
    return s


def in_process(model):
    import torch
    from nnInteractive.inference.inference_session import nnInteractiveInferenceSession

    s = nnInteractiveInferenceSession(device=torch.device("cpu"), use_torch_compile=False, verbose=False,
                                      torch_n_threads=int(TORCH_THREADS), do_autozoom=False)
    s.initialize_from_trained_model_folder(model, 0, "checkpoint_final.pth")
    return s


# ---------------------------------------------------------------------------------------------- layers

def layers(model, tmp, key, img, p, calls, probed):
    """Servers with stamps at every layer boundary (overhead_probe.py), ``probed``: {name: PYTHONPATH or None},
    their calls interleaved in a shuffled order: {name: {"steps": {kind: {step: [ms, ...]}}, "order": [...]}}."""
    rng = random.Random(1)
    with contextlib.ExitStack() as stack:
        sides, procs, outs = [], {}, {}
        for name, path in probed.items():
            outs[name] = os.path.join(tmp, "probe-%s.json" % name)
            url, procs[name] = stack.enter_context(server("probe", model, tmp, key, pythonpath=path,
                                                          probe_out=outs[name]))
            sides.append(Side(name, official_client(url, key), img, probed=True))
        for kind in KINDS:
            for _ in range(calls):
                for side in rng.sample(sides, len(sides)):
                    call(side.s, kind, p, img)
                    side.after(kind)
        for side in sides:
            side.close()
            procs[side.name].terminate()  # SIGTERM: the probe writes its stamps as the server exits
            procs[side.name].wait(30)
    found = {}
    for name, path in outs.items():
        with open(path) as f:
            found[name] = json.load(f)
    return found


# ---------------------------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--reps", type=int, default=60, help="repetitions of every call on every side (default 60)")
    ap.add_argument("--blocks", type=int, default=5, help="blocks of repetitions for the spread (default 5)")
    ap.add_argument("--size", default="S", choices=list(SIZES), help="image size (default S, 64x64x32)")
    ap.add_argument("--key", default="shared", choices=["shared", "none"],
                    help="a shared API key on both servers (default, as shipped), or none")
    ap.add_argument("--before", metavar="REF", help="also our server as of this git commit (side 'before')")
    ap.add_argument("--layers", action="store_true", help="also time each layer of our server (a probed server)")
    ap.add_argument("--layer-calls", type=int, default=200, help="calls of each kind for --layers (default 200)")
    ap.add_argument("--json", metavar="PATH", help="write every figure here")
    a = ap.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    key = KEY if a.key == "shared" else None
    tmp = tempfile.mkdtemp(prefix="nni-overhead-")
    from tiny_models import make_random_model

    model = make_random_model(os.path.join(tmp, "tiny"), background_bias=None)
    shape = SIZES[a.size]
    img = phantom(shape, False)
    p = prompts(shape)
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "server", "SlicerNNInteractive"],
                           capture_output=True, text=True).stdout.strip()
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit + ("+changes" if dirty else ""),
            "machine": "%s, %d CPU cores (%s)" % (platform.platform(), os.cpu_count(), cpu_name()),
            "load_before": _load(), "size": a.size, "reps": a.reps, "key": a.key, "before": a.before,
            "command": "python Testing/benchmark/overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    started = time.perf_counter()
    res = {"meta": meta}
    with contextlib.ExitStack() as stack:
        remote = [("ours", None), ("official", None)]  # (side, PYTHONPATH of its server)
        if a.before:
            remote.insert(1, ("before", snapshot(a.before, tempfile.mkdtemp(prefix="before-", dir=tmp))))
        urls = {}
        for name, path in remote:  # one at a time: each imports nnInteractive (seconds) on 2 cores
            urls[name] = stack.enter_context(server("official" if name == "official" else "ours", model, tmp, key,
                                                    pythonpath=path))[0]
        log("servers up after %.0f s" % (time.perf_counter() - started))
        sides = [Side("inproc", in_process(model), img)]
        sides += [Side(name, official_client(urls[name], key), img) for name, _ in remote]
        for side in sides:  # warm-up
            for kind in KINDS:
                for _ in range(3):
                    call(side.s, kind, p, img)
                    side.after(kind)
        with contextlib.redirect_stdout(open(os.devnull, "w")):  # the library prints every interaction in-process
            times = experiment(sides, img, p, a.reps, log)
        for side in sides:
            side.close()
    res["times_ms"] = times
    names = [s.name for s in sides]
    res["median_ms"] = {k: {n: statistics.median(times[k][n]) for n in names} for k in KINDS}
    res["overhead_ms"] = {n: {k: statistics.median(v) for k, v in overheads(times, n).items()}
                          for n in names if n != "inproc"}
    res["ratio"] = {n: ratios(times, n, "official", a.blocks) for n in names if n not in ("inproc", "official")}
    if a.before:
        res["ratio_to_before"] = ratios(times, "ours", "before", a.blocks)
    if a.layers:
        probed = {"ours": None}
        if a.before:
            probed["before"] = dict(remote)["before"]
        log("layers: %d calls of each kind through probed servers (%s)" % (a.layer_calls, ", ".join(probed)))
        res["layers"] = layers(model, tmp, key, img, p, a.layer_calls, probed)
    meta["load_after"] = _load()
    meta["seconds"] = round(time.perf_counter() - started)
    report(res, names)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def report(res, names):
    m = res["meta"]
    print("# Serving overhead (%s, %s image, %d repetitions, key %s)\n" % (m["date"], m["size"], m["reps"], m["key"]))
    print("machine: %s; commit %s; load %s -> %s; %d s" % (m["machine"], m["commit"], m["load_before"],
                                                          m["load_after"], m["seconds"]))
    print("\nmedian ms per call (official client, run_prediction=False):\n")
    print("| call | " + " | ".join(names) + " | " + " | ".join("%s overhead" % n for n in names[1:]) + " |")
    print("|---" * (2 * len(names)) + "|")
    for k in KINDS:
        print("| %s | " % k + " | ".join("%.3f" % res["median_ms"][k][n] for n in names) + " | "
              + " | ".join("%.3f" % res["overhead_ms"][n][k] for n in names[1:]) + " |")
    for n, r in res["ratio"].items():
        print("\n%s / official, overhead ratio (all repetitions; range over blocks):" % n)
        for k in list(KINDS) + ["prompts"]:
            whole, blocks = r[k]
            print("  %-9s %.2f  [%.2f - %.2f]" % (k, whole, min(blocks), max(blocks)))
    if "ratio_to_before" in res:
        print("\nours / before, overhead ratio:")
        for k in list(KINDS) + ["prompts"]:
            whole, blocks = res["ratio_to_before"][k]
            print("  %-9s %.2f  [%.2f - %.2f]" % (k, whole, min(blocks), max(blocks)))
    if "layers" in res:
        probed = list(res["layers"])
        print("\nour server, layer by layer: median ms per request of each group of steps (probed servers: %s)\n"
              % " / ".join(probed))
        kinds = [k for k in KINDS if any(k in res["layers"][n]["groups"] for n in probed)]
        print("| layer | " + " | ".join(kinds) + " |")
        print("|---" * (len(kinds) + 1) + "|")
        for group in res["layers"][probed[0]]["group_order"] + ["total (bytes in > asgi out)"]:
            row = []
            for k in kinds:
                values = [(res["layers"][n]["groups"].get(k, {}).get(group)
                           or res["layers"][n]["steps"].get(k, {}).get(group)) for n in probed]
                row.append(" / ".join("%.3f" % statistics.median(v) if v else "-" for v in values))
            print("| %s | " % group + " | ".join(row) + " |")
        print("\nlayer by layer: median ms of each step (probed servers: %s; a step between two stamps, in the order "
              "they happen)\n" % " / ".join(probed))
        kinds = [k for k in KINDS if any(k in res["layers"][n]["steps"] for n in probed)]
        print("| step | " + " | ".join(kinds) + " |")
        print("|---" * (len(kinds) + 1) + "|")
        order = []
        for n in probed:
            order += [step for step in res["layers"][n]["order"] if step not in order]
        for step in order:
            row = []
            for k in kinds:
                values = [res["layers"][n]["steps"].get(k, {}).get(step) for n in probed]
                row.append(" / ".join("%.3f" % statistics.median(v) if v else "-" for v in values))
            if any(c.strip("- /") for c in row):
                print("| %s | " % step + " | ".join(row) + " |")

if __name__ == "__main__":
    sys.exit(main())
