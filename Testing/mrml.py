"""Real Slicer MRML for tests, from the slicer-core wheel: Slicer's MRML, segmentation, segment-editor and
markups libraries without the application (no Qt, no views). The module's scene adapter
(``SlicerNNInteractiveLib.slicerscene``) runs on these nodes exactly as inside Slicer.

``MrmlScene`` builds what the Segment Editor works on (a volume, a segmentation, a segment editor node)
from numpy arrays and adds the test helpers ``ArrayScene`` has (``edit``, ``set_visible``, ``layer_count``,
``settings``...), written with Slicer's own functions, so that the same tests run on both. Every segment read
through our layer code is checked against Slicer's own export of the segment into the volume's geometry.
"""

import numpy as np
import vtk

import slicer

from SlicerNNInteractiveLib import masking as M
from SlicerNNInteractiveLib.slicerscene import SlicerScene, arrayToVtkMatrix

Logic = slicer.vtkSlicerSegmentationsModuleLogic


def new_mrml_scene():
    """A MRML scene with the node classes and segmentation converters that Slicer's modules register."""
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = app.GetColorLogic()  # label maps' default color table
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    logics = [app]
    for logic in (slicer.vtkSlicerSegmentationsModuleLogic(), slicer.vtkSlicerMarkupsLogic()):
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app)
        logics.append(logic)
    scene._keep = logics  # the logics must live as long as the scene
    return scene


def add_volume(scene, image, ijk_to_ras=None, name="volume"):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(image))
    if ijk_to_ras is not None:
        node.SetIJKToRASMatrix(arrayToVtkMatrix(ijk_to_ras))
    return node


def add_linear_transform(scene, matrix, parent=None):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetMatrixTransformToParent(arrayToVtkMatrix(matrix))
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    return node


def oriented_image(mask, volume_node, value=1):
    """A binary vtkOrientedImageData on the volume's voxel grid (in the volume node's coordinates)."""
    image = slicer.vtkOrientedImageData()
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    image.SetImageToWorldMatrix(m)
    shape = mask.shape
    image.SetExtent(0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    view = vtk.util.numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape)
    view[:] = (np.asarray(mask) != 0) * value
    return image


def write_segment(segmentation_node, key, mask, volume_node):
    """Replace a segment by a full-volume mask, as Segment Editor effects write (Slicer's own logic)."""
    ok = Logic.SetBinaryLabelmapToSegment(oriented_image(mask, volume_node), segmentation_node, key,
                                          Logic.MODE_REPLACE)
    assert ok, "Slicer could not write segment %s" % key


def export_segment(segmentation_node, key, volume_node):
    """A segment as Slicer exports it into the volume's geometry: (k, j, i) bool array."""
    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        ok = Logic.ExportSegmentsToLabelmapNode(segmentation_node, [key], labelmap, volume_node,
                                                slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        assert ok, "Slicer could not export segment %s" % key
        return slicer.util.arrayFromVolume(labelmap) != 0
    finally:
        scene.RemoveNode(labelmap)


class MrmlScene(SlicerScene):
    """The module's SlicerScene on a real MRML scene, plus ArrayScene's test helpers.

    ``segments``: optional {key: mask}, each on its own layer, or with ``shared=True`` collapsed into one
    layer the way Slicer does (non-overlapping segments share a labelmap, label values 1, 2, ...).
    """

    def __init__(self, image, segments=None, shared=False, ijk_to_ras=None, scene=None):
        self.mrml = scene or new_mrml_scene()
        self.volume_node = add_volume(self.mrml, image, ijk_to_ras)
        self.segmentation_node = self.mrml.AddNewNodeByClass("vtkMRMLSegmentationNode")
        self.segmentation_node.CreateDefaultDisplayNodes()
        self.segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(self.volume_node)
        editor = self.mrml.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        editor.SetAndObserveSegmentationNode(self.segmentation_node)
        editor.SetAndObserveSourceVolumeNode(self.volume_node)
        SlicerScene.__init__(self, editor)
        # ArrayScene's default masking (a new editor node overwrites all other segments), so that the same
        # tests expect the same segments; tests of masking set it.
        self.settings = M.MaskingSettings()
        self.modified_calls = []
        for key, mask in (segments or {}).items():
            self.segmentation().AddEmptySegment(key, key)
            write_segment(self.segmentation_node, key, mask, self.volume_node)
        if shared and segments:
            self.segmentation().CollapseBinaryLabelmaps(False)
            assert self.layer_count() == 1

    # --- as ArrayScene
    def replace_image(self, image):
        slicer.util.updateVolumeFromArray(self.volume_node, np.ascontiguousarray(image))

    def remove_segment(self, key):
        self.segmentation().RemoveSegment(key)

    def set_visible(self, key, visible):
        self.segmentation_node.GetDisplayNode().SetSegmentVisibility(key, bool(visible))

    @property
    def settings(self):
        return self.masking_settings()

    @settings.setter
    def settings(self, s):
        node = self.editorNode
        node.SetMaskMode(s.mask_mode)
        node.SetOverwriteMode(s.overwrite_mode)
        node.SetMaskSegmentID(s.mask_segment_id)
        node.SetSourceVolumeIntensityMask(s.intensity_range is not None)
        if s.intensity_range is not None:
            node.SetSourceVolumeIntensityMaskRange(*s.intensity_range)

    def layers_modified(self, keys):
        self.modified_calls.append(list(keys))
        SlicerScene.layers_modified(self, keys)

    def edit(self, key, fn):
        """Change a segment by hand, as another editor effect would: ``fn(full_mask)`` edits a copy."""
        full = self.read_segment(key).astype(bool)
        fn(full)
        write_segment(self.segmentation_node, key, full, self.volume_node)

    def layer_count(self):
        return self.segmentation().GetNumberOfLayers()

    def slicer_segment(self, key):
        return export_segment(self.segmentation_node, key, self.volume_node)

    def read_segment(self, key, out=None):
        ours = SlicerScene.read_segment(self, key, out)
        assert np.array_equal(ours != 0, self.slicer_segment(key)), \
            "our layer read of %s differs from Slicer's export" % key
        return ours

