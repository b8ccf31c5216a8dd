"""Deterministic synthetic volumes with bright ellipsoidal blobs, and prompts on them.

numpy/scipy only, so tests can import it without torch. Arrays are indexed [x, y, z] (the axis order
nnInteractive uses). A phantom has an int16 image and a uint8 instance label map (0 background, blob k
has label k, 1..n), so the ground truth of every blob is known.

    from phantoms import make_phantom, interior_voxel, box_2d, dice
    ph = make_phantom(seed=123)                 # 64^3, 4 blobs
    x, y, z = interior_voxel(ph.labels, 1)      # deepest voxel of blob 1
    ...  # prompt the model, then
    dice(mask > 0, ph.labels == 1)

The prompt helpers (points, 2D boxes, 2D scribbles, 2D lassos) are deterministic unless given an rng;
the training script (train_blobs.py) uses the randomized forms, tests should use the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

__all__ = ["Blob", "Phantom", "make_phantom", "blob_mask", "interior_voxel", "random_interior_voxel",
           "largest_slice", "box_2d", "scribble_2d", "lasso_2d", "dice"]


@dataclass
class Blob:
    label: int
    center: Tuple[float, float, float]
    radii: Tuple[float, float, float]
    contrast: float  # intensity above the background (negative: a dark blob)


@dataclass
class Phantom:
    image: np.ndarray  # int16 [x, y, z]
    labels: np.ndarray  # uint8 [x, y, z], 0 = background, k = blob k (1..n)
    blobs: List[Blob] = field(default_factory=list)

    @property
    def n_blobs(self) -> int:
        return len(self.blobs)


def make_phantom(shape: Sequence[int] = (64, 64, 64), n_blobs: int = 4, seed: int = 0,
                 sizes: Sequence[float] = (5.0, 7.0, 9.0, 11.0), contrast: Tuple[float, float] = (300.0, 600.0),
                 background: Tuple[float, float] = (50.0, 200.0), noise: float = 10.0, gap: float = 4.0,
                 margin: int = 2, dark: Sequence[int] = ()) -> Phantom:
    """A volume of ``shape`` with ``n_blobs`` non-touching axis-aligned ellipsoids.

    Blob k gets a base radius from ``sizes`` (cycled, so a few sizes always occur), scaled per axis by a
    factor in [0.8, 1.25]; its contrast above the background is drawn from ``contrast``. The background is a
    smooth field (a level drawn from ``background`` plus a gradient and a low-frequency wobble), plus
    Gaussian noise of std ``noise`` (0 for none). Blobs are at least ``gap`` voxels apart (bounding
    spheres) and ``margin`` voxels inside the volume. Same arguments, same phantom.

    ``dark``: labels of blobs that are darker than the background instead (their contrast is negated; the
    rest of the phantom, and the random draws, stay the same: ``dark=()`` gives the phantom of before).
    """
    shape = tuple(int(s) for s in shape)
    rng = np.random.RandomState(seed)

    blobs: List[Blob] = []
    for k in range(n_blobs):
        base = float(sizes[k % len(sizes)])
        for _ in range(2000):
            radii = tuple(float(np.clip(base * rng.uniform(0.8, 1.25), 2.5, (s - 2 * margin - 1) / 2))
                          for s in shape)
            lo = [r + margin for r in radii]
            hi = [s - 1 - r - margin for r, s in zip(radii, shape)]
            if any(h < l for l, h in zip(lo, hi)):
                continue
            center = tuple(float(rng.uniform(l, h)) for l, h in zip(lo, hi))
            ok = all(np.linalg.norm(np.subtract(center, b.center)) >= max(radii) + max(b.radii) + gap for b in blobs)
            if ok:
                blobs.append(Blob(k + 1, center, radii, float(rng.uniform(*contrast))))
                break
        else:
            raise ValueError(f"cannot place {n_blobs} blobs of sizes {list(sizes)} in a volume of shape {shape}")

    unknown = set(int(k) for k in dark) - set(b.label for b in blobs)
    if unknown:
        raise ValueError(f"dark blobs {sorted(unknown)} do not exist (blobs 1..{len(blobs)})")
    for b in blobs:
        if b.label in dark:
            b.contrast = -b.contrast

    labels = np.zeros(shape, dtype=np.uint8)
    fg = np.zeros(shape, dtype=np.float32)
    for b in blobs:
        # work on the blob's bounding box only (open grids broadcast to it)
        box = tuple(slice(max(0, int(c - r) - 2), min(s, int(c + r) + 3)) for c, r, s in zip(b.center, b.radii, shape))
        axes = [((np.arange(sl.start, sl.stop, dtype=np.float32) - c) / r) ** 2
                for sl, c, r in zip(box, b.center, b.radii)]
        d = axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]
        labels[box][d <= 1.0] = b.label
        # a soft edge about one voxel wide, centred on the label boundary
        r_eff = float(np.mean(b.radii))
        fg[box] += b.contrast * np.clip(0.5 - (np.sqrt(d) - 1.0) * r_eff, 0.0, 1.0)

    level = rng.uniform(*background)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    ramp_axes = [np.arange(s, dtype=np.float32) / max(s, 1) * di for s, di in zip(shape, direction)]
    ramp = (ramp_axes[0][:, None, None] + ramp_axes[1][None, :, None] + ramp_axes[2][None, None, :])
    ramp *= rng.uniform(0, 40)
    # low-frequency wobble: smooth noise on a 4x coarser grid, interpolated up
    coarse = [int(np.ceil(s / 4)) + 1 for s in shape]
    wobble = ndimage.gaussian_filter(rng.normal(size=coarse).astype(np.float32), sigma=1.5, mode="wrap")
    for ax, s in enumerate(shape):  # separable linear interpolation, one axis at a time
        pos = np.arange(s, dtype=np.float32) / 4
        w = np.maximum(0.0, 1.0 - np.abs(pos[:, None] - np.arange(coarse[ax], dtype=np.float32)[None, :]))
        wobble = np.moveaxis(np.tensordot(w, wobble, axes=(1, ax)), 0, ax)
    wobble *= rng.uniform(0, 25) / max(float(wobble.std()), 1e-6)
    img = level + ramp + wobble + fg
    if noise > 0:
        img = img + rng.normal(scale=noise, size=shape).astype(np.float32)
    image = np.clip(np.round(img), -32768, 32767).astype(np.int16)
    return Phantom(image=image, labels=labels, blobs=blobs)


def blob_mask(labels: np.ndarray, k: int) -> np.ndarray:
    """Boolean ground truth of blob ``k``."""
    return labels == k


def _blob_edt(labels: np.ndarray, k: int):
    """Distance to the boundary inside blob k, on the blob's bounding box (padded by 1), and the box offset."""
    m = labels == k
    if not m.any():
        raise ValueError(f"no blob {k}")
    sl = ndimage.find_objects(m.astype(np.uint8))[0]
    sl = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in sl)
    return ndimage.distance_transform_edt(np.pad(m[sl], 1))[1:-1, 1:-1, 1:-1], [s.start for s in sl]


