"""nnInteractive 2.6's remote protocol: leases, the session's image and buffers, prompts.

Routes parse and translate; the key, the lease and the body limits come from ``deps``, errors are raised and mapped
in ``errors``, input checks live in ``validate``.
"""

import json
import math
import time

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from SlicerNNInteractiveLib import protocol as P
from SlicerNNInteractiveLib.wire import MASK_CODEC, pack_array

from .. import validate
from ..deps import (act, caller, finish_preprocessing, finished, leased, lookup, meta, preprocessed, read_json,
                    read_packed, server, sized)
from ..errors import AtCapacity, Draining
from ..leases import ServerFull, UserFull
from ..limits import session_bytes
from .lean import LeanRoute

router = APIRouter(route_class=LeanRoute)  # endpoints take the request alone (see lean.py)
COMPACT = json.JSONEncoder(separators=(",", ":"))  # json.dumps makes an encoder per call for these separators


def timing_header(timing):
    # Durations in ms; "received_at" / "sent_at" are wall-clock stamps (s) that let a client on the same machine
    # split the exchange into upload and download.
    # (Written by hand: json.dumps with rounding costs twice as much, on every call.)
    timing["sent_at"] = time.time()
    return "{%s}" % ",".join(['"%s":%.*f' % (k, 6 if k.endswith("_at") else 3, v) for k, v in timing.items()])


def changed_region(session, ran):
    """(bbox, the target buffer's view of it) of what the last prediction changed, or None; forgets it either way."""
    bbox = session._clipped_last_paste_bbox() if ran else None
    session._last_paste_bbox = None  # never resend a stale region
    if bbox is None or not all(lo < hi for lo, hi in bbox):
        return None
    return bbox, session.target_buffer[tuple(slice(lo, hi) for lo, hi in bbox)]


def prediction_response(changed, ran, body, timing, started):
    meta_ = {"ran_prediction": bool(ran), "bbox": None}
    if changed is not None:
        bbox, region = changed
        meta_.update(bbox=[[int(lo), int(hi)] for lo, hi in bbox], dtype=str(region.dtype), shape=list(region.shape))
    timing["total"] = (time.perf_counter() - started) * 1e3
    return Response(body, media_type=P.OCTET_STREAM, headers={
        P.META_HEADER: COMPACT.encode(meta_), P.TIMING_HEADER: timing_header(timing)})


def pack_region(changed):
    return pack_array(changed[1], **MASK_CODEC) if changed is not None else b""


def predict_response(session, timing, ran, started):
    """The answer to a prediction (or an undo): the changed region, packed here."""
    t0 = time.perf_counter()
    changed = changed_region(session, ran)
    body = pack_region(changed)
    timing["encode"] = (time.perf_counter() - t0) * 1e3
    return prediction_response(changed, ran, body, timing, started)


async def prompt(request, lease_, check, call, timing=None, nbytes=0):
    """A prompt, on the event loop: checked against the session's image (``check(session)``, in a worker thread when
    it reads more than ``INLINE_BYTES`` of a ``nbytes`` array), then run on the prediction thread (``call(session,
    arg)`` returns whether it predicted) with no worker thread in between; the changed region is packed where
    ``sized`` says."""
    srv = server(request)
    started = time.perf_counter()
    timing = timing if timing is not None else {}

    async def work(session):
        validate.ready_for_prompt(session)
        arg = await sized(nbytes, check, session)
        t0 = time.perf_counter()
        await preprocessed(session)  # here, not on the prediction thread
        timing["preprocess_wait"] = (time.perf_counter() - t0) * 1e3
        predicted_at = []

        def timed():
            predicted_at.append(time.perf_counter())
            return call(session, arg)

        ran, waited = await finished(srv.engine.queue.submit(timed, owner=lease_))
        timing["queue_wait"] = waited * 1e3
        timing["predict"] = (time.perf_counter() - predicted_at[0]) * 1e3
        t0 = time.perf_counter()
        changed = changed_region(session, ran)
        body = await sized(changed[1].nbytes, pack_region, changed) if changed is not None else b""
        timing["encode"] = (time.perf_counter() - t0) * 1e3
        return prediction_response(changed, ran, body, timing, started)

    return await act(request, lease_, work)


def prompt_flags(fields):
    """include_interaction (required), run_prediction (default true), override_capability_checks."""
    return (validate.flag(fields, "include_interaction"), validate.flag(fields, "run_prediction", True),
            validate.flag(fields, "override_capability_checks", False))


class Scoped:
    """Budget reservations of one request, given back when it ends."""

    def __init__(self):
        self.items = []

    def add(self, reservation):
        self.items.append(reservation)
        return reservation

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for r in self.items:
            r.release()


