"""One automatic-segmentation request, study in -> outputs on disk: the body of ``POST /infer`` (and of
``/infer_file`` once the upload is unpacked) and of the ``nnunet-predict`` commands.

    response = run_study(registry, segmenter, request)

``request`` is the established ``/infer`` body (``REQUEST_FIELDS``); ``response`` has the established fields and
status values (``done``; failures are exceptions here: ``failure_payload`` builds the established ``failed`` body for
an endpoint that catches them). Semantics, as the established nnU-Net server has them (differences marked *ours*):

* ``nnunet_id``: a model (id, alias or name) or a list of models, run one after the other (a *cascade*; stage ``i``
  writes to ``output_dir/stage_i/``). ``series_folders`` are paths under ``study_path``: for one model a list (one
  series per model channel); for several a list of lists, one per stage (a single list is used for every stage).
  With ``is_dicom`` a series folder holds the files of one DICOM series (read by series UID; a folder holding
  several is an error *ours*) and a file is read as an image; without it each entry is an image file (NIfTI, NRRD,
  MHA, ...). The second and later series of a stage are resampled (linear; nearest neighbour for label images) to
  the first one's grid, whose geometry every output of the stage keeps exactly.
* Per-stage fields: ``class_idx``, ``proba_threshold``, ``min_confidence``, ``checkpoint_name``, ``use_folds``
  (``tta`` applies to all). A scalar applies to every stage; for several stages a list gives one value per stage
  (a list of one value is repeated). ``class_idx`` as established: a list is per stage (``[1, 2]`` for two models:
  label 1 of the first, label 2 of the second) and a nested list a stage's subset (``[[1, 2]]``: labels 1 and 2 of
  one model); a flat list whose length is neither 1 nor the number of models is refused with the nested form to
  write (*ours*: the established server would keep its first values and drop the rest silently). A flat
  ``use_folds`` list is the folds of every stage (*ours*: it would refuse it for a cascade). A field the request
  leaves out (or sets to null) takes the model's ``default_args`` value (a model's ``class_idx: [1, 2]`` default
  is its subset, as established).
* ``class_idx``, ``proba_threshold``, ``min_confidence``: as ``AutoSegmenter.predict``. ``save_proba_map`` needs
  a ``proba_threshold`` (400 otherwise, as established). ``remove_objects_smaller_than``: per label, components
  smaller than this many voxels (an int) or this fraction of the label's largest component (a float) are dropped.
* Cascades (``cascade_mode``, one or a list of ``intersect`` / ``crop``; each mode named applies between every
  pair of stages): ``crop`` runs the next stage on the bounding box of the previous stage's mask grown by
  ``crop_padding`` voxels (x, y, z; default 10 each) and puts the result back in place (an empty mask makes the
  next stage empty without running it *ours*); ``intersect`` keeps only those 26-connected components of the next
  stage's prediction of which at least ``min_intersection`` (default 0.1) of the voxels lie inside the previous
  stage's mask. ``crop_from`` / ``intersect_with`` do the same with label 1 of a mask file, as established
  (a file with other labels but no 1 is refused *ours*), resampled to the stage's grid, for every stage until a
  cascade replaces it.
* ``from:<model>``, ``from:<model>=<k>``, ``from:<model>[<i>]`` in ``series_folders``: an earlier stage's label map,
  label ``k`` of it, or channel ``i`` of its probability map, as an input channel; a model not in the request runs
  first as an inserted stage (``auto/references.py``).
* Outputs per stage (``suffix`` appended as ``_<suffix>``): ``prediction.nii.gz``; with ``save_proba_map``
  ``probabilities.nii.gz`` (``proba_<suffix>``; one channel, or one per label as a vector image, each masked by its
  label); with ``save_nifti_inputs`` ``input_volume_<j>.nii.gz``; from DICOM input ``prediction.dcm`` (BINARY DICOM
  SEG, not written when the mask is empty), ``probabilities.dcm`` (FRACTIONAL DICOM SEG, *ours*: the established
  server writes binned binary segments) with ``save_proba_map``, ``struct.dcm`` (RTSTRUCT) with
  ``save_rt_struct_output``. ``copy_final`` (the commands) also copies the last stage's outputs into
  ``output_dir`` and names them in ``<field>_final``.
* DICOM series are checked before they are read (``dicomseries.py``): files that do not form one regular volume
  (several orientations, sizes, echoes, time points; repeated or missing positions; a sheared stack) are refused
  with the reason; localizers are left out; a series of several b-values is refused unless
  ``bvalue_for_filtering`` selects the files of the b-value closest to it (as nnunet-serve; each series of the
  request, NIfTI inputs untouched). What was left out or selected is in ``warnings``.
* Limits: every input's size comes from its header, before any pixel is read; one over ``--max-image-voxels`` is
  refused (413), and the memory the reading holds is reserved from ``--memory-budget`` for the run (``inputs.py``).
* ``tmp_dir`` is accepted and unused (nothing is written outside ``output_dir``).

Response (the established fields first): ``time_elapsed`` (s), ``gpu`` (CUDA device index or null),
``nnunet_path`` (per stage: the result folder relative to the registry's model folder, *ours*: no server path),
``metadata`` (per stage: the SEG attributes and segments of the model, no server paths), ``request`` (the request
with the arguments each stage ran with), ``status`` (``done``), ``error`` (null), ``identifiers`` ([]),
``is_empty`` (per stage), the output lists (one entry per stage, null where nothing was written: an empty mask gets
no DICOM SEG / RTSTRUCT) ``nifti_prediction`` and, when asked, ``nifti_proba``, ``nifti_inputs`` (every input),
``dicom_segmentation``, ``dicom_struct``, ``dicom_fractional_segmentation``; with ``copy_final`` ``<field>_final``
(a file name in ``output_dir``). *Ours*: ``stages`` (per stage: ``nnunet_id``, ``series``, ``labels`` found with
names and colours, ``crop_ijk`` (the region run, index ranges i, j, k) or null, ``skipped``, ``timings``) and
``warnings`` when there are any.

Paths: every path a request names goes through ``files`` (``paths.ConfinedFiles`` for the server: confined to its
``--infer-root`` folders for ``/infer``, to the job's folder for ``/infer_file``, never through a link, 403
otherwise; ``paths.LocalFiles`` for the commands: the user's own files). Inputs are read from the private copies it
makes, in the accepted formats only (``formats.py``); outputs are written through it (a temporary file moved into
place under its name). The request is checked against its one definition, ``auto/request.py`` (unknown fields
refused).
"""

