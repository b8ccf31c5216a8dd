"""Merge a region returned by the server into the selected segment the way Segment Editor effects do.

A prediction replaces the selected segment inside the returned region (Slicer's "set" modification),
restricted by the Segment Editor's masking settings, exactly as ``vtkSlicerSegmentEditorLogic::
ModifySegmentByLabelmap`` and ``vtkMRMLSegmentationNode::GenerateEditMask`` do it in Slicer:

* editable area (``MaskMode``): everywhere; inside all segments; inside visible segments; outside all
  segments; outside visible segments; inside one segment. "Inside" modes count the selected segment
  itself; "outside" modes ignore it. Inside one segment with no segment chosen allows nothing.
* editable intensity range: only voxels whose source volume value is in ``[low, high]`` are editable.
* outside the editable area the selected segment keeps its voxels (set mode adds them back);
* overwrite other segments: none, visible segments, all segments: the voxels of the new selected segment
  are removed from those segments.

Everything works on numpy arrays of the region only (array order ``(k, j, i)``). The second half of the
module reads and writes such regions in Slicer's binary labelmap *layers* (several segments may share one
labelmap, each with its own label value), again on numpy views only, so the Slicer module stays a thin
adapter that hands over ``arrayFromSegmentInternalBinaryLabelmap`` views.
"""

import numpy as np

# Values of vtkMRMLSegmentationNode::EditAllowed* (MaskMode of vtkMRMLSegmentEditorNode).
EDIT_EVERYWHERE = 0
EDIT_INSIDE_ALL = 1
EDIT_INSIDE_VISIBLE = 2
EDIT_OUTSIDE_ALL = 3
EDIT_OUTSIDE_VISIBLE = 4
EDIT_INSIDE_SINGLE = 5
MASK_MODES = (EDIT_EVERYWHERE, EDIT_INSIDE_ALL, EDIT_INSIDE_VISIBLE, EDIT_OUTSIDE_ALL, EDIT_OUTSIDE_VISIBLE,
              EDIT_INSIDE_SINGLE)

# Values of vtkMRMLSegmentEditorNode::Overwrite*.
OVERWRITE_ALL = 0
OVERWRITE_VISIBLE = 1
OVERWRITE_NONE = 2
OVERWRITE_MODES = (OVERWRITE_ALL, OVERWRITE_VISIBLE, OVERWRITE_NONE)


class SegmentRegion(object):
    """One other segment of the segmentation, seen through the region: its voxels there and its visibility."""

    __slots__ = ("mask", "visible")

    def __init__(self, mask, visible=True):
        self.mask = np.asarray(mask) != 0
        self.visible = bool(visible)


class MaskingSettings(object):
    """The Segment Editor's masking settings (read from its vtkMRMLSegmentEditorNode by the module).

    ``intensity_range``: None, or (low, high) when "editable intensity range" is on.
    ``mask_segment_id``: the segment of EDIT_INSIDE_SINGLE.
    """

    __slots__ = ("mask_mode", "overwrite_mode", "mask_segment_id", "intensity_range")

    def __init__(self, mask_mode=EDIT_EVERYWHERE, overwrite_mode=OVERWRITE_NONE, mask_segment_id=None,
                 intensity_range=None):
        if mask_mode not in MASK_MODES:
            raise ValueError("unknown mask mode %r" % (mask_mode,))
        if overwrite_mode not in OVERWRITE_MODES:
            raise ValueError("unknown overwrite mode %r" % (overwrite_mode,))
        self.mask_mode = mask_mode
        self.overwrite_mode = overwrite_mode
        self.mask_segment_id = mask_segment_id
        self.intensity_range = None if intensity_range is None else (float(intensity_range[0]),
                                                                     float(intensity_range[1]))

    @property
    def restricts(self):
        """True when some voxels may not be editable (the result can differ from the prediction)."""
        return self.mask_mode != EDIT_EVERYWHERE or self.intensity_range is not None

    def needs_other_segments(self):
        """True when the merge must see other segments' voxels (masking by segments or overwriting)."""
        return self.mask_mode != EDIT_EVERYWHERE or self.overwrite_mode != OVERWRITE_NONE

    def __repr__(self):
        return "MaskingSettings(mask_mode=%r, overwrite_mode=%r, mask_segment_id=%r, intensity_range=%r)" % (
            self.mask_mode, self.overwrite_mode, self.mask_segment_id, self.intensity_range)


class MergeResult(object):
    """``selected``: the new selected-segment region (bool); ``others``: {segment_id: new bool region} for the
    other segments that lose voxels; ``changed``: whether anything differs from before."""

    __slots__ = ("selected", "others", "changed")

    def __init__(self, selected, others, changed):
        self.selected = selected
        self.others = others
        self.changed = changed


