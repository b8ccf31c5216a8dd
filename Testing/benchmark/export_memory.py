"""Benchmark: the peak memory of exporting a many-class prediction (logits at the network's resolution -> labels on the
image's grid): nnU-Net's ``convert_predicted_logits_to_segmentation_with_correct_shape`` against ours
(``auto/pieces.py: export_steps``, one class at a time), same logits, same process set-up.

    python Testing/benchmark/export_memory.py                  # 100 classes, ~1-2 min, ~1.5 GB at its peak
    python Testing/benchmark/export_memory.py --classes 20 --write

A tiny random nnU-Net model (Testing/models/tiny_nnunet.py) with ``--classes`` outputs; an image of 48 x 96 x 96
voxels at 1.5 mm, which the model (1 mm) predicts on a 72 x 144 x 144 grid, so the export resamples every class. The
logits are computed once and saved; each export runs in a fresh process that loads them, resets its peak resident
memory (``/proc/self/clear_refs``) and reports the peak (``VmHWM``) above what it held just before the export, and
the export's time. Both exports give
the same labels (checked here too). Figures are printed, never asserted.
"""

import argparse
import datetime
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SHAPE, SPACING = (48, 96, 96), (1.5, 1.5, 1.5)

CHILD = r"""
import os, sys, time, pickle
sys.path[:0] = [os.path.join(%(repo)r, "server"), os.path.join(%(repo)r, "SlicerNNInteractive")]
import numpy as np, torch
torch.set_num_threads(2)
from nninteractive_slicer_server.auto.predictors import LoadedPredictor
from nninteractive_slicer_server.auto.pieces import export_steps
from nninteractive_slicer_server.scheduler import DeviceQueue
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape as conv

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def peak():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

model = LoadedPredictor(%(folder)r, (0,), "checkpoint_final.pth", "cpu")
p = model.predictor
with open(%(props)r, "rb") as f:
    props = pickle.load(f)
logits = torch.from_numpy(np.load(%(logits)r))
queue = DeviceQueue()
queue.run(lambda: None)  # its thread started before the measure
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak so far (loading the logits) is forgotten: VmHWM restarts from now
before = rss()
t = time.perf_counter()
if %(which)r == "ours":
    labels, _ = queue.run_pieces(lambda run: export_steps(p, logits, props, run))
else:
    labels = conv(logits, p.plans_manager, p.configuration_manager, p.label_manager, props)
seconds = time.perf_counter() - t
high = peak()
np.save(%(out)r, labels)
print(high - before, seconds)
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=100, help="classes of the model, background included (100)")
    p.add_argument("--write", action="store_true", help="append the section to Testing/benchmark/RESULTS.md")
    args = p.parse_args()
    sys.path[:0] = [os.path.join(REPO, "server"), os.path.join(REPO, "Testing", "models"),
                    os.path.join(REPO, "Testing", "benchmark")]
    import pickle

    import numpy as np
    import torch

    import tiny_nnunet
    from provenance import commit, machine, publish
    from nninteractive_slicer_server.auto.predictors import LoadedPredictor

    torch.set_num_threads(2)
    tmp = tempfile.mkdtemp(prefix="export-memory-")
    folder = tiny_nnunet.make_tiny_nnunet(os.path.join(tmp, "models"), labels=["l%d" % i for i in
                                                                              range(args.classes - 1)])
    model = LoadedPredictor(folder, (0,), "checkpoint_final.pth", "cpu")
    image = (np.random.RandomState(0).rand(1, *SHAPE) * 100).astype(np.float32)
    data, props = model.preprocess(image, SPACING)
    model.load_parameters(model.predictor.list_of_parameters[0])
    logits = model.predictor.predict_logits_from_preprocessed_data(data)
    paths = {k: os.path.join(tmp, k) for k in ("logits.npy", "props.pkl")}
    np.save(paths["logits.npy"], logits.numpy())
    with open(paths["props.pkl"], "wb") as f:
        pickle.dump(props, f)
    del logits, data
    figures = {}
    for which in ("nnunet", "ours"):
        out = os.path.join(tmp, which + ".npy")
        code = CHILD % {"repo": REPO, "folder": folder, "props": paths["props.pkl"], "logits": paths["logits.npy"],
                        "which": which, "out": out}
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, r.stderr[-3000:]
        extra, seconds = r.stdout.split()[-2:]
        figures[which] = (int(extra), float(seconds))
        print("%s: peak +%.1f MB, %.2f s" % (which, int(extra) / 1e6, float(seconds)), flush=True)
    same = bool((np.load(os.path.join(tmp, "ours.npy")) == np.load(os.path.join(tmp, "nnunet.npy"))).all())
    net = [int(s) for s in np.load(paths["logits.npy"], mmap_mode="r").shape[1:]]
    full = int(np.prod(SHAPE))
    text = "\n".join([
        "## Export memory with many classes (`Testing/benchmark/export_memory.py`, %s, %s)" % (
            datetime.date.today().isoformat(), commit()),
        "",
        "Produced by `python Testing/benchmark/export_memory.py%s` on %s. A %d-class tiny random nnU-Net; an image of "
        "%s voxels at 1.5 mm predicted on a %s grid (1 mm), so every class is resampled; the logits (%.0f MB, "
        "float16) are loaded first; peak resident memory above that during the export, in a fresh process each." % (
            "" if args.classes == 100 else " --classes %d" % args.classes, machine(), args.classes,
            "x".join(map(str, SHAPE)), "x".join(map(str, net)), args.classes * np.prod(net) * 2 / 1e6),
        "",
        "| export | peak memory above the logits | time |",
        "|---|---|---|",
        "| nnU-Net (`convert_predicted_logits_to_segmentation_with_correct_shape`) | %.0f MB | %.1f s |" % (
            figures["nnunet"][0] / 1e6, figures["nnunet"][1]),
        "| ours (`export_steps`, one class at a time) | %.0f MB | %.1f s |" % (figures["ours"][0] / 1e6,
                                                                             figures["ours"][1]),
        "",
        "Labels equal: %s. For scale: one class on the network's grid in float64 is %.1f MB, all %d of them %.0f MB; "
        "the labels on the image's grid are %.1f MB." % (
            "yes" if same else "NO", np.prod(net) * 8 / 1e6, args.classes, args.classes * np.prod(net) * 8 / 1e6,
            full / 1e6),
        "",
    ])
    publish(text, args.write)


if __name__ == "__main__":
    main()