import logging
import os
import re
import time
from typing import Any, Dict, List

import numpy as np

from ..cancel import NEVER
from ..validate import BadInput
from . import dicomseg
from . import inputs as ainputs
from . import io as aio
from . import references
from .paths import LocalFiles
from .request import FIELDS as REQUEST_FIELDS
from .request import parse_request

log = logging.getLogger("nninteractive_slicer_server")

SUCCESS_STATUS = "done"
FAILURE_STATUS = "failed"

STAGE_FIELDS = ("class_idx", "proba_threshold", "min_confidence", "checkpoint_name", "use_folds")
DEFAULTS = {"is_dicom": False, "tta": False, "min_intersection": 0.1, "crop_padding": [10, 10, 10],
            "cascade_mode": ["intersect"], "save_proba_map": False, "save_nifti_inputs": False,
            "save_rt_struct_output": False, "suffix": None, "tmp_dir": ".tmp", "intersect_with": None,
            "crop_from": None, "remove_objects_smaller_than": None, "bvalue_for_filtering": None, "flip_xy": None}
OUTPUT_KEYS = ("nifti_prediction", "nifti_proba", "nifti_inputs", "dicom_segmentation", "dicom_struct",
               "dicom_fractional_segmentation")
CASCADE_MODES = ("intersect", "crop")
_SUFFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def failure_payload(error, request=None, **extra):
    """The established body of a failed request (``status: failed``), for an endpoint that caught the error."""
    out = {"time_elapsed": None, "gpu": None, "nnunet_path": None, "metadata": None, "status": FAILURE_STATUS,
           "request": _jsonable(request or {}), "error": str(error)}
    out.update(extra)
    return out


# ---------------------------------------------------------------------------------------------------------- request

class Plan:
    """A checked request: the stages (model, series paths, prediction arguments) and the shared options."""

    def __init__(self):
        self.stages: List[Dict[str, Any]] = []
        self.options: Dict[str, Any] = {}
        self.output_dir = None
        self.echo: Dict[str, Any] = {}
        self.expansion = None  # references.Expansion: the stages from: references need, and what they read


