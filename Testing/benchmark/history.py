"""Benchmark: prompt histories (issue 18): bytes per prompt kind in a history, what recording costs, and replay
time per prompt count, FAST (the segment, prompts with ``run_prediction=False``) against FULL (every prompt predicted).

    python Testing/benchmark/history.py              # ~3 min on 2 CPU cores: starts our server with the blob model
    python Testing/benchmark/history.py --smoke      # well under a minute: a small image, 1 and 2 prompts, one run
    python Testing/benchmark/history.py --url http://gpu:1527   # an already running server (a GPU one, say)

What it measures (printed as Markdown; ``--out FILE`` also writes JSON):
  * bytes of each prompt in a history's JSON (what the scene keeps on the segmentation node), per kind, on the L
    phantom (256 x 256 x 130, ``phantoms.make_phantom``, 8 blobs; one point, 2D box, scribble and lasso per blob, made
    by phantoms' helpers and cropped as the Slicer module sends them), under an oblique, anisotropic IJK-to-RAS
    matrix; and the header with the base (the segment of all blobs, compressed);
  * recording: a prompt into the history, and storing the history (the segment's digest and the JSON, as the
    controller does after each prompt), on L;
  * replay time per prompt count (1, 2, 5, 10, 20 prompts of the four kinds in turn) against the server on L,
    FAST and FULL interleaved, median of the repetitions, with one prompt's time (with its prediction) for scale.
Timings are printed, never asserted.
"""

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "Testing"))
sys.path.insert(0, os.path.join(REPO, "Testing", "models"))
sys.path.insert(0, os.path.join(REPO, "SlicerNNInteractive"))

from conftest import BLOB_MODEL, our_server  # noqa: E402
from phantoms import box_2d, interior_voxel, lasso_2d, make_phantom, scribble_2d  # noqa: E402
from provenance import commit, machine  # noqa: E402
from test_scene_geometry import affine, rotation  # noqa: E402
from SlicerNNInteractiveLib import history as H  # noqa: E402
from SlicerNNInteractiveLib.client import RemoteSession  # noqa: E402
from SlicerNNInteractiveLib.rasterize import crop_to_bbox  # noqa: E402

L = (256, 256, 130)
KINDS = ("point", "bbox", "scribble", "lasso")


def oblique():
    """A volume's IJK-to-RAS matrix as a file gives it: rotated, anisotropic, with an origin."""
    return affine(rotation(2, 12) @ rotation(0, 5) @ np.diag([0.782, 0.782, 2.5]), [-101.3, -87.9, -154.25])


def prompts_for(ph):
    """Per blob, one prompt of each kind, as SyncedSession.prompt takes them: (kind, args)."""
    out = []
    for k in range(1, ph.n_blobs + 1):
        out.append(("point", {"coordinates": interior_voxel(ph.labels, k)}))
        out.append(("bbox", {"bbox": box_2d(ph.labels, k)}))
        for kind, make in (("scribble", scribble_2d), ("lasso", lasso_2d)):
            crop, box = crop_to_bbox(make(ph.labels, k))
            out.append((kind, {"mask": crop, "interaction_bbox": box}))
    return out


def in_turn(prompts, n):
    """``n`` prompts of the four kinds in turn (point, box, scribble, lasso of blob 1, then of blob 2...)."""
    return [prompts[i % len(prompts)] for i in range(n)]


def history_of(shape, prompts, base=None):
    h = H.PromptHistory.start(shape, base, "Segment_1")
    server = {"url": "http://127.0.0.1:1527", "model": "blobs", "version": "2.6.0"}
    for kind, args in prompts:
        h.add(H.Step.from_args(kind, args, True, shape), server)
    return h


def timed(fn, repeat):
    """Milliseconds per call: [median, min] of ``repeat`` calls (on a shared machine the minimum is the cost itself,
    the median what it was under the load of the moment)."""
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(out), min(out)]


# ---------------------------------------------------------------------------------------------- sizes and recording

