"""The simulated user: where a box, a click or a scribble goes, given the ground truth and the current mask.

Arrays are indexed ``[z, y, x]`` as SimpleITK reads them (``[k, j, i]``: axis 0 is the slice axis), which is the
layout of the CVPR 2025 challenge's ``.npz`` files (D, H, W); "slice" means a plane of constant axis 0.

The rules of the CVPR 2025 challenge "Foundation Models for Interactive 3D Biomedical Image Segmentation"
(https://www.codabench.org/competitions/5263/), as its organisers describe and implement them:

* **Box** (dataset description, https://huggingface.co/datasets/junma/CVPR-BiomedSegFM, and the organisers'
  ``get_boxes.py`` in https://github.com/JunMa11/CVPR-MedSegFMCompetition): the object's z range (first and last
  slice holding it) and the 2D box of the object on its middle slice. The middle slice is the slice of the object's
  middle voxel in array order (``z`` of the ``n // 2``-th of its ``n`` voxels), not the middle of the z range.
  nnInteractive's own baseline for the challenge (``nnInteractive/inference/cvpr2025_challenge_baseline/predict.py``
  in the nnInteractive package) sends it as the 3D box ``[z_min, z_max + 1] x`` the middle slice's extents; a model
  that takes only 2D boxes gets the middle slice's box (``box_prompt``). Here the box is tight: the organisers'
  precomputed boxes were also widened at random by 0-5 voxels (scaled by the image size / 256).
* **Clicks** (the organisers' ``CVPR25_iter_eval.py``, same repository): the error is every voxel where the mask
  and the ground truth of the object differ; its connected components are taken with 26-connectivity, the largest
  one (most voxels) is chosen, and the click goes to the voxel of that component farthest from its border
  (Euclidean distance transform in voxel units, the image border counting as border). Among voxels at the same
  largest distance, one is drawn uniformly with numpy's legacy generator seeded with 42, in C (array) order of the
  candidates. The click is positive where the ground truth holds the object (a false negative), negative otherwise.
  No error, no click. Equal largest components: the first one in C order (the one whose first voxel comes first,
  as connected-component labelling numbers them).

The point-only and scribble-only variants (``points``, ``scribbles``) are this project's: their first prompt is the
correction of an empty mask by the same rule (a positive click at the deepest voxel of the object's largest part),
and a scribble is a stroke through the click voxel, on its slice, inside the error there (``scribble_prompt``).
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

TIE_SEED = 42  # the challenge's fixed seed for choosing among equally deep voxels
CONNECTIVITY_26 = np.ones((3, 3, 3), bool)
CONNECTIVITY_8 = np.ones((3, 3), bool)


@dataclass(frozen=True)
class Click:
    """A click at voxel ``coords`` (``[z, y, x]``); ``positive``: add to the object (a false negative was there)."""

    coords: Tuple[int, int, int]
    positive: bool


@dataclass(frozen=True)
class Box:
    """Half-open ``[[z0, z1], [y0, y1], [x0, x1]]``; 2D when ``z1 - z0 == 1``."""

    bbox: List[List[int]]

    @property
    def is_2d(self) -> bool:
        return any(hi - lo == 1 for lo, hi in self.bbox)


@dataclass(frozen=True)
class Scribble:
    """A stroke on one slice: ``mask`` (uint8, shape ``(1, h, w)``) placed at ``bbox`` (half-open, as
    ``interaction_bbox`` of the nnInteractive API), positive or negative; ``click`` is the voxel it goes through."""

    bbox: List[List[int]]
    mask: np.ndarray
    positive: bool
    click: Click


def _bbox(mask: np.ndarray) -> Optional[List[Tuple[int, int]]]:
    """Half-open extent per axis of the nonzero voxels, or None."""
    extents = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        if not hits.size:
            return None
        extents.append((int(hits[0]), int(hits[-1]) + 1))
    return extents


def box_prompt(gt: np.ndarray, three_d: bool = False) -> Box:
    """The challenge's box of the object ``gt`` (bool ``[z, y, x]``): its 2D box on the middle slice, or with
    ``three_d`` the same box over the object's whole z range."""
    zs = np.nonzero(gt)[0]  # C order: sorted by z
    if not zs.size:
        raise ValueError("the object is empty")
    z_mid = int(zs[zs.size // 2])
    ys, xs = np.nonzero(gt[z_mid])
    z_range = [int(zs[0]), int(zs[-1]) + 1] if three_d else [z_mid, z_mid + 1]
    return Box([z_range, [int(ys.min()), int(ys.max()) + 1], [int(xs.min()), int(xs.max()) + 1]])


def largest_error(pred: np.ndarray, gt: np.ndarray) -> Optional[Tuple[np.ndarray, Tuple[int, int, int]]]:
    """The largest 26-connected component of ``pred != gt``, as ``(mask, offset)``: a bool mask over the component's
    bounding box and the box's first voxel. None when there is no error."""
    error = np.not_equal(pred != 0, gt != 0)
    box = _bbox(error)
    if box is None:
        return None
    # Cropping keeps the components and their order (C order within a box is C order of the volume).
    crop = error[tuple(slice(lo, hi) for lo, hi in box)]
    labels, n = ndimage.label(crop, structure=CONNECTIVITY_26)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    k = int(np.argmax(sizes))  # the first of equal sizes
    sl = ndimage.find_objects(labels, max_label=k)[k - 1]
    comp = labels[sl] == k
    return comp, tuple(b[0] + s.start for b, s in zip(box, sl))


def deepest_voxel(comp: np.ndarray) -> Tuple[int, int, int]:
    """The voxel of ``comp`` farthest from its border (outside the array counts as outside the component); ties are
    drawn with the challenge's seed, in C order."""
    depth = ndimage.distance_transform_edt(np.pad(comp, 1))[1:-1, 1:-1, 1:-1]
    candidates = np.argwhere(depth == depth.max())
    pick = candidates[np.random.RandomState(TIE_SEED).choice(len(candidates))]
    return tuple(int(v) for v in pick)


def _next_click(pred: np.ndarray, gt: np.ndarray):
    """``(component, its offset, the click's voxel in it, Click)`` of the challenge's next click, or None when
    ``pred`` equals ``gt``."""
    found = largest_error(pred, gt)
    if found is None:
        return None
    comp, offset = found
    local = deepest_voxel(comp)
    coords = tuple(o + c for o, c in zip(offset, local))
    return comp, offset, local, Click(coords, bool(gt[coords]))


def click_prompt(pred: np.ndarray, gt: np.ndarray) -> Optional[Click]:
    """The challenge's next click for the mask ``pred`` of the object ``gt``, or None when ``pred`` equals it."""
    found = _next_click(pred, gt)
    return found[-1] if found is not None else None


def scribble_prompt(pred: np.ndarray, gt: np.ndarray, thickness: Sequence[int] = (2, 2)) -> Optional[Scribble]:
    """A scribble that corrects the same error the next click would: on the click's slice, within the 8-connected
    part of the largest error component that holds the click and has its kind (missed object, or wrongly included
    background), a straight stroke through the click along that part's longest direction (principal axis of its
    voxels), as far as it stays inside, ``thickness`` voxels wide (in-plane, the server's preferred scribble
    thickness) and clipped to the part. None when ``pred`` equals ``gt``."""
    found = _next_click(pred, gt)
    if found is None:
        return None
    comp, offset, local, click = found
    z = local[0]
    gt_plane = gt[click.coords[0], offset[1]:offset[1] + comp.shape[1], offset[2]:offset[2] + comp.shape[2]] != 0
    same_kind = gt_plane == click.positive
    plane, _ = ndimage.label(comp[z] & same_kind, structure=CONNECTIVITY_8)
    part = plane == plane[local[1], local[2]]
    stroke = _stroke(part, np.array(local[1:], float))
    t = [max(1, int(v)) for v in thickness]
    if t != [1, 1]:
        stroke = ndimage.binary_dilation(stroke, structure=np.ones(t, bool)) & part
    ys, xs = np.nonzero(stroke)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    mask = stroke[y0:y1, x0:x1][None].astype(np.uint8)
    bbox = [[click.coords[0], click.coords[0] + 1], [offset[1] + y0, offset[1] + y1], [offset[2] + x0, offset[2] + x1]]
    return Scribble(bbox, mask, click.positive, click)


def _stroke(part: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Voxels of a straight line through ``start`` along ``part``'s principal axis, both ways until it leaves ``part``
    (sampled every half voxel, rounded)."""
    stroke = np.zeros_like(part)
    stroke[int(start[0]), int(start[1])] = True
    pts = np.argwhere(part).astype(float)
    if len(pts) < 2:
        return stroke
    cov = np.cov(pts.T)
    direction = np.linalg.eigh(cov)[1][:, -1]  # eigenvector of the largest eigenvalue
    for sign in (1.0, -1.0):
        for step in range(1, 2 * sum(part.shape)):
            y, x = np.rint(start + sign * 0.5 * step * direction).astype(int)
            if not (0 <= y < part.shape[0] and 0 <= x < part.shape[1] and part[y, x]):
                break
            stroke[y, x] = True
    return stroke
