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

import os

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from SlicerNNInteractiveLib import protocol as P

from ..auto.jobs import PathGuard
from ..auto.orthanc import Orthanc, series_lists
from ..auto.references import is_reference
from ..auto.request import InferenceRequestOrthanc, parse_request
from ..deps import read_json, require_key, server
from ..errors import NotFound
from ..validate import BadInput
from .auto import auto_service, check_models, established_failure, in_download, run_study

router = APIRouter(dependencies=[Depends(require_key)])

NO_ORTHANC = ("/infer_orthanc is off on this server: its operator names no Orthanc (start it with --orthanc-url URL "
              "or ORTHANC_URL)")


@router.post(P.PATH_INFER_ORTHANC)
async def infer_orthanc(request: Request, user=Depends(require_key)):
    svc = auto_service(request)
    limits = server(request).limits
    with established_failure() as failing:
        payload = await read_json(request)
        failing.fields = payload
        fields = parse_request(payload, InferenceRequestOrthanc)
        failing.fields = fields
        orthanc = svc.orthanc
        if orthanc is None:
            raise NotFound(NO_ORTHANC)
        if fields.get("is_dicom") is False:
            raise BadInput("is_dicom: the series of Orthanc are DICOM series; leave is_dicom out or set it true")
        stages = series_lists(fields["series_ids"])
        wanted = list(dict.fromkeys(s for stage in stages for s in stage if not is_reference(s)))
        for sid in wanted:
            Orthanc.check_id(sid)  # 400 before anything is fetched
        check_models(svc.registry, fields["nnunet_id"])
        job = await run_in_threadpool(svc.jobs.create, user)
    try:
        with established_failure(fields):
            local = {}
            for sid in wanted:
                folder = await run_in_threadpool(orthanc.download_series, sid, os.path.join(job.inputs, sid), limits)
                local[sid] = os.path.relpath(folder, job.inputs)
            run = {k: v for k, v in fields.items() if k not in ("series_ids", "tmp_dir")}
            run.update(study_path=job.inputs, output_dir=job.output, is_dicom=True,
                       series_folders=[[s if is_reference(s) else local[s] for s in stage] for stage in stages])
            guard = PathGuard([job.folder] + list(svc.guard.roots), "this run's folder or the --infer-root directories")
            result = await run_study(request, svc, run, guard.resolver(base=job.inputs))
            stored = []
            for path in result.get("dicom_segmentation") or []:
                if path:
                    stored.append(await run_in_threadpool(orthanc.upload, path))
            result = in_download(result, job)
            echo = {k: v for k, v in (result.get("request") or {}).items() if k != "series_folders"}
            result["request"] = dict(echo, series_ids=fields["series_ids"])
            result["orthanc_upload"] = {"uploaded_instance_count": len(stored), "responses": stored}
    finally:
        await run_in_threadpool(svc.jobs.discard, job)
    return result
