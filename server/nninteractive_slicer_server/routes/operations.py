"""Operations: what a load balancer, an orchestrator or an operator asks. Never waits on a session.

``/healthz`` needs no key (and answers 503 while the server drains, so a balancer sends no new users; a server that
is merely full stays 200, so that a balancer keeps sending it the sessions it holds: its free capacity is what the
agent-check of ``capacity.py`` reports);
``/metrics`` (Prometheus) needs an operator's key or a metrics key (``deps.require_metrics_reader``).
``HEAD /healthz`` answers as GET does, without a body (what some balancers and uptime checks send).
"""

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from SlicerNNInteractiveLib import protocol as P

from ..deps import require_metrics_reader, server

router = APIRouter()


@router.get(P.PATH_HEALTHZ, operation_id="healthz")
@router.head(P.PATH_HEALTHZ, operation_id="healthz_head")  # one id per method: OpenAPI wants them unique
async def healthz(request: Request):
    if getattr(server(request), "draining", False):
        return JSONResponse({"ok": False, "draining": True}, status_code=503, headers={"Retry-After": "10"})
    return {"ok": True}


@router.get(P.PATH_METRICS, dependencies=[Depends(require_metrics_reader)])
async def metrics(request: Request):
    body, content_type = server(request).metrics.exposition()
    return Response(body, media_type=content_type)
