"""``nnunet-predict`` and ``nnunet-predict-batch``: run registered nnU-Net models on studies from the command line,
with the flags of the established nnU-Net model server's commands, on this machine's device (CPU allowed).

    nnunet-predict -i STUDY -s SERIES [SERIES ...] --nnunet_id MODEL [MODEL ...] -o OUT [options]
    nnunet-predict-batch --data_json STUDIES.json --nnunet_id MODEL [MODEL ...] [options]
    nnunet-predict-batch --data_dir PATIENTS/ -o OUT --nnunet_id MODEL [options]

The registry comes from ``--model-serve-spec``, else ``$MODEL_SERVE_SPEC``, else ``./model-serve-spec.yaml``
(``$OVERRIDE_MODEL_FOLDER`` replaces its ``model_folder``). ``-s`` takes one argument per model of a
cascade, each a comma-separated list of series (``-s t2,adc``: one model, two channels; ``-s t2 t2``: two models).
Only the flags given on the command line override a model's ``default_args``. The outputs go to
``OUT/stage_<i>/`` with the last stage's also copied into ``OUT``; the response (as ``/infer`` gives it) is printed
on stdout as JSON, progress on stderr. ``--nproc_writing N`` (the established batch command's writing processes)
keeps up to N studies in flight: one study's network on the device at a time, the others reading and writing.

Exit status: 0 done, 1 failed (a model that cannot run here, an input larger than ``--max-image-voxels``, an error
while predicting; for the batch: any study failed), 2 a wrong command line or request (unknown model, missing
series, wrong number of series, a DICOM series that is not one regular volume, ...).

Inputs are checked from their headers before any pixel is read: an image whose header declares more voxels than
``--max-image-voxels`` (default: what a server on this machine accepts by default, sized from its memory) is refused
with the size, instead of filling the machine's memory. The commands have no memory budget (they run alone).
"""

import argparse
import contextlib
import json
import os
import re
import sys
import time

SUPPRESS = argparse.SUPPRESS


def _float_or_none(x):
    return None if str(x).lower() == "none" else float(x)


def _int_list_or_all(x):
    """``1`` -> 1, ``1,2`` -> [1, 2], ``all`` -> None (every class)."""
    x = str(x).replace(" ", "").strip(",")
    if x.lower() == "all":
        return None
    if "," in x:
        return sorted({int(y) for y in x.split(",")})
    return int(x)


def _folds(x):
    """``0`` -> 0, ``0,1`` -> [0, 1], ``all`` -> 'all' (nnU-Net's fold_all)."""
    x = str(x).replace(" ", "").strip(",")
    parts = [p if p == "all" else int(p) for p in x.split(",")]
    return parts if len(parts) > 1 else parts[0]


def _int_or_float(x):
    try:
        return int(x)
    except ValueError:
        return float(x)


def _voxels(x):
    n = int(x)
    if n < 0:
        raise argparse.ArgumentTypeError("a number of voxels, 0 or more (0: no limit), got %s" % x)
    return n


def _series(x):
    return [s for s in str(x).split(",") if s]


