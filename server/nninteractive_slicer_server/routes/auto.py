"""Automatic nnU-Net models: the established nnU-Net model server's endpoints, and ours under /x/.

* ``GET /model_info`` (the registered models: names, labels, colours, terminology, default arguments, license),
  ``GET /request-params`` (the JSON schema of the /infer body), ``GET /readyz`` (registry loaded and device usable;
  503 otherwise; 200 with ``models_loaded: false`` on a server without a registry, which is ready for sessions), ``POST /infer`` (a study on server paths, confined to ``--infer-root``), ``POST /infer_file`` (a
  study uploaded as a zip/tar archive, multipart fields ``file`` and ``request``; answers a ``job_id``),
  ``GET /download/{job_id}`` (a zip of that job's outputs), ``POST /expire`` (empty the predictor cache; GET too, as
  the established server has it). Failures of /infer and /infer_file carry the established fields beside
  ``detail`` (``status: "failed"``, ``error``, ``request``, and ``job_id``).
* ``POST /x/auto_segment`` (with the lease): run a model on the image the session already holds; the answer is the
  packed label array of the box holding labels (``X-Meta``: ``bbox``, ``shape``, ``dtype``, ``labels``, ``timings``),
  an empty body when nothing was found. Any of its labels can be sent back with /add_initial_seg_interaction.

Every route needs the key (when one is set); paths that name nothing on a server without a registry answer 404
saying so. The study reader/writer behind /infer and /infer_file is ``AutoService.run_study`` (``auto.pipeline``),
given a ``resolve_path`` that confines every path it touches: to ``--infer-root`` for /infer, to the job's folder for
/infer_file.
"""

import asyncio
import json
import math
import os
import time

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as StarletteRequest

from SlicerNNInteractiveLib import protocol as P
from SlicerNNInteractiveLib.wire import MASK_CODEC, pack_array

from ..deps import act, lease, read_json, require_key, require_operator, server
from ..errors import Invalid, NotFound, OutOfMemory, Problem, is_out_of_memory, request_id
from ..validate import BadInput, require
from ..auto.jobs import PathGuard, unpack_archive
from ..auto.pipeline import OUTPUT_KEYS
from ..auto.request import InferenceRequest, InferenceRequestFile, parse_request

router = APIRouter(dependencies=[Depends(require_key)])

SUCCESS_STATUS, FAILURE_STATUS = "done", "failed"  # the established server's status values
# Request fields of /x/auto_segment beside "model" (or "nnunet_id") and "spacing": the prediction arguments.
AUTO_FIELDS = ("use_folds", "tta", "checkpoint_name", "class_idx", "proba_threshold", "min_confidence")
MAX_META_BYTES = 48 * 1024  # an X-Meta header longer than this drops the labels' terminology (clients cap header lines)
NO_REGISTRY = ("this server serves no automatic models: its operator starts it with --model-serve-spec PATH (or "
               "MODEL_SERVE_SPEC) to serve some")


def auto_service(request):
    svc = server(request).auto
    if svc is None:
        raise NotFound(NO_REGISTRY)
    return svc


# ---------------------------------------------------------------------------------------------------------- failures

def failure_fields(detail, fields, **more):
    """The established failure payload (beside our ``detail``)."""
    return dict({"time_elapsed": None, "gpu": None, "nnunet_path": None, "metadata": None, "status": FAILURE_STATUS,
                 "request": fields or {}, "error": detail}, **more)


class established_failure:
    """Give any failure inside the established fields (with ``fields`` as the echoed request)."""

    def __init__(self, fields=None, **more):
        self.fields, self.more = fields, more

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None:
            return False
        if isinstance(exc, Problem):
            if exc.extra is None:
                exc.extra = failure_fields(exc.detail, self.fields, **self.more)
            return False
        if isinstance(exc, BadInput):
            raise Invalid(str(exc), extra=failure_fields(str(exc), self.fields, **self.more)) from exc
        return False


def check_models(registry, nnunet_id):
    for name in nnunet_id if isinstance(nnunet_id, list) else [nnunet_id]:
        registry.get(name)  # UnknownModel: 400 naming the known ids