def interior_voxel(labels: np.ndarray, k: int) -> Tuple[int, int, int]:
    """The deepest voxel of blob ``k`` (largest distance to its boundary; first one on ties)."""
    edt, off = _blob_edt(labels, k)
    return tuple(int(i) + o for i, o in zip(np.unravel_index(int(np.argmax(edt)), edt.shape), off))


def random_interior_voxel(labels: np.ndarray, k: int, rng: np.random.RandomState,
                          min_depth: float = 2.0) -> Tuple[int, int, int]:
    """A random voxel of blob ``k`` at least ``min_depth`` voxels from its boundary (or the deepest ones)."""
    edt, off = _blob_edt(labels, k)
    cand = np.argwhere(edt >= min(min_depth, float(edt.max())))
    return tuple(int(i) + o for i, o in zip(cand[rng.randint(len(cand))], off))


def largest_slice(labels: np.ndarray, k: int, axis: int) -> int:
    """Index along ``axis`` of the slice where blob ``k`` has its largest cross-section."""
    other = tuple(a for a in range(3) if a != axis)
    return int(np.argmax((labels == k).sum(axis=other)))


def _slice_mask(labels: np.ndarray, k: int, axis: int, slice_index: Optional[int]) -> Tuple[int, np.ndarray]:
    if slice_index is None:
        slice_index = largest_slice(labels, k, axis)
    sec = np.take(labels == k, slice_index, axis=axis)
    if not sec.any():
        raise ValueError(f"blob {k} does not cross slice {slice_index} of axis {axis}")
    return slice_index, sec


def _embed(sec2d: np.ndarray, shape: Sequence[int], axis: int, slice_index: int) -> np.ndarray:
    out = np.zeros(shape, dtype=np.uint8)
    idx = [slice(None)] * 3
    idx[axis] = slice_index
    out[tuple(idx)] = sec2d.astype(np.uint8)
    return out


