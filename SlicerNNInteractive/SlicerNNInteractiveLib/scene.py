"""The scene the controller works on: one image and a segmentation made of labelmap layers.

``Scene`` names the few primitives a host must provide (Slicer implements them in the module on VTK
arrays; ``ArrayScene`` implements them on numpy arrays for scripts and tests). Every decision built on them
lives here, in plain Python, so that it is tested without Slicer:

* reading one segment's voxels in a region, or whole (for an upload);
* merging a returned region under the masking settings (``masking.merge_prediction``), growing the layer
  when the segment reaches outside it, moving the segment to its own layer when it would overwrite a
  segment sharing its layer that may not be overwritten, erasing it from overwritten segments;
* remembering what a write replaced, so that it can be undone.

Layers follow Slicer's segmentation model: a segment's binary labelmap is a layer (an integer array over an
extent of the volume's voxel grid, in array order ``(k, j, i)``) that several segments may share, each with
its own label value; voxels outside a layer's extent are empty.
"""

import numpy as np

from . import masking as M


class Layer(object):
    """A view of one segment's layer: ``array`` (writable, (k, j, i); None when the layer holds nothing),
    ``offset`` (volume index of ``array[0, 0, 0]``) and the segment's ``label`` in it."""

    __slots__ = ("array", "offset", "label")

    def __init__(self, array, offset, label):
        self.array = array
        self.offset = tuple(int(x) for x in offset)
        self.label = int(label)

    @property
    def shape(self):
        return (0, 0, 0) if self.array is None else tuple(self.array.shape)