def mask_accept(request, lease_, scoped, kind):
    """``accept`` for a prompt array: it must fit inside the session's image (its exact shape is checked later,
    with the prompt), and its bytes must fit the memory budget."""
    srv = server(request)

    def accept(shape, dtype):
        image_shape = lease_.session.original_image_shape
        validate.require(image_shape is not None, "no image yet: send set_image before any prompt")
        spatial = list(image_shape[1:])
        validate.require(len(shape) == 3 and all(d <= s for d, s in zip(shape, spatial)),
                         "the %s shape %s does not match the image's spatial shape %s", kind, list(shape), spatial)
        scoped.add(srv.budget.reserve(math.prod(shape) * dtype.itemsize, "the %s %s" % (kind, list(shape)),
                                      user=lease_.user))

    return accept


# ---------------------------------------------------------------- prompts
# (first: FastAPI tries a request's path against the routes in the order they were made, the calls made most first)


@router.post(P.PATH_ADD_POINT)
async def add_point(request: Request):
    with leased(request) as lease_:
        payload = await read_json(request, lease_)
        timing = {"received_at": time.time()}
        include, run, override = prompt_flags(payload)

        def call(session, coords):
            session.add_point_interaction(coords, include, run, override)
            return run

        return await prompt(request, lease_, lambda s: validate.point(payload, s.original_image_shape[1:]), call,
                            timing)


@router.post(P.PATH_ADD_BBOX)
async def add_bbox(request: Request):
    with leased(request) as lease_:
        payload = await read_json(request, lease_)
        timing = {"received_at": time.time()}
        include, run, override = prompt_flags(payload)
        supports_3d = server(request).supports_3d_box

        def call(session, box):
            session.add_bbox_interaction(box, include, run, override)
            return run

        return await prompt(request, lease_, lambda s: validate.bbox(payload, s.original_image_shape[1:], supports_3d),
                            call, timing)


async def mask_prompt(request, lease_, meta_, kind):
    include, run, override = prompt_flags(meta_)
    with Scoped() as scoped:
        t0 = time.perf_counter()
        mask = await read_packed(request, lease_, mask_accept(request, lease_, scoped, kind), "the %s" % kind)
        timing = {"received_at": time.time(), "decode": (time.perf_counter() - t0) * 1e3}
        method = "add_scribble_interaction" if kind == "scribble" else "add_lasso_interaction"

        def call(session, box):
            getattr(session, method)(mask, include, run_prediction=run, override_capability_checks=override,
                                     interaction_bbox=box)
            return run

        return await prompt(request, lease_, lambda s: validate.mask_prompt(mask, meta_, s.original_image_shape[1:],
                                                                            kind), call, timing, mask.nbytes)


@router.post(P.PATH_ADD_SCRIBBLE)
async def add_scribble(request: Request):
    with leased(request) as lease_:
        return await mask_prompt(request, lease_, meta(request), "scribble")


@router.post(P.PATH_ADD_LASSO)
async def add_lasso(request: Request):
    with leased(request) as lease_:
        return await mask_prompt(request, lease_, meta(request), "lasso")


@router.post(P.PATH_PREDICT)
async def predict(request: Request):
    with leased(request) as lease_:
        payload = await read_json(request, lease_)
        force = validate.flag(payload, "force_full_refine", False)
        return await prompt(request, lease_, lambda s: None,
                            lambda s, _: s._predict(force_full_refine=force) is not None)


@router.post(P.PATH_ADD_INITIAL_SEG)
async def add_initial_seg(request: Request):
    with leased(request) as lease_:
        meta_ = meta(request)
        run = validate.flag(meta_, "run_prediction", False)
        override = validate.flag(meta_, "override_capability_checks", False)
        with Scoped() as scoped:
            seg = await read_packed(request, lease_, mask_accept(request, lease_, scoped, "initial segmentation"),
                                    "the initial segmentation")

            def call(session, _):
                session.add_initial_seg_interaction(seg, run_prediction=run, override_capability_checks=override)
                return run

            return await prompt(request, lease_, lambda s: validate.initial_seg(seg, s.original_image_shape[1:]), call)


# ---------------------------------------------------------------- session state


@router.post(P.PATH_SET_IMAGE)
async def set_image(request: Request):
    with leased(request) as lease_:
        return await receive_image(request, lease_, meta(request))


