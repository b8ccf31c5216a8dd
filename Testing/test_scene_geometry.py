"""Click -> voxel and slice placement for non-trivial geometries (pure numpy, no server)."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "SlicerNNInteractive"))

from SlicerNNInteractiveLib import geometry as G  # noqa: E402


def rotation(axis, degrees):
    a = np.radians(degrees)
    c, s = np.cos(a), np.sin(a)
    r = np.eye(3)
    i, j = [(1, 2), (0, 2), (0, 1)][axis]
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def affine(linear, translation):
    m = np.eye(4)
    m[:3, :3] = linear
    m[:3, 3] = translation
    return m


@pytest.fixture
def volume():
    """A volume whose voxel grid is rotated, anisotropic and off the origin, under a rigid parent transform."""
    spacing = np.array([0.7, 1.3, 3.0])  # i, j, k
    directions = rotation(2, 30) @ rotation(0, -20) @ np.diag([-1, -1, 1])  # LPS-like flip + rotations
    ijk_to_ras = affine(directions @ np.diag(spacing), [12.5, -40.0, 7.25])
    parent = affine(rotation(1, 15), [5.0, 2.0, -3.0])  # volume RAS -> world
    shape = (20, 30, 40)  # K, J, I
    return {
        "shape": shape,
        "ijk_to_ras": ijk_to_ras,
        "ras_to_ijk": np.linalg.inv(ijk_to_ras),
        "parent": parent,
        "world_to_ras": np.linalg.inv(parent),
        "ijk_to_world": parent @ ijk_to_ras,
    }


def to_world(vol, ijk):
    p = np.append(np.asarray(ijk, dtype=float), 1.0)
    return (vol["ijk_to_world"] @ p)[:3]


def test_click_maps_to_array_order_index(volume):
    world = to_world(volume, [7, 11, 13])  # i=7, j=11, k=13
    assert G.click_to_voxel(world, volume["ras_to_ijk"], volume["shape"], volume["world_to_ras"]) == (13, 11, 7)


def test_click_rounds_to_nearest_voxel_with_anisotropic_spacing(volume):
    # 0.4 voxel off along every axis still lands on the same voxel; 0.6 lands on the next one.
    assert G.click_to_voxel(to_world(volume, [7.4, 10.6, 12.6]), volume["ras_to_ijk"], volume["shape"],
                            volume["world_to_ras"]) == (13, 11, 7)
    assert G.click_to_voxel(to_world(volume, [7.6, 11.0, 13.0]), volume["ras_to_ijk"], volume["shape"],
                            volume["world_to_ras"]) == (13, 11, 8)
    # Half-way rounds up, never to even.
    assert G.ijk_to_index([2.5, 3.5, 0.5]).tolist() == [1, 4, 3]


def test_parent_transform_matters(volume):
    world = to_world(volume, [7, 11, 13])
    without = G.world_to_ijk(world, volume["ras_to_ijk"])
    assert not np.allclose(without, [7, 11, 13], atol=0.5)
    # A callable (a non-linear transform evaluated by the caller) works like the matrix.
    fn = lambda pts: pts @ volume["world_to_ras"][:3, :3].T + volume["world_to_ras"][:3, 3]  # noqa: E731
    assert np.allclose(G.world_to_ijk(world, volume["ras_to_ijk"], fn), [7, 11, 13])
    assert np.allclose(G.world_to_ijk([world, world], volume["ras_to_ijk"], volume["world_to_ras"]),
                       [[7, 11, 13]] * 2)


def test_click_outside_is_refused(volume):
    with pytest.raises(G.GeometryError, match="outside the image"):
        G.click_to_voxel(to_world(volume, [-1, 5, 5]), volume["ras_to_ijk"], volume["shape"], volume["world_to_ras"])
    with pytest.raises(G.GeometryError):
        G.click_to_voxel(to_world(volume, [5, 5, 19.6]), volume["ras_to_ijk"], volume["shape"], volume["world_to_ras"])


def slice_to_ras_for(vol, in_plane_ijk_axes, ijk_point, roll_degrees=0.0):
    """SliceToRAS of a view whose plane contains two IJK axes of the volume (in world), through a point."""
    m = vol["ijk_to_world"]
    u = m[:3, :3] @ np.eye(3)[in_plane_ijk_axes[0]]
    v = m[:3, :3] @ np.eye(3)[in_plane_ijk_axes[1]]
    u /= np.linalg.norm(u)
    v = v - u * (u @ v)
    v /= np.linalg.norm(v)
    n = np.cross(u, v)
    r = rotation(2, roll_degrees)  # an in-plane roll keeps the plane
    axes = np.stack([u, v, n], axis=1) @ r
    s = np.eye(4)
    s[:3, :3] = axes
    s[:3, 3] = to_world(vol, ijk_point)
    return s


@pytest.mark.parametrize("in_plane,array_axis", [((0, 1), 0), ((0, 2), 1), ((1, 2), 2)])
def test_slice_placement_for_each_orientation(volume, in_plane, array_axis):
    point = [10, 12, 9]
    s = slice_to_ras_for(volume, in_plane, point, roll_degrees=33)
    p = G.slice_placement(s, volume["ras_to_ijk"], volume["shape"], volume["world_to_ras"])
    assert p.axis == array_axis
    assert p.index == [9, 12, 10][array_axis]
    assert abs(p.offset) < 1e-9


def test_slice_between_voxels_uses_nearest_and_reports_offset(volume):
    s = slice_to_ras_for(volume, (0, 1), [10, 12, 9.3])
    p = G.slice_placement(s, volume["ras_to_ijk"], volume["shape"], volume["world_to_ras"])
    assert (p.axis, p.index) == (0, 9)
    assert p.offset == pytest.approx(0.3)


def test_oblique_view_is_refused(volume):
    s = slice_to_ras_for(volume, (0, 1), [10, 12, 9])
    tilt = affine(rotation(0, 10), [0, 0, 0])
    s[:3, :3] = tilt[:3, :3] @ s[:3, :3]
    with pytest.raises(G.GeometryError, match="not aligned"):
        G.slice_placement(s, volume["ras_to_ijk"], volume["shape"], volume["world_to_ras"])


def test_view_aligned_without_parent_transform_is_oblique_with_it(volume):
    # Aligned with the volume in its own RAS, but the parent transform rotates the volume: oblique in world.
    m = volume["ijk_to_ras"]
    u = m[:3, 0] / np.linalg.norm(m[:3, 0])
    v = m[:3, 1] / np.linalg.norm(m[:3, 1])
    s = np.eye(4)
    s[:3, 0], s[:3, 1], s[:3, 2] = u, v, np.cross(u, v)
    assert G.slice_placement(s, volume["ras_to_ijk"], volume["shape"]).axis == 0
    with pytest.raises(G.GeometryError):
        G.slice_placement(s, volume["ras_to_ijk"], volume["shape"], volume["world_to_ras"])


def test_slice_outside_image_is_refused(volume):
    s = slice_to_ras_for(volume, (0, 1), [10, 12, 25])
    with pytest.raises(G.GeometryError, match="outside the image"):
        G.slice_placement(s, volume["ras_to_ijk"], volume["shape"], volume["world_to_ras"])


def test_placement_from_points():
    pts = np.array([[3.1, 4.0, 7.2], [9.0, 12.5, 6.9], [5.0, 8.0, 7.0]])
    p = G.placement_from_points(pts, (20, 30, 40))
    assert (p.axis, p.index) == (0, 7)
    pts2 = np.array([[3.0, 4.0, 1.0], [3.1, 12.5, 6.9], [2.9, 8.0, 9.0]])
    assert (G.placement_from_points(pts2, (20, 30, 40)).axis, G.placement_from_points(pts2, (20, 30, 40)).index) == (2, 3)
    with pytest.raises(G.GeometryError, match="one voxel slice"):
        G.placement_from_points(np.array([[0, 0, 0], [5, 5, 5.0]]), (20, 30, 40))


def test_lattice_offset(volume):
    a = volume["ijk_to_world"]
    shifted = a @ affine(np.eye(3), [3, -2, 5])  # the same grid starting 3, -2, 5 voxels away
    assert G.lattice_offset(shifted, a) == (3, -2, 5)
    assert G.lattice_offset(a, a) == (0, 0, 0)
    assert G.lattice_offset(a @ affine(np.eye(3), [0.5, 0, 0]), a) is None
    assert G.lattice_offset(a @ affine(np.diag([2, 1, 1]), [0, 0, 0]), a) is None
