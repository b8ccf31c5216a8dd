"""Bad input gets a 4xx with a message saying what was wrong, and the session keeps working afterwards."""

import json

import numpy as np
import pytest
import requests

from conftest import our_server
from test_equivalence import make_image

from SlicerNNInteractiveLib import protocol as P
from SlicerNNInteractiveLib.client import RemoteSession
from SlicerNNInteractiveLib.errors import BadRequestError
from SlicerNNInteractiveLib.wire import pack_array


@pytest.fixture(scope="module")
def server(quiet_model, tmp_path_factory):
    with our_server(quiet_model, tmp_path_factory.mktemp("bad"), "--no-autozoom", "--max-sessions", "2") as (url, _):
        yield url


@pytest.fixture
def session(server):
    with RemoteSession(server) as s:
        yield s


def raw(session, path, body=b"", meta=None, json_body=None):
    headers = {P.LEASE_HEADER: session._lease_token}
    if meta is not None:
        headers[P.META_HEADER] = json.dumps(meta)
    if json_body is not None:
        body = json.dumps(json_body).encode()
        headers["Content-Type"] = "application/json"
    return requests.post(session.server_url + path, data=body, headers=headers)


def assert_still_works(session):
    image = make_image()
    session.set_image(image)
    buf = np.zeros(image.shape[1:], np.uint8)
    session.set_target_buffer(buf)
    assert session.add_point_interaction((10, 10, 10), include_interaction=True) is not None


def expect_400(call, *words):
    with pytest.raises(BadRequestError) as err:
        call()
    assert 400 <= err.value.status_code < 500
    for w in words:
        assert w in str(err.value), str(err.value)


def test_prompt_before_any_image(session):
    expect_400(lambda: session.add_point_interaction((1, 1, 1), True), "set_image")
    expect_400(lambda: session.set_target_buffer(np.zeros((4, 4, 4), np.uint8)), "set_image")
    assert_still_works(session)


def test_image_of_wrong_ndim_dtype_or_content(session):
    bad = pack_array(np.ones((8, 8, 8), np.int16))  # 3D: no channel axis
    r = raw(session, P.PATH_SET_IMAGE, bad, meta={})
    assert r.status_code == 400 and "4D" in r.json()["detail"]
    r = raw(session, P.PATH_SET_IMAGE, pack_array(np.ones((2, 8, 8, 8), np.int16)), meta={})
    assert r.status_code == 400 and "channel" in r.json()["detail"]
    expect_400(lambda: session.set_image(np.zeros((1, 8, 8, 8), np.int16)), "zero")
    expect_400(lambda: session.set_image(np.full((1, 8, 8, 8), np.nan, np.float32)), "NaN")
    # an object array never reaches the wire; a forged dtype name is refused by the decoder
    forged = bytearray(pack_array(np.ones((1, 4, 4, 4), np.int16)))
    forged[8:13] = b"objec"
    r = raw(session, P.PATH_SET_IMAGE, bytes(forged), meta={})
    assert r.status_code == 400 and "dtype" in r.json()["detail"]
    assert_still_works(session)


def test_target_buffer_not_matching_the_image(session):
    session.set_image(make_image())
    expect_400(lambda: session.set_target_buffer(np.zeros((4, 4, 4), np.uint8)), "does not match")
    expect_400(lambda: session.set_target_buffer(np.zeros((48, 56, 40), np.float32)), "dtype")
    r = raw(session, P.PATH_SET_TARGET_BUFFER, json_body={"shape": [48, 56], "dtype": "uint8"})
    assert r.status_code == 400
    assert_still_works(session)


