"""Segment writes through labelmap layers, on numpy (ArrayScene) and on real Slicer segmentations (MrmlScene)."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "SlicerNNInteractive"))

from SlicerNNInteractiveLib import masking as M  # noqa: E402

SHAPE = (8, 10, 12)


def box(shape, sl):
    m = np.zeros(shape, bool)
    m[sl] = True
    return m


def test_write_grows_an_empty_layer_to_the_new_voxels_only(Scene):
    scene = Scene(np.zeros(SHAPE, np.int16))
    key = scene.add_segment()
    bbox = [[2, 6], [3, 7], [4, 8]]
    pred = np.zeros((4, 4, 4), np.uint8)
    pred[1:3, 1:3, 1:3] = 1
    new, undo = scene.merge(key, bbox, pred)
    lay = scene.layer(key)
    assert lay.offset == (3, 4, 5) and lay.shape == (2, 2, 2)  # allocated where the voxels are
    assert scene.read_segment(key).sum() == 8
    assert undo is not None and not undo.regions[key].any()
    # A second region further away grows the layer and keeps the first.
    new, undo = scene.merge(key, [[0, 1], [0, 1], [0, 1]], np.ones((1, 1, 1)))
    assert scene.read_segment(key).sum() == 9 and scene.layer(key).offset == (0, 0, 0)
    scene.restore(undo)
    assert scene.read_segment(key).sum() == 8


def test_overwrite_none_separates_a_shared_layer_instead_of_erasing(Scene):
    a = box(SHAPE, np.s_[0:4, 0:4, 0:4])
    b = box(SHAPE, np.s_[4:8, 4:8, 4:8])
    scene = Scene(np.zeros(SHAPE), {"a": a, "b": b}, shared=True)
    assert scene.layer_count() == 1
    scene.settings = M.MaskingSettings(overwrite_mode=M.OVERWRITE_NONE)
    bbox = [[2, 6], [2, 6], [2, 6]]
    new, undo = scene.merge("a", bbox, np.ones((4, 4, 4)))
    assert scene.layer_count() == 2  # a moved to its own layer: overlap kept
    assert scene.read_segment("b").sum() == b.sum()
    assert scene.read_segment("a").sum() == (a | box(SHAPE, np.s_[2:6, 2:6, 2:6])).sum()


def test_overwrite_all_takes_voxels_from_shared_and_separate_layers_and_undo_restores_them(Scene):
    a = box(SHAPE, np.s_[0:4, 0:4, 0:4])
    b = box(SHAPE, np.s_[4:8, 4:8, 4:8])
    c = box(SHAPE, np.s_[0:2, 6:10, 6:12])
    scene = Scene(np.zeros(SHAPE), {"a": a, "b": b, "c": c}, shared=True)
    scene.separate_segment("c")
    scene.settings = M.MaskingSettings(overwrite_mode=M.OVERWRITE_ALL)
    before = {k: scene.read_segment(k).copy() for k in "abc"}
    bbox = [[0, 8], [3, 8], [3, 8]]
    new, undo = scene.merge("a", bbox, np.ones((8, 5, 5)))
    assert scene.layer_count() == 2  # no separation needed: b may be overwritten
    region = box(SHAPE, np.s_[0:8, 3:8, 3:8])
    assert (scene.read_segment("a").astype(bool) == (a | region)).all()
    assert (scene.read_segment("b").astype(bool) == (b & ~region)).all()
    assert (scene.read_segment("c").astype(bool) == (c & ~region)).all()
    assert sorted(undo.regions) == ["a", "b", "c"]
    scene.restore(undo)
    for k in "abc":
        assert np.array_equal(scene.read_segment(k), before[k])


def test_masked_merge_through_scene_and_hidden_segments(Scene):
    a = box(SHAPE, np.s_[0:8, 0:5, 0:12])
    scene = Scene(np.arange(np.prod(SHAPE), dtype=np.int32).reshape(SHAPE), {"a": a})
    key = scene.add_segment()
    scene.settings = M.MaskingSettings(M.EDIT_OUTSIDE_VISIBLE, M.OVERWRITE_NONE)
    full = [[0, n] for n in SHAPE]
    scene.merge(key, full, np.ones(SHAPE))
    assert (scene.read_segment(key).astype(bool) == ~a).all()
    scene.clear_segment(key)
    scene.set_visible("a", False)
    scene.merge(key, full, np.ones(SHAPE))
    assert scene.read_segment(key).all()
    # Intensity range: only voxels with values 0..99 are editable.
    scene.clear_segment(key)
    scene.settings = M.MaskingSettings(intensity_range=(0, 99))
    scene.merge(key, full, np.ones(SHAPE))
    assert scene.read_segment(key).sum() == 100


def test_no_change_no_write(Scene):
    scene = Scene(np.zeros(SHAPE), {"a": box(SHAPE, np.s_[1:3, 1:3, 1:3])})
    version = scene.segment_version("a")
    new, undo = scene.merge("a", [[1, 3], [1, 3], [1, 3]], np.ones((2, 2, 2)))
    assert undo is None and scene.segment_version("a") == version and scene.modified_calls == []
