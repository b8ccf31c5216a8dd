"""Automatic segmentation then refinement, through the module's controller on real Slicer nodes: our server runs
the tiny trained automatic model (Testing/models/auto_blobs: bright and dark blobs) on the image the session
already holds, each label becomes a named, coloured segment written under the Segment Editor's masking rules,
and a prompt then refines one of them (selecting it makes it the starting mask). A 100-label model's result is one
new layer and one undo state, written a bounded step per poll while prompts wait behind it; Cancel stops the run on
the server."""

import shutil
import threading

import numpy as np
import pytest

import tiny_nnunet
from conftest import REPO, our_server
from mrml import MrmlScene
from phantoms import blob_mask, dice, interior_voxel, make_phantom

from SlicerNNInteractiveLib import masking as M
from SlicerNNInteractiveLib.client import RemoteSession
from SlicerNNInteractiveLib.controller import Controller
from SlicerNNInteractiveLib.errors import BadRequestError

DARK = (2,)  # a blob darker than the background: label 2 of the model
MANY = ["organ_%03d" % n for n in range(1, 101)]  # the random many-label model's labels


@pytest.fixture(scope="module")
def server(blob_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auto-refine")
    models = tmp / "models"
    shutil.copytree(REPO + "/Testing/models/auto_blobs", str(models / "auto_blobs"))
    tiny_nnunet.make_tiny_nnunet(str(models), labels=MANY, dataset_name="Dataset990_Many")
    spec = tmp / "model-serve-spec.yaml"
    spec.write_text("model_folder: %s\nmodels:\n  - id: auto_blobs\n    rel_path: auto_blobs\n"
                    "    name: Blobs (tiny trained model)\n    aliases: [blobs]\n"
                    "    default_args: {use_folds: [0], tta: false}\n"
                    "  - id: many\n    rel_path: Dataset990_Many\n    name: 100 organs (random weights)\n"
                    "    default_args: {use_folds: [0], tta: false}\n" % models)
    with our_server(blob_model, tmp, "--max-sessions", "4", "--model-serve-spec", str(spec)) as (url, _):
        yield url


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(seed=103, dark=DARK)


class Setup(object):
    def __init__(self, server, phantom, segments=None):
        self.scene = MrmlScene(phantom.image, segments=segments)
        self.errors, self.results = [], []
        self.controller = Controller(self.scene, lambda: RemoteSession(server),
                                     on_error=lambda exc, job, dropped: self.errors.append(exc),
                                     on_result=lambda job, result, timings: self.results.append((job, timings)))

    def close(self):
        self.controller.close()

    def named(self):
        segmentation = self.scene.segmentation_node.GetSegmentation()
        return {segmentation.GetSegment(k).GetName(): k for k in self.scene.segment_keys()}


@pytest.fixture
def setup(server, phantom):
    s = Setup(server, phantom)
    yield s
    s.close()


def truth(phantom, dark):
    return np.any([blob_mask(phantom.labels, k) for k in range(1, phantom.n_blobs + 1) if (k in DARK) == dark], 0)


def test_each_label_becomes_a_named_segment_then_a_prompt_refines_one(setup, phantom):
    c = setup.controller
    c.auto_segment("blobs")
    c.wait()
    assert setup.errors == []
    named = setup.named()
    assert set(named) == {"bright_blob", "dark_blob"}
    bright = setup.scene.read_segment(named["bright_blob"]).astype(bool)
    dark = setup.scene.read_segment(named["dark_blob"]).astype(bool)
    assert dice(bright, truth(phantom, False)) > 0.9 and dice(dark, truth(phantom, True)) > 0.9
    segment = setup.scene.segmentation_node.GetSegmentation().GetSegment(named["dark_blob"])
    assert segment.GetColor() != setup.scene.segmentation_node.GetSegmentation().GetSegment(
        named["bright_blob"]).GetColor()
    timings = setup.results[-1][1]
    assert timings["kind"] == "auto" and "server_predict_ms" in timings and len(timings["segments"]) == 2
    assert c.sync.uploads["image"] == 1
    # Refine the dark blob: selecting its segment makes it the starting mask; a negative click inside removes it,
    # and the bright blobs' segment is left alone.
    setup.scene.select_segment(named["dark_blob"])
    c.set_positive(False)
    c.submit("point", {"coordinates": interior_voxel(phantom.labels, 2)})
    c.wait()
    assert setup.errors == []
    assert c.sync.uploads == {"image": 1, "segment": 1}  # the automatic result went as the starting mask
    refined = setup.scene.read_segment(named["dark_blob"]).astype(bool)
    assert refined[blob_mask(phantom.labels, 2)].mean() < 0.2 < dark[blob_mask(phantom.labels, 2)].mean()
    assert np.array_equal(setup.scene.read_segment(named["bright_blob"]).astype(bool), bright)


def test_the_masking_rules_hold_and_a_cancelled_run_writes_nothing(server, phantom):
    # A segment of the user's over blob 1; editable area "outside all segments": the automatic result is written
    # around it, as any Segment Editor effect would, and the user's segment keeps every voxel.
    mine = blob_mask(phantom.labels, 1)
    s = Setup(server, phantom, segments={"mine": mine})
    try:
        s.scene.settings = M.MaskingSettings(mask_mode=M.EDIT_OUTSIDE_ALL, overwrite_mode=M.OVERWRITE_NONE)
        s.controller.auto_segment("auto_blobs")
        s.controller.wait()
        assert s.errors == []
        bright = s.scene.read_segment(s.named()["bright_blob"]).astype(bool)
        assert bright.any() and not (bright & mine).any()
        assert np.array_equal(s.scene.read_segment("mine").astype(bool), mine)
        before = sorted(s.scene.segment_keys())
        s.controller.auto_segment("auto_blobs")
        assert s.controller.cancel_auto() == 1
        s.controller.wait()
        assert sorted(s.scene.segment_keys()) == before and s.errors == []
        s.controller.auto_segment("no-such-model")
        s.controller.wait()
        assert s.errors and "auto_blobs" in str(s.errors[-1])  # the known models are named
    finally:
        s.close()


def test_a_hundred_labels_are_one_layer_and_one_undo_state_written_a_step_a_poll(server, phantom):
    s = Setup(server, phantom, segments={"mine": blob_mask(phantom.labels, 1)})
    c = s.controller
    writes, after_run = [], []
    c.before_write = writes.append
    c.on_result = lambda job, result, timings: after_run.append(
        (timings, s.scene.layer_count(), len(s.scene.segment_keys()), list(writes))) if job.kind == "auto" else None
    c.apply_step_seconds = 0  # one unit of work a poll: every slab, then every segment, its own step
    try:
        layers = s.scene.layer_count()
        s.scene.select_segment("mine")
        c.auto_segment("many")
        c.submit("point", {"coordinates": interior_voxel(phantom.labels, 1)})  # waits until the result is written
        c.wait()
        assert s.errors == []
        [(timings, layer_count, segment_count, writes_then)] = after_run
        keys = timings["segments"]
        names = [s.scene.segmentation().GetSegment(k).GetName() for k in keys]
        assert len(keys) > 10 and names == sorted(names) and set(names) <= set(MANY)
        assert layer_count == layers + 1 and segment_count == 1 + len(keys)  # all of them in one new layer
        assert writes_then == [None]  # one undo state for the whole run, saved before anything was written
        assert timings["apply_steps"] > len(keys)  # a poll returned between every two segments
        assert writes[1:] == ["mine"]  # then the prompt queued behind the run, once all of it was written
        assert s.scene.selected_segment() == keys[0]  # the first new segment is selected, ready to refine
    finally:
        s.close()


def test_cancel_asks_the_server_on_its_own_connection_and_drops_the_result(server, phantom):
    s = Setup(server, phantom)
    logged = []
    s.controller.log = logged.append
    try:
        before = s.scene.segment_keys()
        s.controller.auto_segment("many")
        s.controller.poll()
        assert s.controller.cancel_auto() == 1
        s.controller.wait()
        deadline = threading.Event()
        for _ in range(200):  # the cancel thread's answer, logged
            if any("automatic run" in m for m in logged):
                break
            deadline.wait(0.05)
        answers = [m for m in logged if "automatic run" in m]
        assert answers, logged
        assert "cannot stop" not in answers[0]  # the server answered the cancel (True or False), on its own connection
        assert s.scene.segment_keys() == before and s.errors == [] and s.results == []
    finally:
        s.close()


def test_cancel_stops_the_run_in_progress_on_the_server(server, phantom):
    """The run's own request ends early with 409."""
    big = make_phantom(shape=(96, 192, 192), seed=104, dark=DARK)
    with RemoteSession(server) as session:
        assert session.cancel_auto_segment() is False  # nothing runs yet
        session.set_image(big.image[None])
        outcome = {}

        def run():
            try:
                outcome["result"] = session.auto_segment("auto_blobs", spacing=(1.0, 1.0, 1.0))
            except BadRequestError as exc:
                outcome["error"] = exc

        worker = threading.Thread(target=run)
        worker.start()
        stopped = False
        while worker.is_alive() and not stopped:
            stopped = session.cancel_auto_segment()
        worker.join()
        assert stopped, "the run ended before a cancel reached it: make the image larger"
        assert "result" not in outcome and outcome["error"].status_code == 409