def make_parser(prog, description, batch=False):
    p = argparse.ArgumentParser(prog=prog, description=description, argument_default=SUPPRESS)
    if not batch:
        p.add_argument("--study_path", "-i", required=True, help="path to the study (the series are under it)")
        p.add_argument("--series_folders", "-s", nargs="+", type=_series, required=True,
                       help="series under the study: one argument per model, each a comma-separated list of series "
                            "(one per model channel)")
        p.add_argument("--output_dir", "-o", required=True, help="output folder")
    else:
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--data_json", help="a JSON list of {study_path, series_folders, output_dir} (each item may "
                         "also set any other request field)")
        src.add_argument("--data_dir", help="PATIENT/STUDY/SERIES folders, the series named <name>_0000, _0001, ... "
                         "(one per model channel); needs --output_dir")
        p.add_argument("--output_dir", "-o", help="output folder (with --data_dir: OUT/PATIENT/STUDY)")
    p.add_argument("--nnunet_id", nargs="+", required=True, help="model id(s), alias(es) or name(s); several run as a "
                   "cascade")
    p.add_argument("--checkpoint_name", nargs="+", help="checkpoint file name(s) (default: the model's, else "
                   "checkpoint_final.pth)")
    p.add_argument("--use_folds", "-f", nargs="+", type=_folds, help="fold(s) to use (e.g. 0 1 2 3 4, or all); "
                   "comma-separated per model of a cascade")
    p.add_argument("--tta", "-t", action="store_true", help="test-time augmentation (mirroring)")
    p.add_argument("--tmp_dir", help="accepted for compatibility; nothing is written outside the output folder")
    p.add_argument("--is_dicom", "-D", action="store_true", help="the series are DICOM series folders; also writes a "
                   "DICOM SEG (prediction.dcm)")
    p.add_argument("--proba_map", "-p", action="store_true", dest="save_proba_map",
                   help="write the probability map (probabilities.nii.gz; from DICOM also a fractional DICOM SEG, "
                        "probabilities.dcm); needs --proba_threshold")
    p.add_argument("--proba_threshold", nargs="+", type=_float_or_none, help="probability threshold(s), one per "
                   "model or one for all (None: none)")
    p.add_argument("--min_confidence", nargs="+", type=_float_or_none, help="drop objects whose highest probability "
                   "is below this (per model)")
    p.add_argument("--rt_struct_output", action="store_true", dest="save_rt_struct_output",
                   help="also write an RTSTRUCT (struct.dcm; DICOM input; needs rt-utils)")
    p.add_argument("--save_nifti_inputs", "-S", action="store_true", help="write the inputs as NIfTI "
                   "(input_volume_<j>.nii.gz)")
    p.add_argument("--cascade_mode", nargs="+", choices=["intersect", "crop"], help="how a cascade's models combine: "
                   "crop the next input to the previous mask, or keep the next model's objects that intersect it")
    p.add_argument("--intersect_with", help="a mask image: keep only objects of which at least --min_intersection "
                   "lies inside it")
    p.add_argument("--min_intersection", nargs="+", type=_float_or_none, help="fraction of an object that must lie in "
                   "the mask (default 0.1)")
    p.add_argument("--crop_from", help="a mask image: run on its bounding box (grown by --crop_padding)")
    p.add_argument("--crop_padding", nargs="+", type=_int_or_float, help="voxels added around the crop (x y z, "
                   "default 10 10 10)")
    p.add_argument("--class_idx", nargs="+", type=_int_list_or_all, help="label(s) to keep (all: every label); "
                   "comma-separated per model of a cascade")
    p.add_argument("--suffix", help="added to the output file names (prediction_<suffix>.nii.gz)")
    p.add_argument("--model-serve-spec", dest="model_serve_spec", default=None,
                   help="the model registry (default: $MODEL_SERVE_SPEC, else "
                   "./model-serve-spec.yaml)")
    p.add_argument("--device", default=None, help="cuda, cuda:N, mps or cpu (default: cuda when there is one, else "
                   "cpu)")
    p.add_argument("--nproc_writing", type=int, default=1, metavar="N",
                   help="studies in flight at once (default 1): while one study's network runs on the device, the "
                        "others read their inputs and write their outputs (the established command's writing "
                        "processes; here threads, the device one study at a time). nnunet-predict runs one study: "
                        "accepted, nothing to overlap")
    p.add_argument("--quiet", "-q", action="store_true", default=False, help="no progress on stderr")
    p.add_argument("--max-image-voxels", dest="max_image_voxels", type=_voxels, default=None, metavar="N",
                   help="refuse an input whose header declares more voxels than this, before reading it (default: "
                        "what a server on this machine accepts, sized from its memory; 0: no limit)")
    return p


FLAG_FIELDS = ("nnunet_id", "checkpoint_name", "use_folds", "tta", "tmp_dir", "is_dicom", "save_proba_map",
               "proba_threshold", "min_confidence", "save_rt_struct_output", "save_nifti_inputs", "cascade_mode",
               "intersect_with", "min_intersection", "crop_from", "crop_padding", "class_idx", "suffix")