def _stage_values(name, value, n, per_stage_if_nested_only=False):
    """One value per stage from a request field (see the module's notes)."""
    if value is None:
        return [None] * n
    if not isinstance(value, (list, tuple)):
        return [value] * n
    value = list(value)
    nested = any(v is None or isinstance(v, (list, tuple)) for v in value)
    if per_stage_if_nested_only and not nested:
        return [value] * n  # a flat list is the value (a class subset, a fold list) of every stage
    if len(value) == n:
        return value
    if len(value) == 1:
        return value * n
    if name == "class_idx" and not nested:  # the established server would take the first n, dropping the others
        raise BadInput("class_idx %r gives one label per model, and nnunet_id has %d model(s); to keep several labels "
                       "of one model, nest them: %r" % (value, n, [value] if n == 1 else [value] + [None] * (n - 1)))
    raise BadInput("'%s' has %d values for %d model(s) in nnunet_id; give one value, or one per model"
                   % (name, len(value), n))


def _series_lists(series_folders, n):
    if series_folders is None:
        raise BadInput("series_folders must be defined: the series (paths under study_path) the model reads, one per "
                       "model channel")
    if isinstance(series_folders, str):
        series_folders = [series_folders]
    if not isinstance(series_folders, (list, tuple)) or not series_folders:
        raise BadInput("series_folders must be a list of paths under study_path (a list of lists for several "
                       "models), got %r" % (series_folders,))
    if all(isinstance(s, str) for s in series_folders):
        lists = [list(series_folders)] * n
    elif all(isinstance(s, (list, tuple)) for s in series_folders):
        lists = [list(s) for s in series_folders]
        if len(lists) == 1 and n > 1:
            lists = lists * n
        if len(lists) != n:
            raise BadInput("series_folders and nnunet_id must be the same length: %d list(s) of series for %d "
                           "model(s)" % (len(lists), n))
    else:
        raise BadInput("series_folders must be a list of paths or a list of lists of paths, got %r"
                       % (series_folders,))
    for stage in lists:
        if not stage or not all(isinstance(s, str) and s.strip() for s in stage):
            raise BadInput("series_folders: each model needs a non-empty list of non-empty paths, got %r" % (stage,))
    return lists


def _model_channels(registry, spec):
    import json

    try:
        with open(os.path.join(registry.result_folder(spec), "dataset.json"), encoding="utf-8") as f:
            names = json.load(f).get("channel_names") or {}
        return [str(v) for _k, v in sorted(names.items(), key=lambda kv: int(kv[0]))]
    except (OSError, ValueError):
        return None


