"""The timing run of the nnInteractive paper, through the whole client path: sizes S, M, L; every prompt type;
repetitions; mean and standard deviation of each phase (prepare, upload, network + server, apply, total).

Inside Slicer the module runs it on real volume and segmentation nodes (``logic.runTimingExperiment()`` in
the Python console); outside Slicer it runs on ``ArrayScene``::

    python -m SlicerNNInteractiveLib.timing --url http://gpu-node:1527 --api-key KEY [--reps 10] [--sizes S M L]

Each repetition resets the segment first, so every measured prompt is the first on an empty segment (the
image is uploaded once per size, by an unmeasured warm-up prompt, and reported separately).
"""

import argparse
import math
import sys
import time

import numpy as np

from .rasterize import lasso_from_polygon, scribble_from_strokes
from .geometry import SlicePlacement

# The paper's sizes, x * y * z, as array shapes (K, J, I) = (z, y, x).
SIZES = {"S": (32, 64, 64), "M": (65, 128, 128), "L": (130, 256, 256)}
KINDS = ("point", "bbox", "scribble", "lasso")
PHASES = ("prepare_ms", "upload_image_ms", "upload_segment_ms", "encode_ms", "exchange_ms", "server_total_ms",
          "decode_ms", "apply_ms", "total_ms")


def synthetic_volume(shape, seed=0):
    """An int16 volume with a bright ellipsoid in its middle (radii a quarter of the shape) and noise."""
    rng = np.random.RandomState(seed)
    k, j, i = np.ogrid[:shape[0], :shape[1], :shape[2]]
    c = [(n - 1) / 2.0 for n in shape]
    r = [max(2.0, n / 4.0) for n in shape]
    inside = ((k - c[0]) / r[0]) ** 2 + ((j - c[1]) / r[1]) ** 2 + ((i - c[2]) / r[2]) ** 2 <= 1.0
    img = rng.normal(100.0, 20.0, shape)
    img[inside] += 400.0
    return img.astype(np.int16), inside


