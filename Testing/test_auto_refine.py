"""Automatic segmentation then refinement, through the module's controller on real Slicer nodes: our server runs
the tiny trained automatic model (Testing/models/auto_blobs: bright and dark blobs) on the image the session
already holds, each label becomes a named, coloured segment written under the Segment Editor's masking rules,
and a prompt then refines one of them (selecting it makes it the starting mask)."""

import numpy as np
import pytest

from conftest import REPO, our_server
from mrml import MrmlScene
from phantoms import blob_mask, dice, interior_voxel, make_phantom

from SlicerNNInteractiveLib import masking as M
from SlicerNNInteractiveLib.client import RemoteSession
from SlicerNNInteractiveLib.controller import Controller

DARK = (2,)  # a blob darker than the background: label 2 of the model


@pytest.fixture(scope="module")
def server(blob_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auto-refine")
    spec = tmp / "model-serve-spec.yaml"
    spec.write_text("model_folder: %s\nmodels:\n  - id: auto_blobs\n    rel_path: auto_blobs\n"
                    "    name: Blobs (tiny trained model)\n    aliases: [blobs]\n"
                    "    default_args: {use_folds: [0], tta: false}\n" % (REPO + "/Testing/models"))
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