def plan_request(registry, segmenter, request, files=None):
    """Check ``request`` and turn it into a ``Plan`` (``BadInput`` for anything wrong, naming the field; ``files``'
    ``Forbidden`` for a path the request may not name)."""
    files = files or LocalFiles()
    request = parse_request(request)  # the one definition of the request (auto/request.py): types, unknown fields
    ids = request.get("nnunet_id")
    if isinstance(ids, str):
        ids = [ids]
    if not isinstance(ids, (list, tuple)) or not ids or not all(isinstance(i, str) and i for i in ids):
        raise BadInput("nnunet_id must be a model id (or alias or name) or a list of them, got %r"
                       % (request.get("nnunet_id"),))
    specs = [registry.get(i) for i in ids]  # UnknownModel (400) names the known ids
    n = len(specs)

    def shared(name):
        """A non-stage field: the request's value, else the last stage's model default, else ours."""
        if request.get(name) is not None:
            return request[name]
        for spec in reversed(specs):
            if spec.default_args.get(name) is not None:
                return spec.default_args[name]
        return DEFAULTS.get(name)

    plan = Plan()
    for key in ("study_path", "output_dir"):
        if not isinstance(request.get(key), str) or not request[key].strip():
            raise BadInput("%s is required: a path, got %r" % (key, request.get(key)))
    study = files.locate(request["study_path"], "study_path")
    if files.kind(study, "study_path") != "dir":
        raise BadInput("study_path %s is not a folder" % request["study_path"])
    plan.output_dir = files.locate(request["output_dir"], "output_dir")
    files.check_output(plan.output_dir, "output_dir")
    if request.get("tmp_dir") is not None:
        files.locate(request["tmp_dir"], "tmp_dir")  # unused, but a path named outside the allowed ones is refused

    for key in ("is_dicom", "tta", "save_proba_map", "save_nifti_inputs", "save_rt_struct_output"):
        v = shared(key)
        if not isinstance(v, bool):
            raise BadInput("'%s' must be true or false, got %r" % (key, v))
        plan.options[key] = v
    bvalue = shared("bvalue_for_filtering")
    if bvalue is not None and (not _number(bvalue) or bvalue < 0):
        raise BadInput("bvalue_for_filtering must be a b-value (a number, 0 or more), got %r" % (bvalue,))
    plan.options["bvalue_for_filtering"] = bvalue
    suffix = shared("suffix")
    if suffix is not None and (not isinstance(suffix, str) or not _SUFFIX.match(suffix) or ".." in suffix):
        raise BadInput("suffix must be letters, digits, '.', '_' or '-' (at most 64, no '..'), got %r" % (suffix,))
    plan.options["suffix"] = suffix
    mi = shared("min_intersection")
    mi = mi[0] if isinstance(mi, (list, tuple)) and len(mi) == 1 else mi
    if not _number(mi) or not 0 <= mi <= 1:
        raise BadInput("min_intersection must be a fraction between 0 and 1, got %r" % (mi,))
    plan.options["min_intersection"] = float(mi)
    pad = shared("crop_padding")
    pad = [pad] * 3 if _number(pad) else pad
    if not isinstance(pad, (list, tuple)) or len(pad) == 1:
        pad = list(pad) * 3 if isinstance(pad, (list, tuple)) else pad
    if not isinstance(pad, (list, tuple)) or len(pad) != 3 or not all(_number(p) and p >= 0 for p in pad):
        raise BadInput("crop_padding must be 3 numbers of voxels (x, y, z) of 0 or more, got %r" % (pad,))
    plan.options["crop_padding"] = [int(round(p)) for p in pad]
    modes = shared("cascade_mode")
    modes = [modes] if isinstance(modes, str) else modes
    if not isinstance(modes, (list, tuple)) or not modes or any(m not in CASCADE_MODES for m in modes):
        raise BadInput("cascade_mode must be 'intersect' or 'crop' (or a list of them), got %r" % (modes,))
    plan.options["cascade_mode"] = list(modes)
    for key in ("intersect_with", "crop_from"):
        v = shared(key)
        if v is not None:
            if not isinstance(v, str) or not v.strip():
                raise BadInput("%s must be the path of a mask image, got %r" % (key, v))
            p = files.locate(v, key)
            if files.kind(p, key) != "file":
                raise BadInput("%s %s does not exist (or is not a file)" % (key, v))
            v = p
        plan.options[key] = v

    series = _series_lists(request.get("series_folders") if request.get("series_folders") is not None
                           else specs[0].default_args.get("series_folders"), n)
    per_stage = {}
    for name in STAGE_FIELDS:
        per_stage[name] = _stage_values(name, request.get(name), n,
                                        per_stage_if_nested_only=(name == "use_folds"))
    small = _stage_values("remove_objects_smaller_than", shared("remove_objects_smaller_than"), n)
    flips = _stage_values("flip_xy", request.get("flip_xy"), n)
    # from: references (auto/references.py): the stages they need inserted (their models' defaults for every
    # per-stage field), each reference placed on the stage whose output it reads
    plan.expansion = expansion = references.expand(registry, specs, series, lambda s: _model_channels(registry, s))
    specs, series, n = expansion.specs, expansion.series, len(expansion.specs)
    per_stage = {k: expansion.per_stage(v) for k, v in per_stage.items()}
    small, flips = expansion.per_stage(small), expansion.per_stage(flips)
    for pos in expansion.inserted:
        small[pos] = specs[pos].default_args.get("remove_objects_smaller_than")

    for i, spec in enumerate(specs):
        given = {k: per_stage[k][i] for k in STAGE_FIELDS if per_stage[k][i] is not None}
        given["tta"] = plan.options["tta"]
        if isinstance(given.get("class_idx"), int):
            given["class_idx"] = [given["class_idx"]]
        args = segmenter.arguments(spec, given)  # BadInput names a wrong field
        s = small[i]
        if s is not None and (not _number(s) or s < 0):
            raise BadInput("remove_objects_smaller_than must be a number of voxels or a fraction, got %r" % (s,))
        flip = flips[i] if flips[i] is not None else spec.default_args.get("flip_xy", spec.is_totalseg)
        paths = []
        for folder in series[i]:
            if isinstance(folder, references.Reference):
                paths.append(folder)
                continue
            p = files.locate(os.path.join(study, folder), "series_folders")
            if files.kind(p, "series_folders") is None:
                raise BadInput("series folder %r does not exist under study_path %s" % (folder,
                                                                                      request["study_path"]))
            paths.append(p)
        channels = _model_channels(registry, spec)
        if channels is not None and len(channels) != len(paths):
            raise BadInput("model %r takes %d series (%s); stage %d of the request gives %d (%s)"
                           % (spec.id, len(channels), ", ".join(channels), i, len(paths),
                              ", ".join(str(f) for f in series[i])))
        plan.stages.append({"spec": spec, "paths": paths, "folders": [str(f) for f in series[i]], "given": given,
                            "args": args, "remove_small": s, "flip_xy": bool(flip),
                            "probabilities": i in expansion.probabilities})
    if plan.options["save_proba_map"] and all(st["args"].get("proba_threshold") is None for st in plan.stages):
        raise BadInput("proba_threshold must be not-None if save_proba_map is True")
    plan.echo = {k: _jsonable(request.get(k)) for k in REQUEST_FIELDS if k in request}
    plan.echo.update({k: _jsonable(v) for k, v in plan.options.items() if k not in ("intersect_with", "crop_from")})
    plan.echo["nnunet_id"] = [s.id for s in specs]
    plan.echo["series_folders"] = [[str(f) for f in entries] for entries in series]
    for name in STAGE_FIELDS:
        plan.echo[name] = [_jsonable(st["args"].get(name)) for st in plan.stages]
    return plan


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


