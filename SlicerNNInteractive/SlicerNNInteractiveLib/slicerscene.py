"""The Scene on Slicer's MRML nodes, and prompts read from Slicer's markups, slice views and labelmaps.

This is the one submodule that needs Slicer's Python (``slicer`` and ``vtk``): inside Slicer, or the
``slicer-core`` wheel (Slicer's MRML and logic libraries without the application), on which the tests run
it against a real server. Everything else it needs (which voxel a click is, how a prompt is rasterized,
how a result is merged) comes from the pure-Python modules beside it.

Voxel arrays are views of VTK memory (no copies), in the volume's array order (k, j, i).
"""

import numpy as np
import vtk
import vtk.util.numpy_support

import slicer

from . import geometry, masking, rasterize
from .scene import Layer, Scene


def vtkMatrixToArray(matrix):
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def arrayToVtkMatrix(array):
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r][c]))
    return m


def _isEmpty(imageData):
    if imageData is None:
        return True
    extent = imageData.GetExtent()
    return extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5] \
        or imageData.GetPointData().GetScalars() is None


def _arrayView(imageData):
    """The scalars of an image as a writable (k, j, i) numpy view."""
    dims = imageData.GetDimensions()
    return vtk.util.numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars()).reshape(
        dims[2], dims[1], dims[0])


def definedWorldPoints(markupsNode):
    """[(n, control point ID, world position)] of the control points whose position is defined
    (world: after the markups node's own parent transforms)."""
    points = []
    for n in range(markupsNode.GetNumberOfControlPoints()):
        if markupsNode.GetNthControlPointPositionStatus(n) != slicer.vtkMRMLMarkupsNode.PositionDefined:
            continue
        world = [0.0, 0.0, 0.0]
        markupsNode.GetNthControlPointPositionWorld(n, world)
        points.append((n, markupsNode.GetNthControlPointID(n), world))
    return points


def terminologyEntry(terminology):
    """Slicer's terminology tag of a segment (vtkSlicerTerminologiesModuleLogic's serialization) from DICOM codes
    ``{"category": {"CodeValue", "CodingSchemeDesignator", "CodeMeaning"}, "type": ..., "type_modifier": ...,
    "anatomic_region": ..., "anatomic_region_modifier": ...}`` (missing parts empty)."""

    def code(part):
        c = terminology.get(part) or {}
        return "^".join(str(c.get(k, "")) for k in ("CodingSchemeDesignator", "CodeValue", "CodeMeaning"))

    return "~".join(["Segmentation category and type - DICOM master list", code("category"), code("type"),
                     code("type_modifier"), "Anatomic codes - DICOM master list", code("anatomic_region"),
                     code("anatomic_region_modifier")])


HISTORY_ATTRIBUTE = "SlicerNNInteractive.PromptHistory."


def historyAttributeName(segmentId):
    """The segmentation node attribute holding a segment's prompt history. A scene file separates attributes with ';'
    and a name from its value with ':', so every character of the segment ID but letters, digits, '_', '-' and '.' is
    written as %XX."""
    safe = "".join(c if (c.isalnum() and ord(c) < 128) or c in "_-." else
                   "".join("%%%02X" % b for b in c.encode("utf-8")) for c in segmentId)
    return HISTORY_ATTRIBUTE + safe


