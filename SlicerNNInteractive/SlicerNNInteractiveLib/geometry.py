"""Where a click lands: world RAS -> volume RAS -> IJK -> array index, and which voxel slice a view shows.

The one convention of the project, written down once:

* Slicer's ``arrayFromVolume`` returns arrays indexed ``[K, J, I]``. The library and the wire use that
  order everywhere, so a voxel sent to the server is ``(k, j, i)`` and a box is
  ``[[k0, k1], [j0, j1], [i0, i1]]`` (half-open).
* IJK coordinates (what VTK and Slicer matrices produce) are ``(i, j, k)``; voxel centres sit on integer
  IJK coordinates. ``ijk_to_index`` is the only place where the order is reversed.

Matrices are 4x4 numpy arrays (or nested lists). ``world_to_ras`` undoes the parent transforms of the
volume: a 4x4 matrix for linear transforms, or any callable mapping an (N, 3) array of world points to
volume RAS points (a non-linear transform evaluated by the caller). Pure numpy: no Slicer imports.
"""

import numpy as np

# Array axes (k, j, i) -> a name used in messages. Which anatomical plane an axis is depends on the
# volume's directions, so messages name the array axis and the view, never "axial" blindly.
AXIS_NAMES = ("K", "J", "I")

# A slice plane counts as aligned with a volume axis when the in-plane directions, mapped to IJK, have a
# component along that axis smaller than this fraction of a voxel per voxel travelled in-plane.
ALIGN_TOLERANCE = 1e-3
# A plane counts as lying on a voxel slice when it is within this fraction of a voxel of its centre.
# Slicer's slice views step by the slice spacing and normally sit on voxel centres; a view between two
# slices still shows (and paints on) the nearest one, like the Segment Editor does.
ON_SLICE_TOLERANCE = 0.5


class GeometryError(ValueError):
    """A prompt cannot be mapped to voxels; ``str(err)`` says why, in words a user can act on."""


