"""Benchmark: the memory an automatic run reserves for its reading (``auto/inputs.py``'s ``read_bytes``, taken from
``--memory-budget`` before any pixel is read) against what the run's own arrays reach, for a few request shapes.

    python Testing/benchmark/auto_read_memory.py               # 48 x 96 x 96 int16, ~1 min on 2 CPU cores
    python Testing/benchmark/auto_read_memory.py --shape 64,128,128

Measured: the peak of numpy's allocations (``tracemalloc``) in ``pipeline.run_study`` outside the prediction (whose
working memory ``AutoSegmenter.predict`` accounts for): before the prediction, and after it (the arrays still held,
the labels and maps, post-processing, writing), plus the SimpleITK images read (their bytes from the headers;
SimpleITK's buffers are not seen by tracemalloc, nor are the copies it makes to write). The estimate must stay above
the measured figure; how far above is the price of an upper bound. The model: ``Testing/models/tiny_nnunet.py``'s
random two-label network (one untimed warm-up run loads it). Figures are printed, never asserted.
"""

import argparse
import os
import platform
import sys
import tempfile
import tracemalloc

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [os.path.join(REPO, "server"), os.path.join(REPO, "SlicerNNInteractive"),
                os.path.join(REPO, "Testing", "models")]

MiB = 1 << 20


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="48,96,96", help="the image, k,j,i (int16)")
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))

    import SimpleITK as sitk

    import tiny_nnunet
    from nninteractive_slicer_server.auto import inputs
    from nninteractive_slicer_server.auto.paths import LocalFiles
    from nninteractive_slicer_server.auto.pipeline import plan_request, run_study
    from nninteractive_slicer_server.auto.predictors import AutoSegmenter
    from nninteractive_slicer_server.auto.registry import load_registry

    tmp = tempfile.mkdtemp(prefix="auto-read-memory-")
    tiny_nnunet.make_tiny_nnunet(os.path.join(tmp, "models"))
    registry = load_registry(tiny_nnunet.write_spec(os.path.join(tmp, "spec.yaml"), os.path.join(tmp, "models")))
    segmenter = AutoSegmenter(registry)
    study = os.path.join(tmp, "study")
    os.makedirs(study)
    sitk.WriteImage(sitk.GetImageFromArray(np.random.RandomState(0).normal(0, 50, shape).astype(np.int16)),
                    os.path.join(study, "ct.nii.gz"))
    box = np.zeros(shape, np.uint8)
    box[tuple(slice(n // 5, n // 2) for n in shape)] = 1
    sitk.WriteImage(sitk.GetImageFromArray(box), os.path.join(study, "box.nii.gz"))
    base = {"nnunet_id": "tiny", "series_folders": ["ct.nii.gz"], "study_path": study,
            "output_dir": os.path.join(tmp, "out")}
    cases = [("one model", {}),
             ("probability map", {"save_proba_map": True, "proba_threshold": 0.3}),
             ("crop_from a mask", {"crop_from": os.path.join(study, "box.nii.gz")}),
             ("intersect_with + small objects", {"intersect_with": os.path.join(study, "box.nii.gz"),
                                                 "remove_objects_smaller_than": 5}),
             ("cascade of 2 (crop)", {"nnunet_id": ["tiny", "tiny"], "series_folders": [["ct.nii.gz"]] * 2,
                                      "cascade_mode": "crop"})]

    peaks = {}
    real_predict = segmenter.predict

    def predict(*a, **kw):  # the prediction's own allocations are not the reading's: peaks around it
        peaks["before"] = tracemalloc.get_traced_memory()[1]
        out = real_predict(*a, **kw)
        tracemalloc.reset_peak()
        return out

    segmenter.predict = predict
    run_study(registry, segmenter, dict(base))  # warm-up: loads the model
    images = int(np.prod(shape)) * 2
    print("image %s int16 (%.1f MB); %s, Python %s, numpy %s" % ("x".join(map(str, shape)), images / MiB,
                                                                 platform.machine(), platform.python_version(),
                                                                 np.__version__))
    print("%-32s %12s %14s %14s %8s" % ("request", "reserved MB", "measured MB", "(before/after)", "ratio"))
    for name, extra in cases:
        request = dict(base, **extra)
        estimate = inputs.prepare(plan_request(registry, segmenter, request), LocalFiles(), registry).nbytes
        peaks.clear()
        tracemalloc.start()
        run_study(registry, segmenter, request)
        after = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        measured = max(peaks.get("before", 0), after) + images
        print("%-32s %12.1f %14.1f %7.1f/%-6.1f %8.2f" % (name, estimate / MiB, measured / MiB, peaks.get("before", 0)
                                                          / MiB, after / MiB, estimate / measured))


if __name__ == "__main__":
    main()
