"""Automatic nnU-Net models: the established nnU-Net model server's endpoints, and ours under /x/ and /jobs.

* ``GET /model_info`` (the registered models: names, labels, colours, terminology, default arguments, license,
  ``available`` and why not), ``GET /model_info_clean`` (the same, each model's segments listed as the established
  server lists them), ``GET /request-params`` (the JSON schema of the /infer body), ``GET /readyz`` (registry
  loaded, device usable, at least one model able to serve; 503 otherwise; 200 with ``models_loaded: false`` on a
  server without a registry, which is ready for sessions), ``POST /infer`` (a study on server paths, confined to
  ``--infer-root``), ``POST /infer_file`` (a study uploaded as a zip/tar archive, multipart fields ``file`` and
  ``request``; answers a ``job_id``), ``GET /download/{job_id}`` (a zip of that job's outputs), ``POST /expire``
  (empty the predictor cache; GET too, as the established server has it). Failures of /infer and /infer_file carry
  the established fields beside ``detail`` (``status: "failed"``, ``error``, ``request``, and ``job_id`` once a job
  exists). Both answer when the run is done; a client that disconnects first cancels it.
* Jobs (ours): ``POST /jobs`` (the body of /infer_file or of /infer) answers 202 with the job at once; ``GET
  /jobs/{job_id}`` its status, queue position, progress, result or error; ``GET /jobs`` the caller's jobs; ``DELETE
  /jobs/{job_id}`` cancels (queued, running) or deletes (finished) it with its files. A job is its owner's alone.
* ``POST /x/auto_segment`` (with the lease): run a model on the image the session already holds; the answer is the
  packed label array of the box holding labels (``X-Meta``: ``bbox``, ``shape``, ``dtype``, ``labels``, ``timings``),
  an empty body when nothing was found. Any of its labels can be sent back with /add_initial_seg_interaction. The run
  takes turns with every session's prompts on the prediction thread (a piece at a time, prompts first) and stops
  between two pieces (409 to whoever still waits) when its client goes away or sends
  ``POST /x/auto_segment/cancel`` with the same lease (``{"cancelled": true}`` when a run of that lease was in
  progress or waiting; another lease never reaches it).

Every route needs the key (when one is set); paths that name nothing on a server without a registry answer 404
saying so. A draining server (SIGTERM) takes no new study (503 + Retry-After). Uploads are received by
``auto.upload``; every study runs as a job (``auto.jobs``) on the runner's threads (``auto.runner``), through
``AutoService`` (``auto.service``), which confines every path the study runner touches: to ``--infer-root`` for
server paths, to the job's folder for uploads.
"""

import asyncio
import json
import logging
import math
import time

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from SlicerNNInteractiveLib import protocol as P
from SlicerNNInteractiveLib.wire import MASK_CODEC, pack_array

from ..cancel import CancelToken
from ..deps import act, leased, lookup, read_json, require_key, require_operator, server
from ..errors import Invalid, NotFound, OutOfMemory, Problem, is_out_of_memory
from ..validate import BadInput, require
from ..auto.jobs import CANCELLED
from ..auto.request import InferenceRequest, InferenceRequestFile, parse_request
from ..auto.runner import refusal_when_draining
from ..auto.upload import REQUEST_FIELD, discard_upload, receive_upload

log = logging.getLogger("nninteractive_slicer_server")
router = APIRouter(dependencies=[Depends(require_key)])
CLIENT_GONE = 499  # the status nobody reads: the client went away (as proxies log it)

SUCCESS_STATUS, FAILURE_STATUS = "done", "failed"  # the established server's status values
# Request fields of /x/auto_segment beside "model" (or "nnunet_id") and "spacing": the prediction arguments.
AUTO_FIELDS = ("use_folds", "tta", "checkpoint_name", "class_idx", "proba_threshold", "min_confidence")
DISCONNECT_POLL_S = 0.25  # how often a waiting /x/auto_segment looks whether its client went away
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

    def parse(self, payload, model):
        """``parse_request``: a failure echoes ``payload`` until it parses, then the parsed fields."""
        self.fields = payload
        self.fields = parse_request(payload, model)
        return self.fields

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


# ---------------------------------------------------------------------------------------------------------- listing