def as_matrix(m):
    """A 4x4 float64 array from a numpy array or nested lists (rows)."""
    a = np.asarray(m, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError("expected a 4x4 matrix, got shape %s" % (a.shape,))
    return a


def _apply(m, points):
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    return pts @ m[:3, :3].T + m[:3, 3]


def world_to_ijk(points_world, ras_to_ijk, world_to_ras=None):
    """Continuous IJK ``(i, j, k)`` of world RAS points (N, 3) or one point (3,).

    ``ras_to_ijk``: the volume's RASToIJK matrix (spacing, origin and directions).
    ``world_to_ras``: None (no parent transform), the 4x4 world-to-volume matrix of the parent
    transforms, or a callable doing the same for non-linear transforms.
    """
    pts = np.asarray(points_world, dtype=np.float64)
    single = pts.ndim == 1
    pts = pts.reshape(-1, 3)
    if world_to_ras is not None:
        if callable(world_to_ras):
            pts = np.asarray(world_to_ras(pts), dtype=np.float64).reshape(-1, 3)
        else:
            pts = _apply(as_matrix(world_to_ras), pts)
    ijk = _apply(as_matrix(ras_to_ijk), pts)
    return ijk[0] if single else ijk


def ijk_to_index(ijk):
    """Nearest voxel of continuous IJK ``(i, j, k)``, as an array index ``(k, j, i)`` of ints.

    Voxel centres are at integer IJK; a coordinate exactly half-way rounds up (floor(x + 0.5)), the same
    voxel for the same click whatever numpy's banker's rounding would do.
    """
    ijk = np.asarray(ijk, dtype=np.float64)
    idx = np.floor(ijk + 0.5).astype(np.int64)
    return idx[..., ::-1]


def index_in_shape(index, shape):
    """True when array index ``(k, j, i)`` lies inside an array of ``shape`` ``(K, J, I)``."""
    return all(0 <= int(x) < int(n) for x, n in zip(index, shape))


def click_to_voxel(point_world, ras_to_ijk, shape, world_to_ras=None):
    """Array index ``(k, j, i)`` of the voxel under a world RAS point; GeometryError when outside."""
    ijk = world_to_ijk(point_world, ras_to_ijk, world_to_ras)
    index = ijk_to_index(ijk)
    if not index_in_shape(index, shape):
        raise GeometryError(
            "The point is outside the image (voxel k=%d, j=%d, i=%d; the image has %d x %d x %d voxels). "
            "Place it on the image." % (tuple(int(x) for x in index) + tuple(int(n) for n in shape)))
    return tuple(int(x) for x in index)


class SlicePlacement(object):
    """A slice view's plane expressed in the volume: the array axis it is normal to and the voxel slice.

    ``axis``: 0, 1 or 2 in array order (0 = K, the third IJK axis); ``index``: the voxel slice along it;
    ``offset``: the plane's distance from that slice's centre, in voxels (for diagnostics).
    """

    __slots__ = ("axis", "index", "offset")

    def __init__(self, axis, index, offset=0.0):
        self.axis = int(axis)
        self.index = int(index)
        self.offset = float(offset)

    def __eq__(self, other):
        return isinstance(other, SlicePlacement) and (self.axis, self.index) == (other.axis, other.index)

    def __ne__(self, other):
        return not self == other

    def __repr__(self):
        return "SlicePlacement(axis=%d, index=%d, offset=%.3f)" % (self.axis, self.index, self.offset)


def _axis_of_plane(u_ijk, v_ijk, tolerance):
    """IJK axis (0=i, 1=j, 2=k) normal to the plane spanned by u, v (IJK vectors), or None if oblique."""
    u = np.asarray(u_ijk, dtype=np.float64)
    v = np.asarray(v_ijk, dtype=np.float64)
    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
    if nu == 0 or nv == 0:
        return None
    u, v = u / nu, v / nv
    normal = np.cross(u, v)
    nn = np.linalg.norm(normal)
    if nn < 1e-9:
        return None
    normal = normal / nn
    axis = int(np.argmax(np.abs(normal)))
    # Both in-plane directions must have no component along the axis.
    if abs(u[axis]) > tolerance or abs(v[axis]) > tolerance:
        return None
    return axis


def slice_placement(slice_to_ras, ras_to_ijk, shape, world_to_ras=None, tolerance=ALIGN_TOLERANCE):
    """Where a slice view's plane lies in the volume, or GeometryError when it does not lie on a voxel slice.

    ``slice_to_ras``: the slice node's SliceToRAS matrix (columns 0 and 1 span the plane, column 3 is a
    point on it), in world coordinates. ``world_to_ras`` must be linear here (a 4x4 matrix or None): a
    plane stays a plane only under a linear transform; for non-linear transforms use
    ``placement_from_points`` on the prompt's own points.
    """
    s = as_matrix(slice_to_ras)
    m = as_matrix(ras_to_ijk)
    if world_to_ras is not None:
        if callable(world_to_ras):
            raise GeometryError("The volume is under a non-linear transform: prompts on slices are checked "
                                "point by point instead.")
        m = m @ as_matrix(world_to_ras)
    u = m[:3, :3] @ s[:3, 0]
    v = m[:3, :3] @ s[:3, 1]
    ijk_axis = _axis_of_plane(u, v, tolerance)
    if ijk_axis is None:
        raise GeometryError(
            "This slice view is not aligned with the volume's voxel grid (it is rotated or oblique), so a "
            "2D prompt drawn on it would not lie on one voxel slice. Reset the view's orientation to the "
            "volume (slice view menu: 'Rotate to volume plane') or use a point prompt.")
    origin_ijk = _apply(m, s[:3, 3])[0]
    return _placement_from_coordinate(ijk_axis, origin_ijk[ijk_axis], shape)


def _placement_from_coordinate(ijk_axis, coordinate, shape):
    axis = 2 - ijk_axis  # IJK axis -> array axis
    index = int(np.floor(coordinate + 0.5))
    offset = float(coordinate - index)
    n = int(shape[axis])
    if not 0 <= index < n:
        raise GeometryError(
            "The slice shown is outside the image (slice %d of %d along %s). Scroll to a slice of the "
            "image." % (index, n, AXIS_NAMES[axis]))
    return SlicePlacement(axis, index, offset)


def placement_from_points(points_ijk, shape, tolerance=ON_SLICE_TOLERANCE):
    """The voxel slice holding all given continuous IJK points (N, 3), or GeometryError when they span more
    than one slice along every axis (a prompt drawn on an oblique view or under a bending transform)."""
    pts = np.asarray(points_ijk, dtype=np.float64).reshape(-1, 3)
    if len(pts) == 0:
        raise GeometryError("The prompt has no points.")
    best = None
    for ijk_axis in (2, 1, 0):  # prefer K, the usual slice axis, when several fit (a single point)
        c = pts[:, ijk_axis]
        centre = float(np.floor(np.median(c) + 0.5))
        spread = float(np.max(np.abs(c - centre)))
        if spread < tolerance and (best is None or spread < best[1] - 1e-9):
            best = (ijk_axis, spread, centre)
    if best is None:
        raise GeometryError(
            "The prompt does not lie on one voxel slice of the volume (the view is oblique or the volume is "
            "under a bending transform). Draw it on a view aligned with the volume's axes.")
    return _placement_from_coordinate(best[0], float(np.median(pts[:, best[0]])), shape)


def lattice_offset(ijk_to_world_a, ijk_to_world_b, tolerance=1e-3):
    """Integer offset ``(di, dj, dk)`` with ``IJK_b = IJK_a + offset`` when the two grids coincide (same
    spacing and directions, origins a whole number of voxels apart), else None.

    Used to check that a segmentation's labelmap shares the volume's voxel grid, so a region of the volume
    is a region of the labelmap.
    """
    a = as_matrix(ijk_to_world_a)
    b = as_matrix(ijk_to_world_b)
    try:
        rel = np.linalg.inv(b) @ a  # IJK_a -> IJK_b
    except np.linalg.LinAlgError:
        return None
    if not np.allclose(rel[:3, :3], np.eye(3), atol=tolerance):
        return None
    t = rel[:3, 3]
    r = np.round(t)
    if not np.allclose(t, r, atol=tolerance):
        return None
    return tuple(int(x) for x in r)
