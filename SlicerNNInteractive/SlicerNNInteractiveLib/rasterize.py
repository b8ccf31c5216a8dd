"""Turn 2D prompts drawn on one voxel slice into what the server takes: a box, or a small mask + its bbox.

Everything is in array order ``(k, j, i)`` (see ``geometry``). Inputs are continuous IJK points
``(i, j, k)`` as ``geometry.world_to_ijk`` returns them and the ``SlicePlacement`` of the slice they were
drawn on. Masks are returned cropped to their bounding box together with that box (``interaction_bbox``
on the wire: half-open, array order), so a prompt on a 512^3 volume sends a few hundred bytes.
"""

import numpy as np

from .geometry import GeometryError, ijk_to_index


def _in_plane_axes(axis):
    return [a for a in (0, 1, 2) if a != axis]


def _to_index_coords(points_ijk):
    """Continuous IJK (N, 3) -> continuous array-order coordinates (N, 3) = (k, j, i)."""
    pts = np.asarray(points_ijk, dtype=np.float64).reshape(-1, 3)
    return pts[:, ::-1]


def _clip_bbox(bbox, shape):
    out = []
    for (lo, hi), n in zip(bbox, shape):
        lo, hi = max(0, int(lo)), min(int(n), int(hi))
        if hi <= lo:
            return None
        out.append([lo, hi])
    return out


def box_from_corners(corner_a_ijk, corner_b_ijk, placement, shape):
    """Half-open 2D box ``[[k0, k1], [j0, j1], [i0, i1]]`` spanning the voxels under two opposite corners
    (both included), size 1 along the slice axis at the slice's index. Clipped to the image;
    GeometryError when nothing of it is on the image or it is a line rather than a box.
    """
    a = ijk_to_index(corner_a_ijk)
    b = ijk_to_index(corner_b_ijk)
    bbox = [None, None, None]
    bbox[placement.axis] = [placement.index, placement.index + 1]
    for ax in _in_plane_axes(placement.axis):
        lo, hi = sorted((int(a[ax]), int(b[ax])))
        bbox[ax] = [lo, hi + 1]
    clipped = _clip_bbox(bbox, shape)
    if clipped is None:
        raise GeometryError("The box is outside the image. Draw it on the image.")
    return clipped


def _segment_distance_sq(px, py, ax, ay, bx, by):
    """Squared distance of points (px, py) (arrays) to the segment a-b (scalars)."""
    dx, dy = bx - ax, by - ay
    length_sq = dx * dx + dy * dy
    if length_sq == 0.0:
        return (px - ax) ** 2 + (py - ay) ** 2
    t = np.clip(((px - ax) * dx + (py - ay) * dy) / length_sq, 0.0, 1.0)
    return (px - (ax + t * dx)) ** 2 + (py - (ay + t * dy)) ** 2


def _radii(thickness, axes):
    if thickness is None:
        thickness = 1
    t = np.broadcast_to(np.asarray(thickness, dtype=np.float64), (3,))
    # A stroke of thickness t covers voxels whose centre is within t/2 of its centre line; at least the
    # voxels the line passes through (radius 0.5) so that a thin stroke is never lost.
    return [max(0.5, float(t[ax]) / 2.0) for ax in axes]


def _stroke_mask_2d(polylines, origin, size, radii):
    """Boolean 2D mask (size) of voxel centres within the (elliptic, per-axis) radius of the polylines.
    ``polylines``: list of (N, 2) arrays in in-plane array coordinates; ``origin``: index of mask[0, 0]."""
    gy, gx = np.meshgrid(np.arange(size[0], dtype=np.float64) + origin[0],
                         np.arange(size[1], dtype=np.float64) + origin[1], indexing="ij")
    # Scale each axis by its radius: the elliptic footprint becomes a unit disc.
    py, px = gy / radii[0], gx / radii[1]
    out = np.zeros(size, dtype=bool)
    for line in polylines:
        pts = np.asarray(line, dtype=np.float64).reshape(-1, 2)
        ys, xs = pts[:, 0] / radii[0], pts[:, 1] / radii[1]
        if len(pts) == 1:
            out |= _segment_distance_sq(py, px, ys[0], xs[0], ys[0], xs[0]) <= 1.0
            continue
        for n in range(len(pts) - 1):
            out |= _segment_distance_sq(py, px, ys[n], xs[n], ys[n + 1], xs[n + 1]) <= 1.0
    return out


def _finish(mask2d, origin2d, placement, shape):
    """Embed a 2D in-plane mask into a 3D (size 1 on the slice axis) cropped mask + bbox, clipped to shape."""
    axes = _in_plane_axes(placement.axis)
    if not mask2d.any():
        return None
    rows = np.flatnonzero(mask2d.any(axis=1))
    cols = np.flatnonzero(mask2d.any(axis=0))
    r0, r1 = rows[0], rows[-1] + 1
    c0, c1 = cols[0], cols[-1] + 1
    bbox = [None, None, None]
    bbox[placement.axis] = [placement.index, placement.index + 1]
    bbox[axes[0]] = [origin2d[0] + r0, origin2d[0] + r1]
    bbox[axes[1]] = [origin2d[1] + c0, origin2d[1] + c1]
    clipped = _clip_bbox(bbox, shape)
    if clipped is None:
        return None
    cr0 = r0 + clipped[axes[0]][0] - bbox[axes[0]][0]
    cr1 = cr0 + clipped[axes[0]][1] - clipped[axes[0]][0]
    cc0 = c0 + clipped[axes[1]][0] - bbox[axes[1]][0]
    cc1 = cc0 + clipped[axes[1]][1] - clipped[axes[1]][0]
    sub = mask2d[cr0:cr1, cc0:cc1]
    if not sub.any():
        return None
    # Re-crop: clipping may have cut off the only rows or columns that held the mask's edges.
    return crop_to_bbox(np.expand_dims(sub, placement.axis).astype(np.uint8),
                        [lo for lo, _ in clipped])


