"""Dice, normalised surface distance (NSD, "surface Dice") and the area under a per-step curve.

NSD at a tolerance of ``t`` mm: the share of both masks' border voxels that lie within ``t`` mm of the other mask's
border. A border voxel is a mask voxel with a face neighbour outside the mask (the image border counts as outside);
distances are between voxel centres, in mm from the voxel spacing, found with k-d trees of the border points
(``scipy.spatial.cKDTree``: on a 300x300x200 volume 0.3 s where two distance maps of the volume took 1.7 s). This is
the voxel form of the measure (as in MONAI's ``compute_surface_dice``); the challenge's script uses DeepMind's
``surface-distance`` package, which weights border elements by their surface area, so figures can differ a little.
The challenge also reports NSD as 0 when Dice is at most 0.2 (to save time); here NSD is always computed.
"""

from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

FACE_NEIGHBOURS = ndimage.generate_binary_structure(3, 1)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks (nonzero = inside); 1.0 when both are empty."""
    a, b = a != 0, b != 0
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


def _border(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=FACE_NEIGHBOURS, border_value=0)


def nsd(a: np.ndarray, b: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> float:
    """Normalised surface distance of masks ``a`` and ``b`` (``spacing`` in mm per array axis): 1.0 when both are
    empty, 0.0 when only one is."""
    a, b = a != 0, b != 0
    either = a | b
    if not either.any():
        return 1.0
    if not (a.any() and b.any()):
        return 0.0
    # Work on the box around both masks, one voxel wider (so a crop edge is never taken for a border).
    crop = []
    for axis in range(3):
        other = tuple(i for i in range(3) if i != axis)
        hits = np.flatnonzero(either.any(axis=other))
        crop.append(slice(max(0, int(hits[0]) - 1), min(either.shape[axis], int(hits[-1]) + 2)))
    a, b = a[tuple(crop)], b[tuple(crop)]
    mm = np.asarray([float(s) for s in spacing])
    points_a, points_b = np.argwhere(_border(a)) * mm, np.argwhere(_border(b)) * mm
    limit = tolerance_mm * (1 + 1e-9)  # inclusive, whatever the rounding of the distances
    # Nearest-border distances from k-d trees of the border points: far cheaper than distance maps of the volume.
    to_b, _ = cKDTree(points_b).query(points_a, distance_upper_bound=limit)
    to_a, _ = cKDTree(points_a).query(points_b, distance_upper_bound=limit)
    near = int(np.count_nonzero(to_b <= limit)) + int(np.count_nonzero(to_a <= limit))
    return near / (len(points_a) + len(points_b))


def auc(values: Sequence[float]) -> float:
    """Trapezoidal area under ``values`` at unit steps (0 for fewer than two values)."""
    v = [float(x) for x in values]
    return sum((p + q) / 2.0 for p, q in zip(v[:-1], v[1:]))
