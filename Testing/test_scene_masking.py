"""Merging a returned region under the Segment Editor's masking rules, and labelmap layer writes."""

import itertools
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "SlicerNNInteractive"))

from SlicerNNInteractiveLib import masking as M  # noqa: E402


def slicer_reference(pred, cur, mode, overwrite, others, selected_visible, mask_segment, intensity, rng_range):
    """Voxel-by-voxel transcription of vtkMRMLSegmentationNode::GenerateEditMask + vtkSlicerSegmentEditorLogic::
    ModifySegmentByLabelmap (set mode): the mask image holds 1 where editing is NOT allowed."""
    shape = pred.shape
    # GenerateEditMask
    if mode == M.EDIT_EVERYWHERE:
        locked = np.zeros(shape, bool)
    else:
        inside = mode in (M.EDIT_INSIDE_ALL, M.EDIT_INSIDE_VISIBLE, M.EDIT_INSIDE_SINGLE)
        ids = []
        allsegs = dict(others)
        allsegs["sel"] = (cur, selected_visible)
        if mode in (M.EDIT_INSIDE_ALL, M.EDIT_OUTSIDE_ALL):
            ids = list(allsegs)
        elif mode in (M.EDIT_INSIDE_VISIBLE, M.EDIT_OUTSIDE_VISIBLE):
            ids = [s for s, (_, vis) in allsegs.items() if vis]
        elif mask_segment:
            ids = [mask_segment]
        if not inside:
            ids = [s for s in ids if s != "sel"]
        if not ids:
            locked = np.full(shape, inside)
        else:
            merged = np.zeros(shape, bool)
            for s in ids:
                merged |= allsegs.get(s, (np.zeros(shape, bool), False))[0]  # an unknown ID adds nothing
            locked = ~merged if inside else merged
    if rng_range is not None:
        locked = locked | ~((intensity >= rng_range[0]) & (intensity <= rng_range[1]))
    # set mode: masked modifier, plus the segment where it is locked
    modifier = pred & ~locked
    modifier |= cur & locked
    new_sel = modifier
    erase = {}
    if overwrite != M.OVERWRITE_NONE:
        for sid, (m, vis) in others.items():
            if overwrite == M.OVERWRITE_VISIBLE and not vis:
                continue
            if (m & modifier).any():
                erase[sid] = m & ~modifier
    return new_sel, erase


@pytest.mark.parametrize("mode,overwrite", list(itertools.product(M.MASK_MODES, M.OVERWRITE_MODES)))
@pytest.mark.parametrize("use_intensity", [False, True])
def test_merge_matches_slicer_rules(mode, overwrite, use_intensity):
    rng = np.random.default_rng(mode * 10 + overwrite + 100 * use_intensity)
    shape = (4, 5, 6)
    for trial in range(6):
        pred = rng.random(shape) < 0.5
        cur = rng.random(shape) < 0.3
        others = {
            "a": (rng.random(shape) < 0.3, True),
            "b": (rng.random(shape) < 0.3, False),
            "c": (np.zeros(shape, bool), True),
        }
        selected_visible = bool(trial % 2)
        mask_segment = ["a", "b", "sel", None, "missing", "a"][trial]
        intensity = rng.normal(size=shape)
        rng_range = (-0.5, 0.8) if use_intensity else None
        settings = M.MaskingSettings(mode, overwrite, mask_segment_id=mask_segment, intensity_range=rng_range)
        got = M.merge_prediction(pred.astype(np.uint8), cur, settings, selected_id="sel",
                                 selected_visible=selected_visible,
                                 others={k: M.SegmentRegion(m, v) for k, (m, v) in others.items()},
                                 intensity=intensity)
        want_sel, want_erase = slicer_reference(pred, cur, mode, overwrite, others, selected_visible,
                                                mask_segment, intensity, rng_range)
        assert np.array_equal(got.selected, want_sel)
        assert sorted(got.others) == sorted(want_erase)
        for k in want_erase:
            assert np.array_equal(got.others[k], want_erase[k])


def test_everywhere_no_overwrite_is_the_prediction():
    pred = np.array([[[1, 0, 1]]], dtype=np.uint8)
    cur = np.array([[[0, 1, 1]]], dtype=bool)
    r = M.merge_prediction(pred, cur, M.MaskingSettings())
    assert r.selected.tolist() == [[[True, False, True]]] and r.others == {} and r.changed
    r = M.merge_prediction(pred, pred, M.MaskingSettings())
    assert not r.changed


