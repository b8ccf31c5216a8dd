"""Remote results equal in-process ``nnInteractiveInferenceSession`` results voxel for voxel."""

import numpy as np
import pytest
import torch

from conftest import TORCH_THREADS, our_server

from SlicerNNInteractiveLib.client import RemoteSession


def make_image(shape=(48, 56, 40), seed=1):
    rng = np.random.RandomState(seed)
    img = rng.normal(100, 20, shape)
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    img += 300 * (((zz - 20) ** 2 + (yy - 30) ** 2 + (xx - 18) ** 2) < 81)
    return img.astype(np.int16)[None]


def scribble(shape, box):
    m = np.zeros(shape, np.uint8)
    m[box] = 1
    return m


# (name, call) pairs run identically on both sessions; each returns nothing, results are compared in the buffer.
def steps(shape):
    sp = shape[1:]
    lasso = np.zeros(sp, np.uint8)
    lasso[10:30, 12:40, 20] = 1
    initial = np.zeros(sp, np.uint8)
    initial[15:25, 15:25, 10:20] = 1
    return [
        ("point+", lambda s: s.add_point_interaction((20, 30, 18), include_interaction=True)),
        ("point-", lambda s: s.add_point_interaction((22, 28, 18), include_interaction=False)),
        ("bbox+", lambda s: s.add_bbox_interaction([[10, 30], [20, 40], [18, 19]], include_interaction=True)),
        ("bbox-", lambda s: s.add_bbox_interaction([[5, 6], [10, 30], [10, 30]], include_interaction=False)),
        ("scribble+", lambda s: s.add_scribble_interaction(
            scribble(sp, np.s_[18:22, 25:35, 18]), include_interaction=True)),
        ("scribble-", lambda s: s.add_scribble_interaction(
            scribble(sp, np.s_[30, 10:40, 5:30]), include_interaction=False)),
        ("lasso+", lambda s: s.add_lasso_interaction(lasso, include_interaction=True)),
        ("lasso-(bbox)", lambda s: s.add_lasso_interaction(
            np.ones((5, 6, 1), np.uint8), include_interaction=False, interaction_bbox=[[2, 7], [3, 9], [4, 5]])),
        ("undo", lambda s: s.undo()),
        ("no-predict", lambda s: s.add_point_interaction((10, 10, 10), include_interaction=True,
                                                          run_prediction=False)),
        ("predict", lambda s: s._predict()),
        ("initial", lambda s: s.add_initial_seg_interaction(initial, run_prediction=False)),
        ("point-after-initial", lambda s: s.add_point_interaction((20, 20, 15), include_interaction=False)),
        ("initial+predict", lambda s: s.add_initial_seg_interaction(initial, run_prediction=True)),
        ("undo-initial", lambda s: s.undo()),
        ("reset", lambda s: s.reset_interactions()),
        ("point-after-reset", lambda s: s.add_point_interaction((20, 30, 18), include_interaction=True)),
    ]


@pytest.fixture(scope="module")
def server(speckle_model, tmp_path_factory):
    with our_server(speckle_model, tmp_path_factory.mktemp("eq"), "--no-autozoom") as (url, _):
        yield url


def local_session(model_dir, autozoom=False):
    from nnInteractive.inference.inference_session import nnInteractiveInferenceSession

    s = nnInteractiveInferenceSession(device=torch.device("cpu"), use_torch_compile=False, verbose=False,
                                      torch_n_threads=int(TORCH_THREADS), do_autozoom=autozoom)
    s.initialize_from_trained_model_folder(model_dir)
    return s


def test_remote_equals_in_process(server, speckle_model):
    image = make_image()
    local = local_session(speckle_model)
    local_buf = np.zeros(image.shape[1:], np.uint8)
    local.set_image(image)
    local.set_target_buffer(local_buf)
    with RemoteSession(server) as remote:
        remote_buf = np.zeros(image.shape[1:], np.uint8)
        remote.set_image(image)
        remote.set_target_buffer(remote_buf)
        nonempty = 0
        for name, call in steps(image.shape):
            call(local)
            call(remote)
            assert np.array_equal(local_buf, remote_buf), "results differ after step %s (%d voxels)" % (
                name, int((local_buf != remote_buf).sum()))
            nonempty += bool(local_buf.any())
        # The oracle only means something if the model predicted something.
        assert nonempty >= len(steps(image.shape)) // 2
