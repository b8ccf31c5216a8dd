"""The scribble tool: the Segment Editor's Paint brush on a hidden scratch segmentation; each stroke is a prompt.

Qt and Slicer code for the module's widget, imported when the scribble tool is first armed (as boxtool.py is). The
brush paints into the scratch segmentation (``slicerscene.scratchSegmentation``: the volume's voxel grid, under its
transform) through a hidden Segment Editor of its own, whose inputs are set on its node itself (on Slicer 5.6 / 5.8
the widget's setSourceVolumeNode gives up when its segmentation combo box, which hides hidden nodes, is empty).
``onPainted()`` is called, once the current event has been handled, after each stroke while the tool is armed.
"""

import qt

import slicer

from .slicerscene import SCRIBBLE_SEGMENT, helperNode, scratchSegmentation


def setEditorNodeInputs(editorNode, segmentationNode, volumeNode):
    """Set the segmentation and source volume on a Segment Editor node (what its widget shows)."""
    editorNode.SetAndObserveSegmentationNode(segmentationNode)
    try:
        editorNode.SetAndObserveSourceVolumeNode(volumeNode)
    except AttributeError:  # Slicer < 5.3
        editorNode.SetAndObserveMasterVolumeNode(volumeNode)


class ScribbleTool(object):
    """``observe(vtkObject, event, callback)``: the widget's VTKObservationMixin.addObserver (removed with the
    widget's observers)."""

    def __init__(self, onPainted, observe):
        self.onPainted, self.observe = onPainted, observe
        self.node = None  # the scratch segmentation
        self.editor = None  # the hidden qMRMLSegmentEditorWidget
        self.editorNode = None
        self.armed = False

    def scratch(self, volumeNode, color):
        """The scratch segmentation on ``volumeNode``'s grid, its stroke colour ``color``."""
        node = scratchSegmentation(slicer.mrmlScene, volumeNode, self.node, color)
        if node is not self.node:
            self.observe(node.GetSegmentation(), slicer.vtkSegmentation.SourceRepresentationModified, self._painted)
            self.node = node
        return node

    def arm(self, volumeNode, color, thickness):
        import qSlicerSegmentationsModuleWidgetsPythonQt

        scratch = self.scratch(volumeNode, color)
        if self.editor is None:
            self.editor = qSlicerSegmentationsModuleWidgetsPythonQt.qMRMLSegmentEditorWidget()
            self.editor.setMRMLScene(slicer.mrmlScene)
            self.editor.setUndoEnabled(False)
        node = self.editorNode
        if node is None or not slicer.mrmlScene.IsNodePresent(node):
            node = self.editorNode = helperNode(slicer.mrmlScene, "scribble editor", "vtkMRMLSegmentEditorNode",
                                                "nnInteractive scribble editor")
        node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere)
        node.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
        setEditorNodeInputs(node, scratch, volumeNode)
        node.SetSelectedSegmentID(SCRIBBLE_SEGMENT)
        self.editor.setMRMLSegmentEditorNode(node)
        self.editor.updateWidgetFromMRML()
        self.editor.setActiveEffectByName("Paint")
        self.configureBrush(volumeNode, thickness)
        self.armed = True

    def configureBrush(self, volumeNode, thickness):
        """Brush diameter = the server's preferred scribble thickness (voxels; None: 2), in the volume's finest
        spacing. Never the pixel mode: it writes the segment on every mouse move, which would send a prompt per
        move."""
        effect = self.editor.activeEffect() if self.editor is not None else None
        if effect is None or volumeNode is None:
            return
        voxels = max([1.0] + [float(t) for t in (thickness if thickness is not None else (2.0,))])
        effect.setParameter("BrushSphere", 0)
        effect.setParameter("BrushPixelMode", 0)
        effect.setParameter("BrushDiameterIsRelative", 0)
        effect.setParameter("BrushAbsoluteDiameter", voxels * min(volumeNode.GetSpacing()))

    def _painted(self, caller, event):
        if self.armed:
            qt.QTimer.singleShot(0, self.onPainted)

    def release(self):
        """Disarmed: Paint off, the views no longer observed by its editor."""
        self.armed = False
        if self.editor is not None:
            self.editor.setActiveEffect(None)
            self.editor.removeViewObservations()

    def forget(self):
        """The scene is closing: its nodes are going."""
        self.release()
        self.node = self.editorNode = None
        if self.editor is not None:
            self.editor.setMRMLSegmentEditorNode(None)