async def run_study(request, svc, fields, resolve_path):
    """``svc.run_study`` in a worker thread, at most ``max_running_jobs`` at once; the answer's established fields.
    ``resolve_path``: the confinement of every path the study runner touches (``PathGuard.resolver``)."""
    if svc.running is None:
        svc.running = asyncio.Semaphore(max(1, svc.limits.max_running_jobs))
    started = time.perf_counter()
    async with svc.running:
        try:
            result = await run_in_threadpool(svc.run_study, fields, resolve_path)
        except (Problem, BadInput):
            raise
        except Exception as exc:
            if is_out_of_memory(exc):
                raise OutOfMemory("the server ran out of memory (or its device failed) running this study (%s); try "
                                  "again later, or with fewer folds" % type(exc).__name__)
            raise Problem("the automatic segmentation failed: internal error; request id %s (the server log has the "
                          "details)" % request_id(request)) from exc
    result = dict(result or {})
    result.setdefault("status", SUCCESS_STATUS)
    result.setdefault("error", None)
    result.setdefault("request", fields)
    result.setdefault("time_elapsed", time.perf_counter() - started)
    return result


# ---------------------------------------------------------------------------------------------------------- listing

@router.get(P.PATH_MODEL_INFO)
async def model_info(request: Request):
    svc = server(request).auto
    if svc is None:
        return {}
    return await run_in_threadpool(svc.model_info)  # reads metadata files


@router.get(P.PATH_REQUEST_PARAMS)
async def request_params():
    return InferenceRequest.model_json_schema()


@router.get(P.PATH_READYZ)
async def readyz(request: Request):
    svc = server(request).auto
    if svc is None:  # nothing to load: ready for interactive sessions (a balancer's probe must not drop it)
        return JSONResponse({"status": "ok", "models_loaded": False, "detail": NO_REGISTRY})
    ready, body = await run_in_threadpool(svc.readiness)
    return JSONResponse(body, status_code=200 if ready else 503)


@router.post(P.PATH_EXPIRE, dependencies=[Depends(require_operator)])
@router.get(P.PATH_EXPIRE, dependencies=[Depends(require_operator)])
async def expire(request: Request):
    svc = auto_service(request)
    n = await run_in_threadpool(svc.segmenter.cache.expire)
    return {"status": "ok", "message": "Expired %d items" % n, "expired": n}


# ---------------------------------------------------------------------------------------------------------- studies

@router.post(P.PATH_INFER)
async def infer(request: Request):
    svc = auto_service(request)
    fields = None
    with established_failure() as failing:
        payload = await read_json(request)
        failing.fields = payload
        fields = parse_request(payload, InferenceRequest)
        failing.fields = fields
        svc.guard.require_roots()
        check_models(svc.registry, fields["nnunet_id"])
        return await run_study(request, svc, fields, svc.guard.resolver())


async def read_upload(request, limits):
    """The multipart form of /infer_file, the whole body within ``max_upload_bytes`` (413 past it)."""
    received = [0]
    receive = request.receive

    async def counting():
        message = await receive()
        if message.get("type") == "http.request":
            received[0] += len(message.get("body", b""))
            limits.check_upload(received[0])
        return message

    return await StarletteRequest(request.scope, counting).form(max_files=1, max_fields=8)