class Scene(object):
    """What the controller needs from a host. Segments are named by ``key`` strings."""

    # --- image
    def image_key(self):
        """Identifies the image (a new key means another image)."""
        raise NotImplementedError

    def image_version(self):
        """Changes whenever the image's voxels change (Slicer: the image data's MTime)."""
        raise NotImplementedError

    def image_array(self):
        """The image, array order, (K, J, I) or (C, K, J, I); a view, never a copy."""
        raise NotImplementedError

    # --- segments
    def segment_keys(self):
        raise NotImplementedError

    def selected_segment(self):
        """Key of the segment selected in the editor, or None."""
        raise NotImplementedError

    def select_segment(self, key):
        raise NotImplementedError

    def segment_name(self, key):
        """The name the user sees for segment ``key``."""
        return key

    def add_segment(self, name=None, color=None, terminology=None):
        """Add an empty segment, select it, return its key. ``name``, ``color`` (r, g, b in 0..1) and
        ``terminology`` (DICOM codes, as an automatic model's labels carry them) when given."""
        raise NotImplementedError

    def spacing(self):
        """Voxel spacing per array axis (k, j, i), as nnU-Net models need it."""
        raise NotImplementedError

    def segment_visible(self, key):
        raise NotImplementedError

    def masking_settings(self):
        """The editor's MaskingSettings."""
        raise NotImplementedError

    def segment_version(self, key):
        """Changes whenever the segment's voxels may have changed (Slicer: its layer's MTime)."""
        raise NotImplementedError

    def layer(self, key):
        """The segment's Layer (see Layer)."""
        raise NotImplementedError

    def shares_layer_with(self, key):
        """Keys of the other segments in the segment's layer."""
        raise NotImplementedError

    def grow_layer(self, key, offset, shape):
        """Enlarge the segment's layer to cover ``offset``..``offset + shape``, keeping its content."""
        raise NotImplementedError

    def separate_segment(self, key):
        """Move the segment to a layer of its own (Slicer: vtkSegmentation.SeparateSegmentLabelmap)."""
        raise NotImplementedError

    def layers_modified(self, keys):
        """Announce that the layers of these segments were written in place (Slicer: Modified())."""
        raise NotImplementedError

    def clear_segment(self, key):
        raise NotImplementedError

    # --- prompt histories (history.py), kept with the scene where the host can save it
    keeps_histories = False

    def ijk_to_ras(self):
        """The volume's IJK-to-RAS matrix (4x4: spacing, origin, directions), or None when unknown."""
        return None

    def stored_history(self, key):
        """The prompt history text kept for segment ``key`` (``store_history``), or None."""
        return None

    def store_history(self, key, text):
        """Keep ``text`` as segment ``key``'s prompt history (None: remove it)."""

    def add_labelmap_layer(self, offset, shape, dtype):
        """A new layer of ``shape`` (array order) and integer ``dtype``, all 0, with its first voxel at the volume index
        ``offset``, used by no segment yet. Returns ``(handle, array)``: the handle for ``add_layer_segment`` and a
        writable view of its voxels."""
        raise NotImplementedError

    def add_layer_segment(self, layer, value, name=None, color=None, terminology=None):
        """Add a segment made of the voxels of ``layer`` (a handle from ``add_labelmap_layer``) that hold ``value``,
        named and coloured as ``add_segment`` does; nothing is selected. Returns its key."""
        raise NotImplementedError

    # --- derived operations (no need to override)
    @property
    def shape(self):
        return tuple(self.image_array().shape[-3:])

    def segment_region(self, key, bbox):
        lay = self.layer(key)
        return M.read_region(lay.array, lay.offset, lay.label, bbox)

    def read_segment(self, key, out=None):
        """The whole segment as a uint8 array of the image's shape (a full-volume read: only on change)."""
        lay = self.layer(key)
        return M.full_mask(lay.array, lay.offset, lay.label, self.shape, out=out)

    def other_regions(self, key, bbox):
        """{key: SegmentRegion} of the other segments with voxels in ``bbox``."""
        out = {}
        for other in self.segment_keys():
            if other == key:
                continue
            lay = self.layer(other)
            if M.any_in_region(lay.array, lay.offset, lay.label, bbox):
                out[other] = M.SegmentRegion(M.read_region(lay.array, lay.offset, lay.label, bbox),
                                             self.segment_visible(other))
        return out

    def layer_groups(self, keys):
        """``keys`` grouped by the layer they share: a list of lists, each in the order of ``keys``."""
        groups, seen = [], set()
        for key in keys:
            if key in seen:
                continue
            shared = set(self.shares_layer_with(key))
            group = [key] + [k for k in keys if k in shared and k not in seen and k != key]
            seen.update(group)
            groups.append(group)
        return groups

    def intensity_region(self, bbox):
        img = self.image_array()
        if img.ndim == 4:
            img = img[0]
        return img[tuple(slice(lo, hi) for lo, hi in bbox)]

    def write_segment_region(self, key, bbox, new_mask, overwritable=()):
        """Write ``new_mask`` as the segment's voxels in ``bbox``, growing or separating its layer when
        needed. ``overwritable``: keys of segments whose voxels it may take over. Returns True if changed."""
        new_mask = np.asarray(new_mask, dtype=bool)
        lay = self.layer(key)
        grow = M.required_extent(lay.offset, lay.shape, bbox, new_mask)
        shared = self.shares_layer_with(key)
        if shared:
            labels = {}
            for other in shared:
                labels[self.layer(other).label] = other
            over = [lab for lab, k in labels.items() if k in overwritable]
            if lay.array is not None and M.conflicting_labels(lay.array, lay.offset, lay.label, bbox, new_mask, over):
                self.separate_segment(key)
                lay = self.layer(key)
                grow = M.required_extent(lay.offset, lay.shape, bbox, new_mask)
        if grow is not None:
            self.grow_layer(key, grow[0], grow[1])
            lay = self.layer(key)
        if lay.array is None:
            return False
        return M.write_region(lay.array, lay.offset, lay.label, bbox, new_mask)

    def erase_segment_region(self, key, bbox, keep_mask):
        lay = self.layer(key)
        if lay.array is None:
            return False
        return M.erase_region(lay.array, lay.offset, lay.label, bbox, keep_mask)

    def merge(self, key, bbox, prediction, settings=None):
        """Merge the server's ``prediction`` for ``bbox`` into segment ``key`` under the editor's masking
        settings. Returns ``(new_region, undo)`` where ``new_region`` is what the segment now holds in
        ``bbox`` and ``undo`` an UndoRecord (None when nothing changed)."""
        settings = settings or self.masking_settings()
        current = self.segment_region(key, bbox)
        others = self.other_regions(key, bbox) if settings.needs_other_segments() else {}
        intensity = self.intensity_region(bbox) if settings.intensity_range is not None else None
        result = M.merge_prediction(prediction, current, settings, key, self.segment_visible(key), others, intensity)
        if not result.changed:
            return current, None
        undo = UndoRecord(bbox, {key: current})
        for other in result.others:
            undo.regions[other] = others[other].mask
        touched = [key]
        self.write_segment_region(key, bbox, result.selected, overwritable=list(result.others))
        for other, keep in result.others.items():
            if self.erase_segment_region(other, bbox, keep):
                touched.append(other)
        self.layers_modified(touched)
        return result.selected, undo

    def restore(self, undo):
        """Put back what an UndoRecord remembers (segments that were deleted meanwhile are skipped)."""
        keys = set(self.segment_keys())
        touched = []
        for key, region in undo.regions.items():
            if key in keys and self.write_segment_region(key, undo.bbox, region, overwritable=list(undo.regions)):
                touched.append(key)
        if touched:
            self.layers_modified(touched)
        return touched


