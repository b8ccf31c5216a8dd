"""HTTP routes: translate nnInteractive 2.6's remote protocol to calls on leased inference sessions.

Routes only parse, check and translate; leases live in ``leases.py``, the model in ``engine.py``, input checks in
``validate.py`` and the wire codec in ``SlicerNNInteractiveLib.wire`` (shared with the client).
"""

import asyncio
import hmac
import json
import logging
import os
import time
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from SlicerNNInteractiveLib import protocol as P
from SlicerNNInteractiveLib.wire import MASK_CODEC, ArrayDecoder, WireFormatError, pack_array, unpack_array

from . import __version__, validate
from .leases import LeaseRegistry, ServerFull, UnknownLease
from .validate import BadInput

log = logging.getLogger("nninteractive_slicer_server")

try:
    _RAM = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
except (ValueError, OSError, AttributeError):
    _RAM = 32 << 30
MAX_TARGET_BUFFER_BYTES = _RAM // 4


def _rss_bytes():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def make_app(engine, max_sessions=1, idle_timeout=600.0, liveness_timeout=60.0, api_key=None):
    registry = LeaseRegistry(engine.new_session, engine.close_session, max_sessions, idle_timeout, liveness_timeout)
    caps = engine.capabilities
    supports_3d_box = bool(caps["supported_interactions"].get("bbox3d"))
    image_channels = len(engine.artifacts["dataset_json"]["channel_names"])
    expected_auth = ("Bearer " + api_key).encode() if api_key else None
    sweep_every = max(0.05, min(15.0, idle_timeout / 4, liveness_timeout / 4))

    @asynccontextmanager
    async def lifespan(_app):
        async def reap():
            while True:
                await asyncio.sleep(sweep_every)
                try:
                    await run_in_threadpool(registry.sweep)
                except Exception:
                    log.exception("error while reaping sessions")

        task = asyncio.create_task(reap())
        try:
            yield
        finally:
            task.cancel()
            registry.close_all()

    app = FastAPI(title="nninteractive-slicer-server", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url="/x/openapi.json")
    app.state.registry = registry

    @app.exception_handler(Exception)
    async def internal_error(_request, exc):
        log.exception("internal error")
        return JSONResponse({"detail": "internal server error (%s: %s); see the server log"
                                       % (type(exc).__name__, exc)}, status_code=500)

    # ---------------------------------------------------------------- helpers

    def check_auth(request):
        if expected_auth is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not given:
            raise HTTPException(401, "missing API key: send 'Authorization: Bearer <key>'")
        if not hmac.compare_digest(given, expected_auth):
            raise HTTPException(401, "wrong API key")

    def lease_of(request, touch=True):
        check_auth(request)
        try:
            return registry.get(request.headers.get(P.LEASE_HEADER), touch=touch)
        except UnknownLease:
            raise HTTPException(410, "lease expired or unknown: claim a new session")

    async def json_body(request):
        body = await request.body()
        if not body:
            return {}
        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise HTTPException(400, "the request body is not valid JSON (%s)" % exc)
        if not isinstance(payload, dict):
            raise HTTPException(400, "the request body must be a JSON object")
        return payload

    def meta_of(request):
        raw = request.headers.get(P.META_HEADER)
        if raw is None:
            return {}
        try:
            meta = json.loads(raw)
        except ValueError as exc:
            raise HTTPException(400, "bad %s header: %s" % (P.META_HEADER, exc))
        if not isinstance(meta, dict):
            raise HTTPException(400, "the %s header must hold a JSON object" % P.META_HEADER)
        return meta

    def undecodable(exc):
        return HTTPException(400, "could not decode the packed array: %s" % exc)

    def decode(body):
        try:
            return unpack_array(body)
        except WireFormatError as exc:
            raise undecodable(exc)

    def act(lease, work):
        """Run ``work(session, timing)`` as one real action of this lease: one at a time, 400 on bad input."""
        lease.active()
        with lease.lock:
            if lease.closed:
                raise HTTPException(410, "lease expired or unknown: claim a new session")
            try:
                return work(lease.session)
            except (BadInput, ValueError, AssertionError) as exc:
                # The library reports bad input as ValueError/AssertionError; nothing else was touched.
                raise HTTPException(400, str(exc) or type(exc).__name__)

    def timing_header(timing):
        # Durations in ms; "received_at" / "sent_at" are wall-clock stamps (s) that let a client on the same
        # machine split the exchange into upload and download.
        timing["sent_at"] = time.time()
        return json.dumps({k: round(v, 6 if k.endswith("_at") else 3) for k, v in timing.items()},
                          separators=(",", ":"))

    def predict_response(session, timing, ran, started):
        t0 = time.perf_counter()
        bbox = session._clipped_last_paste_bbox() if ran else None
        session._last_paste_bbox = None  # never resend a stale region
        meta = {"ran_prediction": bool(ran), "bbox": None}
        body = b""
        if bbox is not None and all(lo < hi for lo, hi in bbox):
            region = session.target_buffer[tuple(slice(lo, hi) for lo, hi in bbox)]
            meta.update(bbox=[[int(lo), int(hi)] for lo, hi in bbox], dtype=str(region.dtype),
                        shape=list(region.shape))
            body = pack_array(region, **MASK_CODEC)
        timing["encode"] = (time.perf_counter() - t0) * 1e3
        timing["total"] = (time.perf_counter() - started) * 1e3
        return Response(body, media_type=P.OCTET_STREAM, headers={
            P.META_HEADER: json.dumps(meta, separators=(",", ":")),
            P.TIMING_HEADER: timing_header(timing)})

    def on_gpu(session, timing, started, fn):
        """Wait for this session's preprocessing here (not on the GPU thread), then run ``fn`` on the GPU thread."""
        t0 = time.perf_counter()
        session._finish_preprocessing_and_initialize_interactions()
        t1 = time.perf_counter()
        timing["preprocess_wait"] = (t1 - t0) * 1e3
        predicted_at = []

        def timed():
            predicted_at.append(time.perf_counter())
            return fn()

        ran, waited = engine.run_on_gpu(timed)
        timing["queue_wait"] = waited * 1e3
        timing["predict"] = (time.perf_counter() - predicted_at[0]) * 1e3
        return predict_response(session, timing, ran, started)

    def prompt(lease, check, call, started, timing):
        def work(session):
            validate.ready_for_prompt(session)
            args = check(session)
            return on_gpu(session, timing, started, lambda: call(session, args))
        return act(lease, work)

    # ---------------------------------------------------------------- lifecycle endpoints

    @app.get(P.PATH_HEALTHZ)
    async def healthz():
        return {"ok": True}

    @app.get(P.PATH_CAPABILITIES)
    async def capabilities(request: Request):
        check_auth(request)
        return caps

    @app.get(P.PATH_SERVER_INFO)
    async def server_info(request: Request):
        check_auth(request)
        return {"server": "nninteractive-slicer-server", "server_version": __version__,
                "version": caps["inference_session_version"], "model": engine.model_name,
                "license": engine.license, "device": str(engine.device), "torch_compile": engine.use_torch_compile,
                "sessions": registry.count(), "max_sessions": registry.max_sessions, "rss_bytes": _rss_bytes(),
                "machine": P.machine_id()}

    @app.post(P.PATH_CLAIM)
    async def claim(request: Request):
        check_auth(request)
        try:
            lease = await run_in_threadpool(registry.claim)
        except ServerFull:
            raise HTTPException(503, "server is at capacity (%d sessions); try again later" % registry.max_sessions,
                                headers={"Retry-After": "10"})
        return {"lease_token": lease.token, "idle_timeout_seconds": registry.idle_timeout,
                "liveness_timeout_seconds": registry.liveness_timeout, "max_sessions": registry.max_sessions}

    @app.post(P.PATH_RELEASE)
    async def release(request: Request):
        check_auth(request)
        await run_in_threadpool(registry.release, request.headers.get(P.LEASE_HEADER))
        return {"released": True}

    @app.post(P.PATH_HEARTBEAT)
    async def heartbeat(request: Request):
        lease = lease_of(request)
        return {"remaining_seconds": registry.remaining(lease)}

    @app.get(P.PATH_LEASE_STATUS)
    async def lease_status(request: Request):
        lease = lease_of(request, touch=False)
        return {"remaining_seconds": registry.remaining(lease), "idle_timeout_seconds": registry.idle_timeout}

    # ---------------------------------------------------------------- session state

    @app.post(P.PATH_SET_IMAGE)
    async def set_image(request: Request):
        # The image is decoded while it arrives: each compressed chunk is decompressed as soon as it is complete,
        # overlapping the transfer (clients that stream send it in small chunks; others in one).
        try:
            lease, meta, problem = lease_of(request), meta_of(request), None
        except HTTPException as exc:
            lease, meta, problem = None, {}, exc
        decoder = ArrayDecoder()
        started = time.perf_counter()
        async for piece in request.stream():  # read it all even after a problem, so the client gets our answer
            if problem is None:
                try:
                    decoder.feed(piece)
                except WireFormatError as exc:
                    problem = undecodable(exc)
        timing = {"received_at": time.time(), "stream_decode": (time.perf_counter() - started) * 1e3}
        if problem is not None:
            raise problem
        props = meta.get("image_properties") or {}

        def work():
            t0 = time.perf_counter()
            try:
                arr = decoder.finish()
            except WireFormatError as exc:
                raise undecodable(exc)
            timing["decode"] = (time.perf_counter() - t0) * 1e3

            def apply(session):
                validate.image(arr, image_channels)
                t1 = time.perf_counter()
                try:  # a previous image's preprocessing must not finish after (and overwrite) this one
                    session._finish_preprocessing_and_initialize_interactions()
                except ValueError:
                    pass  # that image was refused; it is being replaced anyway
                timing["preprocess_wait"] = (time.perf_counter() - t1) * 1e3
                session.set_image(arr, props)  # preprocessing continues in the session's background thread
                return {"original_image_shape": list(session.original_image_shape)}
            result = act(lease, apply)
            timing["total"] = (time.perf_counter() - started) * 1e3
            return JSONResponse(result, headers={P.TIMING_HEADER: timing_header(timing)})
        return await run_in_threadpool(work)

    @app.post(P.PATH_SET_TARGET_BUFFER)
    async def set_target_buffer(request: Request):
        lease = lease_of(request)
        payload = await json_body(request)

        def apply(session):
            shape, dtype = validate.target_buffer_request(payload, session.original_image_shape,
                                                          MAX_TARGET_BUFFER_BYTES)
            session.set_target_buffer(np.zeros(shape, dtype=dtype))
            return {}
        return await run_in_threadpool(act, lease, apply)

    @app.post(P.PATH_SET_DO_AUTOZOOM)
    async def set_do_autozoom(request: Request):
        lease = lease_of(request)
        payload = await json_body(request)

        def apply(session):
            session.set_do_autozoom(validate.flag(payload, "do_autozoom"))
            return {}
        return await run_in_threadpool(act, lease, apply)

    @app.post(P.PATH_RESET_INTERACTIONS)
    async def reset_interactions(request: Request):
        lease = lease_of(request)

        def apply(session):
            session._finish_preprocessing_and_initialize_interactions()
            if session.original_image_shape is not None:
                session.reset_interactions()
            return {}
        return await run_in_threadpool(act, lease, apply)

    @app.post(P.PATH_UNDO)
    async def undo(request: Request):
        lease = lease_of(request)
        started = time.perf_counter()

        def apply(session):
            session._finish_preprocessing_and_initialize_interactions()
            ran = session.undo() if session.original_image_shape is not None else False
            return predict_response(session, {}, ran, started)
        return await run_in_threadpool(act, lease, apply)

    # ---------------------------------------------------------------- prompts

    @app.post(P.PATH_PREDICT)
    async def predict(request: Request):
        lease = lease_of(request)
        payload = await json_body(request)
        started = time.perf_counter()
        force = validate.flag(payload, "force_full_refine", False) if "force_full_refine" in payload else False
        return await run_in_threadpool(
            prompt, lease, lambda s: None, lambda s, _: s._predict(force_full_refine=force) is not None, started, {})

    def prompt_flags(fields):
        """include_interaction (required), run_prediction (default true), override_capability_checks."""
        try:
            return (validate.flag(fields, "include_interaction"), validate.flag(fields, "run_prediction", True),
                    validate.flag(fields, "override_capability_checks", False))
        except BadInput as exc:
            raise HTTPException(400, str(exc))

    def json_prompt_route(path, check, call):
        @app.post(path)
        async def route(request: Request):
            lease = lease_of(request)
            payload = await json_body(request)
            started = time.perf_counter()
            timing = {"received_at": time.time()}
            include, run, override = prompt_flags(payload)

            def invoke(session, arg):
                call(session, arg, include, run, override)
                return run
            return await run_in_threadpool(
                prompt, lease, lambda s: check(payload, s.original_image_shape[1:]), invoke, started, timing)
        return route

    json_prompt_route(P.PATH_ADD_POINT, validate.point,
                      lambda s, coords, inc, run, ovr: s.add_point_interaction(coords, inc, run, ovr))
    json_prompt_route(P.PATH_ADD_BBOX, lambda p, shape: validate.bbox(p, shape, supports_3d_box),
                      lambda s, box, inc, run, ovr: s.add_bbox_interaction(box, inc, run, ovr))

    def mask_prompt_route(path, kind):
        @app.post(path)
        async def route(request: Request):
            lease = lease_of(request)
            meta = meta_of(request)
            body = await request.body()
            started = time.perf_counter()
            received_at = time.time()

            def work():
                timing = {"received_at": received_at}
                t0 = time.perf_counter()
                mask = decode(body)
                timing["decode"] = (time.perf_counter() - t0) * 1e3
                include, run, override = prompt_flags(meta)
                method = "add_scribble_interaction" if kind == "scribble" else "add_lasso_interaction"

                def invoke(session, box):
                    getattr(session, method)(mask, include, run_prediction=run, override_capability_checks=override,
                                             interaction_bbox=box)
                    return run
                return prompt(lease, lambda s: validate.mask_prompt(mask, meta, s.original_image_shape[1:], kind),
                              invoke, started, timing)
            return await run_in_threadpool(work)
        return route

    mask_prompt_route(P.PATH_ADD_SCRIBBLE, "scribble")
    mask_prompt_route(P.PATH_ADD_LASSO, "lasso")

    @app.post(P.PATH_ADD_INITIAL_SEG)
    async def add_initial_seg(request: Request):
        lease = lease_of(request)
        meta = meta_of(request)
        body = await request.body()
        started = time.perf_counter()

        def work():
            seg = decode(body)
            try:
                run = validate.flag(meta, "run_prediction", False)
                override = validate.flag(meta, "override_capability_checks", False)
            except BadInput as exc:
                raise HTTPException(400, str(exc))

            def invoke(session, _):
                session.add_initial_seg_interaction(seg, run_prediction=run, override_capability_checks=override)
                return run
            return prompt(lease, lambda s: validate.initial_seg(seg, s.original_image_shape[1:]), invoke, started, {})
        return await run_in_threadpool(work)

    return app