def request_from_args(args):
    """The /infer request of the flags given on the command line (only those: the rest are the models' defaults)."""
    req = {}
    for key in FLAG_FIELDS + ("study_path", "series_folders", "output_dir"):
        if hasattr(args, key):
            req[key] = getattr(args, key)
    ids = req.get("nnunet_id")
    if isinstance(ids, list) and len(ids) == 1:
        req["nnunet_id"] = ids[0]
    if "class_idx" in req:
        idx = req["class_idx"]  # one argument per model: a label, a comma list (a subset) or None (every class)
        if len(idx) == 1 and not isinstance(idx[0], list):
            idx = idx[0]
        if idx is None or (isinstance(idx, list) and all(v is None for v in idx)):
            del req["class_idx"]
        else:
            req["class_idx"] = idx  # [[1, 2]]: the subset of one model, as the established command sends it
    for key in ("checkpoint_name", "min_intersection"):
        if key in req and len(req[key]) == 1:
            req[key] = req[key][0]
    if "use_folds" in req and len(req["use_folds"]) == 1:
        req["use_folds"] = req["use_folds"][0]
    return req


def _device(name):
    import torch

    if name:
        from ..cli import check_device

        return str(check_device(name))
    return "cuda" if torch.cuda.is_available() else "cpu"


class _Progress:
    def __init__(self, quiet, prefix=""):
        self.quiet, self.prefix, self.t0 = quiet, prefix, time.perf_counter()

    def __call__(self, msg):
        if not self.quiet:
            print("[%6.1fs] %s%s" % (time.perf_counter() - self.t0, self.prefix, msg), file=sys.stderr, flush=True)


def _setup(args, prog, model_ids=()):
    """(registry, segmenter) or an exit status. Unknown models fail here, before torch is imported."""
    from .registry import SpecError, UnknownModel, load_registry, spec_source

    spec, where_from = spec_source(args.model_serve_spec)
    if not spec:
        print("%s: error: no model registry: give --model-serve-spec SPEC.yaml, set MODEL_SERVE_SPEC, or run where "
              "./model-serve-spec.yaml is" % prog, file=sys.stderr)
        return 2
    if not args.quiet:
        print("%s: model registry %s (from %s)" % (prog, spec, where_from), file=sys.stderr)
    try:
        registry = load_registry(spec)
    except SpecError as exc:
        print("%s: error: %s" % (prog, exc), file=sys.stderr)
        return 2
    try:
        for model in model_ids:
            registry.get(model)
    except UnknownModel as exc:
        print("%s: error: %s" % (prog, exc), file=sys.stderr)
        return 2
    try:
        device = _device(args.device)
    except Exception as exc:  # StartupError
        print("%s: error: %s" % (prog, exc), file=sys.stderr)
        return 2
    from .predictors import AutoSegmenter

    return registry, AutoSegmenter(registry, device=device)


def _limits(args):
    """The voxel limit of ``--max-image-voxels`` (a ``Limits``; None for 0). The commands have no memory budget:
    they run alone, and their inputs' headers are checked against this limit before any pixel is read."""
    from ..limits import Limits

    if args.max_image_voxels == 0:
        return None
    return Limits.defaults(max_image_voxels=args.max_image_voxels)


def _run_one(registry, segmenter, request, progress, limits=None, quiet_stdout=True):
    """(exit status, response or failure payload). ``quiet_stdout``: send what nnU-Net prints to stderr (stdout is
    for the JSON response); a caller running studies in threads does that once around them all instead (swapping
    ``sys.stdout`` is process-wide)."""
    from ..errors import Problem
    from ..validate import BadInput
    from .pipeline import failure_payload, run_study

    try:
        with contextlib.redirect_stdout(sys.stderr) if quiet_stdout else contextlib.nullcontext():
            return 0, run_study(registry, segmenter, request, progress=progress, copy_final=True, limits=limits)
    except BadInput as exc:
        return 2, failure_payload(exc, request)
    except Problem as exc:  # model unavailable, not enough GPU memory
        return 1, failure_payload(exc.detail, request)
    except Exception as exc:
        import logging

        logging.getLogger("nninteractive_slicer_server").exception("nnunet-predict failed")
        return 1, failure_payload("%s: %s" % (type(exc).__name__, exc), request)


