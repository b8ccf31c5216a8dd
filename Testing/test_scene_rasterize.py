"""Box, scribble and lasso rasterization on each slice orientation (pure numpy, no server)."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "SlicerNNInteractive"))

from SlicerNNInteractiveLib import rasterize as R  # noqa: E402
from SlicerNNInteractiveLib.geometry import GeometryError, SlicePlacement  # noqa: E402

SHAPE = (20, 30, 40)  # K, J, I


def ijk_on_slice(axis, index, u, v):
    """Continuous IJK of in-plane coordinates (u, v) (the two other array axes, in order) on a slice."""
    idx = [0.0, 0.0, 0.0]
    others = [a for a in range(3) if a != axis]
    idx[axis] = index
    idx[others[0]] = u
    idx[others[1]] = v
    return [idx[2], idx[1], idx[0]]  # (k, j, i) -> (i, j, k)


def paste(mask, bbox, shape=SHAPE):
    out = np.zeros(shape, dtype=np.uint8)
    out[tuple(slice(lo, hi) for lo, hi in bbox)] = mask
    return out


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_box_from_corners(axis):
    p = SlicePlacement(axis, 5)
    box = R.box_from_corners(ijk_on_slice(axis, 5.2, 9.6, 3.2), ijk_on_slice(axis, 4.9, 2.4, 7.7), p, SHAPE)
    expected = [None, None, None]
    expected[axis] = [5, 6]
    others = [a for a in range(3) if a != axis]
    expected[others[0]] = [2, 11]  # voxels 2..10 (under the corners 2.4 -> 2 and 9.6 -> 10), half-open
    expected[others[1]] = [3, 9]
    assert box == expected


def test_box_is_clipped_and_refused_when_outside():
    p = SlicePlacement(0, 3)
    box = R.box_from_corners([-5, -5, 3], [10, 50, 3], p, SHAPE)  # IJK (i, j, k)
    assert box == [[3, 4], [0, 30], [0, 11]]
    with pytest.raises(GeometryError):
        R.box_from_corners([-10, -10, 3], [-5, -5, 3], p, SHAPE)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_scribble_is_on_one_slice_and_thick(axis):
    p = SlicePlacement(axis, 7)
    others = [a for a in range(3) if a != axis]
    stroke = [ijk_on_slice(axis, 7, 5, 3 + t) for t in np.linspace(0, 10, 11)]  # a straight line
    mask, bbox = R.scribble_from_strokes([stroke], p, SHAPE, thickness=[3, 3, 3])
    assert mask.dtype == np.uint8 and mask.shape == tuple(hi - lo for lo, hi in bbox)
    assert bbox[axis] == [7, 8]
    full = paste(mask, bbox)
    plane = np.take(full, 7, axis=axis)
    assert full.sum() == plane.sum()  # nothing off the slice
    # Thickness 3 -> radius 1.5 around the line: rows 4, 5, 6 across, columns 2..14 along (end caps).
    assert np.flatnonzero(plane.any(axis=1)).tolist() == [4, 5, 6]
    assert np.flatnonzero(plane.any(axis=0)).tolist() == list(range(2, 15))
    assert plane[5, 3:14].all()
    # The crop is tight: every border row/column of the mask holds a voxel.
    for ax in others:
        assert np.take(mask, 0, axis=ax).any() and np.take(mask, -1, axis=ax).any()


def test_scribble_thickness_per_axis_and_thin_line():
    p = SlicePlacement(0, 2)
    stroke = [[5.0, 5.0, 2], [15.0, 5.0, 2]]  # along i at j=5
    mask, bbox = R.scribble_from_strokes([stroke], p, SHAPE, thickness=[1, 5, 1])
    full = paste(mask, bbox)[2]
    assert np.flatnonzero(full.any(axis=1)).tolist() == [3, 4, 5, 6, 7]  # j: radius 2.5
    mask, bbox = R.scribble_from_strokes([stroke], p, SHAPE, thickness=1)
    assert bbox == [[2, 3], [5, 6], [5, 16]]  # a one-voxel line, both ends included
    assert R.scribble_from_strokes([[[-20, -20, 2], [-10, -10, 2]]], p, SHAPE, thickness=2) is None


def test_scribble_several_strokes_and_single_click():
    p = SlicePlacement(1, 4)
    strokes = [[[3.0, 4, 3.0]], [[20.0, 4, 10.0], [25.0, 4, 10.0]]]
    mask, bbox = R.scribble_from_strokes(strokes, p, SHAPE, thickness=1)
    full = paste(mask, bbox)
    assert full[3, 4, 3] and full[10, 4, 20:26].all()
    assert full.sum() == 1 + 6


def test_scribble_clipped_at_image_border():
    p = SlicePlacement(0, 0)
    mask, bbox = R.scribble_from_strokes([[[0.0, 0.0, 0], [0.0, 10.0, 0]]], p, SHAPE, thickness=4)
    assert bbox[0] == [0, 1] and bbox[1][0] == 0 and bbox[2][0] == 0
    assert mask.shape == tuple(hi - lo for lo, hi in bbox)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_lasso_fills_the_polygon(axis):
    p = SlicePlacement(axis, 6)
    # A square from (u, v) = (4, 5) to (12, 15) drawn as a closed polygon (last point joined to the first).
    corners = [(4, 5), (4, 15), (12, 15), (12, 5)]
    poly = [ijk_on_slice(axis, 6.1, u, v) for u, v in corners]
    mask, bbox = R.lasso_from_polygon(poly, p, SHAPE)
    assert bbox[axis] == [6, 7]
    full = paste(mask, bbox)
    plane = np.take(full, 6, axis=axis)
    expected = np.zeros_like(plane)
    expected[4:13, 5:16] = 1  # the outline voxels count as inside
    assert np.array_equal(plane, expected)


def test_lasso_concave_polygon_and_small_lasso():
    p = SlicePlacement(0, 1)
    # A "U": the notch between the arms must stay empty.
    u_shape = [(2, 2), (2, 20), (12, 20), (12, 16), (5, 16), (5, 6), (12, 6), (12, 2)]
    poly = [[v, u, 1] for u, v in u_shape]  # IJK: i = v, j = u
    mask, bbox = R.lasso_from_polygon(poly, p, SHAPE)
    plane = paste(mask, bbox)[1]
    assert plane[3, 10] and plane[10, 3] and plane[10, 18]
    assert not plane[9, 10] and not plane[10, 11]
    # A lasso smaller than a voxel still selects the voxel under it.
    tiny = [[10.1, 10.1, 1], [10.3, 10.1, 1], [10.2, 10.3, 1]]
    mask, bbox = R.lasso_from_polygon(tiny, p, SHAPE)
    assert bbox == [[1, 2], [10, 11], [10, 11]]
    with pytest.raises(GeometryError):
        R.lasso_from_polygon(tiny[:2], p, SHAPE)


def test_crop():
    m = np.zeros((5, 6, 7), dtype=np.uint8)
    m[1, 2:4, 3] = 1
    mask, bbox = R.crop_to_bbox(m, offset=(10, 20, 30))
    assert bbox == [[11, 12], [22, 24], [33, 34]] and mask.shape == (1, 2, 1)
    assert R.crop_to_bbox(np.zeros((2, 2, 2))) is None


def test_painted_scribble_is_clipped_to_the_image_and_must_lie_on_one_slice():
    painted = np.zeros((3, 8, 8), bool)
    painted[1, 2:6, 0:8] = True  # one slice along axis 0, reaching 2 voxels past the image's first column
    mask, bbox = R.scribble_from_painted(painted, (4, 10, -2), SHAPE)
    assert bbox == [[5, 6], [12, 16], [0, 6]] and mask.all() and mask.shape == (1, 4, 6)
    assert R.scribble_from_painted(painted, (4, 10, -8), SHAPE) is None  # painted off the image
    assert R.scribble_from_painted(np.zeros((1, 2, 2)), (0, 0, 0), SHAPE) is None
    painted[2, 2:6, 0:8] = True  # a second slice: as a sphere brush or an oblique view would paint
    with pytest.raises(GeometryError, match="more than one voxel slice"):
        R.scribble_from_painted(painted, (4, 10, 0), SHAPE)
