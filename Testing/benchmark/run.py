"""Benchmark: the nnInteractive paper's timing experiment, in-process vs our server vs the official server.

Sides: ``inproc`` (the library in this process), ``ours`` (our client -> our server), ``ours-lz4`` (image uploads
only, compressed as for a remote server: the codec A/B), ``official`` (our client -> official server: the servers
compared alone) and ``official-client`` (nnInteractive's client -> official server: all official, totals only).

    python Testing/benchmark/run.py                  # full run (~9 min on 2 CPU cores), writes Testing/benchmark/out/
    python Testing/benchmark/run.py --smoke          # well under a minute: S only, 2 repetitions, no official server
    python Testing/benchmark/run.py --our-url http://gpu:1527 --no-official   # an already running server
    python Testing/benchmark/run.py --resenc-l --device cuda [--torch-compile]   # GPU: official-size network

What it measures (all sides interleaved per repetition, same model, same prompts, same images):
  * sizes S 64x64x32, M 128x128x65, L 256x256x130 (int16, array order [x, y, z]), smooth and noisy phantoms;
  * every prompt type (point, bbox, scribble, lasso), with and without ``run_prediction``, and the image upload;
  * each call split into client prepare (change detection + encoding), upload, server queue wait, prediction,
    response encoding, download and client apply (decode + write); bytes sent / received;
  * server memory per session (RSS of the server process, before claiming vs holding the L image);
  * the 0.x client baseline (array_equal on deep copies, full-volume gzip + unpackbits, full-volume write) vs
    our sync layer's client-side work per prompt on L;
  * concurrency 1/2/4/8 sessions against one server, and a prediction's queue wait while another session
    uploads images;
  * the wire codec for images and masks (sizes, pack and unpack times, smooth and noisy).

Outputs (``--out``): results.json, results.md, figure3.png. Timings are printed, never asserted.
"""

import argparse
import contextlib
import copy
import gzip
import json
import math
import os
import platform
import statistics
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

from conftest import official_server, our_server  # noqa: E402  (real servers on free loopback ports)
from SlicerNNInteractiveLib import wire  # noqa: E402
from SlicerNNInteractiveLib.client import RemoteSession  # noqa: E402
from SlicerNNInteractiveLib.rasterize import crop_to_bbox  # noqa: E402
from SlicerNNInteractiveLib.sync import SyncedSession  # noqa: E402
from provenance import cpu_name  # noqa: E402

SIZES = {"S": (64, 64, 32), "M": (128, 128, 65), "L": (256, 256, 130)}
KINDS = ("point", "bbox", "scribble", "lasso")


# ---------------------------------------------------------------------------------------------- data

def phantom(shape, noisy, seed=0):
    """int16 [x, y, z]: a smooth background (gradient + low-frequency wobble) with a bright ellipsoid in the middle;
    ``noisy`` adds Gaussian noise (std 40), which is what makes CT/MR volumes hard to compress."""
    rng = np.random.RandomState(seed)
    x, y, z = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    X, Y, Z = np.meshgrid(x, y, z, indexing="ij", sparse=True)
    img = 100 + 60 * X + 30 * np.sin(3 * Y) * np.cos(2 * Z)
    img = img + 500 * (((X / 0.45) ** 2 + (Y / 0.35) ** 2 + (Z / 0.5) ** 2) <= 1.0)
    if noisy:
        img = img + rng.normal(0, 40, shape).astype(np.float32)
    return np.round(img).astype(np.int16)


