"""Benchmark: one automatic segmentation (a registered nnU-Net model) four ways, same image, same model, same run.

    python Testing/benchmark/auto_timing.py                 # L phantom, 5 repetitions (~5 min on 2 CPU cores)
    python Testing/benchmark/auto_timing.py --reps 3 --size M
    python Testing/benchmark/auto_timing.py --write          # also append a section to Testing/benchmark/RESULTS.md

Sides (interleaved per repetition, after one untimed warm-up run of each):

* ``session``: ``RemoteSession.auto_segment`` on the image the session already holds (uploaded once, before the
  timing, as Slicer's session holds it), split from its timings into **queue** (the wait for the GPU/CPU worker),
  **prediction** (the server's work: nnU-Net preprocessing, sliding-window prediction, postprocessing) and
  **response** (everything else: packing the label box, transfer, decoding on the client);
* ``/infer_file``: the study uploaded as a zip of one NIfTI file (built once, beforehand), run, and the outputs zip
  downloaded: **upload + run** (the POST) and **download** (the GET), with the pipeline's own time (``time_elapsed``:
  reading the NIfTI, predicting, writing prediction.nii.gz);
* ``/infer``: the same study on a server path (``--infer-root``), nothing uploaded or downloaded;
* ``nnunet-predict``: the command in a fresh process (``python -m ...predict_cli``), as a script runs it: the wall
  time includes starting Python, importing torch and nnU-Net and loading the model; ``time_elapsed`` is its run alone.

The image: ``run.py``'s smooth phantom (the benchmark's L size, 256 x 256 x 130), held as a Slicer array is,
``[k, j, i]`` = (130, 256, 256), spacing 1 mm (the tiny model's own, so nnU-Net does not resample). The model:
``Testing/models/tiny_nnunet.py``'s random two-label network (features 4, 8; patch 64^3): it predicts speckle over
the whole image, so every side writes and sends a full-size label map. Timings are printed, never asserted.
"""

import argparse
import datetime
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "Testing"))
sys.path.insert(0, os.path.join(REPO, "Testing", "models"))
sys.path.insert(0, os.path.join(REPO, "SlicerNNInteractive"))

from conftest import SERVER_ENV, TORCH_THREADS, our_server  # noqa: E402  (a real server on a free loopback port)
from provenance import commit, machine, publish  # noqa: E402
from run import SIZES, phantom  # noqa: E402
from SlicerNNInteractiveLib.client import RemoteSession  # noqa: E402

MODEL = "tiny_organs"


def median(values):
    return statistics.median(values) if values else float("nan")


def session_side(remote, image_shape):
    t0 = time.perf_counter()
    bbox, region, labels, t = remote.auto_segment(MODEL)
    wall = time.perf_counter() - t0
    assert bbox is not None and region is not None, "the tiny model found nothing"
    server_total = t.get("total", 0.0)
    queue = t.get("queue", 0.0)
    prediction = server_total - queue - t.get("encode", 0.0)
    return {"total": wall, "queue": queue, "prediction": prediction, "response": wall - queue - prediction,
            "nn_predict": t.get("predict", 0.0), "preprocess": t.get("preprocess", 0.0),
            "postprocess": t.get("postprocess", 0.0), "encode": t.get("encode", 0.0), "decode": t.get("decode", 0.0),
            "bytes_down": int(region.nbytes)}


def infer_file_side(url, archive):
    t0 = time.perf_counter()
    r = requests_post(url + "/infer_file", files={"file": ("study.zip", archive)},
                      data={"request": json.dumps({"nnunet_id": MODEL, "series_folders": ["ct.nii.gz"]})})
    t1 = time.perf_counter()
    assert r.status_code == 200, r.text
    body = r.json()
    z = requests_get(url + "/download/%s" % body["job_id"])
    t2 = time.perf_counter()
    assert z.status_code == 200, z.text
    with zipfile.ZipFile(io.BytesIO(z.content)) as zf:
        assert "output/stage_0/prediction.nii.gz" in zf.namelist()
    return {"total": t2 - t0, "upload_run": t1 - t0, "download": t2 - t1, "pipeline": body["time_elapsed"],
            "nn_predict": body["stages"][0]["timings"].get("predict", 0.0), "bytes_up": len(archive),
            "bytes_down": len(z.content)}