def prompts_for(shape, thickness=(2, 2, 2)):
    """One prompt of each kind on the middle of the volume, in array order, as the controller takes them."""
    ck, cj, ci = [n // 2 for n in shape]
    rk, rj, ri = [max(1, n // 4) for n in shape]
    placement = SlicePlacement(0, ck)
    # IJK (i, j, k) points on the middle axial slice
    stroke = [[ci - ri // 2, cj, ck], [ci + ri // 2, cj + rj // 3, ck]]
    scribble = scribble_from_strokes([stroke], placement, shape, thickness)
    angles = np.linspace(0, 2 * math.pi, 24, endpoint=False)
    polygon = [[ci + 1.1 * ri * math.cos(a), cj + 1.1 * rj * math.sin(a), ck] for a in angles]
    lasso = lasso_from_polygon(polygon, placement, shape)
    return {
        "point": {"coordinates": (ck, cj, ci)},
        "bbox": {"bbox": [[ck, ck + 1], [max(0, cj - rj - 2), min(shape[1], cj + rj + 3)],
                          [max(0, ci - ri - 2), min(shape[2], ci + ri + 3)]]},
        "scribble": {"mask": scribble[0], "interaction_bbox": scribble[1]},
        "lasso": {"mask": lasso[0], "interaction_bbox": lasso[1]},
    }


def mean_std(values):
    values = [float(v) for v in values]
    if not values:
        return float("nan"), float("nan")
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def summarize(records):
    """``records``: dicts with "size", "kind" and phase timings. Returns {(size, kind): {phase: (mean, std, n)}}."""
    groups = {}
    for rec in records:
        groups.setdefault((rec.get("size"), rec.get("kind")), []).append(rec)
    out = {}
    for key, recs in groups.items():
        out[key] = {}
        for phase in PHASES:
            values = [r[phase] for r in recs if phase in r]
            if values:
                m, s = mean_std(values)
                out[key][phase] = (m, s, len(values))
    return out


def format_summary(summary, phases=("prepare_ms", "exchange_ms", "server_total_ms", "apply_ms", "total_ms")):
    """A plain-text table: one row per size and prompt type, mean +- std in ms per phase."""
    names = {"prepare_ms": "prepare", "exchange_ms": "net+server", "server_total_ms": "server",
             "apply_ms": "apply", "total_ms": "total", "upload_image_ms": "upload image",
             "encode_ms": "encode", "decode_ms": "decode", "upload_segment_ms": "upload segment"}
    header = "%-4s %-9s %4s " % ("size", "prompt", "n") + " ".join("%17s" % names.get(p, p) for p in phases)
    lines = [header, "-" * len(header)]
    order = {s: n for n, s in enumerate(list(SIZES) + [None])}
    korder = {k: n for n, k in enumerate(KINDS + ("upload",))}
    for (size, kind) in sorted(summary, key=lambda sk: (order.get(sk[0], 99), korder.get(sk[1], 99))):
        row = summary[(size, kind)]
        n = max([v[2] for v in row.values()] or [0])
        cells = []
        for p in phases:
            if p in row:
                cells.append("%8.1f +- %6.1f" % (row[p][0], row[p][1]))
            else:
                cells.append("%17s" % "-")
        lines.append("%-4s %-9s %4d " % (size, kind, n) + " ".join(cells))
    return "\n".join(lines)


def run(make_scene, make_controller, sizes=("S", "M", "L"), kinds=KINDS, reps=10, pump=None, log=print,
        thickness=(2, 2, 2)):
    """Run the experiment. ``make_scene(image)`` returns a Scene holding the image (Slicer: a new volume node);
    ``make_controller(scene)`` a Controller on it. ``pump`` is called while waiting (Slicer: processEvents).
    Returns the list of per-prompt timing records (with "size", "kind", "rep")."""
    records = []
    for size in sizes:
        shape = SIZES[size]
        image, _ = synthetic_volume(shape)
        scene = make_scene(image)
        controller = make_controller(scene)
        try:
            prompts = prompts_for(shape, thickness)
            controller.submit("point", prompts["point"])  # warm-up: uploads the image once
            _wait(controller, pump)
            warm = dict(controller.timings[-1])
            warm.update(size=size, kind="upload", rep=0)
            records.append(warm)
            for kind in kinds:
                for rep in range(reps):
                    controller.reset_segment()
                    controller.submit(kind, prompts[kind])
                    _wait(controller, pump)
                    rec = dict(controller.timings[-1])
                    rec.update(size=size, kind=kind, rep=rep)
                    records.append(rec)
                log("%s %s: %d repetitions done" % (size, kind, reps))
        finally:
            controller.close()
    return records


class Stopped(RuntimeError):
    """The experiment was stopped (the scene it works in is closing)."""


def pump_until(pump, stop=None):
    """``pump()``, then raise Stopped when ``stop()`` is true (the host's scene is closing)."""
    pump()
    if stop is not None and stop():
        raise Stopped("The timing experiment was stopped: the scene was closed.")


def _wait(controller, pump, timeout=600.0):
    deadline = time.monotonic() + timeout
    while controller.busy:
        controller.poll()
        if pump is not None:
            pump()
        if time.monotonic() > deadline:
            raise TimeoutError("a prompt did not finish within %.0f s" % timeout)
        time.sleep(0.002)
    errors = getattr(controller, "last_errors", None)
    if errors:
        raise errors[-1]


def main(argv=None):
    from .client import RemoteSession
    from .controller import Controller
    from .scene import ArrayScene

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:1527")
    p.add_argument("--api-key", default=None)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    a = p.parse_args(argv)

    def make_controller(scene):
        c = Controller(scene, lambda: RemoteSession(a.url, api_key=a.api_key))
        c.last_errors = []
        c.on_error = lambda exc, job, dropped: c.last_errors.append(exc)
        return c

    records = run(ArrayScene, make_controller, a.sizes, a.kinds, a.reps, log=lambda m: print(m, file=sys.stderr))
    print(format_summary(summarize(records)))
    return 0


def report(records, last=30):
    """What the module's Timings dialog shows: the phases' summary and the last prompts, one line each."""
    from .controller import format_timing

    if not records:
        return "No prompt has run yet."
    text = format_summary(summarize(records), phases=("prepare_ms", "upload_image_ms", "exchange_ms",
                                                      "server_total_ms", "apply_ms", "total_ms"))
    return text + "\n\nLast prompts:\n" + "\n".join(format_timing(t) for t in records[-last:])


if __name__ == "__main__":
    sys.exit(main())