def prompts(shape):
    """One prompt of each kind on the middle axial slice (2D box, scribble and lasso), array order [x, y, z]."""
    cx, cy, cz = [n // 2 for n in shape]
    rx, ry = shape[0] // 5, shape[1] // 5
    scribble = np.zeros(shape, np.uint8)
    for t in range(-rx, rx + 1):
        scribble[cx + t, cy + t // 3: cy + t // 3 + 2, cz] = 1
    lasso = np.zeros(shape, np.uint8)
    X, Y = np.ogrid[:shape[0], :shape[1]]
    lasso[..., cz] = (((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2) <= 1.0
    return {
        "point": {"coordinates": (cx, cy, cz)},
        "bbox": {"bbox": [[cx - rx, cx + rx], [cy - ry, cy + ry], [cz, cz + 1]]},
        "scribble": cropped(scribble),
        "lasso": cropped(lasso),
    }


def cropped(mask):
    """A mask prompt as the Slicer module sends it: cropped to its bounding box, with ``interaction_bbox``
    (the rasterizer knows the box, so no full-volume mask is packed, sent or scanned)."""
    crop, box = crop_to_bbox(mask)
    return {"mask": crop, "interaction_bbox": box}


# ---------------------------------------------------------------------------------------------- sides

def proc_rss(pid):
    """Resident memory of a process (bytes), from /proc."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


class InProcess:
    """The reference: nnInteractiveInferenceSession in this process."""
    name = "inproc"

    def __init__(self, model_dir, device, threads, compile_):
        import torch
        from nnInteractive.inference.inference_session import nnInteractiveInferenceSession

        self.s = nnInteractiveInferenceSession(device=torch.device(device), use_torch_compile=compile_, verbose=False,
                                               torch_n_threads=threads, do_autozoom=False)
        self.s.initialize_from_trained_model_folder(model_dir, 0, "checkpoint_final.pth")
        self.target = None

    def set_image(self, img):
        t0 = time.perf_counter()
        self.s.set_image(img[None])
        ms = (time.perf_counter() - t0) * 1e3
        self.target = np.zeros(img.shape, np.uint8)
        self.s.set_target_buffer(self.target)
        self.s._finish_preprocessing_and_initialize_interactions()  # unmeasured: keep sides from overlapping
        return {"total_ms": ms}

    def reset(self):
        self.s.reset_interactions()

    def prompt(self, kind, args, run):
        t0 = time.perf_counter()
        _call(self.s, kind, args, run)
        return {"total_ms": (time.perf_counter() - t0) * 1e3}

    def close(self):
        self.s._reset_session()


class Remote:
    """Our client (RemoteSession) against a server: ours, or the official one."""

    def __init__(self, name, url, pid, image_codec=None, prompts=True):
        self.name, self.url, self.pid = name, url, pid
        self.s = RemoteSession(url, heartbeat=False)
        if image_codec:
            self.s.image_codec = dict(image_codec)
        self.prompts = prompts  # False: an image-upload-only side (codec A/B)
        self.target = None

    def _record(self, total_ms):
        return _remote_record(self.s.last_timing, total_ms)

    def set_image(self, img):
        t0 = time.perf_counter()
        self.s.set_image(img[None])
        rec = self._record((time.perf_counter() - t0) * 1e3)
        self.target = np.zeros(img.shape, np.uint8)
        self.s.set_target_buffer(self.target)
        self.s.add_point_interaction([n // 2 for n in img.shape], True, run_prediction=False)  # waits preprocessing
        self.s.reset_interactions()
        return rec

    def reset(self):
        self.s.reset_interactions()

    def prompt(self, kind, args, run):
        if not self.prompts:
            return None
        t0 = time.perf_counter()
        _call(self.s, kind, args, run)
        return self._record((time.perf_counter() - t0) * 1e3)

    def close(self):
        self.s.close()


class OfficialClient(Remote):
    """nnInteractive's own client (``nnInteractiveRemoteInferenceSession``) against the official server: the
    all-official reference, whose upload includes the official client's packing. Only totals are known."""

    def __init__(self, name, url, pid):
        from nnInteractive.inference.remote import nnInteractiveRemoteInferenceSession

        self.name, self.url, self.pid = name, url, pid
        self.s = nnInteractiveRemoteInferenceSession(url)
        self.prompts = True
        self.target = None

    def _record(self, total_ms):
        return {"total_ms": total_ms}


def _call(s, kind, args, run):
    if kind == "point":
        s.add_point_interaction(args["coordinates"], True, run_prediction=run)
    elif kind == "bbox":
        s.add_bbox_interaction(args["bbox"], True, run_prediction=run)
    elif kind == "scribble":
        s.add_scribble_interaction(args["mask"], True, run_prediction=run, interaction_bbox=args["interaction_bbox"])
    else:
        s.add_lasso_interaction(args["mask"], True, run_prediction=run, interaction_bbox=args["interaction_bbox"])


def _remote_record(t, total_ms):
    """Split one remote call into phases (ms). ``upload``/``download`` use the server's wall-clock stamps when it
    sends them (ours does; the clocks agree on one machine); otherwise transfer is one lump."""
    rec = {"total_ms": total_ms, "bytes_sent": t.get("bytes_sent", 0), "bytes_received": t.get("bytes_received", 0),
           "prepare_ms": t.get("encode_ms", 0.0), "apply_ms": t.get("decode_ms", 0.0) + t.get("write_ms", 0.0)}
    if "server_total" in t:
        server = t["server_total"]
        rec.update(queue_ms=t.get("server_queue_wait", 0.0), predict_ms=t.get("server_predict", 0.0),
                   encode_response_ms=t.get("server_encode", 0.0))
        rec["server_other_ms"] = server - rec["queue_ms"] - rec["predict_ms"] - rec["encode_response_ms"]
        transfer = t["exchange_ms"] - server
        if "server_received_at" in t and "sent_at" in t:
            up = (t["server_received_at"] - t["sent_at"]) * 1e3
            rec["upload_ms"] = min(max(up, 0.0), transfer)
            rec["download_ms"] = transfer - rec["upload_ms"]
        else:
            rec["transfer_ms"] = transfer
    else:
        rec["server_ms"] = t.get("exchange_ms", 0.0)  # official: no server-side split
    rec["outside_predict_ms"] = total_ms - rec.get("predict_ms", float("nan"))
    return rec


# ---------------------------------------------------------------------------------------------- statistics

def stats(values):
    v = sorted(float(x) for x in values if x is not None and not math.isnan(x))
    if not v:
        return None
    p90 = v[min(len(v) - 1, int(math.ceil(0.9 * len(v))) - 1)]
    return {"n": len(v), "mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
            "median": statistics.median(v), "p90": p90}


def percentile(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(math.ceil(q * len(v))) - 1))] if v else float("nan")


# ---------------------------------------------------------------------------------------------- experiments

def experiment(sides, sizes, noises, reps, kinds, log):
    """The paper's experiment, every side interleaved: for each repetition every side does the same call in a
    rotating order, so background load hits all sides alike."""
    records = []
    for size in sizes:
        shape = SIZES[size]
        for noisy in noises:
            img = phantom(shape, noisy)
            p = prompts(shape)
            label = "%s-%s" % (size, "noisy" if noisy else "smooth")
            for rep in range(reps):
                order = sides[rep % len(sides):] + sides[:rep % len(sides)]
                for side in order:
                    rec = side.set_image(img)
                    records.append(dict(rec, side=side.name, size=size, noise=noisy, kind="image", run=True, rep=rep))
                for kind in kinds:
                    for run in (True, False):
                        for side in order:
                            side.reset()
                            rec = side.prompt(kind, p[kind], run)
                            if rec is None:
                                continue
                            records.append(dict(rec, side=side.name, size=size, noise=noisy, kind=kind, run=run,
                                                rep=rep))
            log("  %s: %d repetitions on %s" % (label, reps, ", ".join(s.name for s in sides)))
    return records


def summarize(records):
    """{side|size|noise|kind|run: {phase: stats}}"""
    groups = {}
    for r in records:
        key = "%s|%s|%s|%s|%s" % (r["side"], r["size"], "noisy" if r["noise"] else "smooth", r["kind"],
                                  "pred" if r["run"] else "nopred")
        groups.setdefault(key, []).append(r)
    out = {}
    for key, recs in groups.items():
        phases = sorted({k for r in recs for k in r if k.endswith("_ms") or k.startswith("bytes_")})
        out[key] = {ph: stats([r.get(ph) for r in recs if ph in r]) for ph in phases}
    return out


def paired_overhead(records, side, ref="inproc"):
    """Median over repetitions of (side - ref) end-to-end time for the same call: per size/noise/kind/run."""
    by = {}
    for r in records:
        by.setdefault((r["size"], r["noise"], r["kind"], r["run"], r["rep"]), {})[r["side"]] = r["total_ms"]
    diffs = {}
    for (size, noise, kind, run, _rep), d in by.items():
        if side in d and ref in d:
            diffs.setdefault((size, noise, kind, run), []).append(d[side] - d[ref])
    return {k: statistics.median(v) for k, v in diffs.items()}


def memory_per_session(servers, shape, log):
    """RSS of each server process before claiming one more session and while it holds the L image + a prediction."""
    out = {}
    img = phantom(shape, False)
    for name, (url, pid) in servers.items():
        before = proc_rss(pid)
        s = RemoteSession(url, heartbeat=False)
        s.set_image(img[None])
        s.set_target_buffer(np.zeros(shape, np.uint8))
        s.add_point_interaction([n // 2 for n in shape], True)
        held = proc_rss(pid)
        s.close()
        time.sleep(0.5)
        after = proc_rss(pid)
        out[name] = {"rss_before": before, "rss_holding": held, "rss_after_release": after,
                     "per_session_bytes": held - before}
        log("  memory %s: +%.1f MB per L session (RSS %.0f -> %.0f MB)"
            % (name, (held - before) / 2**20, before / 2**20, held / 2**20))
    return out


def client_side(url, reps, log):
    """Client-side work per prompt on L: our sync layer (caller versions, as Slicer gives; and checksums) vs the
    0.x approach. Both get the same server answer; only the client's own work is timed."""
    shape = SIZES["L"]
    img = phantom(shape, False)
    seg = np.zeros(shape, np.uint8)
    p = prompts(shape)
    res = {"ours_versions": [], "ours_checksums": [], "baseline_0x": [], "bytes_ours": [], "bytes_0x": []}
    sync = SyncedSession(lambda: RemoteSession(url, heartbeat=False))
    version = [0]
    for mode in ("ours_versions", "ours_checksums"):
        for rep in range(reps + 1):
            kw = {"image_key": "img", "image_version": 1, "segment_key": "seg", "segment_version": version[0]} \
                if mode == "ours_versions" else {}
            r = sync.prompt("point", p["point"], img, seg, **kw)
            sync.apply(r, seg)
            version[0] += 1
            if mode == "ours_versions":
                sync.segment_written("seg", version[0])
            else:
                t0 = time.perf_counter()
                sync.segment_written(None, segment=seg)  # the checksum after the write is client work too
                r.timings["apply_ms"] += (time.perf_counter() - t0) * 1e3
            t = r.timings
            if rep:  # the first prompt uploads the image
                res[mode].append({"detect_ms": t.get("detect_ms", 0.0), "decode_ms": t.get("decode_ms", 0.0),
                                  "write_ms": t.get("apply_ms", 0.0)})
                res["bytes_ours"].append(t.get("bytes_received", 0))
    full = seg.copy()  # the server's answer in 0.x: the whole segment, packbits + gzip
    payload = gzip.compress(np.packbits(full > 0).tobytes(), compresslevel=1)
    prev_img, prev_seg = copy.deepcopy(img), copy.deepcopy(seg)
    for rep in range(reps):
        t0 = time.perf_counter()
        changed = (not np.array_equal(img, prev_img)) or (not np.array_equal(seg, prev_seg))
        prev_img, prev_seg = copy.deepcopy(img), copy.deepcopy(seg)
        t1 = time.perf_counter()
        mask = np.unpackbits(np.frombuffer(gzip.decompress(payload), np.uint8))[:full.size].reshape(shape)
        t2 = time.perf_counter()
        seg[...] = mask
        t3 = time.perf_counter()
        assert not changed
        res["baseline_0x"].append({"detect_ms": (t1 - t0) * 1e3, "decode_ms": (t2 - t1) * 1e3,
                                   "write_ms": (t3 - t2) * 1e3})
        res["bytes_0x"].append(len(payload))
    sync.close()
    out = {}
    for mode in ("ours_versions", "ours_checksums", "baseline_0x"):
        rows = res[mode]
        out[mode] = {ph: stats([r[ph] for r in rows]) for ph in ("detect_ms", "decode_ms", "write_ms")}
        out[mode]["total_ms"] = stats([sum(r.values()) for r in rows])
        log("  client-side work per prompt on L, %s: median %.2f ms" % (mode, out[mode]["total_ms"]["median"]))
    out["bytes_received"] = {"ours": stats(res["bytes_ours"]), "baseline_0x": stats(res["bytes_0x"])}
    return out


def concurrency(url, levels, prompts_each, log):
    """N sessions prompting at once against one server (image M), then a prompting session beside an uploader."""
    shape = SIZES["M"]
    img = phantom(shape, False)
    p = prompts(shape)["point"]
    out = {"levels": {}}
    for n in levels:
        sessions = [RemoteSession(url, heartbeat=False) for _ in range(n)]
        for s in sessions:
            s.set_image(img[None])
            s.set_target_buffer(np.zeros(shape, np.uint8))
            s.add_point_interaction(p["coordinates"], True, run_prediction=False)
        lat, queue = [], []
        barrier = threading.Barrier(n)

        def worker(s):
            barrier.wait()
            for _ in range(prompts_each):
                s.reset_interactions()
                t0 = time.perf_counter()
                s.add_point_interaction(p["coordinates"], True)
                lat.append((time.perf_counter() - t0) * 1e3)
                queue.append(s.last_timing.get("server_queue_wait", float("nan")))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(s,)) for s in sessions]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        for s in sessions:
            s.close()
        out["levels"][n] = {"sessions": n, "prompts": len(lat), "throughput_per_s": len(lat) / wall,
                            "p50_ms": percentile(lat, 0.5), "p95_ms": percentile(lat, 0.95),
                            "queue_wait_p50_ms": percentile(queue, 0.5), "queue_wait_p95_ms": percentile(queue, 0.95)}
        log("  concurrency %d: %.2f prompts/s, p50 %.0f ms, p95 %.0f ms" % (
            n, out["levels"][n]["throughput_per_s"], out["levels"][n]["p50_ms"], out["levels"][n]["p95_ms"]))

    # Isolation: session A prompts while session B uploads L images over and over (B never predicts).
    a, b = RemoteSession(url, heartbeat=False), RemoteSession(url, heartbeat=False)
    a.set_image(img[None])
    a.set_target_buffer(np.zeros(shape, np.uint8))
    big = phantom(SIZES["L"], True)
    stop, uploads = threading.Event(), [0]

    def uploader():
        while not stop.is_set():
            b.set_image(big[None])
            uploads[0] += 1

    rows = []
    for phase in ("alone", "beside_uploads"):
        th = None
        if phase == "beside_uploads":
            th = threading.Thread(target=uploader)
            th.start()
            time.sleep(0.2)
        for _ in range(prompts_each * 2):
            a.reset_interactions()
            a.add_point_interaction(p["coordinates"], True)
            t = a.last_timing
            rows.append({"phase": phase, "queue_wait_ms": t["server_queue_wait"], "predict_ms": t["server_predict"],
                         "preprocess_wait_ms": t.get("server_preprocess_wait", 0.0)})
        if th is not None:
            stop.set()
            th.join()
    a.close()
    b.close()
    out["isolation"] = {ph: {k: stats([r[k] for r in rows if r["phase"] == ph])
                             for k in ("queue_wait_ms", "predict_ms", "preprocess_wait_ms")}
                        for ph in ("alone", "beside_uploads")}
    out["isolation"]["uploads_meanwhile"] = uploads[0]
    log("  isolation: queue wait beside %d L uploads: max %.2f ms (alone: max %.2f ms)" % (
        uploads[0], max(r["queue_wait_ms"] for r in rows if r["phase"] == "beside_uploads"),
        max(r["queue_wait_ms"] for r in rows if r["phase"] == "alone")))
    return out


def codec_sweep(sizes, log, reps=3):
    """Pack / unpack time and size of every codec setting on smooth and noisy images, and on masks."""
    settings = [(c, lvl, f) for c in ("lz4", "zstd") for lvl in (0, 1, 3, 5, 9) for f in ("none", "shuffle", "bitshuffle")]
    out = []
    shape = SIZES[sizes[-1]]
    p = prompts(shape)
    region = np.zeros((shape[0] // 2, shape[1] // 2, shape[2] // 2), np.uint8)  # a returned region: one blob
    X, Y, Z = np.ogrid[[slice(0, n) for n in region.shape]]
    region[((X / region.shape[0] - .5) ** 2 + (Y / region.shape[1] - .5) ** 2 + (Z / region.shape[2] - .5) ** 2)
           < 0.16] = 1
    arrays = {"image-smooth": phantom(shape, False), "image-noisy": phantom(shape, True),
              "mask-region": region, "mask-scribble": p["scribble"]["mask"]}
    for name, arr in arrays.items():
        for codec, level, filt in settings:
            pk, up = [], []
            for _ in range(reps):
                t0 = time.perf_counter()
                buf = wire.pack_array(arr, codec=codec, clevel=level, filter=filt)
                t1 = time.perf_counter()
                wire.unpack_array(buf)
                t2 = time.perf_counter()
                pk.append((t1 - t0) * 1e3)
                up.append((t2 - t1) * 1e3)
            out.append({"array": name, "shape": list(arr.shape), "raw_bytes": arr.nbytes, "codec": codec,
                        "clevel": level, "filter": filt, "bytes": len(buf), "ratio": arr.nbytes / len(buf),
                        "pack_ms": statistics.median(pk), "unpack_ms": statistics.median(up)})
    for name in arrays:
        rows = [r for r in out if r["array"] == name]
        best = min(rows, key=lambda r: r["pack_ms"] + r["unpack_ms"])
        log("  codec %s: fastest round trip %s/%d/%s %.1f ms, %.1fx" % (
            name, best["codec"], best["clevel"], best["filter"], best["pack_ms"] + best["unpack_ms"], best["ratio"]))
    return out


# ---------------------------------------------------------------------------------------------- output

PHASES = [("prepare_ms", "client prepare"), ("upload_ms", "upload"), ("queue_ms", "queue wait"),
          ("predict_ms", "prediction"), ("server_other_ms", "server other"), ("encode_response_ms", "response encode"),
          ("download_ms", "download"), ("transfer_ms", "transfer"), ("server_ms", "server (opaque)"),
          ("apply_ms", "client apply")]


def _med(summary, key, phase="total_ms"):
    s = summary.get(key, {}).get(phase)
    return s["median"] if s else float("nan")


def write_markdown(res, path):
    L = []
    m = res["meta"]
    L.append("# Benchmark results\n")
    L.append("%s; %s; python %s; torch %s; nnInteractive %s; blosc2 %s; load before: %s; load after: %s\n" % (
        m["date"], m["machine"], m["python"], m["torch"], m["nninteractive"], m["blosc2"], m["load_before"],
        m["load_after"]))
    L.append("Command: `%s`; model: %s; device %s; %d repetitions\n" % (m["command"], m["model"], m["device"],
                                                                        m["reps"]))
    L.append("## Targets\n")
    L.append("| target | measured | goal |\n|---|---|---|")
    for row in res["targets"]:
        L.append("| %s | %s | %s |" % (row["what"], row["measured"], row["goal"]))
    L.append("\n## Per call, end to end (ms; median [p90]; mean +- std) and overhead over in-process\n")
    sides = res["sides"]
    L.append("| size | image | call | " + " | ".join(sides) + " | " +
             " | ".join("%s - inproc (paired median)" % s for s in sides if s != "inproc") + " |")
    L.append("|---" * (3 + len(sides) + len(sides) - 1) + "|")
    summ = res["summary"]
    for size in res["sizes"]:
        for noise in res["noises"]:
            for kind in ("image",) + KINDS:
                for run in ((True,) if kind == "image" else (True, False)):
                    cells = []
                    for s in sides:
                        st = summ.get("%s|%s|%s|%s|%s" % (s, size, noise, kind, "pred" if run else "nopred"), {})
                        t = st.get("total_ms")
                        cells.append("%.1f [%.1f]; %.1f +- %.1f" % (t["median"], t["p90"], t["mean"], t["std"])
                                     if t else "-")
                    for s in sides:
                        if s == "inproc":
                            continue
                        d = res["paired_overhead"].get(s, {}).get("%s|%s|%s|%s" % (size, noise, kind, run))
                        cells.append("%+.1f" % d if d is not None else "-")
                    call = kind if kind == "image" else kind + ("" if run else " (no pred)")
                    L.append("| %s | %s | %s | %s |" % (size, noise, call, " | ".join(cells)))
    L.append("\n## Phases of our server's calls (median ms) and bytes\n")
    L.append("| size | image | call | " + " | ".join(n for _, n in PHASES if _ not in ("transfer_ms", "server_ms"))
             + " | sent | received |")
    L.append("|---" * (3 + len(PHASES) - 2 + 2) + "|")
    for size in res["sizes"]:
        for noise in res["noises"]:
            for kind in ("image",) + KINDS:
                for run in ((True,) if kind == "image" else (True, False)):
                    st = summ.get("ours|%s|%s|%s|%s" % (size, noise, kind, "pred" if run else "nopred"))
                    if not st:
                        continue
                    cells = ["%.2f" % st[ph]["median"] if st.get(ph) else "-" for ph, _ in PHASES
                             if ph not in ("transfer_ms", "server_ms")]
                    cells += ["%d" % st["bytes_sent"]["median"], "%d" % st["bytes_received"]["median"]]
                    call = kind if kind == "image" else kind + ("" if run else " (no pred)")
                    L.append("| %s | %s | %s | %s |" % (size, noise, call, " | ".join(cells)))
    if res.get("memory"):
        L.append("\n## Server memory per session (L image held, one prediction)\n")
        L.append("| server | RSS before claim (MB) | RSS holding (MB) | per session (MB) |\n|---|---|---|---|")
        for name, m_ in res["memory"].items():
            L.append("| %s | %.1f | %.1f | %.1f |" % (name, m_["rss_before"] / 2**20, m_["rss_holding"] / 2**20,
                                                     m_["per_session_bytes"] / 2**20))
    if res.get("client_side"):
        c = res["client_side"]
        L.append("\n## Client-side work per prompt on L (ms, median [p90])\n")
        L.append("| client | detect change | decode | write | total |\n|---|---|---|---|---|")
        for mode in ("ours_versions", "ours_checksums", "baseline_0x"):
            L.append("| %s | %s |" % (mode, " | ".join("%.2f [%.2f]" % (c[mode][ph]["median"], c[mode][ph]["p90"])
                                                       for ph in ("detect_ms", "decode_ms", "write_ms", "total_ms"))))
        L.append("\nBytes received per prompt: ours %d, 0.x %d." % (c["bytes_received"]["ours"]["median"],
                                                                   c["bytes_received"]["baseline_0x"]["median"]))
    if res.get("concurrency"):
        c = res["concurrency"]
        L.append("\n## Concurrency (our server, image M, point prompts)\n")
        L.append("| sessions | prompts | prompts/s | p50 ms | p95 ms | queue wait p50 | queue wait p95 |")
        L.append("|---|---|---|---|---|---|---|")
        for n, r in c["levels"].items():
            L.append("| %s | %d | %.2f | %.0f | %.0f | %.0f | %.0f |" % (
                n, r["prompts"], r["throughput_per_s"], r["p50_ms"], r["p95_ms"], r["queue_wait_p50_ms"],
                r["queue_wait_p95_ms"]))
        iso = c["isolation"]
        L.append("\nA prediction beside another session's uploads (%d L uploads meanwhile): queue wait median %.2f ms,"
                 " max-ish p90 %.2f ms (alone: %.2f / %.2f ms); prediction median %.0f ms (alone %.0f ms)." % (
                     iso["uploads_meanwhile"], iso["beside_uploads"]["queue_wait_ms"]["median"],
                     iso["beside_uploads"]["queue_wait_ms"]["p90"], iso["alone"]["queue_wait_ms"]["median"],
                     iso["alone"]["queue_wait_ms"]["p90"], iso["beside_uploads"]["predict_ms"]["median"],
                     iso["alone"]["predict_ms"]["median"]))
    if res.get("codecs"):
        L.append("\n## Wire codec (median of 3; ms; bytes)\n")
        L.append("| array | codec | clevel | filter | ratio | pack | unpack | MB | pack+unpack+1GbE |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for r in res["codecs"]:
            L.append("| %s | %s | %d | %s | %.2f | %.2f | %.2f | %.2f | %.1f |" % (
                r["array"], r["codec"], r["clevel"], r["filter"], r["ratio"], r["pack_ms"], r["unpack_ms"],
                r["bytes"] / 1e6, r["pack_ms"] + r["unpack_ms"] + r["bytes"] / 125e3))
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


def write_figure(res, path):
    """Like the paper's Figure 3: per prompt type, stacked bars of where the time goes, one bar per side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = res["summary"]
    sizes = res["sizes"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4.5), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, size in zip(axes[0], sizes):
        labels, x = [], 0
        for kind in KINDS:
            for side in res["sides"]:
                st = summ.get("%s|%s|%s|%s|pred" % (side, size, res["noises"][0], kind))
                if not st:
                    continue
                bottom = 0.0
                if not any(st.get(ph) for ph, _ in PHASES):  # in-process, official client: totals only
                    ax.bar(x, st["total_ms"]["median"], color=colors(3), label=None)
                else:
                    for i, (ph, name) in enumerate(PHASES):
                        if st.get(ph):
                            v = st[ph]["median"]
                            ax.bar(x, v, bottom=bottom, color=colors(i))
                            bottom += v
                labels.append("%s\n%s" % (kind, side))
                x += 1
            x += 0.5
        ax.set_xticks([i for i in range(len(labels))] if False else [])
        ax.set_title("%s (%s image), median ms per prompt" % (size, res["noises"][0]))
        ax.set_ylabel("ms")
        ticks, pos = [], 0
        for kind in KINDS:
            n = sum(1 for side in res["sides"] if summ.get("%s|%s|%s|%s|pred" % (side, size, res["noises"][0], kind)))
            ticks += [pos + i for i in range(n)]
            pos += n + 0.5
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, fontsize=6, rotation=90)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors(i)) for i in range(len(PHASES))]
    fig.legend(handles, [n for _, n in PHASES], loc="upper center", ncol=5, fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def targets(res):
    """The issue's CPU targets, read off this run."""
    rows = []
    summ, po = res["summary"], res["paired_overhead"]
    size = "L" if "L" in res["sizes"] else res["sizes"][-1]
    preds = [summ.get("ours|%s|smooth|%s|pred" % (size, k), {}).get("outside_predict_ms") for k in KINDS]
    preds = [p["median"] for p in preds if p]
    if preds:
        rows.append({"what": "serving overhead per prompt, ours (%s, total - server prediction, median over kinds)"
                     % size, "measured": "%.2f ms (kinds: %s)" % (statistics.median(preds), ", ".join(
                         "%.2f" % p for p in preds)), "goal": "<= 3 ms (official ~5-6 ms)"})
    for side in ("ours", "ours-lz4", "official", "official-client"):
        if side not in po:
            continue
        d = [po[side].get("%s|smooth|%s|True" % (size, k)) for k in KINDS]
        d = [x for x in d if x is not None]
        if d:
            rows.append({"what": "per prompt over in-process, %s (%s, paired median over kinds)" % (side, size),
                         "measured": "%.2f ms" % statistics.median(d), "goal": "ours <= 3 ms"})
        d = [po[side].get("%s|smooth|%s|False" % (size, k)) for k in KINDS]
        d = [x for x in d if x is not None]
        if d:
            rows.append({"what": "run_prediction=False over in-process, %s (%s, median over kinds)" % (side, size),
                         "measured": "%.2f ms" % statistics.median(d), "goal": "ours <= 2 ms (official +3-5)"})
        d = po[side].get("%s|smooth|image|True" % size)
        if d is not None:
            rows.append({"what": "image upload %s smooth over in-process, %s" % (size, side),
                         "measured": "%.1f ms" % d, "goal": "ours <= 25 ms (official +56)"})
        d = po[side].get("%s|noisy|image|True" % size)
        if d is not None:
            rows.append({"what": "image upload %s noisy over in-process, %s" % (size, side),
                         "measured": "%.1f ms" % d, "goal": "(reported)"})
    c = res.get("client_side")
    if c:
        rows.append({"what": "client-side work per prompt on L (detect + decode + write), ours with versions",
                     "measured": "%.2f ms (0.x baseline %.1f ms, ratio %.0fx)" % (
                         c["ours_versions"]["total_ms"]["median"], c["baseline_0x"]["total_ms"]["median"],
                         c["baseline_0x"]["total_ms"]["median"] / c["ours_versions"]["total_ms"]["median"]),
                     "goal": "<= 2 ms (0.x ~22 ms)"})
    mem = res.get("memory") or {}
    if "ours" in mem and "official" in mem:
        rows.append({"what": "server memory per session, L", "measured": "ours %.1f MB, official %.1f MB" % (
            mem["ours"]["per_session_bytes"] / 2**20, mem["official"]["per_session_bytes"] / 2**20),
            "goal": "ours <= official"})
    return rows


# ---------------------------------------------------------------------------------------------- main

def _load():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", default=os.path.join(HERE, "out"), help="output folder (default Testing/benchmark/out)")
    p.add_argument("--smoke", action="store_true", help="a quick run: S, 2 repetitions, no official server")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--noise", nargs="+", default=["smooth", "noisy"], choices=["smooth", "noisy"])
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--model-dir", help="nnInteractive model folder (default: a tiny random model is built)")
    p.add_argument("--resenc-l", action="store_true",
                   help="build a random network of the official model's size (ResEnc-L, patch 192^3) and use it")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--torch-compile", action="store_true", help="torch.compile the network (GPU experiment)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every side")
    p.add_argument("--our-url", help="an already running server of ours (else one is started)")
    p.add_argument("--our-pid", type=int, help="its process id, for memory figures (same machine)")
    p.add_argument("--official-url", help="an already running official nninteractive-server (else one is started)")
    p.add_argument("--official-pid", type=int)
    p.add_argument("--no-official", action="store_true")
    p.add_argument("--no-inproc", action="store_true")
    p.add_argument("--concurrency", type=int, nargs="*", default=[1, 2, 4, 8])
    p.add_argument("--no-codecs", action="store_true")
    a = p.parse_args(argv)
    if a.smoke:
        a.sizes, a.reps, a.no_official = ["S"], 2, True
        a.concurrency = [1, 2]
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    os.makedirs(a.out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="nni-bench-")
    model = a.model_dir
    if model is None:
        from tiny_models import make_random_model, make_random_resenc_l

        if a.resenc_l:
            model = make_random_resenc_l(os.path.join(tmp, "resenc_l"))
        else:  # input-dependent speckle: every prediction returns a non-empty region, like a real model
            model = make_random_model(os.path.join(tmp, "tiny"), background_bias=None)
    import blosc2
    import torch
    import nnInteractive

    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": "%s, %d CPU cores (%s)" % (
        platform.platform(), os.cpu_count(), cpu_name()), "python": platform.python_version(),
        "torch": torch.__version__, "nninteractive": getattr(nnInteractive, "__version__", _dist_version()),
        "blosc2": blosc2.__version__, "load_before": _load(), "command": " ".join(["python", "Testing/benchmark/run.py"]
                                                                                + (argv or sys.argv[1:])),
        "model": "ResEnc-L random" if a.resenc_l else (a.model_dir or "tiny random (4-8-16 features, patch 64^3)"),
        "device": a.device, "reps": a.reps, "torch_compile": a.torch_compile,
        "image_codec": wire.IMAGE_CODEC, "loopback_image_codec": wire.LOOPBACK_IMAGE_CODEC,
        "mask_codec": wire.MASK_CODEC}
    flags = ["--no-autozoom", "--device", a.device, "--max-sessions", "8"]
    if not a.torch_compile:
        flags.append("--no-torch-compile")
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        servers = {}
        # Start the servers side by side (each takes seconds to import nnInteractive).
        pending = []
        if a.our_url:
            servers["ours"] = (a.our_url, a.our_pid)
        else:
            pending.append(("ours", our_server(model, tmp, *flags)))
        if not a.no_official:
            if a.official_url:
                servers["official"] = (a.official_url, a.official_pid)
            else:
                pending.append(("official", official_server(model, tmp, *flags)))
        entered = {}

        def enter(name, cm):
            try:
                entered[name] = (cm, cm.__enter__())
            except Exception as exc:
                entered[name] = (None, exc)

        threads = [threading.Thread(target=enter, args=pc) for pc in pending]
        for t in threads:
            t.start()
        inproc = None if a.no_inproc else InProcess(model, a.device, a.threads, a.torch_compile)
        for t in threads:
            t.join()
        for name, (cm, val) in entered.items():
            if cm is None:
                raise SystemExit("could not start the %s server: %s" % (name, val))
            stack.push(lambda *exc, cm=cm: cm.__exit__(*exc))
            servers[name] = (val[0], val[1].pid)
        log("servers up after %.1f s: %s" % (time.perf_counter() - started, servers))
        sides = ([inproc] if inproc else []) + [Remote(n, servers[n][0], servers[n][1]) for n in ("ours", "official")
                                               if n in servers]
        if "ours" in servers:  # codec A/B in the same run: images compressed as they would be to a remote server
            sides.append(Remote("ours-lz4", *servers["ours"], image_codec=wire.IMAGE_CODEC, prompts=False))
        if "official" in servers:  # our client -> official server isolates the servers; this is all-official
            sides.append(OfficialClient("official-client", *servers["official"]))
        for s in sides:  # warm-up (first calls allocate and JIT-free paths warm up)
            s.set_image(phantom(SIZES["S"], False))
            s.prompt("point", prompts(SIZES["S"])["point"], True)
        log("experiment (%s, %d reps)" % (" ".join(a.sizes), a.reps))
        noises = [n == "noisy" for n in a.noise]
        records = experiment(sides, a.sizes, noises, a.reps, a.kinds, log)
        for s in sides:
            s.close()
        res = {"meta": meta, "sides": [s.name for s in sides], "sizes": a.sizes, "noises": a.noise,
               "records": records, "summary": summarize(records)}
        res["paired_overhead"] = {s.name: {"%s|%s|%s|%s" % (k[0], "noisy" if k[1] else "smooth", k[2], k[3]): v
                                           for k, v in paired_overhead(records, s.name).items()}
                                  for s in sides if s.name != "inproc" and inproc}
        mem_servers = {n: v for n, v in servers.items() if v[1]}
        mem_shape = SIZES["L"] if "L" in a.sizes else SIZES[a.sizes[-1]]
        res["memory"] = memory_per_session(mem_servers, mem_shape, log) if mem_servers else {}
        if "ours" in servers:
            if "L" in a.sizes or a.smoke:
                res["client_side"] = client_side(servers["ours"][0], a.reps, log)
            if a.concurrency:
                res["concurrency"] = concurrency(servers["ours"][0], a.concurrency, max(2, a.reps // 2), log)
    if not a.no_codecs:
        res["codecs"] = codec_sweep(a.sizes, log, reps=1 if a.smoke else 3)
    meta["load_after"] = _load()
    meta["seconds"] = time.perf_counter() - started
    res["targets"] = targets(res)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1, default=float)
    write_markdown(res, os.path.join(a.out, "results.md"))
    write_figure(res, os.path.join(a.out, "figure3.png"))
    print(open(os.path.join(a.out, "results.md")).read().split("## Per call")[0])
    log("wrote %s (results.json, results.md, figure3.png) in %.0f s" % (a.out, meta["seconds"]))
    return 0


def _dist_version():
    from importlib.metadata import version

    return version("nnInteractive")


if __name__ == "__main__":
    sys.exit(main())