# ---------------------------------------------------------------------------------------------------------- helpers

def _might_be_mask(image):
    import SimpleITK as sitk

    if "int" not in image.GetPixelIDTypeAsString().lower():
        return False
    return len(np.unique(sitk.GetArrayViewFromImage(image))) <= 50


def mask_on(source, reference, field="mask"):
    """A mask as a boolean ``[k, j, i]`` array on ``reference``'s grid: of a mask file (``source`` its probed
    ``io.Input``, the request's ``field``) its label 1, as the established server reads ``crop_from`` /
    ``intersect_with`` (``BadInput`` when the file has other labels on the grid but no 1: an empty mask there would
    silently empty the result); of a cascade's mask image its nonzero voxels."""
    from_file = isinstance(source, aio.Input)
    image = aio.read_input(source).image if from_file else source
    arr, _ = aio.to_array(aio.resample_to(image, reference, is_mask=True))
    if not from_file:
        return arr != 0
    mask = arr == 1
    if not mask.any() and arr.any():
        raise BadInput("%s %s has no voxel of label 1, the label it selects (as in the established server); its "
                       "labels: %s: write the region as label 1" % (field, os.path.basename(source.path),
                                                                    [int(v) for v in np.unique(arr)[1:11]]))
    return mask


def keep_intersecting(labels, reference_mask, min_fraction):
    """Zero the 26-connected components of ``labels > 0`` of which less than ``min_fraction`` of the voxels lie in
    ``reference_mask``. Returns ``(labels, kept)`` (``kept``: boolean, the voxels left)."""
    from scipy import ndimage

    fg = labels > 0
    comps, n = ndimage.label(fg, structure=np.ones((3, 3, 3)))
    if n == 0:
        return labels, fg
    idx = np.arange(1, n + 1)
    sizes = ndimage.sum_labels(np.ones(labels.shape, dtype=np.float32), comps, idx)
    inside = ndimage.sum_labels(reference_mask.astype(np.float32), comps, idx)
    keep = np.zeros(n + 1, dtype=bool)
    keep[1:] = (inside / np.maximum(sizes, 1)) >= min_fraction
    kept = keep[comps]
    return np.where(kept, labels, 0).astype(labels.dtype), kept


def remove_small_objects(labels, min_size):
    """Per label, drop components smaller than ``min_size`` voxels (an int) or than that fraction of the label's
    largest component (a float), as the established ``remove_objects_smaller_than``."""
    from scipy import ndimage

    out = labels.copy()
    for v in np.unique(labels):
        if v == 0:
            continue
        comps, n = ndimage.label(labels == v)
        if n == 0:
            continue
        sizes = ndimage.sum_labels(np.ones(labels.shape, dtype=np.float32), comps, np.arange(1, n + 1))
        limit = int(min_size * sizes.max()) if isinstance(min_size, float) else int(min_size)
        small = np.zeros(n + 1, dtype=bool)
        small[1:] = sizes < limit
        out[small[comps]] = 0
    return out