class SlicerScene(Scene):
    """One Segment Editor parameter node: its source volume, its segmentation, its selected segment.

    Segments are keyed by segment ID; a segment's labelmap must share the volume's voxel grid (up to a
    whole-voxel offset of its extent), which is what the Segment Editor makes when the source volume is the
    segmentation's reference geometry.
    """

    def __init__(self, segmentEditorNode):
        Scene.__init__(self)
        self.editorNode = segmentEditorNode

    # --- nodes
    def volumeNode(self):
        try:
            return self.editorNode.GetSourceVolumeNode()
        except AttributeError:  # Slicer < 5.3
            return self.editorNode.GetMasterVolumeNode()

    def segmentationNode(self):
        return self.editorNode.GetSegmentationNode()

    def segmentation(self):
        return self.segmentationNode().GetSegmentation()

    # --- image
    def image_key(self):
        return self.volumeNode().GetID()

    def image_version(self):
        imageData = self.volumeNode().GetImageData()
        scalars = imageData.GetPointData().GetScalars()
        return max(imageData.GetMTime(), scalars.GetMTime() if scalars is not None else 0)

    def image_array(self):
        volumeNode = self.volumeNode()
        components = volumeNode.GetImageData().GetNumberOfScalarComponents()
        if components != 1:
            raise geometry.GeometryError("nnInteractive needs a single-channel (grayscale) volume; %s has %d "
                                         "components." % (volumeNode.GetName(), components))
        return slicer.util.arrayFromVolume(volumeNode)

    # --- geometry
    def volumeIJKToLocal(self):
        m = vtk.vtkMatrix4x4()
        self.volumeNode().GetIJKToRASMatrix(m)
        return vtkMatrixToArray(m)

    def rasToIJK(self):
        m = vtk.vtkMatrix4x4()
        self.volumeNode().GetRASToIJKMatrix(m)
        return vtkMatrixToArray(m)

    def worldToVolume(self):
        """None, a 4x4 array (linear parent transforms) or a callable (non-linear ones)."""
        transformNode = self.volumeNode().GetParentTransformNode()
        if transformNode is None:
            return None
        if transformNode.IsTransformToWorldLinear():
            m = vtk.vtkMatrix4x4()
            transformNode.GetMatrixTransformFromWorld(m)
            return vtkMatrixToArray(m)
        transform = vtk.vtkGeneralTransform()
        transformNode.GetTransformFromWorld(transform)

        def apply(points):
            return np.array([transform.TransformPoint([float(c) for c in p]) for p in points])

        return apply

    def nodeToVolume(self, node):
        """4x4 from a transformable node's coordinates to the volume's, or None when not linear."""
        m = vtk.vtkMatrix4x4()
        ok = slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(
            node.GetParentTransformNode(), self.volumeNode().GetParentTransformNode(), m)
        return vtkMatrixToArray(m) if ok else None

    def segmentationToVolume(self):
        return self.nodeToVolume(self.segmentationNode())

    def latticeOffset(self, orientedImage, toVolume=None):
        """(di, dj, dk) from the volume's IJK to the oriented image's, or None when the grids differ.
        ``toVolume``: 4x4 from the image's world (its node's coordinates) to the volume's coordinates."""
        if toVolume is None:
            return None
        m = vtk.vtkMatrix4x4()
        orientedImage.GetImageToWorldMatrix(m)
        return geometry.lattice_offset(self.volumeIJKToLocal(), toVolume @ vtkMatrixToArray(m))

    # --- segments
    def segment_keys(self):
        segmentationNode = self.segmentationNode()
        if segmentationNode is None:
            return []
        return list(segmentationNode.GetSegmentation().GetSegmentIDs())

    def selected_segment(self):
        segmentId = self.editorNode.GetSelectedSegmentID()
        if not segmentId or self.segmentationNode() is None:
            return None
        if self.segmentation().GetSegment(segmentId) is None:
            return None
        return segmentId

    def select_segment(self, key):
        self.editorNode.SetSelectedSegmentID(key)

    def segment_name(self, key):
        segment = self.segmentation().GetSegment(key) if self.segmentationNode() is not None else None
        return segment.GetName() if segment is not None and segment.GetName() else key

    def add_segment(self, name=None, color=None, terminology=None):
        segmentationNode = self.segmentationNode()
        segmentation = segmentationNode.GetSegmentation()
        if color is None:
            segmentId = segmentation.AddEmptySegment("", name or "")
        else:
            segmentId = segmentation.AddEmptySegment("", name or "", list(color))
        if terminology:
            segmentation.GetSegment(segmentId).SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(),
                                                      terminologyEntry(terminology))
        self._show(segmentId)
        self.editorNode.SetSelectedSegmentID(segmentId)
        return segmentId

    def _show(self, segmentId):
        displayNode = self.segmentationNode().GetDisplayNode()
        if displayNode is not None:
            displayNode.SetSegmentVisibility(segmentId, True)

    def add_labelmap_layer(self, offset, shape, dtype):
        image = slicer.vtkOrientedImageData()
        self._placeOnVolumeGrid(image, offset, shape, vtk.util.numpy_support.get_vtk_array_type(np.dtype(dtype)))
        image.GetPointData().GetScalars().Fill(0)
        return image, _arrayView(image)

    def add_layer_segment(self, layer, value, name=None, color=None, terminology=None):
        """As vtkSlicerSegmentationsModuleLogic::ImportLabelmapToSegmentationNode (Slicer 5.6 - 5.10) adds the
        segments of a labelmap: a vtkSegment with its label value and the shared oriented image as its binary
        labelmap, added with vtkSegmentation::AddSegment; name, colour, terminology and status are set before it
        is added, so that adding it is its only event."""
        segmentation = self.segmentation()
        segmentId = segmentation.GenerateUniqueSegmentID("")
        segment = slicer.vtkSegment()
        segment.SetName(name or segmentId)
        if color is not None:
            segment.SetColor(*[float(c) for c in color])
        if terminology:
            segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), terminologyEntry(terminology))
        segment.SetLabelValue(int(value))
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        logic.SetSegmentStatus(segment, logic.InProgress)
        segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), layer)
        if not segmentation.AddSegment(segment, segmentId):
            raise geometry.GeometryError("Slicer could not add the segment %s to the segmentation." % (name or ""))
        self._show(segmentId)
        return segmentId

    def segment_visible(self, key):
        displayNode = self.segmentationNode().GetDisplayNode()
        return True if displayNode is None else bool(displayNode.GetSegmentVisibility(key))

    def masking_settings(self):
        node = self.editorNode
        try:
            useRange = node.GetSourceVolumeIntensityMask()
            intensityRange = node.GetSourceVolumeIntensityMaskRange()
        except AttributeError:  # Slicer < 5.3
            useRange = node.GetMasterVolumeIntensityMask()
            intensityRange = node.GetMasterVolumeIntensityMaskRange()
        return masking.MaskingSettings(
            mask_mode=int(node.GetMaskMode()), overwrite_mode=int(node.GetOverwriteMode()),
            mask_segment_id=node.GetMaskSegmentID() or None,
            intensity_range=(intensityRange[0], intensityRange[1]) if useRange else None)

    def _labelmap(self, key):
        return self.segmentationNode().GetBinaryLabelmapInternalRepresentation(key)

    def segment_version(self, key):
        labelmap = self._labelmap(key)
        if labelmap is None:
            return None
        # MTimes come from one global clock: a segment moved to another layer gets a new, larger one too.
        scalars = labelmap.GetPointData().GetScalars()
        return max(labelmap.GetMTime(), scalars.GetMTime() if scalars is not None else 0)

    def layer(self, key):
        label = self.segmentation().GetSegment(key).GetLabelValue()
        labelmap = self._labelmap(key)
        if _isEmpty(labelmap):
            return Layer(None, (0, 0, 0), label)
        offset = self.latticeOffset(labelmap, self.segmentationToVolume())
        if offset is None:
            raise geometry.GeometryError(
                "The segmentation's voxel grid differs from the volume's, so results cannot be written "
                "voxel for voxel. In the Segment Editor, use 'Specify geometry' (next to the segmentation "
                "selector) to set the source volume as reference geometry, or start a new segmentation.")
        slicer.vtkOrientedImageDataResample.CastImageForValue(labelmap, label)
        extent = labelmap.GetExtent()
        return Layer(_arrayView(labelmap), (extent[4] - offset[2], extent[2] - offset[1], extent[0] - offset[0]),
                     label)

    def shares_layer_with(self, key):
        labelmap = self._labelmap(key)
        return [other for other in self.segment_keys() if other != key and self._labelmap(other) is labelmap]

    def grow_layer(self, key, offset, shape):
        labelmap = self._labelmap(key)
        if _isEmpty(labelmap):
            # An empty layer takes the volume's voxel grid (in the segmentation's coordinates).
            self._placeOnVolumeGrid(labelmap, offset, shape, vtk.VTK_UNSIGNED_CHAR)
            labelmap.GetPointData().GetScalars().Fill(0)
            return
        lattice = self.latticeOffset(labelmap, self.segmentationToVolume())
        contained = slicer.vtkOrientedImageData()
        m = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(m)
        contained.SetImageToWorldMatrix(m)
        contained.SetExtent(offset[2] + lattice[0], offset[2] + shape[2] - 1 + lattice[0],
                            offset[1] + lattice[1], offset[1] + shape[1] - 1 + lattice[1],
                            offset[0] + lattice[2], offset[0] + shape[0] - 1 + lattice[2])
        slicer.vtkOrientedImageDataResample.PadImageToContainImage(labelmap, contained, labelmap)

    def _placeOnVolumeGrid(self, image, offset, shape, scalarType):
        """Put an oriented image on the volume's voxel grid (in the segmentation's coordinates), covering the volume
        indices ``offset`` .. ``offset + shape`` (array order), its scalars allocated, not filled."""
        segToVol = self.segmentationToVolume()
        if segToVol is None:
            raise geometry.GeometryError("The segmentation is under a non-linear transform relative to "
                                         "the volume; harden or remove the transform first.")
        image.SetImageToWorldMatrix(arrayToVtkMatrix(np.linalg.inv(segToVol) @ self.volumeIJKToLocal()))
        image.SetExtent(offset[2], offset[2] + shape[2] - 1, offset[1], offset[1] + shape[1] - 1,
                        offset[0], offset[0] + shape[0] - 1)
        image.AllocateScalars(scalarType, 1)

    def separate_segment(self, key):
        self.segmentation().SeparateSegmentLabelmap(key)

    def layers_modified(self, keys):
        done = []
        for key in keys:
            labelmap = self._labelmap(key)
            if labelmap is not None and not any(labelmap is d for d in done):
                labelmap.Modified()
                done.append(labelmap)
            segment = self.segmentation().GetSegment(key)
            logic = slicer.vtkSlicerSegmentationsModuleLogic
            if segment is not None and logic.GetSegmentStatus(segment) == logic.NotStarted:
                logic.SetSegmentStatus(segment, logic.InProgress)

    def clear_segment(self, key):
        self.segmentation().ClearSegment(key)

    # --- prompt histories: one attribute of the segmentation node per segment, saved in the scene's .mrml (checked
    # on slicer-core: .mrml and .mrb round trips keep it, 10 MB and more)
    keeps_histories = True

    def ijk_to_ras(self):
        return self.volumeIJKToLocal()

    def stored_history(self, key):
        node = self.segmentationNode()
        return None if node is None else node.GetAttribute(historyAttributeName(key))

    def store_history(self, key, text):
        """Also removes the histories of segments removed since (a new segment given the same ID must not inherit
        one, and a scene file keeps no history nobody can use)."""
        node = self.segmentationNode()
        if node is None:
            return
        node.SetAttribute(historyAttributeName(key), text)  # None removes it
        kept = set(historyAttributeName(segmentId) for segmentId in node.GetSegmentation().GetSegmentIDs())
        for name in node.GetAttributeNames():
            if name.startswith(HISTORY_ATTRIBUTE) and name not in kept:
                node.RemoveAttribute(name)

    # --- prompts: world RAS -> voxels -> the arguments of the server's calls
    def spacing(self):
        return tuple(self.volumeNode().GetSpacing())[::-1]

    @property
    def shape(self):
        """(K, J, I), from the image's dimensions (no array view needed)."""
        dims = self.volumeNode().GetImageData().GetDimensions()
        return (dims[2], dims[1], dims[0])

    def worldToIJK(self, points):
        return geometry.world_to_ijk(points, self.rasToIJK(), self.worldToVolume())

    def sliceNodePlacement(self, sliceNode):
        toVolume = self.worldToVolume()
        if callable(toVolume):
            raise geometry.GeometryError("The volume is under a non-linear transform. Harden the transform "
                                         "(Data module, right-click the transform) before drawing boxes.")
        return geometry.slice_placement(vtkMatrixToArray(sliceNode.GetSliceToRAS()), self.rasToIJK(),
                                        self.shape, toVolume)

    def pointPrompt(self, world):
        """A click at a world position -> ``{"coordinates": (k, j, i)}``; GeometryError when outside."""
        index = geometry.click_to_voxel(world, self.rasToIJK(), self.shape, self.worldToVolume())
        return {"coordinates": index}

    def boxPrompt(self, sliceNode, worldA, worldB):
        """Two world corners drawn on a slice view -> ``{"bbox": ...}``, a 2D box on that view's voxel slice."""
        placement = self.sliceNodePlacement(sliceNode)
        ijk = self.worldToIJK([worldA, worldB])
        return {"bbox": rasterize.box_from_corners(ijk[0], ijk[1], placement, self.shape)}

    def lassoPrompt(self, worldPoints):
        """The world positions of a closed outline -> ``{"mask", "interaction_bbox"}``, filled on its slice."""
        shape = self.shape
        ijk = self.worldToIJK(worldPoints)
        placement = geometry.placement_from_points(ijk, shape)
        result = rasterize.lasso_from_polygon(ijk, placement, shape)
        if result is None:
            raise geometry.GeometryError("The lasso is outside the image. Draw it on the image.")
        mask, bbox = result
        return {"mask": mask, "interaction_bbox": bbox}

    def takeLasso(self, lassoNode):
        """``lassoPrompt`` of the lasso curve's defined points, then empty the curve for the next lasso. None when it
        holds no point; GeometryError saying what to do for fewer than three."""
        points = [world for _, _, world in definedWorldPoints(lassoNode)]
        lassoNode.RemoveAllControlPoints()
        if not points:
            return None
        if len(points) < 3:
            raise geometry.GeometryError("A lasso needs at least three points: click around the object, then "
                                         "double-click or right-click to close it.")
        return self.lassoPrompt(points)

    def scribblePrompt(self, scratchNode, segmentId):
        """What the paint brush left in a scratch segmentation's segment -> ``{"mask", "interaction_bbox"}``,
        or None when nothing of it is on the image. The scratch node must share the volume's voxel grid
        (its reference geometry is the volume, and it sits under the volume's transform)."""
        labelmap = scratchNode.GetBinaryLabelmapInternalRepresentation(segmentId)
        if _isEmpty(labelmap):
            return None
        offset = self.latticeOffset(labelmap, self.nodeToVolume(scratchNode))
        if offset is None:
            raise geometry.GeometryError("The scribble could not be mapped to the volume's voxels. Select the "
                                         "tool again to re-create the scribble layer on this volume.")
        segment = scratchNode.GetSegmentation().GetSegment(segmentId)
        painted = _arrayView(labelmap) == segment.GetLabelValue()
        extent = labelmap.GetExtent()
        result = rasterize.scribble_from_painted(
            painted, (extent[4] - offset[2], extent[2] - offset[1], extent[0] - offset[0]), self.shape)
        if result is None:
            return None
        mask, bbox = result
        return {"mask": mask, "interaction_bbox": bbox}

    def takeScribble(self, scratchNode, segmentId):
        """``scribblePrompt``, then empty the scratch segment so that the next stroke is a prompt of its own.
        An empty segment is left alone: clearing it would still signal SourceRepresentationModified, the event
        that calls this, and so call it again forever."""
        if _isEmpty(scratchNode.GetBinaryLabelmapInternalRepresentation(segmentId)):
            return None
        try:
            return self.scribblePrompt(scratchNode, segmentId)
        finally:
            scratchNode.GetSegmentation().ClearSegment(segmentId)