class UndoRecord(object):
    """What one write replaced: ``regions`` {segment key: bool region before} over one ``bbox``; ``kind``: the job
    that wrote it (a prompt kind, or "predict" for a Run)."""

    __slots__ = ("bbox", "regions", "segment_key", "server_step", "kind")

    def __init__(self, bbox, regions):
        self.bbox = [list(b) for b in bbox]
        self.regions = regions
        self.segment_key = None
        self.server_step = None
        self.kind = None


class ArrayScene(Scene):
    """A Scene on numpy arrays: the same layer model as Slicer's segmentations, for scripts and tests.

    ``segments``: optional {key: mask}; each starts on its own layer cropped to its voxels, unless
    ``shared=True`` puts them all on one layer (label values 1, 2, ...) like Slicer's collapsed layers.
    ``ijk_to_ras``: the volume's matrix (default: the spacing along the axes, origin 0); prompt histories are kept in
    ``histories`` {key: text}, as Slicer keeps them on the segmentation node.
    """

    keeps_histories = True

    def __init__(self, image, segments=None, shared=False, spacing=(1.0, 1.0, 1.0), ijk_to_ras=None):
        self.image = np.asarray(image)
        self.voxel_spacing = tuple(float(s) for s in spacing)
        self.matrix = np.diag(list(self.voxel_spacing[::-1]) + [1.0]) if ijk_to_ras is None else np.asarray(ijk_to_ras)
        self.histories = {}
        self.names = {}  # segment key -> name
        self._image_key = "image"
        self._image_version = 0
        self._layers = []  # [{"array": ndarray or None, "offset": tuple, "version": int}]
        self._segments = {}  # key -> [layer index, label]
        self._order = []
        self._visible = {}
        self._selected = None
        self._counter = 0
        self._clock = 0
        self.settings = M.MaskingSettings()
        self.modified_calls = []
        segments = segments or {}
        if shared and segments:
            layer = np.zeros(self.shape, dtype=np.uint8)
            for n, (key, mask) in enumerate(segments.items()):
                layer[np.asarray(mask) != 0] = n + 1
            self._layers.append({"array": layer, "offset": (0, 0, 0), "version": self._tick()})
            for n, key in enumerate(segments):
                self._add(key, 0, n + 1)
        else:
            for key, mask in segments.items():
                self._layers.append({"array": None, "offset": (0, 0, 0), "version": self._tick()})
                self._add(key, len(self._layers) - 1, 1)
                self.write_segment_region(key, [[0, n] for n in self.shape], np.asarray(mask) != 0)

    def _tick(self):
        self._clock += 1
        return self._clock

    def _add(self, key, layer_index, label):
        self._segments[key] = [layer_index, label]
        self._order.append(key)
        self._visible[key] = True

    # --- image
    def image_key(self):
        return self._image_key

    def image_version(self):
        return self._image_version

    def image_array(self):
        return self.image

    def replace_image(self, image):
        self.image = np.asarray(image)
        self._image_version = self._tick()

    # --- segments
    def segment_keys(self):
        return list(self._order)

    def selected_segment(self):
        return self._selected

    def select_segment(self, key):
        if key is not None and key not in self._segments:
            raise KeyError(key)
        self._selected = key

    def segment_name(self, key):
        return self.names.get(key, key)

    def _new_key(self):
        self._counter += 1
        key = "Segment_%d" % self._counter
        while key in self._segments:
            self._counter += 1
            key = "Segment_%d" % self._counter
        return key

    def add_segment(self, name=None, color=None, terminology=None):
        key = self._new_key()
        self.names[key] = name or key
        self._layers.append({"array": None, "offset": (0, 0, 0), "version": self._tick()})
        self._add(key, len(self._layers) - 1, 1)
        self._selected = key
        return key

    def add_labelmap_layer(self, offset, shape, dtype):
        array = np.zeros(shape, dtype=dtype)
        self._layers.append({"array": array, "offset": tuple(int(o) for o in offset), "version": self._tick()})
        return len(self._layers) - 1, array

    def add_layer_segment(self, layer, value, name=None, color=None, terminology=None):
        key = self._new_key()
        self.names[key] = name or key
        self._add(key, layer, int(value))
        return key

    def spacing(self):
        return self.voxel_spacing

    def ijk_to_ras(self):
        return self.matrix

    def stored_history(self, key):
        return self.histories.get(key)

    def store_history(self, key, text):
        if text is None:
            self.histories.pop(key, None)
        else:
            self.histories[key] = text

    def remove_segment(self, key):
        del self._segments[key]
        self._order.remove(key)
        if self._selected == key:
            self._selected = None

    def set_visible(self, key, visible):
        self._visible[key] = bool(visible)

    def segment_visible(self, key):
        return self._visible[key]

    def masking_settings(self):
        return self.settings

    def segment_version(self, key):
        index, label = self._segments[key]
        return (index, self._layers[index]["version"])

    def layer(self, key):
        index, label = self._segments[key]
        lay = self._layers[index]
        return Layer(lay["array"], lay["offset"], label)

    def shares_layer_with(self, key):
        index = self._segments[key][0]
        return [k for k, (i, _) in self._segments.items() if i == index and k != key]

    def grow_layer(self, key, offset, shape):
        lay = self._layers[self._segments[key][0]]
        new = np.zeros(shape, dtype=np.uint8 if lay["array"] is None else lay["array"].dtype)
        if lay["array"] is not None:
            sl = tuple(slice(o - n, o - n + s) for o, n, s in zip(lay["offset"], offset, lay["array"].shape))
            new[sl] = lay["array"]
        lay["array"], lay["offset"] = new, tuple(offset)
        lay["version"] = self._tick()

    def separate_segment(self, key):
        index, label = self._segments[key]
        lay = self._layers[index]
        arr = lay["array"]
        own = None
        if arr is not None:
            own = (arr == label).astype(np.uint8)
            arr[arr == label] = 0
        lay["version"] = self._tick()
        self._layers.append({"array": own, "offset": lay["offset"], "version": self._tick()})
        self._segments[key] = [len(self._layers) - 1, 1]

    def layers_modified(self, keys):
        self.modified_calls.append(list(keys))
        for index in set(self._segments[k][0] for k in keys):
            self._layers[index]["version"] = self._tick()

    def clear_segment(self, key):
        index, label = self._segments[key]
        lay = self._layers[index]
        if lay["array"] is not None:
            lay["array"][lay["array"] == label] = 0
        lay["version"] = self._tick()

    def edit(self, key, fn):
        """Change a segment by hand, as another editor effect would: ``fn(full_mask)`` edits a copy."""
        full = self.read_segment(key).astype(bool)
        fn(full)
        self.write_segment_region(key, [[0, n] for n in self.shape], full)
        self.layers_modified([key])

    def layer_count(self):
        return len(set(i for i, _ in self._segments.values()))