def main(argv=None):
    prog = "nnunet-predict"
    args = make_parser(prog, "Run registered nnU-Net model(s) on one study (NIfTI/NRRD/MHA files or DICOM series).") \
        .parse_args(argv)
    if args.nproc_writing < 1:
        print("%s: error: --nproc_writing must be 1 or more" % prog, file=sys.stderr)
        return 2
    setup = _setup(args, prog, args.nnunet_id)
    if isinstance(setup, int):
        return setup
    registry, segmenter = setup
    code, response = _run_one(registry, segmenter, request_from_args(args), _Progress(args.quiet), _limits(args))
    print(json.dumps(response, indent=1))
    if code:
        print("%s: error: %s" % (prog, response["error"]), file=sys.stderr)
    return code


def studies_from_dir(data_dir, output_dir):
    """PATIENT/STUDY/ folders whose series are named <name>_0000, _0001, ... (contiguous from 0)."""
    pattern = re.compile(r".*_([0-9]{4})(\..*)?$")
    items = []
    for patient in sorted(os.listdir(data_dir)):
        pdir = os.path.join(data_dir, patient)
        if not os.path.isdir(pdir):
            continue
        for study in sorted(os.listdir(pdir)):
            sdir = os.path.join(pdir, study)
            if not os.path.isdir(sdir):
                continue
            found = sorted((int(m.group(1)), name) for name in os.listdir(sdir) for m in [pattern.match(name)] if m)
            if not found:
                continue
            if [k for k, _ in found] != list(range(len(found))):
                raise ValueError("%s: series numbers must run _0000, _0001, ... without gaps, got %s"
                                 % (sdir, [n for _, n in found]))
            items.append({"study_path": sdir, "series_folders": [[n for _, n in found]],
                          "output_dir": os.path.join(output_dir, patient, study)})
    return items


def batch_main(argv=None):
    prog = "nnunet-predict-batch"
    args = make_parser(prog, "Run registered nnU-Net model(s) on many studies.", batch=True).parse_args(argv)
    if args.nproc_writing < 1:
        print("%s: error: --nproc_writing must be 1 or more" % prog, file=sys.stderr)
        return 2
    if getattr(args, "data_json", None):
        try:
            with open(args.data_json, encoding="utf-8") as f:
                items = json.load(f)
        except (OSError, ValueError) as exc:
            print("%s: error: --data_json %s: %s" % (prog, args.data_json, exc), file=sys.stderr)
            return 2
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            print("%s: error: --data_json must hold a list of objects with study_path, series_folders and "
                  "output_dir" % prog, file=sys.stderr)
            return 2
    else:
        if not getattr(args, "output_dir", None):
            print("%s: error: --data_dir needs --output_dir" % prog, file=sys.stderr)
            return 2
        try:
            items = studies_from_dir(args.data_dir, args.output_dir)
        except (OSError, ValueError) as exc:
            print("%s: error: %s" % (prog, exc), file=sys.stderr)
            return 2
    setup = _setup(args, prog, args.nnunet_id)
    if isinstance(setup, int):
        return setup
    registry, segmenter = setup
    base = request_from_args(args)
    base.pop("output_dir", None)
    t0 = time.perf_counter()

    def study(k, item):
        progress = _Progress(args.quiet, "[%d/%d %s] " % (k + 1, len(items), item.get("study_path")))
        progress("starting")
        code, response = _run_one(registry, segmenter, dict(base, **item), progress, _limits(args), quiet_stdout=False)
        if code:
            print("%s: study %d (%s) failed: %s" % (prog, k + 1, item.get("study_path"), response["error"]),
                  file=sys.stderr)
        return code, response

    with contextlib.redirect_stdout(sys.stderr):  # nnU-Net prints; stdout is for the JSON responses
        if args.nproc_writing > 1 and len(items) > 1:
            # studies in flight at once: the forward passes take turns (the segmenter's runner), the reading,
            # preprocessing, export and writing of the others go on meanwhile
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=args.nproc_writing, thread_name_prefix="study") as pool:
                results = list(pool.map(study, range(len(items)), items))
        else:
            results = [study(k, item) for k, item in enumerate(items)]
    responses = [r for _c, r in results]
    worst = 1 if any(c for c, _r in results) else 0
    done = sum(1 for r in responses if r.get("status") == "done")
    if not args.quiet:
        print("%s: %d of %d studies done in %.1f s" % (prog, done, len(items), time.perf_counter() - t0),
              file=sys.stderr)
    print(json.dumps(responses, indent=1))
    return worst


if __name__ == "__main__":
    sys.exit(main())
