"""routes.lean.LeanRoute, the protocol's route class: the endpoint is awaited with the request alone (FastAPI's
parameter parsing and dependency solving skipped), so an endpoint declaring anything else is refused when the route
is made, never served with that declaration silently ignored. Matching, 405 and the exception handlers stay
FastAPI's (the protocol's own behaviour is tested against the real server everywhere else)."""

import pytest
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse
from fastapi.testclient import TestClient

from nninteractive_slicer_server.routes.lean import LeanRoute


async def needs_something(request: Request):
    return "x"


def test_an_endpoint_of_a_lean_route_takes_the_request_alone():
    router = APIRouter(route_class=LeanRoute)
    with pytest.raises(TypeError, match="takes the Request alone.*n"):
        @router.get("/query")
        async def query(request: Request, n: int):
            return {}
    with pytest.raises(TypeError, match="takes the Request alone.*needs_something"):
        @router.get("/dependency", dependencies=[Depends(needs_something)])
        async def dependency(request: Request):
            return {}
    with pytest.raises(TypeError, match="no Request"):
        @router.get("/nothing")
        async def nothing():
            return {}

    @router.post("/json")
    async def json_answer(request: Request):
        return {"path": request.url.path, "body": (await request.body()).decode()}

    @router.get("/response")
    async def response(request: Request):
        return PlainTextResponse("as is", headers={"X-Kept": "1"})

    @router.get("/refused")
    async def refused(request: Request):
        raise ValueError("bad")

    app = FastAPI()
    app.include_router(router)
    app.add_exception_handler(ValueError, lambda request, exc: PlainTextResponse(str(exc), status_code=400))
    client = TestClient(app)
    r = client.post("/json", content=b"hello")
    assert r.status_code == 200 and r.json() == {"path": "/json", "body": "hello"}
    r = client.get("/response")
    assert r.text == "as is" and r.headers["x-kept"] == "1"
    assert client.get("/json").status_code == 405
    r = client.get("/refused")
    assert r.status_code == 400 and r.text == "bad"
    assert set(app.openapi()["paths"]) == {"/json", "/response", "/refused"}