# --- the nodes the prompt tools work with (not saved with the scene)

SCRIBBLE_SEGMENT = "scribble"
ROLE_ATTRIBUTE = "SlicerNNInteractive.Role"  # marks our helper nodes, so that a widget after a Reload finds them


def roleNode(mrmlScene, role, className):
    """Our helper node of ``className`` that plays ``role`` in the scene (made by this widget or by the one before a
    developer Reload), or None."""
    for n in range(mrmlScene.GetNumberOfNodesByClass(className)):
        node = mrmlScene.GetNthNodeByClass(n, className)
        if node.GetAttribute(ROLE_ATTRIBUTE) == role:
            return node
    return None


def promptNode(mrmlScene, role, className, name, color):
    """The markups node for prompts that plays ``role``: the one in the scene, else a new one (``newPromptNode``)."""
    node = roleNode(mrmlScene, role, className)
    if node is None:
        node = newPromptNode(mrmlScene, className, name, color)
        node.SetAttribute(ROLE_ATTRIBUTE, role)
    return node


def helperNode(mrmlScene, role, className, name):
    """A hidden node, not saved with the scene, that plays ``role``: the one in the scene, else a new one."""
    node = roleNode(mrmlScene, role, className)
    if node is None:
        node = mrmlScene.AddNewNodeByClass(className, name)
        node.SetSaveWithScene(False)
        node.SetHideFromEditors(True)
        node.SetAttribute(ROLE_ATTRIBUTE, role)
    return node