def editable_mask(shape, settings, selected_id, current, selected_visible, others, intensity=None):
    """Boolean region where the selected segment may change (True = editable).

    ``current``: the selected segment's region; ``others``: {segment_id: SegmentRegion} of every other
    segment (only those with voxels in the region are needed); ``intensity``: the source volume's region
    (needed when ``settings.intensity_range`` is set).
    """
    mode = settings.mask_mode
    if mode == EDIT_EVERYWHERE:
        editable = np.ones(shape, dtype=bool)
    elif mode in (EDIT_INSIDE_ALL, EDIT_INSIDE_VISIBLE):
        editable = np.zeros(shape, dtype=bool)
        if mode == EDIT_INSIDE_ALL or selected_visible:
            editable |= current
        for region in others.values():
            if mode == EDIT_INSIDE_ALL or region.visible:
                editable |= region.mask
    elif mode in (EDIT_OUTSIDE_ALL, EDIT_OUTSIDE_VISIBLE):
        covered = np.zeros(shape, dtype=bool)
        for region in others.values():
            if mode == EDIT_OUTSIDE_ALL or region.visible:
                covered |= region.mask
        editable = ~covered
    else:  # EDIT_INSIDE_SINGLE
        sid = settings.mask_segment_id
        if sid is None or sid == "":
            editable = np.zeros(shape, dtype=bool)
        elif sid == selected_id:
            editable = current.copy()
        elif sid in others:
            editable = others[sid].mask.copy()
        else:
            editable = np.zeros(shape, dtype=bool)
    if settings.intensity_range is not None:
        if intensity is None:
            raise ValueError("the editable intensity range is on: the source volume's region is needed")
        low, high = settings.intensity_range
        values = np.asarray(intensity)
        editable &= (values >= low) & (values <= high)
    return editable


def merge_prediction(prediction, current, settings, selected_id=None, selected_visible=True, others=None,
                     intensity=None):
    """Merge the server's prediction for a region into the selected segment under the masking settings.

    ``prediction``, ``current``: same-shape arrays (non-zero = inside). ``others``: {segment_id:
    SegmentRegion} of the other segments (their voxels in the region and their visibility).
    Returns a MergeResult; the inputs are never modified.
    """
    pred = np.asarray(prediction) != 0
    cur = np.asarray(current) != 0
    if pred.shape != cur.shape:
        raise ValueError("prediction %s and segment region %s differ in shape" % (pred.shape, cur.shape))
    others = others or {}
    if settings.restricts:
        editable = editable_mask(pred.shape, settings, selected_id, cur, selected_visible, others, intensity)
        new = np.where(editable, pred, cur)
    else:
        new = pred
    changed = not np.array_equal(new, cur)
    erase = {}
    if settings.overwrite_mode != OVERWRITE_NONE and new.any():
        for sid, region in others.items():
            if settings.overwrite_mode == OVERWRITE_VISIBLE and not region.visible:
                continue
            hit = region.mask & new
            if hit.any():
                erase[sid] = region.mask & ~new
                changed = True
    return MergeResult(new, erase, changed)


# ----------------------------------------------------------------------------------------------------
# Binary labelmap layers: a layer is an integer array covering an extent of the volume's grid; each
# segment in it has a label value. Regions are half-open boxes in volume array coordinates.


def overlap(bbox, layer_offset, layer_shape):
    """Slices into the region and into the layer for the part of ``bbox`` the layer covers, or None."""
    region_sl, layer_sl = [], []
    for (lo, hi), off, n in zip(bbox, layer_offset, layer_shape):
        a, b = max(lo, off), min(hi, off + n)
        if b <= a:
            return None
        region_sl.append(slice(a - lo, b - lo))
        layer_sl.append(slice(a - off, b - off))
    return tuple(region_sl), tuple(layer_sl)


def read_region(layer, layer_offset, label, bbox):
    """The segment ``label`` of a layer (array; ``layer_offset``: volume index of ``layer[0, 0, 0]``) seen
    through ``bbox``, as a bool array of the bbox's shape (False where the layer does not reach)."""
    shape = tuple(hi - lo for lo, hi in bbox)
    out = np.zeros(shape, dtype=bool)
    if layer is None:
        return out
    ov = overlap(bbox, layer_offset, np.shape(layer))
    if ov is not None:
        region_sl, layer_sl = ov
        out[region_sl] = np.asarray(layer)[layer_sl] == label
    return out


def read_values(layer, layer_offset, bbox):
    """A layer's label values seen through ``bbox``, an array of the bbox's shape (0 where the layer does not
    reach)."""
    shape = tuple(hi - lo for lo, hi in bbox)
    if layer is None:
        return np.zeros(shape, dtype=np.uint8)
    out = np.zeros(shape, dtype=np.asarray(layer).dtype)
    ov = overlap(bbox, layer_offset, np.shape(layer))
    if ov is not None:
        region_sl, layer_sl = ov
        out[region_sl] = np.asarray(layer)[layer_sl]
    return out