@router.post(P.PATH_INFER_FILE)
async def infer_file(request: Request, user=Depends(require_key)):
    svc = auto_service(request)
    srv = server(request)
    declared = request.headers.get("content-length")
    with established_failure():
        if declared is not None and declared.isdigit():
            srv.limits.check_upload(int(declared))  # before any job or byte: 413
        job = await run_in_threadpool(svc.jobs.create, user)
    try:
        with established_failure(job_id=job.id) as failing:
            form = await read_upload(request, srv.limits)
            try:
                upload = form.get("file")
                text = form.get("request")
                if upload is None or isinstance(upload, str):
                    raise BadInput("send the study as a zip or tar archive in the multipart/form-data field 'file' "
                                   "(and the request JSON in the field 'request')")
                if text is None or not isinstance(text, str):
                    raise BadInput("send the request JSON (nnunet_id, series_folders, ...) in the multipart/form-data "
                                   "field 'request'")
                try:
                    payload = json.loads(text)
                except ValueError as exc:
                    raise BadInput("the 'request' field is not valid JSON (%s)" % exc)
                require(isinstance(payload, dict), "the 'request' field must hold a JSON object")
                failing.fields = payload
                fields = parse_request(payload, InferenceRequestFile)
                failing.fields = fields
                check_models(svc.registry, fields["nnunet_id"])
                await run_in_threadpool(unpack_archive, upload.file, job.inputs, srv.limits)
            finally:
                await form.close()
            # The study is the archive, the outputs go to the job's folder; tmp_dir is ignored (nothing is written
            # elsewhere); relative masks (crop_from, intersect_with) are paths inside the archive.
            fields = {k: v for k, v in fields.items() if k != "tmp_dir"}
            fields.update(study_path=job.inputs, output_dir=job.output)
            resolve = PathGuard([job.folder], "this job's folder (the uploaded archive)").resolver(base=job.inputs)
            result = await run_study(request, svc, fields, resolve)
            result = in_download(result, job)
            await run_in_threadpool(svc.jobs.finish, job)
    except BaseException:
        await run_in_threadpool(svc.jobs.discard, job)
        raise
    result["job_id"] = job.id
    return result


def in_download(result, job):
    """The output paths of a job's answer as they are named in its /download zip (``output/stage_0/...``), the
    request's folders as the client named them: no server path."""
    def rel(path):
        return os.path.relpath(path, job.folder) if isinstance(path, str) and os.path.isabs(path) else path

    out = dict(result)
    for key in OUTPUT_KEYS:
        if isinstance(out.get(key), list):
            out[key] = [rel(p) for p in out[key]]
    if isinstance(out.get("request"), dict):
        out["request"] = {k: v for k, v in out["request"].items() if k not in ("study_path", "output_dir")}
    return out


@router.get(P.PATH_DOWNLOAD)
async def download(request: Request, job_id: str, user=Depends(require_key)):
    job = auto_service(request).jobs.get(job_id, user)
    return FileResponse(job.zip_path, media_type="application/zip", filename="%s.zip" % job.id)


# ---------------------------------------------------------------------------------------------------------- sessions

def session_spacing(given, properties, ndim):
    """The spacing of the session's image, per array axis: the request's ``spacing``, else ``image_properties``'
    ``spacing`` from set_image. nnU-Net's convention: one value per axis of the array as sent (a Slicer array is
    [k, j, i], so (spacing_k, spacing_j, spacing_i))."""
    spacing, source = (given, "spacing") if given is not None else (properties.get("spacing"), "image_properties")
    require(spacing is not None, "nnU-Net models need the voxel spacing: this session's image was set without "
                                 "image_properties {'spacing': [...]}; send 'spacing' (one value per array axis, in "
                                 "the array's axis order) with the request")
    ok = isinstance(spacing, (list, tuple)) and len(spacing) == ndim and all(
        isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0 for s in spacing)
    require(ok, "the %s spacing %r must be %d positive numbers, one per array axis" % (source, spacing, ndim))
    return [float(s) for s in spacing]


def label_box(labels):
    """Half-open box of the nonzero voxels of ``labels``, or None."""
    box = []
    for axis in range(labels.ndim):
        others = tuple(a for a in range(labels.ndim) if a != axis)
        hit = np.flatnonzero(labels.any(axis=others))
        if hit.size == 0:
            return None
        box.append([int(hit[0]), int(hit[-1]) + 1])
    return box