def sizes(ph, prompts):
    matrix = oblique()
    per_kind = {k: [] for k in KINDS}
    for kind, args in prompts:
        per_kind[kind].append(len(H.Step.from_args(kind, args, True, ph.image.shape).to_json(matrix)) + 1)  # + comma
    segment = (ph.labels > 0).astype(np.uint8)
    header = history_of(ph.image.shape, [], segment).to_json(matrix, "0" * 8, "0" * 8)
    empty = history_of(ph.image.shape, []).to_json(matrix, "0" * 8, "0" * 8)
    whole = history_of(ph.image.shape, in_turn(prompts, 20), segment).to_json(matrix, "0" * 8, "0" * 8)
    return {"per_kind": per_kind, "header_with_base": len(header), "header_without_base": len(empty),
            "segment_voxels": int(segment.sum()), "twenty_prompts_with_base": len(whole)}


def recording(ph, prompts, repeat=20):
    shape = ph.image.shape
    record = {}
    for kind in KINDS:
        args = [a for k, a in prompts if k == kind][0]
        record[kind] = (timed(lambda: history_of(shape, [(kind, args)]), repeat))
    segment = (ph.labels > 0).astype(np.uint8)
    h = history_of(shape, in_turn(prompts, 20), segment)
    matrix = oblique()
    h.to_json(matrix)  # the steps' JSON is made once and kept
    digest = (timed(lambda: H.mask_digest(segment), repeat))
    store = (timed(lambda: h.to_json(matrix, "0" * 8, H.mask_digest(segment)), repeat))
    start = (timed(lambda: H.PromptHistory.start(shape, segment), repeat))
    image = (timed(lambda: H.image_digest(ph.image), 5))
    out = {"record_prompt_ms": record, "segment_digest_ms": digest, "store_20_prompts_ms": store,
           "start_with_base_ms": start, "image_digest_ms": image}
    try:  # the attribute write on a real segmentation node (slicer-core), when installed
        import slicer

        scene = slicer.vtkMRMLScene()
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        text = h.to_json(matrix, "0" * 8, "0" * 8)
        texts = itertools.cycle([text, text + " "])  # a value that changes each time (an equal one is not set)
        out["set_attribute_ms"] = (timed(lambda: node.SetAttribute("h", next(texts)), repeat))
    except ImportError:
        pass
    return out


# ---------------------------------------------------------------------------------------------- replay on a server

