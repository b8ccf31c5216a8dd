"""Benchmark: how long an automatic run's labels hold the GUI thread while they are written into Slicer's nodes.

On Slicer's MRML from the slicer-core wheel (no rendering: Slicer's own display updates come on top), a 256^3
volume with three segments already drawn gets a 100-label result over most of the volume, twice per masking
setting, interleaved:

  * ``label by label``: what the module did before (a segment, an undo state and a masked merge per label, all in
    one call on the GUI thread): the GUI is frozen for the whole of it;
  * ``one merge``: ``labelmerge.LabelsMerge`` as the controller drives it, one ``step`` per timer tick with the
    budget ``labelmerge.STEP_SECONDS``: the longest step is the longest the GUI waits for a frame.

Both save undo states in Slicer's real vtkSegmentationHistory, as the Segment Editor's saveStateForUndo does.

    .venv/bin/python Testing/benchmark/label_merge.py [--size 256] [--labels 100] [--repeat 2]
"""

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "Testing"))
sys.path.insert(0, os.path.join(REPO, "SlicerNNInteractive"))

import numpy as np  # noqa: E402
import slicer  # noqa: E402

from mrml import MrmlScene  # noqa: E402

from SlicerNNInteractiveLib import masking as M  # noqa: E402
from SlicerNNInteractiveLib.labelmerge import STEP_SECONDS, LabelsMerge  # noqa: E402

SETTINGS = {
    "everywhere, overwrite all": M.MaskingSettings(M.EDIT_EVERYWHERE, M.OVERWRITE_ALL),
    "outside all, overwrite visible, intensity": M.MaskingSettings(M.EDIT_OUTSIDE_ALL, M.OVERWRITE_VISIBLE,
                                                                   intensity_range=(-100.0, 300.0)),
}


def phantom(size, n_labels, seed=0):
    """(image, segments before the run, bbox, region): 100 labelled blocks over the middle 90 % of the volume."""
    rng = np.random.default_rng(seed)
    shape = (size, size, size)
    image = rng.integers(-200, 400, size=shape).astype(np.int16)
    lo, hi = size // 20, size - size // 20
    bbox = [[lo, hi]] * 3
    n = hi - lo
    side = int(np.ceil(n_labels ** (1.0 / 3)))
    cells = (np.arange(n) * side // n)
    region = (cells[:, None, None] * side * side + cells[None, :, None] * side + cells[None, None, :]) % n_labels + 1
    region = region.astype(np.uint8)
    region[rng.random(region.shape) < 0.2] = 0
    segments = {}
    for name, box in (("body", (slice(0, size), slice(size // 8, size - size // 8), slice(size // 8, size - size // 8))),
                      ("lesion", (slice(size // 3, size // 2),) * 3),
                      ("marker", (slice(size // 2, size // 2 + 8),) * 3)):
        mask = np.zeros(shape, bool)
        mask[box] = True
        segments[name] = mask
    return image, segments, bbox, region


def history_for(scene):
    history = slicer.vtkSegmentationHistory()
    history.SetMaximumNumberOfStates(10)  # what the module's editor keeps
    history.SetSegmentation(scene.segmentation())
    return history


def label_by_label(scene, bbox, region, labels):
    """The module's automatic result before this change: one segment, undo state and merge per label."""
    history = history_for(scene)
    t0 = time.perf_counter()
    for label in labels:
        key = scene.add_segment(label["name"])
        history.SaveState()
        scene.merge(key, bbox, (region == label["value"]).astype(np.uint8))
    return {"frozen_ms": (time.perf_counter() - t0) * 1e3, "steps": 1, "undo_states": history.GetNumberOfStates()}


def one_merge(scene, bbox, region, labels):
    history = history_for(scene)
    merge = LabelsMerge(scene, bbox, region, labels, before_write=history.SaveState)
    steps = []
    while True:
        t0 = time.perf_counter()
        done = merge.step(STEP_SECONDS)
        steps.append((time.perf_counter() - t0) * 1e3)
        if done:
            break
    return {"frozen_ms": max(steps), "steps": len(steps), "mean_step_ms": statistics.mean(steps),
            "total_ms": sum(steps), "undo_states": history.GetNumberOfStates(), "restarts": merge.restarts}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--labels", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    image, segments, bbox, region = phantom(args.size, args.labels)
    labels = [{"value": v, "name": "label %d" % v} for v in range(1, args.labels + 1)]
    print("volume %d^3 int16, %d labels over a %d^3 box (%d labelled voxels), 3 segments before; step budget %.0f ms"
          % (args.size, args.labels, bbox[0][1] - bbox[0][0], np.count_nonzero(region), STEP_SECONDS * 1e3))
    results = {}
    for rep in range(args.repeat):
        for setting_name, settings in SETTINGS.items():
            for way, run in (("label by label", label_by_label), ("one merge", one_merge)):
                order = (way, setting_name)
                scene = MrmlScene(image, segments)
                scene.set_visible("marker", False)
                scene.settings = settings
                out = run(scene, bbox, region, labels)
                results.setdefault(order, []).append(out)
                print("  run %d, %-42s %-15s longest GUI freeze %8.1f ms in %d step(s)" % (
                    rep + 1, setting_name, way, out["frozen_ms"], out["steps"]), flush=True)
    print("\n| masking | way | longest GUI freeze (ms) | steps | mean step (ms) | total (ms) | undo states |")
    print("|---|---|---|---|---|---|---|")
    for (way, setting_name), outs in results.items():
        frozen = statistics.median(o["frozen_ms"] for o in outs)
        total = statistics.median(o.get("total_ms", o["frozen_ms"]) for o in outs)
        mean = statistics.median(o.get("mean_step_ms", o["frozen_ms"]) for o in outs)
        print("| %s | %s | %.1f | %d | %.1f | %.0f | %d |" % (setting_name, way, frozen, outs[0]["steps"], mean, total,
                                                             outs[0]["undo_states"]))


if __name__ == "__main__":
    main()