@router.get(P.PATH_MODEL_INFO)
async def model_info(request: Request):
    svc = server(request).auto
    if svc is None:
        return {}
    return await run_in_threadpool(svc.model_info)  # reads metadata files


@router.get(P.PATH_MODEL_INFO_CLEAN)
async def model_info_clean(request: Request):
    svc = server(request).auto
    if svc is None:
        return {}
    return await run_in_threadpool(svc.model_info_clean)


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

def refuse_when_draining(request):
    if server(request).draining:
        raise refusal_when_draining()


async def until_disconnected(request):
    """Return once the client has gone away (its body was read: ``receive`` now waits for the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def answer_of(request, svc, job):
    """Wait for the answer of ``job`` (its result, or its exception raised here); None when the client went away
    first: the job is cancelled then (nobody would read its answer)."""
    answer = asyncio.wrap_future(job.future)
    answer.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even when nobody waits
    gone = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if answer.done():
        return answer.result()
    if svc.cancel(job, "its client disconnected"):
        log.info("auto: the client of job %s went away; the job is cancelled", job.id)
    return None


def established(result, fields, started):
    """A run's result with the established fields filled."""
    result = dict(result or {})
    result.setdefault("status", SUCCESS_STATUS)
    result.setdefault("error", None)
    result.setdefault("request", fields)
    result.setdefault("time_elapsed", time.perf_counter() - started)
    return result


@router.post(P.PATH_INFER)
async def infer(request: Request, user=Depends(require_key)):
    svc = auto_service(request)
    with established_failure() as failing:
        refuse_when_draining(request)
        started = time.perf_counter()
        job = await submit_paths(request, svc, user, sync=True, failing=failing)
        result = await answer_of(request, svc, job)
        return Response(status_code=CLIENT_GONE) if result is None else established(result, job.request, started)


async def submit_paths(request, svc, user, sync, failing=None):
    """Check the JSON request of a study on server paths, then make it a job (``failing`` as for ``submit_upload``)."""
    fields = (failing or established_failure()).parse(await read_json(request), InferenceRequest)
    svc.guard.require_roots()
    svc.check_models(fields["nnunet_id"])
    return await run_in_threadpool(svc.submit_paths, user, fields, sync)


async def submit_upload(request, svc, user, sync, failing=None):
    """Receive an upload (auto/upload.py), check its request, then make it a job (``failing``: the established
    failure answer, given the fields as they are known)."""
    failing = failing or established_failure()
    upload = await receive_upload(request, server(request), svc.jobs, user)
    try:
        text = upload.fields.get(REQUEST_FIELD)
        if text is None:
            raise BadInput("send the request JSON (nnunet_id, series_folders, ...) in the multipart/form-data field "
                           "'request'")
        try:
            payload = json.loads(text)
        except ValueError as exc:
            raise BadInput("the 'request' field is not valid JSON (%s)" % exc)
        require(isinstance(payload, dict), "the 'request' field must hold a JSON object")
        fields = failing.parse(payload, InferenceRequestFile)
        svc.check_models(fields["nnunet_id"])
        return await run_in_threadpool(svc.submit_upload, user, upload, fields, sync)
    except BaseException:
        discard_upload(upload.path, upload.receipt)  # nothing left once a job took it over
        raise


@router.post(P.PATH_INFER_FILE)
async def infer_file(request: Request, user=Depends(require_key)):
    svc = auto_service(request)
    with established_failure() as failing:
        refuse_when_draining(request)
        job = await submit_upload(request, svc, user, sync=True, failing=failing)
        failing.more["job_id"] = job.id
        started = time.perf_counter()
        result = await answer_of(request, svc, job)
        if result is None:
            return Response(status_code=CLIENT_GONE)
        return dict(established(result, job.request, started), job_id=job.id)


@router.get(P.PATH_DOWNLOAD)
async def download(request: Request, job_id: str, user=Depends(require_key)):
    job = await run_in_threadpool(auto_service(request).jobs.download, job_id, user)
    return FileResponse(job.zip_path, media_type="application/zip", filename="%s.zip" % job.id)


# ---------------------------------------------------------------------------------------------------------- jobs

