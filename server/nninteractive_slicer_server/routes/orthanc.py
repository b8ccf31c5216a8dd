"""``POST /infer_orthanc`` (the established nnU-Net server's): run models on series of the operator's Orthanc and
store the DICOM SEGs back in it (``auto/orthanc.py``).

The body is ``/infer``'s with ``series_ids`` (Orthanc series identifiers; ``from:`` entries kept) for ``study_path``
and ``series_folders``. The series are fetched into a folder of this run (one job of the job store, removed when the
answer is made, as established), run as an ``/infer`` request (``is_dicom`` is implied), and every DICOM SEG made is
stored in Orthanc. The answer is ``/infer``'s with ``orthanc_upload`` (``uploaded_instance_count``, ``responses``:
the Orthanc series each SEG was filed under); its paths name the outputs as a ``/download`` zip would, no server
path; ``request`` echoes ``series_ids``. Masks (``crop_from``, ``intersect_with``) are server paths, confined to the
``--infer-root`` directories as for ``/infer``.
"""

import time

from fastapi import APIRouter, Depends, Request, Response
from starlette.concurrency import run_in_threadpool

from SlicerNNInteractiveLib import protocol as P

from ..auto.orthanc import Orthanc, series_lists
from ..auto.references import is_reference
from ..auto.request import InferenceRequestOrthanc
from ..deps import read_json, require_key
from ..errors import NotFound
from ..validate import BadInput
from .auto import CLIENT_GONE, answer_of, auto_service, established, established_failure, refuse_when_draining

router = APIRouter(dependencies=[Depends(require_key)])

NO_ORTHANC = ("/infer_orthanc is off on this server: its operator names no Orthanc (start it with --orthanc-url URL "
              "or ORTHANC_URL)")


@router.post(P.PATH_INFER_ORTHANC)
async def infer_orthanc(request: Request, user=Depends(require_key)):
    svc = auto_service(request)
    with established_failure() as failing:
        refuse_when_draining(request)
        fields = failing.parse(await read_json(request), InferenceRequestOrthanc)
        orthanc = svc.orthanc
        if orthanc is None:
            raise NotFound(NO_ORTHANC)
        if fields.get("is_dicom") is False:
            raise BadInput("is_dicom: the series of Orthanc are DICOM series; leave is_dicom out or set it true")
        stages = series_lists(fields["series_ids"])
        wanted = list(dict.fromkeys(s for stage in stages for s in stage if not is_reference(s)))
        for sid in wanted:
            Orthanc.check_id(sid)  # 400 before anything is fetched
        svc.check_models(fields["nnunet_id"])
        started = time.perf_counter()
        job = await run_in_threadpool(svc.submit_orthanc, user, fields, orthanc, stages, wanted)
        result = await answer_of(request, svc, job)  # a failed or cancelled synchronous job leaves nothing behind
        if result is None:
            return Response(status_code=CLIENT_GONE)
        await run_in_threadpool(svc.jobs.discard, job)  # its SEGs are in Orthanc now
        return established(result, fields, started)