def newPromptNode(mrmlScene, className, name, color):
    """A markups node (points or closed curve) for prompts: not saved with the scene, in the polarity's color,
    without labels."""
    node = mrmlScene.AddNewNodeByClass(className, name)
    node.SetSaveWithScene(False)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetSelectedColor(*color)
    display.SetColor(*color)
    display.SetActiveColor(*color)
    display.SetPointLabelsVisibility(False)
    display.SetPropertiesLabelVisibility(False)
    display.SetGlyphScale(2.0)
    return node


def scratchSegmentation(mrmlScene, volumeNode, node=None, color=(1.0, 1.0, 0.0)):
    """The hidden segmentation the Segment Editor's brush paints scribbles into (segment ``scribble``), kept
    on the volume's voxel grid and under the volume's transform, so that a stroke maps to voxels exactly.
    Pass the existing node to re-use it (after the volume changed, say)."""
    if node is None or mrmlScene.GetNodeByID(node.GetID()) is None:
        node = roleNode(mrmlScene, "scribbles", "vtkMRMLSegmentationNode")
    if node is None:
        node = helperNode(mrmlScene, "scribbles", "vtkMRMLSegmentationNode", "nnInteractive scribbles")
        node.CreateDefaultDisplayNodes()
        node.GetSegmentation().AddEmptySegment(SCRIBBLE_SEGMENT, SCRIBBLE_SEGMENT)
        node.GetDisplayNode().SetSegmentOpacity2DFill(SCRIBBLE_SEGMENT, 0.6)
    if node.GetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole()) != volumeNode.GetID():
        node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
    node.GetSegmentation().GetSegment(SCRIBBLE_SEGMENT).SetColor(*color)
    return node