def _names(suffix):
    s = "_%s" % suffix if suffix else ""
    return {"prediction": "prediction%s" % s, "probabilities": "proba%s" % s if suffix else "probabilities",
            "struct": "struct%s" % s}


# ---------------------------------------------------------------------------------------------------------- run

def run_study(registry, segmenter, request, files=None, progress=None, copy_final=False, limits=None,
              budget=None, cancel=None):
    """Run the request's model(s) on its study and write the outputs; return the established response (``status``
    ``done``). Raises ``BadInput`` (HTTP 400) for a wrong request, ``UnknownModel`` (400) for an unknown model,
    the registry's ``ModelUnavailable`` / the predictors' ``NotEnoughGPUMemory`` (503), ``Forbidden`` (403) from
    ``files``; other exceptions are failures of the server. ``progress(message)`` hears what happens.
    Before any pixel is read, every input's header is checked against ``limits`` (``Limits``: an image over
    ``max_image_voxels`` is ``TooLarge``, 413) and the memory its reading holds is reserved from ``budget`` (a
    ``MemoryBudget``: 413 when it can never fit, 503 + Retry-After when not now) until the run ends (``inputs.py``;
    None: not checked / not reserved). ``files``: what the run reads and writes through (see the module's notes;
    default ``LocalFiles``).
    ``cancel`` (a ``cancel.CancelToken``): checked before each stage and its outputs, and between the pieces of each
    prediction (``RunCancelled``, 409)."""
    cancel = cancel or NEVER
    started = time.perf_counter()
    files = files or LocalFiles()
    plan = plan_request(registry, segmenter, request, files)
    reading = ainputs.prepare(plan, files, registry, limits, budget)
    try:
        return _run_plan(registry, segmenter, plan, reading, started, files, progress, copy_final, cancel)
    finally:
        reading.release()