@router.post(P.PATH_AUTO_SEGMENT)
async def auto_segment(request: Request, lease_=Depends(lease)):
    srv = server(request)
    svc = auto_service(request)
    payload = await read_json(request, lease_)
    model = payload.pop("model", None)
    alias = payload.pop("nnunet_id", None)
    model = model if model is not None else alias
    require(isinstance(model, str) and model, "name the model: {\"model\": <id, alias or name>} (GET /model_info "
                                              "lists them)")
    svc.registry.get(model)  # unknown: 400 naming the known ids, before waiting for the session's turn
    given_spacing = payload.pop("spacing", None)
    unknown = sorted(set(payload) - set(AUTO_FIELDS))
    require(not unknown, "unknown field(s) %s; /x/auto_segment takes model, spacing and %s"
            % (", ".join(unknown), ", ".join(AUTO_FIELDS)))
    fields = {k: v for k, v in payload.items() if v is not None}
    svc.segmenter.arguments(model, fields)  # wrong types: 400 now
    started = time.perf_counter()
    received_at = time.time()

    def work(session):
        image = lease_.source_image
        require(image is not None and session.original_image_shape is not None,
                "no image yet: send set_image before /x/auto_segment")
        spacing = session_spacing(given_spacing, lease_.image_properties, image.ndim - 1)
        voxels = math.prod(image.shape[1:])
        n_labels = len(svc.registry.segments(model, resolve=False)) or 2
        # Working memory of the prediction beside the session's own: a float32 copy of the image, probabilities of
        # every class on the image's grid, the labels (an estimate; nnU-Net's resampled copies come and go).
        reserved = srv.budget.reserve(voxels * 4 * (image.shape[0] + n_labels + 2),
                                      "the automatic segmentation of %s" % list(image.shape))
        try:
            result = svc.segmenter.predict(model, image, spacing, probabilities=False, **fields)
        except (Problem, BadInput):
            raise
        except Exception as exc:
            if is_out_of_memory(exc):
                raise OutOfMemory("the server ran out of memory (or its device failed) running model %r (%s); the "
                                  "session keeps its image: try again later" % (model, type(exc).__name__))
            raise
        finally:
            reserved.release()
        return auto_response(result, started, received_at)

    return await act(request, lease_, work)


def auto_response(result, started, received_at):
    t0 = time.perf_counter()
    labels = result.labels
    box = None if result.empty else label_box(labels)
    body = b""
    counts = {}
    meta = {"model": result.model_id, "bbox": None, "shape": None, "dtype": None, "image_shape": list(labels.shape)}
    if box is not None:
        region = np.ascontiguousarray(labels[tuple(slice(lo, hi) for lo, hi in box)])
        values, n = np.unique(region, return_counts=True)
        counts = {int(v): int(c) for v, c in zip(values, n) if v != 0}
        meta.update(bbox=box, shape=list(region.shape), dtype=str(region.dtype))
        body = pack_array(region, **MASK_CODEC)
    known = {s.value: s for s in result.segments}
    meta["labels"] = [dict(known[v].as_dict() if v in known else {"value": v, "name": "Label %d" % v,
                                                                   "color": [128, 128, 128]}, voxels=counts[v])
                      for v in sorted(counts)]
    encode = time.perf_counter() - t0
    timings = dict(result.timings, encode=encode, total=time.perf_counter() - started)
    meta["timings"] = {k: round(v, 4) for k, v in timings.items()}
    text = json.dumps(meta, separators=(",", ":"))
    if len(text) > MAX_META_BYTES:
        for label in meta["labels"]:
            label.pop("terminology", None)
        meta["labels_truncated"] = True  # the full descriptions are in GET /model_info
        text = json.dumps(meta, separators=(",", ":"))
    ms = {"received_at": received_at, "queue_wait": timings.get("queue", 0.0) * 1e3,
          "predict": timings.get("predict", 0.0) * 1e3, "preprocess": timings.get("preprocess", 0.0) * 1e3,
          "postprocess": timings.get("postprocess", 0.0) * 1e3, "encode": encode * 1e3,
          "total": timings["total"] * 1e3, "sent_at": time.time()}
    timing = json.dumps({k: round(v, 6 if k.endswith("_at") else 3) for k, v in ms.items()}, separators=(",", ":"))
    return Response(body, media_type=P.OCTET_STREAM, headers={P.META_HEADER: text, P.TIMING_HEADER: timing})
