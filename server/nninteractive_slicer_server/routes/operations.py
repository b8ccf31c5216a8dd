"""Operations: what a load balancer, an orchestrator or an operator asks. Never needs a key or a lease, never waits
on a session."""

from fastapi import APIRouter

from SlicerNNInteractiveLib import protocol as P

router = APIRouter()


@router.get(P.PATH_HEALTHZ)
async def healthz():
    return {"ok": True}