def segmentEditorSingleton(mrmlScene, tag="SegmentEditor"):
    """The Segment Editor module's parameter node (created when missing), so that this module and the Segment
    Editor show the same segmentation, source volume and masking settings."""
    node = mrmlScene.GetSingletonNode(tag, "vtkMRMLSegmentEditorNode")
    if node is None:
        node = mrmlScene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
        node.UnRegister(None)  # CreateNodeByClass hands over a reference; the scene keeps its own
        node.SetSingletonTag(tag)
        node = mrmlScene.AddNode(node)
    return node


def firstVisibleNode(mrmlScene, className):
    """The first node of a class that the user can see in node selectors (not our hidden helpers)."""
    for n in range(mrmlScene.GetNumberOfNodesByClass(className)):
        node = mrmlScene.GetNthNodeByClass(n, className)
        if not node.GetHideFromEditors():
            return node
    return None


def defaultVolume(mrmlScene, layoutManager):
    """The volume to segment when none is chosen: the first slice view's background, else the first visible one."""
    for name in (layoutManager.sliceViewNames() if layoutManager is not None else []):
        volumeId = layoutManager.sliceWidget(name).mrmlSliceCompositeNode().GetBackgroundVolumeID()
        if volumeId:
            return mrmlScene.GetNodeByID(volumeId)
    return firstVisibleNode(mrmlScene, "vtkMRMLScalarVolumeNode")