def test_prompts_outside_the_image_3d_boxes_and_empty_masks(session):
    image = make_image()
    session.set_image(image)
    session.set_target_buffer(np.zeros(image.shape[1:], np.uint8))
    expect_400(lambda: session.add_point_interaction((100, 10, 10), True), "outside")
    expect_400(lambda: session.add_point_interaction((-3, 10, 10), True), "outside")
    expect_400(lambda: session.add_bbox_interaction([[100, 110], [0, 10], [5, 6]], True), "outside")
    expect_400(lambda: session.add_bbox_interaction([[10, 20], [10, 20], [10, 20]], True), "2D")
    expect_400(lambda: session.add_bbox_interaction([[10, 10], [10, 20], [10, 11]], True), "empty")
    empty = np.zeros(image.shape[1:], np.uint8)
    expect_400(lambda: session.add_scribble_interaction(empty, True), "empty")
    expect_400(lambda: session.add_lasso_interaction(empty, True), "empty")
    expect_400(lambda: session.add_lasso_interaction(np.ones((4, 4, 4), np.uint8), True), "does not match")
    expect_400(lambda: session.add_scribble_interaction(np.ones((2, 2, 1), np.uint8), True,
                                                        interaction_bbox=[[47, 49], [0, 2], [0, 1]]), "inside")
    expect_400(lambda: session.add_initial_seg_interaction(np.ones((4, 4, 4), np.uint8)), "does not match")
    r = raw(session, P.PATH_ADD_POINT, json_body={"coordinates": [1, 2], "include_interaction": True})
    assert r.status_code == 400
    r = raw(session, P.PATH_ADD_POINT, json_body={"coordinates": [1, 2, 3]})
    assert r.status_code == 400 and "include_interaction" in r.json()["detail"]
    r = raw(session, P.PATH_ADD_POINT, body=b"{not json")
    assert r.status_code == 400 and "JSON" in r.json()["detail"]
    assert_still_works(session)


def test_corrupted_or_truncated_packed_arrays(session):
    image = make_image()
    session.set_image(image)
    session.set_target_buffer(np.zeros(image.shape[1:], np.uint8))
    mask = np.zeros(image.shape[1:], np.uint8)
    mask[10:20, 10:20, 5] = 1
    good = pack_array(mask)
    meta = {"include_interaction": True, "run_prediction": True}
    corrupted = bytearray(good)
    corrupted[-40:] = b"\xff" * 40
    oversized = bytearray(good)
    oversized[13:21] = (10 ** 9).to_bytes(8, "little")  # first shape entry: a billion
    for body in (good[:-10], good[:20], b"garbage", bytes(corrupted), bytes(oversized), b""):
        r = raw(session, P.PATH_ADD_SCRIBBLE, body, meta=meta)
        assert r.status_code == 400, (body[:30], r.status_code, r.text)
        assert "packed array" in r.json()["detail"]
    r = raw(session, P.PATH_SET_IMAGE, pack_array(image)[:-100], meta={})
    assert r.status_code == 400
    r = raw(session, P.PATH_ADD_SCRIBBLE, good, meta=None)
    assert r.status_code == 400 and "include_interaction" in r.json()["detail"]
    r = requests.post(session.server_url + P.PATH_ADD_SCRIBBLE, data=good,
                      headers={P.LEASE_HEADER: session._lease_token, P.META_HEADER: "{bad json"})
    assert r.status_code == 400
    # After all that, the session still has its image and answers prompts.
    assert session.add_scribble_interaction(mask, True) is not None


def test_one_clients_bad_request_never_harms_another(server):
    with RemoteSession(server) as good, RemoteSession(server) as bad:
        image = make_image()
        good.set_image(image)
        buf = np.zeros(image.shape[1:], np.uint8)
        good.set_target_buffer(buf)
        good.add_point_interaction((20, 30, 18), True)
        expect_400(lambda: bad.add_point_interaction((1, 1, 1), True), "set_image")
        r = raw(bad, P.PATH_SET_IMAGE, b"junk", meta={})
        assert r.status_code == 400
        assert good.add_point_interaction((20, 30, 18), True) is not None


def test_unknown_lease_is_410_and_unknown_path_404(server):
    r = requests.post(server + P.PATH_ADD_POINT, json={"coordinates": [1, 2, 3], "include_interaction": True},
                      headers={P.LEASE_HEADER: "nope"})
    assert r.status_code == 410 and "claim" in r.json()["detail"]
    assert requests.get(server + "/no/such/path").status_code == 404


def test_json_fields_of_the_wrong_type_are_400_on_every_json_route(session):
    image = make_image()
    session.set_image(image)
    session.set_target_buffer(np.zeros(image.shape[1:], np.uint8))
    for path, body in ((P.PATH_PREDICT, {"force_full_refine": "yes"}), (P.PATH_SET_DO_AUTOZOOM, {"do_autozoom": 1}),
                       (P.PATH_ADD_POINT, {"coordinates": [1, 2, 3], "include_interaction": "true"}),
                       (P.PATH_ADD_BBOX, {"bbox_coords": "box", "include_interaction": True}),
                       (P.PATH_SET_TARGET_BUFFER, {"shape": "48x56x40", "dtype": "uint8"}),
                       (P.PATH_PREDICT, [1, 2])):
        r = raw(session, path, json_body=body)
        assert r.status_code == 400, (path, body, r.status_code, r.text)
        assert r.headers["X-Request-ID"]  # every answer carries its request id
    assert_still_works(session)