def infer_side(url, study, out):
    t0 = time.perf_counter()
    r = requests_post(url + "/infer", json={"nnunet_id": MODEL, "study_path": study, "series_folders": ["ct.nii.gz"],
                                            "output_dir": out})
    wall = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    body = r.json()
    return {"total": wall, "pipeline": body["time_elapsed"],
            "nn_predict": body["stages"][0]["timings"].get("predict", 0.0)}


def cli_side(spec, study, out):
    env = dict(SERVER_ENV, OMP_NUM_THREADS=TORCH_THREADS, MKL_NUM_THREADS=TORCH_THREADS)
    cmd = [sys.executable, "-m", "nninteractive_slicer_server.auto.predict_cli", "-i", study, "-s", "ct.nii.gz",
           "--nnunet_id", MODEL, "-o", out, "--device", "cpu", "--model-serve-spec", spec, "-q"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    assert p.returncode == 0, p.stderr[-3000:]
    body = json.loads(p.stdout)
    return {"total": wall, "pipeline": body["time_elapsed"],
            "nn_predict": body["stages"][0]["timings"].get("predict", 0.0),
            "load": body["stages"][0]["timings"].get("load", 0.0)}


def requests_post(url, **kw):
    import requests

    return requests.post(url, timeout=900, **kw)


def requests_get(url, **kw):
    import requests

    return requests.get(url, timeout=900, **kw)


def ms(x):
    return "%.0f" % (x * 1e3)


def report(args, shape, rows, info, archive_bytes):
    s, f, i, c = rows["session"], rows["infer_file"], rows["infer"], rows["cli"]
    m = {side: {k: median([r[k] for r in rs]) for k in rs[0]} for side, rs in rows.items()}
    lines = [
        "## Automatic segmentation: session vs /infer_file vs /infer vs nnunet-predict (%s, %s)" % (
            info["date"], info["commit"]),
        "",
        "Produced by `python Testing/benchmark/auto_timing.py%s` on %s." % (
            "" if args.size == "L" and args.reps == 5 else " --size %s --reps %d" % (args.size, args.reps),
            info["machine"]),
        "Image: the %s phantom as Slicer holds it, [k, j, i] = %s int16, spacing 1 mm; model: the tiny random "
        "nnU-Net (Testing/models/tiny_nnunet.py, features 4-8, patch 64^3, 2 labels), predicting speckle over the "
        "whole image. Median of %d repetitions, sides interleaved, after one warm-up run each (the predictor cached "
        "in the server; the command loads it every time). Milliseconds." % (args.size, "x".join(map(str, shape)),
                                                                            args.reps),
        "",
        "| path | total | queue | prediction | response / transfer | of which nnU-Net forward passes |",
        "|---|---|---|---|---|---|",
        "| session (`RemoteSession.auto_segment`, image already on the server) | %s | %s | %s | %s | %s |" % (
            ms(m["session"]["total"]), ms(m["session"]["queue"]), ms(m["session"]["prediction"]),
            ms(m["session"]["response"]), ms(m["session"]["nn_predict"])),
        "| `/infer_file` (upload + run, then download) | %s | - | %s (pipeline) | %s + %s | %s |" % (
            ms(m["infer_file"]["total"]), ms(m["infer_file"]["pipeline"]),
            ms(m["infer_file"]["upload_run"] - m["infer_file"]["pipeline"]), ms(m["infer_file"]["download"]),
            ms(m["infer_file"]["nn_predict"])),
        "| `/infer` (study on a server path) | %s | - | %s (pipeline) | %s | %s |" % (
            ms(m["infer"]["total"]), ms(m["infer"]["pipeline"]), ms(m["infer"]["total"] - m["infer"]["pipeline"]),
            ms(m["infer"]["nn_predict"])),
        "| `nnunet-predict` (a fresh process) | %s | - | %s (pipeline, incl. model load %s) | %s (start-up, "
        "imports) | %s |" % (ms(m["cli"]["total"]), ms(m["cli"]["pipeline"]), ms(m["cli"]["load"]),
                             ms(m["cli"]["total"] - m["cli"]["pipeline"]), ms(m["cli"]["nn_predict"])),
        "",
        "Session: prediction = the server's preprocessing %s + forward passes %s + postprocessing %s (+ small "
        "bookkeeping); response = packing %s + transfer + decoding %s (label box %.1f MB raw). `/infer_file`: the "
        "zip uploaded is %.2f MB, the outputs zip %.2f MB; its pipeline time includes reading the NIfTI and writing "
        "prediction.nii.gz, which the session path does not do. Per-repetition totals (s): session %s; /infer_file "
        "%s; /infer %s; nnunet-predict %s." % (
            ms(m["session"]["preprocess"]), ms(m["session"]["nn_predict"]), ms(m["session"]["postprocess"]),
            ms(m["session"]["encode"]), ms(m["session"]["decode"]), m["session"]["bytes_down"] / 1e6,
            archive_bytes / 1e6, m["infer_file"]["bytes_down"] / 1e6,
            ", ".join("%.2f" % r["total"] for r in s), ", ".join("%.2f" % r["total"] for r in f),
            ", ".join("%.2f" % r["total"] for r in i), ", ".join("%.2f" % r["total"] for r in c)),
        "",
    ]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="L")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--write", action="store_true", help="append the section to Testing/benchmark/RESULTS.md")
    args = p.parse_args()

    import SimpleITK as sitk
    import tiny_models
    import tiny_nnunet

    tmp = tempfile.mkdtemp(prefix="auto-timing-")
    models = os.path.join(tmp, "models")
    tiny_nnunet.make_tiny_nnunet(models)
    spec = tiny_nnunet.write_spec(os.path.join(tmp, "model-serve-spec.yaml"), models)
    interactive = tiny_models.make_random_model(os.path.join(tmp, "interactive"))
    allowed = os.path.join(tmp, "allowed")
    study = os.path.join(allowed, "study")
    os.makedirs(study)
    image = np.ascontiguousarray(phantom(SIZES[args.size], noisy=False).transpose(2, 1, 0))  # [x, y, z] -> [k, j, i]
    sitk.WriteImage(sitk.GetImageFromArray(image), os.path.join(study, "ct.nii.gz"))  # spacing 1, 1, 1
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:  # the NIfTI is compressed already
        zf.write(os.path.join(study, "ct.nii.gz"), "ct.nii.gz")
    archive = buf.getvalue()
    shape = image.shape
    print("image %s %s, archive %.2f MB; %d repetitions" % ("x".join(map(str, shape)), image.dtype, len(archive) / 1e6,
                                                            args.reps), flush=True)

    rows = {"session": [], "infer_file": [], "infer": [], "cli": []}
    flags = ["--model-serve-spec", spec, "--infer-root", allowed, "--jobs-dir", os.path.join(tmp, "jobs"),
             "--max-upload-bytes", str(1 << 30), "--max-unpacked-bytes", str(1 << 31),
             "--idle-timeout-seconds", "3600", "--liveness-timeout-seconds", "3600"]
    with our_server(interactive, tmp, *flags) as (url, _proc):
        with RemoteSession(url) as remote:
            remote.set_image(image[None], image_properties={"spacing": [1.0, 1.0, 1.0]})
            for rep in range(args.reps + 1):  # repetition 0: warm-up, not counted
                out = {"session": session_side(remote, shape),
                       "infer_file": infer_file_side(url, archive),
                       "infer": infer_side(url, study, os.path.join(allowed, "out_%d" % rep)),
                       "cli": cli_side(spec, study, os.path.join(tmp, "cli_%d" % rep))}
                print("%s: %s" % ("warm-up" if rep == 0 else "rep %d" % rep,
                                  ", ".join("%s %.2f s" % (k, v["total"]) for k, v in out.items())), flush=True)
                if rep:
                    for k, v in out.items():
                        rows[k].append(v)
    info = {"date": datetime.date.today().isoformat(), "commit": commit(), "machine": machine(TORCH_THREADS)}
    text = report(args, shape, rows, info, len(archive))
    publish(text, args.write)


if __name__ == "__main__":
    main()