def scribble_from_strokes(strokes_ijk, placement, shape, thickness):
    """Rasterize scribble strokes (list of (N, 3) continuous IJK polylines) on one voxel slice, thickened
    to the server's ``preferred_scribble_thickness`` (voxels, per array axis, or one number).

    Returns ``(mask, bbox)`` (uint8 mask of the bbox's shape; bbox half-open, array order) or None when
    nothing of the scribble is on the image.
    """
    axes = _in_plane_axes(placement.axis)
    radii = _radii(thickness, axes)
    lines = []
    for stroke in strokes_ijk:
        pts = _to_index_coords(stroke)
        if len(pts):
            lines.append(pts[:, axes])
    if not lines:
        return None
    allpts = np.concatenate(lines)
    lo = [int(np.floor(allpts[:, n].min() - radii[n])) for n in range(2)]
    hi = [int(np.ceil(allpts[:, n].max() + radii[n])) + 1 for n in range(2)]
    size = (hi[0] - lo[0], hi[1] - lo[1])
    return _finish(_stroke_mask_2d(lines, lo, size, radii), lo, placement, shape)


def _fill_polygon(poly, origin, size):
    """Voxel centres strictly inside a closed polygon (even-odd rule). ``poly``: (N, 2) in-plane coords."""
    gy, gx = np.meshgrid(np.arange(size[0], dtype=np.float64) + origin[0],
                         np.arange(size[1], dtype=np.float64) + origin[1], indexing="ij")
    inside = np.zeros(size, dtype=bool)
    ys, xs = poly[:, 0], poly[:, 1]
    n = len(poly)
    for a in range(n):
        b = (a + 1) % n
        ya, xa, yb, xb = ys[a], xs[a], ys[b], xs[b]
        if ya == yb:
            continue
        crosses = (ya > gy) != (yb > gy)
        x_at = xa + (gy - ya) * (xb - xa) / (yb - ya)
        inside ^= crosses & (gx < x_at)
    return inside


def lasso_from_polygon(polygon_ijk, placement, shape):
    """Fill a closed lasso (N >= 3 continuous IJK vertices, the last joined to the first) on one voxel slice.
    The voxels its outline passes through count as inside, so a small lasso still selects something.

    Returns ``(mask, bbox)`` or None when nothing of it is on the image; GeometryError for fewer than three
    points.
    """
    pts = _to_index_coords(polygon_ijk)
    if len(pts) < 3:
        raise GeometryError("A lasso needs at least three points; draw a closed outline.")
    axes = _in_plane_axes(placement.axis)
    poly = pts[:, axes]
    lo = [int(np.floor(poly[:, n].min())) - 1 for n in range(2)]
    hi = [int(np.ceil(poly[:, n].max())) + 2 for n in range(2)]
    size = (hi[0] - lo[0], hi[1] - lo[1])
    mask = _fill_polygon(poly, lo, size)
    closed = np.concatenate([poly, poly[:1]])
    mask |= _stroke_mask_2d([closed], lo, size, [0.5, 0.5])
    return _finish(mask, lo, placement, shape)


def crop_to_bbox(mask, offset=(0, 0, 0)):
    """Crop a 3D mask to its non-zero voxels. ``offset``: array index of ``mask[0, 0, 0]`` in the volume.

    Returns ``(cropped uint8 mask, bbox)`` with bbox half-open in volume coordinates, or None when empty.
    """
    m = np.asarray(mask)
    nz = m != 0
    if not nz.any():
        return None
    bbox = []
    slices = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        hit = np.flatnonzero(nz.any(axis=other))
        lo, hi = int(hit[0]), int(hit[-1]) + 1
        slices.append(slice(lo, hi))
        bbox.append([int(offset[ax]) + lo, int(offset[ax]) + hi])
    return nz[tuple(slices)].astype(np.uint8), bbox


def scribble_from_painted(painted, offset, shape):
    """A brush stroke as the Segment Editor's paint effect leaves it in a labelmap -> ``(mask, bbox)``.

    ``painted``: 3D mask (array order) of the stroke, ``offset``: volume index of ``painted[0, 0, 0]``,
    ``shape``: the volume's. The stroke is clipped to the volume and cropped; None when nothing is left.
    GeometryError when it spans more than one voxel slice along every axis (painted on an oblique view,
    or with the sphere brush), since the server takes a scribble on one slice.
    """
    painted = np.asarray(painted)
    lo = [max(0, int(o)) for o in offset]
    hi = [min(int(n), int(o) + s) for o, s, n in zip(offset, painted.shape, shape)]
    if any(h <= l for l, h in zip(lo, hi)):
        return None
    inside = painted[tuple(slice(l - int(o), h - int(o)) for l, h, o in zip(lo, hi, offset))]
    result = crop_to_bbox(inside, lo)
    if result is None:
        return None
    mask, bbox = result
    if not any(b - a == 1 for a, b in bbox):
        raise GeometryError("The scribble covers more than one voxel slice: paint on a slice view aligned with "
                            "the volume (slice view menu: 'Rotate to volume plane') and with the sphere brush off.")
    return mask, bbox
