"""Both directions of compatibility with nnInteractive 2.6's own remote implementation:
the official client (unchanged) drives our server, and our client drives the official server, through every
public call; masks must equal the in-process session's."""

import warnings

import numpy as np
import pytest

from conftest import official_server, our_server
from test_equivalence import local_session, make_image, steps

from SlicerNNInteractiveLib import wire
from SlicerNNInteractiveLib.client import RemoteSession
from SlicerNNInteractiveLib.errors import SessionExpiredError


@pytest.fixture(scope="module")
def servers(speckle_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cross")
    with our_server(speckle_model, tmp, "--no-autozoom") as (ours, _), \
            official_server(speckle_model, tmp, "--no-autozoom", "--max-sessions", "1") as (official, _):
        yield {"ours": ours, "official": official}


@pytest.fixture(scope="module")
def reference(speckle_model):
    """Target buffer after each step, in process."""
    image = make_image()
    s = local_session(speckle_model)
    buf = np.zeros(image.shape[1:], np.uint8)
    s.set_image(image)
    s.set_target_buffer(buf)
    out = []
    for name, call in steps(image.shape):
        call(s)
        out.append((name, buf.copy()))
    return out


def official_client(url):
    from nnInteractive.inference.remote import nnInteractiveRemoteInferenceSession

    return nnInteractiveRemoteInferenceSession(url)


def run_all_calls(session, reference):
    """Every public call of the remote session API, with results checked against the in-process reference."""
    image = make_image()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        session.initialize_from_trained_model_folder("/unused")  # a documented no-op on remote sessions
    assert session.ping() is True
    assert session.supported_interactions["points"] is True
    assert session.preferred_scribble_thickness
    assert session.license == "Apache-2.0"
    assert session.supports_undo is True
    session.set_do_autozoom(False)
    assert session.do_autozoom is False
    session.set_image(image)
    assert tuple(session.original_image_shape) == image.shape
    buf = np.zeros(image.shape[1:], np.uint8)
    session.set_target_buffer(buf)
    for (name, call), (ref_name, expected) in zip(steps(image.shape), reference):
        assert name == ref_name
        call(session)
        assert np.array_equal(buf, expected), "step %s differs by %d voxels" % (name, int((buf != expected).sum()))
    remaining = session.heartbeat()
    assert 0 < remaining <= session.idle_timeout_seconds
    status = session.lease_status()
    assert set(status) >= {"remaining_seconds", "idle_timeout_seconds"}


def test_official_client_drives_our_server(servers, reference):
    with official_client(servers["ours"]) as s:
        run_all_calls(s, reference)
    # close() released the lease: a new client gets the only slot at once.
    with official_client(servers["ours"]) as s:
        assert s.ping()


def test_our_client_drives_official_server(servers, reference):
    with RemoteSession(servers["official"]) as s:
        run_all_calls(s, reference)
    with RemoteSession(servers["official"]) as s:
        assert s.ping()


def test_official_client_sees_expired_lease_on_our_server(servers):
    from nnInteractive.inference.remote import SessionExpiredError as OfficialExpired

    import requests

    s = official_client(servers["ours"])

    requests.post(servers["ours"] + "/release", headers={"X-Lease-Token": s._lease_token})
    with pytest.raises(OfficialExpired):
        s.heartbeat()
    s.close()


def test_our_client_sees_expired_lease_on_official_server(servers):
    import requests

    s = RemoteSession(servers["official"], heartbeat=False)
    requests.post(servers["official"] + "/release", headers={"X-Lease-Token": s._lease_token})
    with pytest.raises(SessionExpiredError):
        s.lease_status()
    s.close()


def big_image():
    """Large enough (6.6 MB) for our client to stream it in chunks."""
    rng = np.random.RandomState(3)
    return (rng.normal(100, 30, (1, 160, 160, 130)) + 200).astype(np.int16)


@pytest.mark.parametrize("side", ["ours", "official"])
def test_streamed_image_upload_reaches_both_servers_intact(servers, side):
    image = big_image()
    with RemoteSession(servers[side]) as s:
        s.set_image(image)
        assert s.last_timing["bytes_sent"] > 0
        buf = np.zeros(image.shape[1:], np.uint8)
        s.set_target_buffer(buf)
        s.add_point_interaction((80, 80, 60), include_interaction=True)
        streamed = buf.copy()
        # the same image stored instead of compressed (or the other way round) gives the same answer
        s.image_codec = wire.IMAGE_CODEC if s.image_codec == wire.LOOPBACK_IMAGE_CODEC else wire.LOOPBACK_IMAGE_CODEC
        s.set_image(image)
        s.set_target_buffer(buf)
        buf[:] = 0
        s.add_point_interaction((80, 80, 60), include_interaction=True)
        assert np.array_equal(streamed, buf)
        # the same image sent in one piece gives the same answer
        s._stream_array = s._post_array
        s.set_image(image)
        s.set_target_buffer(buf)
        buf[:] = 0
        s.add_point_interaction((80, 80, 60), include_interaction=True)
        assert np.array_equal(streamed, buf) and buf.any()


@pytest.mark.parametrize("side", ["ours", "official"])
def test_images_are_stored_uncompressed_only_for_our_server_on_this_computer(servers, side):
    # both are on a loopback URL; only ours reports this computer's machine id (an SSH tunnel is loopback too)
    with RemoteSession(servers[side]) as s:
        assert s.image_codec == (wire.LOOPBACK_IMAGE_CODEC if side == "ours" else wire.IMAGE_CODEC)
        image = big_image()
        s.set_image(image)
        if side == "ours":
            assert s.last_timing["bytes_sent"] > image.nbytes
        else:
            assert s.last_timing["bytes_sent"] < 0.8 * image.nbytes


def test_streamed_upload_on_an_expired_lease_reads_as_expired(servers):
    import requests

    s = RemoteSession(servers["ours"], heartbeat=False)
    requests.post(servers["ours"] + "/release", headers={"X-Lease-Token": s._lease_token})
    with pytest.raises(SessionExpiredError):
        s.set_image(big_image())
    s.close()


@pytest.mark.parametrize("side", ["ours", "official"])
def test_prompts_collected_then_one_run_through_the_modules_controller(servers, speckle_model, side):
    """The module's "Run automatically" off (napari's Manual control): prompts are only added (run_prediction=False:
    the segment does not change), then one Run (/predict) gives the in-process session's mask for the same prompts,
    on our server and on the official one."""
    from SlicerNNInteractiveLib.controller import Controller
    from SlicerNNInteractiveLib.scene import ArrayScene
    from test_equivalence import local_session

    image = make_image()
    prompts = [("point", {"coordinates": (20, 30, 18)}, True), ("point", {"coordinates": (22, 28, 18)}, False),
               ("bbox", {"bbox": [[10, 30], [20, 40], [18, 19]]}, True)]
    local = local_session(speckle_model)
    expected = np.zeros(image.shape[1:], np.uint8)
    local.set_image(image)
    local.set_target_buffer(expected)
    local.add_point_interaction((20, 30, 18), include_interaction=True, run_prediction=False)
    local.add_point_interaction((22, 28, 18), include_interaction=False, run_prediction=False)
    local.add_bbox_interaction([[10, 30], [20, 40], [18, 19]], include_interaction=True, run_prediction=False)
    local._predict()
    assert expected.any()

    errors, results = [], []
    scene = ArrayScene(image[0])
    controller = Controller(scene, lambda: RemoteSession(servers[side]),
                            on_error=lambda exc, job, dropped: errors.append(exc),
                            on_result=lambda job, result, timings: results.append((job.kind, job.run)))
    controller.auto_run = False
    try:
        for kind, args, positive in prompts:
            controller.submit(kind, args, positive=positive)
        controller.wait(120)
        key = scene.selected_segment()
        assert errors == [] and not scene.read_segment(key).any()  # added, not run
        controller.predict()
        controller.wait(120)
        assert errors == [] and results == [("point", False), ("point", False), ("bbox", False), ("predict", True)]
        got = scene.read_segment(key)
        assert np.array_equal(got, expected), "%d voxels differ from in-process" % int((got != expected).sum())
    finally:
        controller.close()
