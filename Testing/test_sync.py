"""The sync layer sends the image once for a series of prompts, again after it changed, and the segment after it
was edited outside the prompts; it recovers when the server forgot the session."""

import numpy as np
import pytest
import requests

from conftest import our_server
from test_equivalence import make_image

from SlicerNNInteractiveLib.client import RemoteSession
from SlicerNNInteractiveLib.sync import SyncedSession


@pytest.fixture(scope="module")
def server(speckle_model, tmp_path_factory):
    with our_server(speckle_model, tmp_path_factory.mktemp("sync"), "--no-autozoom") as (url, _):
        yield url


@pytest.fixture
def sync(server):
    s = SyncedSession(lambda: RemoteSession(server))
    yield s
    s.close()


def point(i):
    return {"coordinates": (20 + i, 30, 18)}


def test_image_uploaded_once_for_a_series_of_prompts(sync):
    image = make_image()[0]
    segment = np.zeros(image.shape, np.uint8)
    for i in range(4):
        sync.prompt_and_apply("point", point(i), image, segment)
    assert sync.uploads == {"image": 1, "segment": 1}
    assert segment.any()


def test_image_uploaded_again_after_it_changed(sync):
    image = make_image()[0]
    segment = np.zeros(image.shape, np.uint8)
    sync.prompt_and_apply("point", point(0), image, segment)
    image[5, 5, 5] += 1  # one voxel edited in place
    sync.prompt_and_apply("point", point(1), image, segment)
    assert sync.uploads["image"] == 2
    # with caller-supplied versions nothing is checksummed: same version, no upload
    r = sync.prompt("point", point(2), image, segment, image_key="vol", image_version=7, segment_key="s",
                    segment_version=1)
    sync.apply(r, segment)
    sync.segment_written("s", 2)
    sync.prompt("point", point(3), image, segment, image_key="vol", image_version=7, segment_key="s", segment_version=2)
    assert sync.uploads["image"] == 3


def test_segment_uploaded_after_an_edit_outside_the_prompts_and_on_another_segment(sync):
    image = make_image()[0]
    segment = np.zeros(image.shape, np.uint8)
    sync.prompt_and_apply("point", point(0), image, segment)
    sync.prompt_and_apply("point", point(1), image, segment)
    assert sync.uploads["segment"] == 1
    segment[0:4, 0:4, 0:4] = 1  # a hand edit with another tool
    sync.prompt_and_apply("point", point(2), image, segment)
    assert sync.uploads["segment"] == 2
    other = np.zeros(image.shape, np.uint8)  # another segment selected
    sync.prompt_and_apply("point", point(3), image, other)
    assert sync.uploads == {"image": 1, "segment": 3}


def test_result_written_in_place_only_in_the_changed_region(sync):
    image = make_image()[0]
    segment = np.zeros(image.shape, np.uint8)
    written = []

    def write(seg, slices, region):
        written.append((slices, region.shape))
        seg[slices] = region

    r = sync.prompt_and_apply("point", point(0), image, segment, write=write)
    assert written == [(r.slices, r.region.shape)]
    outside = np.ones(image.shape, bool)
    outside[r.slices] = False
    assert not segment[outside].any()
    for key in ("detect_ms", "exchange_ms", "server_total", "decode_ms", "apply_ms"):
        assert key in r.timings


def test_recovers_after_the_server_forgot_the_session(sync, server):
    image = make_image()[0]
    segment = np.zeros(image.shape, np.uint8)
    sync.prompt_and_apply("point", point(0), image, segment)
    before = segment.copy()
    requests.post(server + "/release", headers={"X-Lease-Token": sync.session._lease_token})
    r = sync.prompt_and_apply("point", point(1), image, segment)
    assert r.bbox is not None
    assert sync.uploads == {"image": 2, "segment": 2}  # a new session got the image and the current segment again
    assert segment.any() and before.any()


def test_an_undo_the_server_cannot_do_makes_the_next_prompt_send_the_segment(sync):
    image = make_image()[0]
    segment = np.zeros(image.shape, np.uint8)
    sync.prompt_and_apply("point", point(0), image, segment)
    sync.prompt_and_apply("point", point(1), image, segment)
    first = sync.undo()
    assert first.ran_prediction  # the server keeps one level of undo
    sync.apply(first, segment)
    sync.segment_written(None, segment=segment)
    assert not sync.undo().ran_prediction
    uploads = sync.uploads["segment"]
    sync.prompt_and_apply("point", point(2), image, segment)
    assert sync.uploads["segment"] == uploads + 1