@router.post(P.PATH_JOBS)
async def submit_job(request: Request, user=Depends(require_key)):
    """A study as a job: the multipart body of /infer_file (an upload) or the JSON body of /infer (server paths);
    202 with the job's id and status at once."""
    svc = auto_service(request)
    refuse_when_draining(request)
    multipart = request.headers.get("content-type", "").lower().startswith("multipart/")
    job = await (submit_upload if multipart else submit_paths)(request, svc, user, sync=False)
    return JSONResponse(svc.status(job), status_code=202, headers={"Location": P.PATH_JOB.format(job_id=job.id)})


@router.get(P.PATH_JOBS)
async def list_jobs(request: Request, user=Depends(require_key)):
    """The caller's jobs, oldest first (without their results: GET /jobs/{id} has them)."""
    svc = auto_service(request)
    jobs = await run_in_threadpool(svc.jobs.of_user, user)
    return {"jobs": [{k: v for k, v in svc.status(j).items() if k not in ("result", "request")} for j in jobs]}


@router.get(P.PATH_JOB)
async def job_status(request: Request, job_id: str, user=Depends(require_key)):
    svc = auto_service(request)
    return svc.status(await run_in_threadpool(svc.jobs.find, job_id, user))


@router.delete(P.PATH_JOB)
async def delete_job(request: Request, job_id: str, user=Depends(require_key)):
    """Cancel the caller's job if it is queued or running (it is removed with its files once it has stopped), or
    delete a finished one with its files."""
    svc = auto_service(request)
    job = await run_in_threadpool(svc.jobs.find, job_id, user)
    if svc.cancel(job, "deleted by its owner"):
        return {"job_id": job.id, "status": CANCELLED}
    await run_in_threadpool(svc.jobs.discard, job)
    return {"job_id": job.id, "status": "deleted"}


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
    require(ok, "the %s spacing %r must be %d positive numbers, one per array axis", source, spacing, ndim)
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
async def auto_segment(request: Request):
    with leased(request) as lease_:
        return await segment_session_image(request, lease_)


async def segment_session_image(request, lease_):
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
    require(not unknown, "unknown field(s) %s; /x/auto_segment takes model, spacing and %s", ", ".join(unknown),
            ", ".join(AUTO_FIELDS))
    fields = {k: v for k, v in payload.items() if v is not None}
    svc.segmenter.arguments(model, fields)  # wrong types: 400 now
    started = time.perf_counter()
    received_at = time.time()
    cancel = CancelToken()

    def work(session):
        image = lease_.source_image
        require(image is not None and session.original_image_shape is not None,
                "no image yet: send set_image before /x/auto_segment")
        spacing = session_spacing(given_spacing, lease_.image_properties, image.ndim - 1)
        try:  # its working memory is reserved from the budget by predict, for as long as it runs
            result = svc.segmenter.predict(model, image, spacing, probabilities=False, cancel=cancel, owner=lease_,
                                           user=lease_.user, **fields)
        except (Problem, BadInput):
            raise
        except Exception as exc:
            if is_out_of_memory(exc):
                raise OutOfMemory("the server ran out of memory (or its device failed) running model %r (%s); the "
                                  "session keeps its image: try again later" % (model, type(exc).__name__))
            raise
        return auto_response(result, started, received_at)

    lease_.auto_runs.add(cancel)
    watch = asyncio.ensure_future(cancel_when_gone(request, cancel))
    try:
        return await act(request, lease_, work)
    finally:
        watch.cancel()
        lease_.auto_runs.discard(cancel)


@router.post(P.PATH_AUTO_CANCEL)
async def auto_segment_cancel(request: Request):
    """Cancel the lease's /x/auto_segment in progress or waiting (it stops between two pieces; its request answers
    409). Never waits for the lease's turn; ``{"cancelled": false}`` when the lease had none."""
    lease_ = lookup(request)
    auto_service(request)
    runs = [token for token in list(lease_.auto_runs) if not token.cancelled]
    for token in runs:
        token.cancel("cancelled by its client")
    return {"cancelled": bool(runs)}


async def cancel_when_gone(request, token):
    """Cancel ``token`` when the client of ``request`` disconnects (its body already read)."""
    while not token.cancelled:
        if await request.is_disconnected():
            token.cancel("its client went away")
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


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