def box_2d(labels: np.ndarray, k: int, axis: int = 2, slice_index: Optional[int] = None, margin: int = 1,
           rng: Optional[np.random.RandomState] = None) -> List[List[int]]:
    """A 2D box ``[[x0, x1], [y0, y1], [z0, z1]]`` (half-open; size 1 along ``axis``) around the cross-section
    of blob ``k`` in slice ``slice_index`` (default: its largest), grown by ``margin`` voxels on each side
    (with an rng: by 0..margin, independently per side). Clipped to the volume."""
    slice_index, sec = _slice_mask(labels, k, axis, slice_index)
    pts = np.argwhere(sec)
    lo, hi = pts.min(0), pts.max(0) + 1
    in_plane = [a for a in range(3) if a != axis]
    box: List[List[int]] = [[0, 0]] * 3
    box[axis] = [slice_index, slice_index + 1]
    for j, a in enumerate(in_plane):
        m0 = margin if rng is None else rng.randint(0, margin + 1)
        m1 = margin if rng is None else rng.randint(0, margin + 1)
        box[a] = [max(0, int(lo[j]) - m0), min(labels.shape[a], int(hi[j]) + m1)]
    return box


def _draw_polyline(shape2d: Sequence[int], points: np.ndarray) -> np.ndarray:
    out = np.zeros(shape2d, dtype=bool)
    for p, q in zip(points[:-1], points[1:]):
        n = int(np.ceil(np.abs(q - p).max())) + 1
        for t in np.linspace(0.0, 1.0, n):
            r = np.round(p + t * (q - p)).astype(int)
            if 0 <= r[0] < shape2d[0] and 0 <= r[1] < shape2d[1]:
                out[r[0], r[1]] = True
    return out


def scribble_2d(labels: np.ndarray, k: int, axis: int = 2, slice_index: Optional[int] = None,
                thickness: int = 2, rng: Optional[np.random.RandomState] = None) -> np.ndarray:
    """A scribble (uint8 mask of the volume's shape, nonzero in one slice of ``axis``) inside the cross-section
    of blob ``k``: a stroke through its centre along its longer in-plane extent, ``thickness`` voxels wide,
    kept inside the blob. With an rng the stroke gets a random direction, length and a bend."""
    slice_index, sec = _slice_mask(labels, k, axis, slice_index)
    inner = ndimage.binary_erosion(sec, iterations=1)
    if inner.sum() < 3:
        inner = sec
    pts = np.argwhere(inner).astype(float)
    c = pts.mean(0)
    if rng is None:
        ext = pts.max(0) - pts.min(0)
        d = np.array([1.0, 0.0]) if ext[0] >= ext[1] else np.array([0.0, 1.0])
        half = 0.35 * (ext.max() + 1)
        line = np.stack([c - half * d, c, c + half * d])
    else:
        ang = rng.uniform(0, np.pi)
        d = np.array([np.cos(ang), np.sin(ang)])
        ext = np.abs((pts - c) @ d).max()
        half = rng.uniform(0.2, 0.5) * (2 * ext + 1)
        bend = np.array([-d[1], d[0]]) * rng.uniform(-0.3, 0.3) * half
        c = c + rng.uniform(-0.2, 0.2, size=2) * ext
        line = np.stack([c - half * d, c + bend, c + half * d])
        thickness = int(rng.randint(1, max(thickness, 1) + 2))
    stroke = _draw_polyline(sec.shape, line)
    if thickness > 1:
        stroke = ndimage.binary_dilation(stroke, structure=np.ones((thickness, thickness), bool))
    stroke &= inner
    if not stroke.any():
        c0 = np.round(pts[np.argmin(((pts - pts.mean(0)) ** 2).sum(1))]).astype(int)
        stroke[c0[0], c0[1]] = True
    return _embed(stroke, labels.shape, axis, slice_index)


def lasso_2d(labels: np.ndarray, k: int, axis: int = 2, slice_index: Optional[int] = None, margin: int = 2,
             rng: Optional[np.random.RandomState] = None) -> np.ndarray:
    """A filled lasso (uint8 mask of the volume's shape, nonzero in one slice of ``axis``) around the
    cross-section of blob ``k``: the cross-section grown by ``margin`` voxels (with an rng: a random growth
    in 0..margin+1 and a little random shift of the outline)."""
    slice_index, sec = _slice_mask(labels, k, axis, slice_index)
    if rng is not None:
        margin = int(rng.randint(0, margin + 2))
        sec = ndimage.shift(sec.astype(np.float32), rng.uniform(-1, 1, size=2), order=1) > 0.5 if sec.sum() > 20 else sec
    grown = ndimage.binary_dilation(sec, iterations=margin) if margin > 0 else sec
    grown = ndimage.binary_fill_holes(grown)
    return _embed(grown, labels.shape, axis, slice_index)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks (nonzero = foreground); 1.0 when both are empty."""
    a = np.asarray(a) != 0
    b = np.asarray(b) != 0
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s