def replay_times(url, ph, prompts, counts, reps):
    image, shape = ph.image, ph.image.shape
    segment = (ph.labels > 0).astype(np.uint8)  # FAST sends the segment as the last prompt left it: this size
    s = RemoteSession(url, heartbeat=False)
    try:
        s.set_image(image[None])
        s.declare_target_buffer(shape)
        s.add_point_interaction([n // 2 for n in shape], True, run_prediction=False)  # waits for preprocessing
        runs = {(mode, n): [] for mode in (H.FAST, H.FULL) for n in counts}
        one = []
        for rep in range(reps):
            for n in counts:
                h = history_of(shape, in_turn(prompts, n))
                for mode in ((H.FAST, H.FULL) if rep % 2 == 0 else (H.FULL, H.FAST)):
                    report = H.replay(h, s, segment=segment, mode=mode)
                    runs[(mode, n)].append(report["seconds"])
                    assert report["predictions"] == (n if mode == H.FULL else 0)
            s.reset_interactions()
            t0 = time.perf_counter()
            s.add_point_interaction(prompts[0][1]["coordinates"], True)
            one.append(time.perf_counter() - t0)
        info = s.server_info or {}
    finally:
        s.close(wait=True)
    server = {k: info.get(k) for k in ("server", "version", "device")}
    server["model"] = os.path.basename(str(info.get("model")))
    return {"runs": {"%s|%d" % k: v for k, v in runs.items()}, "one_prompt": one, "server": server}


# ---------------------------------------------------------------------------------------------- report

def report(res):
    lines = []
    meta = res["meta"]
    lines.append("* Date: %s; commit `%s`; command `%s`." % (meta["date"], meta["commit"], meta["command"]))
    lines.append("* Machine: %s; load average %s before, %s after." % (meta["machine"], meta["load_before"],
                                                                     meta["load_after"]))
    lines.append("* Phantom %s int16, %d blobs; server %s." % ("x".join(str(n) for n in meta["shape"]),
                                                                meta["blobs"], res["replay"]["server"]))
    lines.append("")
    sz = res["sizes"]
    lines.append("Bytes in the history's JSON per prompt (one per blob; min / median / max):")
    lines.append("")
    lines.append("| prompt | bytes (min / median / max) | stored as |")
    lines.append("|---|---|---|")
    how = {"point": "RAS of the voxel", "bbox": "RAS of its first and last voxels",
           "scribble": "box + packed bits", "lasso": "box + packed bits"}
    for kind in KINDS:
        v = sz["per_kind"][kind]
        lines.append("| %s | %d / %d / %d | %s |" % (kind, min(v), statistics.median(v), max(v), how[kind]))
    lines.append("")
    lines.append("Header without a base: %d B; with the base (the segment of all blobs, %d voxels): %d B; "
                 "that base and 20 prompts: %d B." % (sz["header_without_base"], sz["segment_voxels"],
                                                      sz["header_with_base"], sz["twenty_prompts_with_base"]))
    rec = res["recording"]
    lines.append("")
    def both(v, digits=2):
        return "%.*f (%.*f)" % (digits, v[0], digits, v[1])

    lines.append("Recording, ms, median (min): a prompt into the history %s; starting a history with that base "
                 "(compressed) %s; storing it with 20 prompts (the segment's digest %s, with the JSON %s)%s; the image's "
                 "digest (once per image) %s." % (
                     ", ".join("%s %s" % (k, both(rec["record_prompt_ms"][k], 3)) for k in KINDS),
                     both(rec["start_with_base_ms"]), both(rec["segment_digest_ms"]), both(rec["store_20_prompts_ms"]),
                     "; the node attribute write %s" % both(rec["set_attribute_ms"], 3)
                     if "set_attribute_ms" in rec else "", both(rec["image_digest_ms"], 1)))
    rp = res["replay"]
    lines.append("")
    lines.append("Replay per prompt count (median of %d, seconds; FAST sends the segment first):" % meta["reps"])
    lines.append("")
    lines.append("| prompts | FAST (no prediction) | FULL (every prompt predicted) | FULL / FAST |")
    lines.append("|---|---|---|---|")
    for n in meta["counts"]:
        fast = statistics.median(rp["runs"]["fast|%d" % n])
        full = statistics.median(rp["runs"]["full|%d" % n])
        lines.append("| %d | %.3f | %.3f | %.0fx |" % (n, fast, full, full / fast))
    lines.append("")
    lines.append("One prompt with its prediction, for scale: %.3f s (median)." % statistics.median(rp["one_prompt"]))
    return "\n".join(lines)


def load():
    try:
        return "%.1f" % os.getloadavg()[0]
    except OSError:
        return "?"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="a small image, 1 and 2 prompts, one run")
    p.add_argument("--url", help="an already running server (default: start ours with the blob model on the CPU)")
    p.add_argument("--model", default=BLOB_MODEL)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args()
    shape, blobs, counts, reps = (L, 8, (1, 2, 5, 10, 20), args.reps) if not args.smoke else ((96, 96, 64), 3, (1, 2), 1)
    load_before = load()
    ph = make_phantom(shape=shape, n_blobs=blobs, seed=7)
    prompts = prompts_for(ph)
    res = {"sizes": sizes(ph, prompts), "recording": recording(ph, prompts)}
    if args.url:
        res["replay"] = replay_times(args.url, ph, prompts, counts, reps)
    else:
        with our_server(args.model, tempfile.mkdtemp()) as (url, _):
            res["replay"] = replay_times(url, ph, prompts, counts, reps)
    res["meta"] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit(),
                   "command": "python Testing/benchmark/history.py" + (" --smoke" if args.smoke else ""),
                   "machine": machine(),
                   "load_before": load_before, "load_after": load(), "shape": list(shape), "blobs": blobs,
                   "counts": list(counts), "reps": reps}
    print(report(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