async def receive_image(request, lease_, meta_):
    # Decoded while it arrives: each compressed chunk is decompressed (off the event loop) once complete,
    # overlapping the transfer. Its size is checked, and its memory reserved, from its header, before allocation.
    srv = server(request)
    started = time.perf_counter()
    kept = []

    with Scoped() as scoped:
        def accept(shape, dtype):
            validate.image_header(shape, dtype, srv.image_channels)
            voxels = math.prod(shape[1:])
            srv.limits.check_image_voxels(voxels, shape)
            held = session_bytes(voxels, shape[0], srv.num_interaction_channels)
            received = math.prod(shape) * dtype.itemsize
            whole = scoped.add(srv.budget.reserve(held + received, "the image %s %s" % (list(shape), dtype),
                                                  user=lease_.user))
            # Kept by the session (with the received array itself on servers with automatic models); the rest ends
            # with the request.
            kept.append(whole.split(held + (received if srv.keep_source_images else 0)))

        try:
            arr = await read_packed(request, lease_, accept, "the image")
            timing = {"received_at": time.time(), "stream_decode": (time.perf_counter() - started) * 1e3}
            props = meta_.get("image_properties") or {}

            def work(session):
                validate.image(arr, srv.image_channels)
                t1 = time.perf_counter()
                try:  # a previous image's preprocessing must not finish after (and overwrite) this one
                    finish_preprocessing(session)
                except Exception:
                    pass  # that image failed; it is being replaced anyway
                timing["preprocess_wait"] = (time.perf_counter() - t1) * 1e3
                session.set_image(arr, props)  # preprocessing continues in the session's background thread
                lease_.hold("target", None)  # set_image dropped the target buffer
                lease_.hold("image", kept.pop())
                # The library normalises a copy; the array received stays as sent, for /x/auto_segment.
                lease_.keep_source(arr if srv.keep_source_images else None, props)
                return {"original_image_shape": list(session.original_image_shape)}

            result = await act(request, lease_, work)
        finally:  # refused, failed or replaced: the reservation the session did not keep goes back
            for r in kept:
                r.release()
    timing["total"] = (time.perf_counter() - started) * 1e3
    return JSONResponse(result, headers={P.TIMING_HEADER: timing_header(timing)})


@router.post(P.PATH_SET_TARGET_BUFFER)
async def set_target_buffer(request: Request):
    with leased(request) as lease_:
        payload = await read_json(request, lease_)
        budget = server(request).budget

        def work(session):
            shape, dtype = validate.target_buffer_request(payload, session.original_image_shape)
            reserved = budget.reserve(math.prod(shape) * dtype.itemsize,
                                      "the target buffer %s %s" % (list(shape), dtype), user=lease_.user)
            try:
                session.set_target_buffer(np.zeros(shape, dtype=dtype))
            except BaseException:
                reserved.release()
                raise
            lease_.hold("target", reserved)
            return {}

        return await act(request, lease_, work)


@router.post(P.PATH_SET_DO_AUTOZOOM)
async def set_do_autozoom(request: Request):
    with leased(request) as lease_:
        payload = await read_json(request, lease_)
        value = validate.flag(payload, "do_autozoom")
        return await act(request, lease_, lambda session: session.set_do_autozoom(value) or {})


@router.post(P.PATH_RESET_INTERACTIONS)
async def reset_interactions(request: Request):
    with leased(request) as lease_:
        def work(session):
            finish_preprocessing(session)
            if session.original_image_shape is not None:
                session.reset_interactions()
            return {}

        return await act(request, lease_, work)


@router.post(P.PATH_UNDO)
async def undo(request: Request):
    with leased(request) as lease_:
        started = time.perf_counter()

        def work(session):
            finish_preprocessing(session)
            ran = session.undo() if session.original_image_shape is not None else False
            return predict_response(session, {}, ran, started)

        return await act(request, lease_, work)


# ---------------------------------------------------------------- leases


@router.get(P.PATH_CAPABILITIES)
async def capabilities(request: Request):
    caller(request)
    return server(request).caps


@router.post(P.PATH_CLAIM)
async def claim(request: Request):
    user = caller(request)
    srv = server(request)
    registry = srv.registry
    if srv.draining:
        raise Draining("the server is shutting down; try again later (or another server)", retry_after=10)
    try:
        lease_ = await run_in_threadpool(registry.claim, user)
    except UserFull:
        raise AtCapacity("%s already holds %d session(s), the most one user may hold on this server "
                          "(--max-sessions-per-user); close one, or wait until it expires"
                          % (user, registry.max_per_user), retry_after=10)
    except ServerFull:
        raise AtCapacity("server is at capacity (%d sessions); try again later" % registry.max_sessions,
                         retry_after=10)
    return {"lease_token": lease_.token, "idle_timeout_seconds": registry.idle_timeout,
            "liveness_timeout_seconds": registry.liveness_timeout, "max_sessions": registry.max_sessions}


@router.post(P.PATH_RELEASE)
async def release(request: Request):
    # never waits: freeing is the reaper's
    server(request).registry.release(request.headers.get(P.LEASE_HEADER), caller(request))
    return {"released": True}


@router.post(P.PATH_HEARTBEAT)
async def heartbeat(request: Request):
    with leased(request) as lease_:
        return {"remaining_seconds": server(request).registry.remaining(lease_)}


@router.get(P.PATH_LEASE_STATUS)
async def lease_status(request: Request):
    lease_ = lookup(request, touch=False)
    registry = server(request).registry
    return {"remaining_seconds": registry.remaining(lease_), "idle_timeout_seconds": registry.idle_timeout}