def _run_plan(registry, segmenter, plan, reading, started, files, progress, copy_final, cancel):
    """The body of ``run_study`` once its inputs are probed and their reading reserved (``reading``)."""
    say = progress or (lambda msg: log.info("auto: %s", msg))
    opts = plan.options
    names = _names(opts["suffix"])
    n = len(plan.stages)
    out: Dict[str, List[Any]] = {"nifti_prediction": []}
    if opts["save_proba_map"]:
        out["nifti_proba"] = []
    if opts["save_nifti_inputs"]:
        out["nifti_inputs"] = []
    if opts["is_dicom"]:
        out["dicom_segmentation"] = []
        if opts["save_rt_struct_output"]:
            out["dicom_struct"] = []
        if opts["save_proba_map"]:
            out["dicom_fractional_segmentation"] = []
    if opts["is_dicom"] and opts["save_rt_struct_output"] and not dicomseg.rtstruct_available():
        raise BadInput("save_rt_struct_output: RTSTRUCT output needs rt-utils, which is not installed on this server "
                       "(%s)" % dicomseg.RTSTRUCT_EXTRA)
    output = files.output(plan.output_dir, "output_dir")
    loaded: Dict[str, aio.Series] = {}
    crop_ref = reading.masks.get("crop_from")  # a mask file (its probed Input), then (cascade) an image
    inter_ref = reading.masks.get("intersect_with")
    stages_info, is_empty, warnings = [], [], []
    outputs = references.StageOutputs(plan.expansion)  # what from: references of later stages read
    warnings.extend(reading.notes)  # what the DICOM checks left out or selected

    for i, stage in enumerate(plan.stages):
        cancel.check()
        spec = stage["spec"]
        tag = "stage %d/%d (%s)" % (i + 1, n, spec.id)
        t0 = time.perf_counter()
        say("%s: reading %d series" % (tag, len(stage["paths"])))
        vols = []
        for p in stage["paths"]:
            if isinstance(p, references.Reference):
                loaded[p] = outputs.series(p)  # an earlier stage's output
            elif p not in loaded:
                loaded[p] = aio.read_input(reading.info(p))  # the private copy that was probed
            vols.append(loaded[p])
        ref = vols[0].image
        images = [ref] + [aio.resample_to(v.image, ref, is_mask=_might_be_mask(v.image)) for v in vols[1:]]
        arrays = [aio.to_array(im)[0].astype(np.float32, copy=False) for im in images]
        spacing = [float(s) for s in reversed(ref.GetSpacing())]
        shape = arrays[0].shape
        read_s = time.perf_counter() - t0

        region = tuple(slice(0, m) for m in shape)
        skip = False
        if crop_ref is not None:
            crop_mask = mask_on(crop_ref, ref, field="crop_from")
            box = aio.mask_bbox(crop_mask)
            if box is None:
                skip = True
                say("%s: the crop mask is empty; the stage's prediction is empty" % tag)
            else:
                box = aio.padded_bbox(box, opts["crop_padding"][::-1], shape)
                region = tuple(slice(lo, hi) for lo, hi in box)
                say("%s: cropped to %s" % (tag, [(r.start, r.stop) for r in region]))
        labels = np.zeros(shape, dtype=np.uint8)
        probs, prob_values, result, timings = None, [], None, {"read": read_s}
        if not skip:
            image = np.stack([a[region] for a in arrays])
            if stage["flip_xy"]:
                image = image[:, :, ::-1, ::-1]
            say("%s: predicting on %s voxels" % (tag, "x".join(str(d) for d in image.shape[1:])))
            result = segmenter.predict(spec, np.ascontiguousarray(image), spacing,
                                       probabilities=opts["save_proba_map"] or stage["probabilities"],
                                       cancel=cancel, user=files.user, **stage["given"])
            timings.update(result.timings)
            lab, pr = result.labels, result.probabilities
            if stage["flip_xy"]:
                lab = lab[:, ::-1, ::-1]
                pr = pr[:, :, ::-1, ::-1] if pr is not None else None
            labels = np.zeros(shape, dtype=lab.dtype)
            labels[region] = lab
            if pr is not None and (opts["save_proba_map"] or stage["probabilities"]):
                prob_values = _probability_values(result, pr.shape[0])
                chans = pr[-len(prob_values):] if prob_values else pr[:0]
                probs = np.zeros((len(prob_values),) + shape, dtype=np.float32)
                probs[(slice(None),) + region] = chans
        if stage["remove_small"] is not None and labels.any():
            labels = remove_small_objects(labels, stage["remove_small"])
        if inter_ref is not None and labels.any():
            ref_mask = mask_on(inter_ref, ref, field="intersect_with")
            labels, _kept = keep_intersecting(labels, ref_mask, opts["min_intersection"])
        if probs is not None:  # the established map: each label's probability where the mask has that label
            for c, v in enumerate(prob_values):
                probs[c] *= (labels == v) if len(prob_values) > 1 else (labels > 0)
        outputs.keep(i, labels, probs, ref)

        # ---- outputs of this stage
        cancel.check()
        t1 = time.perf_counter()
        sdir = output.sub("stage_%d" % i)
        say("%s: writing outputs to %s" % (tag, sdir.shown))
        labels = labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16, copy=False)
        out["nifti_prediction"].append(sdir.write(names["prediction"] + ".nii.gz", nifti_writer(
            aio.from_array(labels, ref))))
        if opts["save_proba_map"]:
            if probs is None or not len(prob_values):
                out["nifti_proba"].append(None)
            else:
                img = aio.from_array(probs[0], ref) if len(prob_values) == 1 else \
                    aio.from_array(np.moveaxis(probs, 0, -1), ref, vector=True)
                out["nifti_proba"].append(sdir.write(names["probabilities"] + ".nii.gz", nifti_writer(img)))
        if opts["save_nifti_inputs"]:
            for j, im in enumerate(images):
                out["nifti_inputs"].append(sdir.write("input_volume_%d.nii.gz" % j, nifti_writer(im)))
        segments = registry.segments(spec)
        info = _seg_info(registry, spec)
        if opts["is_dicom"]:
            files_k, why = vols[0].files, None
            if not files_k:
                why = "is not a DICOM series"
            elif len(files_k) != shape[0]:
                why = "is a multi-frame DICOM file, for which this server writes no DICOM outputs"
            if why:
                warnings.append("stage %d: the first series (%s) %s; prediction.nii.gz has the result"
                                % (i, stage["folders"][0], why))
                for key in ("dicom_segmentation", "dicom_struct", "dicom_fractional_segmentation"):
                    if key in out:
                        out[key].append(None)
            else:
                seg = sdir.write(names["prediction"] + ".dcm", lambda p: dicomseg.write_binary_seg(
                    labels, files_k, segments, p, info))
                out["dicom_segmentation"].append(seg)
                if "dicom_struct" in out:
                    out["dicom_struct"].append(seg and sdir.write(names["struct"] + ".dcm", lambda p: (
                        dicomseg.write_rtstruct(labels, files_k, segments, p, info))))
                if "dicom_fractional_segmentation" in out:
                    out["dicom_fractional_segmentation"].append(
                        sdir.write(names["probabilities"] + ".dcm", lambda p: dicomseg.write_fractional_seg(
                            probs, files_k, dicomseg.probability_segments(segments, prob_values), p, info))
                        if probs is not None and len(prob_values) else None)
        timings["write"] = time.perf_counter() - t1
        present = [int(v) for v in np.unique(labels) if v > 0]
        is_empty.append(not present)
        by_value = {s.value: s for s in segments}
        stages_info.append({"nnunet_id": spec.id, "series": stage["folders"],
                            "labels": [by_value[v].as_dict() if v in by_value else {"value": v, "name": "label %d" % v}
                                       for v in present],
                            "crop_ijk": [[r.start, r.stop] for r in reversed(region)] if crop_ref is not None and
                            not skip else None,
                            "skipped": skip, "timings": {k: round(float(v), 4) for k, v in timings.items()}})
        # ---- what the next stage takes from this one
        if i < n - 1:
            mask_img = aio.from_array((labels > 0).astype(np.uint8), ref)
            if "intersect" in opts["cascade_mode"]:
                inter_ref = mask_img
            if "crop" in opts["cascade_mode"]:
                crop_ref = mask_img

    response = {
        "time_elapsed": time.perf_counter() - started,
        "gpu": _gpu_index(getattr(segmenter, "device", "cpu")),
        "nnunet_path": [_relative_folder(registry, st["spec"]) for st in plan.stages],
        "metadata": [_public_metadata(registry, st["spec"]) for st in plan.stages],
        "request": plan.echo,
        "status": SUCCESS_STATUS,
        "error": None,
        "identifiers": [],
        "is_empty": is_empty,
        **out,
        "stages": stages_info,
    }
    if warnings:
        response["warnings"] = warnings
    if copy_final:
        last_stage = sdir
        for key in OUTPUT_KEYS:
            if key in out and out[key] and key != "nifti_inputs" and out[key][-1]:
                name = os.path.basename(out[key][-1])
                output.copy(last_stage, name)
                response["%s_final" % key] = name
    say("done in %.1f s" % response["time_elapsed"])
    return response


