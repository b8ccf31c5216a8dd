"""Our additions under /x/ (official clients never call them)."""

from fastapi import APIRouter, Depends, Request

from SlicerNNInteractiveLib import protocol as P

from .. import __version__
from ..capacity import free_capacity
from ..deps import lookup, require_key, role, server
from ..identities import OPERATOR
from ..limits import rss_bytes

router = APIRouter(dependencies=[Depends(require_key)])


@router.get(P.PATH_SERVER_INFO)
async def server_info(request: Request, user=Depends(require_key)):
    """What a client needs (version, model, license, limits of a request, capacity, who it is); an operator also
    gets the server's state (sessions, memory, compile). Never a server path: the model is named, not located."""
    srv = server(request)
    engine, caps = srv.engine, srv.caps
    info = {"server": "nninteractive-slicer-server", "server_version": __version__,
            "version": caps["inference_session_version"], "model": srv.model, "license": engine.license,
            "device": str(engine.device), "max_image_voxels": srv.limits.max_image_voxels,
            "max_body_bytes": srv.limits.max_body_bytes, "machine": P.machine_id(), "user": user,
            "role": role(request), "capacity": free_capacity(srv)}
    if role(request) == OPERATOR:
        info.update({"torch_compile": engine.use_torch_compile, "sessions": srv.registry.count(),
                     "max_sessions": srv.registry.max_sessions, "rss_bytes": rss_bytes(),
                     "memory_budget": srv.budget.total, "memory_reserved": srv.budget.used,
                     "memory_share_per_user": srv.budget.user_share})
    return info


@router.get(P.PATH_QUEUE)
async def queue(request: Request):
    """Where this lease's prediction stands in the GPU queue, asked beside it (on another connection) while a prompt
    waits: ``{"ahead": N, "expected_wait_seconds": S or null, "running": bool, "waiting": bool, "queued": M}``. With
    no prediction of this lease queued, what one sent now would face. Never waits for the lease's turn."""
    return server(request).engine.queue.position(lookup(request))