def newSegmentation(mrmlScene, volumeNode=None):
    """A new segmentation node, on ``volumeNode``'s grid when given."""
    node = mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    node.CreateDefaultDisplayNodes()
    if volumeNode is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    return node


class PromptNodes(object):
    """The markups nodes prompts are placed in: positive points, negative points, the lasso curve (found again after
    a developer Reload by their role). ``ourChange(fn)``: runs ``fn`` as a change of ours (adding a markups node
    makes it the active place node: tools.PromptTools must not read that as the user's choice); ``onPointNode(node)``
    and ``onLassoNode(node)`` are told of each node taken into use."""

    def __init__(self, mrmlScene, colors, ourChange, onPointNode, onLassoNode):
        self.scene, self.colors, self.ourChange = mrmlScene, colors, ourChange
        self.onPointNode, self.onLassoNode = onPointNode, onLassoNode
        self.nodes = {}

    def _node(self, role, className, name, color, adopt):
        node = self.nodes.get(role)
        if node is None or not self.scene.IsNodePresent(node):
            node = self.nodes[role] = self.ourChange(lambda: promptNode(self.scene, role, className, name, color))
            adopt(node)
        return node

    def points(self, positive):
        word = "positive" if positive else "negative"
        return self._node(word + " points", "vtkMRMLMarkupsFiducialNode", "nnInteractive %s points" % word,
                          self.colors[positive], self.onPointNode)

    def isPositive(self, node):
        return node is self.nodes.get("positive points")

    def lasso(self, positive):
        node = self._node("lasso", "vtkMRMLMarkupsClosedCurveNode", "nnInteractive lasso", self.colors[True],
                          self.onLassoNode)
        display = node.GetDisplayNode()
        display.SetLineThickness(0.3)
        display.SetSelectedColor(*self.colors[positive])
        display.SetColor(*self.colors[positive])
        return node

    def clear(self):
        """Remove every prompt's control point (a new or reset segment)."""
        for node in self.nodes.values():
            if self.scene.IsNodePresent(node):
                node.RemoveAllControlPoints()

    def forget(self):
        """The scene is closing: its nodes are going."""
        self.nodes = {}