def nifti_writer(image):
    """The writer of ``image`` as a compressed NIfTI file (for ``output.write``)."""
    return lambda path: aio.write_image(image, path)


def _probability_values(result, channels):
    """The label value of each foreground probability channel of ``result`` (background channel left out)."""
    args = result.args or {}
    idx = args.get("class_idx")
    if idx and args.get("proba_threshold") is not None:
        return [min(idx)]
    values = list(idx) if idx else [s.value for s in result.segments]
    if channels == len(values) + 1 or channels == len(values):
        return values
    return list(range(1, channels))  # a plain nnU-Net model: channel c is label c


def _seg_info(registry, spec):
    template = None
    if spec.metadata_path:
        from .registry import read_dcmqi_template

        try:
            template = read_dcmqi_template(spec.metadata_path)
        except ValueError:
            template = None
    return dicomseg.seg_info(spec.metadata, template, spec.name)


def _public_metadata(registry, spec):
    """What the response says about a model's metadata: its SEG attributes and labels, no server paths."""
    info = _seg_info(registry, spec)
    info = {k: v for k, v in info.items() if isinstance(v, (str, int, float))}
    info["segments"] = [s.as_dict() for s in registry.segments(spec)]
    return info


def _relative_folder(registry, spec):
    try:
        folder = registry.result_folder(spec)
    except Exception:
        return None
    rel = os.path.relpath(folder, registry.model_folder)
    return rel if not rel.startswith("..") else os.path.basename(folder)


def _gpu_index(device):
    d = str(device)
    if not d.startswith("cuda"):
        return None
    return int(d.split(":")[1]) if ":" in d else 0
