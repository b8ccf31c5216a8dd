"""With the tiny trained model, prompts segment the right blob: through our server, as a user would."""

import numpy as np
import pytest

from conftest import our_server
from phantoms import blob_mask, box_2d, dice, interior_voxel, lasso_2d, make_phantom, scribble_2d

from SlicerNNInteractiveLib.client import RemoteSession

SEEDS = (101, 202)  # phantoms the model never saw in training


@pytest.fixture(scope="module")
def server(blob_model, tmp_path_factory):
    with our_server(blob_model, tmp_path_factory.mktemp("trained")) as (url, _):  # autozoom on, as shipped
        yield url


def open_session(url, phantom):
    s = RemoteSession(url)
    s.set_image(phantom.image[None])
    buf = np.zeros(phantom.image.shape, np.uint8)
    s.set_target_buffer(buf)
    return s, buf


@pytest.mark.parametrize("seed", SEEDS)
def test_click_in_a_blob_segments_that_blob_and_a_negative_click_removes_it(server, seed):
    phantom = make_phantom(seed=seed)
    for k in range(1, phantom.n_blobs + 1):
        s, buf = open_session(server, phantom)
        with s:
            inside = interior_voxel(phantom.labels, k)
            s.add_point_interaction(inside, include_interaction=True)
            truth = blob_mask(phantom.labels, k)
            assert dice(buf, truth) >= 0.8, "blob %d of phantom %d: Dice %.3f" % (k, seed, dice(buf, truth))
            s.add_point_interaction(inside, include_interaction=False)
            assert (buf & truth).sum() <= 0.1 * truth.sum(), "negative click left %d of %d voxels" % (
                int((buf & truth).sum()), int(truth.sum()))


@pytest.mark.parametrize("prompt", ["box", "scribble", "lasso"])
def test_box_scribble_and_lasso_segment_the_blob(server, prompt):
    phantom = make_phantom(seed=SEEDS[0])
    scores = []
    for k in range(1, phantom.n_blobs + 1):
        s, buf = open_session(server, phantom)
        with s:
            if prompt == "box":
                s.add_bbox_interaction(box_2d(phantom.labels, k), include_interaction=True)
            elif prompt == "scribble":
                s.add_scribble_interaction(scribble_2d(phantom.labels, k), include_interaction=True)
            else:
                s.add_lasso_interaction(lasso_2d(phantom.labels, k), include_interaction=True)
            scores.append(dice(buf, blob_mask(phantom.labels, k)))
    assert np.mean(scores) >= 0.8, scores