def any_in_region(layer, layer_offset, label, bbox):
    """Whether segment ``label`` has voxels inside ``bbox`` (cheap early-out for other segments)."""
    if layer is None:
        return False
    ov = overlap(bbox, layer_offset, np.shape(layer))
    if ov is None:
        return False
    return bool(np.any(np.asarray(layer)[ov[1]] == label))


def required_extent(layer_offset, layer_shape, bbox, new_mask):
    """The (offset, shape) a layer must grow to so that every True voxel of ``new_mask`` (placed at ``bbox``)
    lies inside it, or None when it already does. An empty layer (shape with a 0) grows to the voxels."""
    crop = np.asarray(new_mask) != 0
    if not crop.any():
        return None
    lo, hi = [], []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        hit = np.flatnonzero(crop.any(axis=other))
        lo.append(bbox[ax][0] + int(hit[0]))
        hi.append(bbox[ax][0] + int(hit[-1]) + 1)
    empty = layer_shape is None or any(int(n) <= 0 for n in layer_shape)
    if empty:
        return tuple(lo), tuple(h - l for l, h in zip(lo, hi))
    if all(l >= o and h <= o + int(n) for l, h, o, n in zip(lo, hi, layer_offset, layer_shape)):
        return None
    new_lo = [min(l, o) for l, o in zip(lo, layer_offset)]
    new_hi = [max(h, o + int(n)) for h, o, n in zip(hi, layer_offset, layer_shape)]
    return tuple(new_lo), tuple(h - l for l, h in zip(new_lo, new_hi))


def conflicting_labels(layer, layer_offset, label, bbox, new_mask, overwritable_labels=()):
    """Label values of *other* segments in the same layer that the new mask would overwrite although they
    may not be overwritten. Non-empty means: move the selected segment to its own layer first (Slicer's
    ``vtkSegmentation::SeparateSegmentLabelmap``, as ``vtkSegmentationModifier`` does)."""
    if layer is None:
        return set()
    ov = overlap(bbox, layer_offset, np.shape(layer))
    if ov is None:
        return set()
    region_sl, layer_sl = ov
    values = np.asarray(layer)[layer_sl][np.asarray(new_mask, dtype=bool)[region_sl]]
    found = set(int(v) for v in np.unique(values))
    found.discard(0)
    found.discard(int(label))
    return found - set(int(v) for v in overwritable_labels)


def write_region(layer, layer_offset, label, bbox, new_mask):
    """Write segment ``label``'s new voxels for ``bbox`` into a layer array in place: ``label`` where the
    mask is set, 0 where the mask is clear and the layer held ``label``; other labels are left alone
    where the mask is clear (and overwritten where it is set: check ``conflicting_labels`` first).

    The layer must already cover every set voxel of the mask (see ``required_extent``); voxels of the
    bbox outside the layer must be clear. Returns True when a value changed.
    """
    new = np.asarray(new_mask, dtype=bool)
    ov = overlap(bbox, layer_offset, np.shape(layer))
    inside = 0
    if ov is not None:
        region_sl, layer_sl = ov
        view = layer[layer_sl]
        sub = new[region_sl]
        inside = int(np.count_nonzero(sub))
    if inside != int(np.count_nonzero(new)):
        raise ValueError("the layer does not cover the segment's new voxels; grow it first")
    if ov is None:
        return False
    old_set = view == label
    add = sub & ~old_set
    remove = old_set & ~sub
    if not add.any() and not remove.any():
        return False
    view[add] = label
    view[remove] = 0
    return True


def erase_region(layer, layer_offset, label, bbox, keep_mask):
    """Clear segment ``label`` in a layer where it is inside ``bbox`` but not in ``keep_mask`` (the other
    segment's new region). Never grows anything. Returns True when a value changed."""
    ov = overlap(bbox, layer_offset, np.shape(layer))
    if ov is None:
        return False
    region_sl, layer_sl = ov
    view = layer[layer_sl]
    remove = (view == label) & ~np.asarray(keep_mask, dtype=bool)[region_sl]
    if not remove.any():
        return False
    view[remove] = 0
    return True


def full_mask(layer, layer_offset, label, shape, out=None):
    """The whole segment ``label`` as a uint8 array of the volume's ``shape`` (for an upload to the server,
    done only when the segment changed by other means than our own writes)."""
    if out is None:
        out = np.zeros(shape, dtype=np.uint8)
    else:
        out[...] = 0
    if layer is None:
        return out
    bbox = [[0, int(n)] for n in shape]
    ov = overlap(bbox, layer_offset, np.shape(layer))
    if ov is not None:
        region_sl, layer_sl = ov
        out[region_sl] = np.asarray(layer)[layer_sl] == label
    return out
