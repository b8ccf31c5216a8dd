"""An automatic run's labels written as one labelmap merge, in steps of bounded time.

A model's run returns a label array for a box of the image (``region`` over ``bbox``) and its labels (value, name,
colour, terminology); each label becomes a segment. Written label by label (a segment, a masked merge over the box
and an undo state each), a 100-label run on a 256^3 image held the GUI thread for seconds and filled the Segment
Editor's undo history with single labels. Here the run becomes one new layer holding all its labels, as Slicer's own
labelmap import makes it (vtkSlicerSegmentationsModuleLogic::ImportLabelmapToSegmentationNode, 5.6 - 5.10: one
oriented image shared by every new segment, each with its label value):

* Masking: the editable area and intensity range are those of the segments that existed before the run. The new
  segments are empty and disjoint, so writing them one after another as the Segment Editor's logic does gives the
  same voxels (Testing/test_label_merge.py checks it against vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap),
  and "overwrite other segments" clears in those segments the voxels the new ones take.
* One undo step: ``before_write()`` (the Segment Editor's saveStateForUndo) is called once, before anything is
  written.
* Bounded time: ``step(budget)`` runs units of work for about ``budget`` seconds and returns; the host calls it from
  its timer until ``done``. Reading the other segments and masking run over slabs of the box, into the new layer
  (which no segment uses yet), and nothing of the scene is written until all of it is ready. Then one unit checks
  that what it read is unchanged (else it starts over) and saves the undo state; the next units clear the
  overwritten voxels a chunk at a time, announce that, and add the segments one at a time (in Slicer an added
  segment may be converted to the segmentation's other representations, such as the closed surface of 3D display,
  so one segment is the unit). A segment edited by hand while its voxels are being cleared keeps the rest of them.
"""

import collections
import time

import numpy as np

from . import masking as M

STEP_SECONDS = 0.025  # one step's budget: a frame at 40 frames per second
SLAB_VOXELS = 1 << 18  # a slab of the box (whole rows of its first axis): a few ms of masking
ERASE_VOXELS = 1 << 20  # overwritten voxels cleared per unit: a few ms
MAX_RESTARTS = 2  # segments edited while the merge prepared: start over this often, then prepare in one step
NEW = object()  # "the new segment" for masking.editable_mask (never a segment key)


class _Group(object):
    """The segments from before the run that share one layer: their layer and label values by role."""

    __slots__ = ("key", "layer", "visible", "hidden", "overwritable", "single")

    def __init__(self, key, layer, visible, hidden, overwritable, single):
        self.key, self.layer = key, layer
        self.visible, self.hidden, self.overwritable, self.single = visible, hidden, overwritable, single


def _lookup(values, dtype):
    """``(table, top)``: ``table[v]`` is True for the label values ``values``. Unsigned 8 or 16 bit regions index the
    table directly; others are clipped to ``top`` first, where the table is False."""
    dtype = np.dtype(dtype)
    if dtype.kind == "u" and dtype.itemsize <= 2:
        size = 1 << (8 * dtype.itemsize)
        table = np.zeros(size, bool)
        table[[v for v in values if v < size]] = True
        return table, None
    top = (max(values) if values else 0) + 1
    table = np.zeros(top + 1, bool)
    table[values] = True
    return table, top