def test_outside_all_keeps_other_segments_and_own_locked_voxels():
    pred = np.ones((1, 1, 4), bool)
    cur = np.array([[[1, 0, 0, 0]]], bool)
    other = M.SegmentRegion([[[0, 0, 1, 1]]], visible=True)
    s = M.MaskingSettings(M.EDIT_OUTSIDE_ALL, M.OVERWRITE_ALL)
    r = M.merge_prediction(pred, cur, s, "sel", True, {"o": other})
    assert r.selected.tolist() == [[[True, True, False, False]]]
    assert r.others == {}  # nothing of the other segment was taken
    # A negative prompt cannot remove the selected segment's voxels where editing is not allowed.
    s = M.MaskingSettings(M.EDIT_INSIDE_SINGLE, M.OVERWRITE_NONE, mask_segment_id="o")
    r = M.merge_prediction(np.zeros((1, 1, 4)), np.ones((1, 1, 4)), s, "sel", True, {"o": other})
    assert r.selected.tolist() == [[[True, True, False, False]]]


def test_intensity_range_needs_the_image():
    with pytest.raises(ValueError, match="intensity"):
        M.merge_prediction(np.ones((1, 1, 1)), np.zeros((1, 1, 1)), M.MaskingSettings(intensity_range=(0, 1)))
    with pytest.raises(ValueError):
        M.MaskingSettings(mask_mode=17)


def test_layer_read_write_with_shared_labels():
    # A layer covering volume indices [2:6, 3:8, 1:5] holding segment 1 and segment 2 (shared labelmap).
    layer = np.zeros((4, 5, 4), dtype=np.int16)
    offset = (2, 3, 1)
    layer[0, 0, 0] = 1
    layer[1, 1, 1] = 2
    layer[2, 2, 2] = 1
    bbox = [[3, 5], [4, 6], [2, 4]]  # covers layer[1:3, 1:3, 1:3]
    region = M.read_region(layer, offset, 1, bbox)
    assert region.shape == (2, 2, 2) and region.sum() == 1 and region[1, 1, 1]
    assert M.any_in_region(layer, offset, 2, bbox) and not M.any_in_region(layer, offset, 3, bbox)
    # Reading a bbox partly outside the layer gives False there.
    outside = M.read_region(layer, offset, 1, [[0, 3], [0, 4], [0, 2]])
    assert outside.shape == (3, 4, 2) and outside[2, 3, 1] and outside.sum() == 1
    new = np.zeros((2, 2, 2), bool)
    new[0, 0, 0] = True  # volume (3, 4, 2) = layer (1, 1, 1), held by label 2
    assert M.conflicting_labels(layer, offset, 1, bbox, new) == {2}
    assert M.conflicting_labels(layer, offset, 1, bbox, new, overwritable_labels=[2]) == set()
    assert M.write_region(layer, offset, 1, bbox, new)
    assert layer[1, 1, 1] == 1 and layer[2, 2, 2] == 0 and layer[0, 0, 0] == 1  # outside bbox untouched
    assert not M.write_region(layer, offset, 1, bbox, new)  # nothing changes the second time
    # Erasing another segment where the selected one now is.
    layer[2, 1, 1] = 2
    keep = np.ones((2, 2, 2), bool)
    keep[1, 0, 0] = False
    assert M.erase_region(layer, offset, 2, bbox, keep) and layer[2, 1, 1] == 0


def test_layer_growth():
    layer_offset, layer_shape = (2, 3, 1), (4, 5, 4)
    bbox = [[0, 3], [3, 5], [1, 3]]
    new = np.zeros((3, 2, 2), bool)
    assert M.required_extent(layer_offset, layer_shape, bbox, new) is None
    new[2, 0, 0] = True  # volume (2, 3, 1): inside
    assert M.required_extent(layer_offset, layer_shape, bbox, new) is None
    new[0, 1, 1] = True  # volume (0, 4, 2): below the layer along K
    assert M.required_extent(layer_offset, layer_shape, bbox, new) == ((0, 3, 1), (6, 5, 4))
    assert M.required_extent((0, 0, 0), (0, 0, 0), bbox, new) == ((0, 3, 1), (3, 2, 2))
    layer = np.zeros(layer_shape, np.uint8)
    with pytest.raises(ValueError, match="grow"):
        M.write_region(layer, layer_offset, 1, bbox, new)


def test_full_mask():
    layer = np.zeros((2, 2, 2), np.uint8)
    layer[1, 1, 1] = 3
    layer[0, 0, 0] = 1
    full = M.full_mask(layer, (1, 1, 1), 3, (4, 4, 4))
    assert full.dtype == np.uint8 and full.sum() == 1 and full[2, 2, 2] == 1
    assert M.full_mask(None, (0, 0, 0), 1, (2, 2, 2)).sum() == 0