class LabelsMerge(object):
    """Write ``labels`` (dicts with ``value`` and optional ``name``, ``color`` (0-255), ``terminology``) of ``region``
    (label values over the half-open box ``bbox``, array order) into ``scene`` as new segments sharing one layer.
    Labels of value 0 are background and get no segment. See the module docstring."""

    def __init__(self, scene, bbox, region, labels, before_write=None, settings=None, clock=time.perf_counter):
        self.scene = scene
        self.bbox = [[int(lo), int(hi)] for lo, hi in bbox]
        self.region = np.asarray(region)
        if self.region.shape != tuple(hi - lo for lo, hi in self.bbox):
            raise ValueError("the region's shape %s does not fit the box %s" % (self.region.shape, self.bbox))
        self.labels = sorted((label for label in labels if int(label["value"]) > 0), key=lambda l: int(l["value"]))
        self.before_write = before_write or (lambda: None)
        self.clock = clock
        self.keys = []  # the new segments' keys, as they are added
        self.steps = 0
        self.max_step_seconds = 0.0
        self.total_seconds = 0.0
        self.restarts = 0
        self.writing = False  # the scene has been written: from here on the merge runs to its end
        values = [int(label["value"]) for label in self.labels]
        self._table, self._top = _lookup(values, self.region.dtype)
        self._fixed_settings = settings
        self._units = collections.deque()
        self._layer, self._out = scene.add_labelmap_layer([lo for lo, _ in self.bbox], self.region.shape,
                                                          np.min_scalar_type(max(values) if values else 1))
        self._prepare()

    @property
    def done(self):
        return not self._units

    def step(self, budget=STEP_SECONDS):
        """Run units of work until ``budget`` seconds are spent (at least one unit). Returns ``done``."""
        t0 = self.clock()
        while self._units:
            self._units.popleft()()
            if self.clock() - t0 >= budget:
                break
        spent = self.clock() - t0
        self.steps += 1
        self.total_seconds += spent
        self.max_step_seconds = max(self.max_step_seconds, spent)
        return self.done

    def run(self):
        """Everything in one step (scripts, tests). Returns the new segments' keys."""
        self.step(float("inf"))
        return self.keys

    # ------------------------------------------------------------------ preparing (reads only)

    def _prepare(self):
        scene = self.scene
        self.settings = self._fixed_settings or scene.masking_settings()
        self._before = dict((key, scene.segment_version(key)) for key in scene.segment_keys())
        self._image_version = scene.image_version() if self.settings.intensity_range is not None else None
        self._groups = self._read_groups() if self.settings.needs_other_segments() else []
        self._out[...] = 0
        self._erase = [[] for _ in self._groups]  # per group: flat indices into its layer
        shape = self.region.shape
        rows = max(1, SLAB_VOXELS // max(1, shape[1] * shape[2]))
        self._units.clear()
        for r0 in range(0, shape[0], rows):
            self._units.append(lambda r0=r0: self._slab(r0, min(shape[0], r0 + rows)))
        self._units.append(self._begin_writing)

    def _read_groups(self):
        scene, settings = self.scene, self.settings
        groups = []
        for keys in scene.layer_groups(list(self._before)):
            layer = scene.layer(keys[0])
            if layer.array is None or M.overlap(self.bbox, layer.offset, layer.shape) is None:
                continue
            labels = dict((key, scene.layer(key).label) for key in keys)
            visible = [labels[k] for k in keys if scene.segment_visible(k)]
            hidden = [labels[k] for k in keys if labels[k] not in visible]
            overwritable = {M.OVERWRITE_ALL: visible + hidden, M.OVERWRITE_VISIBLE: visible}.get(
                settings.overwrite_mode, [])
            single = labels.get(settings.mask_segment_id) if settings.mask_mode == M.EDIT_INSIDE_SINGLE else None
            groups.append(_Group(keys[0], layer, visible, hidden, overwritable, single))
        return groups

    def _slab(self, r0, r1):
        lo = self.bbox[0][0]
        box = [[lo + r0, lo + r1], self.bbox[1], self.bbox[2]]
        values = self.region[r0:r1]
        keep = self._table[values if self._top is None else np.clip(values, 0, self._top)]
        if self.settings.restricts:
            keep &= self._editable(box, keep.shape)
        out = self._out[r0:r1]
        np.copyto(out, values, casting="unsafe", where=keep)
        for n, group in enumerate(self._groups):
            if not group.overwritable:
                continue
            layer = group.layer
            ov = M.overlap(box, layer.offset, layer.shape)
            if ov is None:
                continue
            region_sl, layer_sl = ov
            hit = np.isin(layer.array[layer_sl], group.overwritable) & (out[region_sl] != 0)
            if hit.any():
                index = tuple(i + s.start for i, s in zip(np.nonzero(hit), layer_sl))
                self._erase[n].append(np.ravel_multi_index(index, layer.shape))

    def _editable(self, box, shape):
        """Where the new segments may be written in ``box``: masking.editable_mask for an empty new segment, the
        other segments seen one layer at a time (visible and hidden ones together, the mask segment alone)."""
        others = {}
        for n, group in enumerate(self._groups):
            values = M.read_values(group.layer.array, group.layer.offset, box)
            if group.visible:
                others[(n, "visible")] = M.SegmentRegion(np.isin(values, group.visible), True)
            if group.hidden:
                others[(n, "hidden")] = M.SegmentRegion(np.isin(values, group.hidden), False)
            if group.single is not None:
                others[self.settings.mask_segment_id] = M.SegmentRegion(values == group.single, True)
        intensity = self.scene.intensity_region(box) if self.settings.intensity_range is not None else None
        return M.editable_mask(shape, self.settings, NEW, np.zeros(shape, bool), True, others, intensity)

    def _changed(self):
        """Whether what the preparation read changed since: segments, their voxels, the settings, the image."""
        scene = self.scene
        if set(scene.segment_keys()) != set(self._before):
            return True
        if any(scene.segment_version(key) != version for key, version in self._before.items()):
            return True
        if self._fixed_settings is None and repr(scene.masking_settings()) != repr(self.settings):
            return True
        return self._image_version is not None and scene.image_version() != self._image_version

    # ------------------------------------------------------------------ writing

    def _begin_writing(self):
        if self._changed():
            self.restarts += 1
            self._prepare()
            if self.restarts > MAX_RESTARTS:  # edited again and again: prepare in this step, so nothing can change
                while not self.writing:
                    self._units.popleft()()
            return
        self.writing = True
        self.before_write()
        erased = []
        for group, flat in zip(self._groups, self._erase):
            if flat:
                flat = np.concatenate(flat)
                for start in range(0, len(flat), ERASE_VOXELS):
                    self._units.append(lambda g=group, f=flat[start:start + ERASE_VOXELS]: self._clear(g, f))
                erased.append(group.key)
        if erased:
            self._units.append(lambda: self.scene.layers_modified(erased))
        for label in self.labels:
            self._units.append(lambda label=label: self._add(self._layer, label))
        if self.labels:
            self._units.append(lambda: self.scene.select_segment(self.keys[0]))
        self._groups = self._erase = None

    def _clear(self, group, flat):
        """Clear overwritten voxels of one layer (announced once, after the last chunk: until then its version is
        the one read, unless someone else changed it, who then keeps its voxels)."""
        if self.scene.segment_version(group.key) == self._before[group.key]:
            np.put(self.scene.layer(group.key).array, flat, 0)

    def _add(self, layer, label):
        color = label.get("color")
        self.keys.append(self.scene.add_layer_segment(layer, int(label["value"]), label.get("name"),
                                                      [c / 255.0 for c in color] if color else None,
                                                      label.get("terminology")))
