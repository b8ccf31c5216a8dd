"""Stand-in for ``qSlicerSegmentationsModuleWidgetsPythonQt.qMRMLSegmentEditorWidget`` (Slicer 5.6 / 5.8 rules),
on the real ``vtkMRMLSegmentEditorNode``, scene and ``slicer.vtkSegmentationHistory``.

Reproduced from qMRMLSegmentEditorWidget.cxx (v5.8.0), method by method:

* ``setMRMLScene``: observes the interaction node singleton (ModifiedEvent -> ``onInteractionNodeModified``) and
  the scene's EndCloseEvent, then ``updateWidgetFromMRML``.
* ``setMRMLSegmentEditorNode``: observes the node's ModifiedEvent (-> ``updateWidgetFromMRML``), sets the
  effects' default parameters, updates. ``updateWidgetFromMRML`` does nothing without a scene, while the scene
  closes or batch-processes, or without an editor node, as in C++.
* The segmentation node combo box: ``segmentationNode()`` / ``segmentationNodeID()`` read the combo box, which
  shows the editor node's segmentation only if the scene is set and the node is not ``HideFromEditors``
  (qMRMLNodeComboBox filters hidden nodes); so on 5.6 / 5.8 ``setSourceVolumeNode`` gives up with a critical
  message when the segmentation is hidden (``version="5.10"`` sets the node directly, as 5.10 does through
  vtkSlicerSegmentEditorLogic).
* Switching to a segmentation that has segments selects its first segment; the undo history follows the
  editor node's segmentation; a newly shown source volume is put in the slice views' background
  (AutoShowSourceVolumeNode) when it is not shown there yet.
* ``setActiveEffect`` / ``setActiveEffectByName`` only write ``ActiveEffectName`` into the editor node; the
  update that follows deactivates the old effect, makes binary labelmap the source representation (an empty
  segmentation is switched silently; a non-empty one in another representation asks the user, answered from the
  test's queue), switches the interaction node to view-transform mode when it is not, and activates the effect.
  ``onInteractionNodeModified``: while an effect is active and the interaction mode is not view-transform, the
  effect deselects itself (qSlicerSegmentEditorAbstractEffect::interactionNodeModified -> selectEffect("")).
* Undo: ``saveStateForUndo`` saves a state of the real vtkSegmentationHistory when its maximum number of states
  is above 0; ``undo``/``redo`` restore the previous / next state inside a modify blocker on the segmentation
  node and fire its DisplayModifiedEvent; ``setUndoEnabled(True)`` clears the history (False only hides the
  buttons: states are still saved).
* Effects: objects with ``name()``, ``setParameter``/``parameter`` (stored as "<Effect>.<name>" attributes of the
  editor node, numbers formatted as QString::number does), ``setCommonParameter``/``commonParameter``,
  ``parameterDefined``, ``integerParameter``/``doubleParameter``; counters ``activations``/``deactivations``.
* ``paint(mask)`` (harness only, no Slicer API): a Paint stroke as the Paint effect applies it on mouse release:
  ``saveStateForUndo()`` then vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap(mode Add, per segment, with
  masking) into the selected segment, which fires the segmentation's SourceRepresentationModified event.

Not reproduced: every Qt child widget of the real editor (segments table, effect buttons, options, masking
section), effect behaviours other than parameters and a Paint stroke (no mouse interaction with views: tests
call ``paint``), view observations (``setupViewObservations`` / ``removeViewObservations`` only set a flag),
cursors, keyboard shortcuts, ``showSourceVolumeInSliceViewers``' check that the segmentation is displayable in a
view, slice-rotation warnings, terminology, surface creation, auto-selection of a newly added segmentation node
by the combo box.
"""

import logging

import numpy as np
import vtk
import vtk.util.numpy_support

import slicer

EFFECT_NAMES = ("Paint", "Draw", "Erase", "Level tracing", "Grow from seeds", "Fill between slices", "Margin",
                "Hollow", "Smoothing", "Scissors", "Islands", "Logical operators", "Threshold", "Mask volume")
PAINT_DEFAULTS = {"BrushSphere": "0", "BrushMinimumAbsoluteDiameter": "0.01", "BrushAbsoluteDiameter": "5",
                  "BrushRelativeDiameter": "3", "BrushDiameterIsRelative": "1", "BrushPixelMode": "0",
                  "EditIn3DViews": "0"}
log = logging.getLogger("slicerapp.qMRMLSegmentEditorWidget")


def _qstring_number(value):
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "%.6g" % value  # QString::number(double) uses 'g' with precision 6
    return str(value)


class Effect(object):
    """qSlicerSegmentEditorAbstractEffect: parameters live in the editor node's attributes."""

    def __init__(self, editor, name):
        self._editor = editor
        self._name = name
        self.activations = 0
        self.deactivations = 0

    def name(self):
        return self._name

    def _node(self):
        return self._editor.mrmlSegmentEditorNode()

    def setCommonParameter(self, name, value):
        node = self._node()
        if node is None:
            self._editor._critical("setCommonParameter: Invalid segment editor parameter set node set to effect "
                                   + self._name)
            return
        value = _qstring_number(value)
        old = node.GetAttribute(name)
        if (old is None and value == "") or value == old:
            return
        node.SetAttribute(name, value)
        node.InvokeCustomModifiedEvent(slicer.vtkMRMLSegmentEditorNode.EffectParameterModified)

    def setParameter(self, name, value):
        if self._node() is None:
            self._editor._critical("setParameter: Invalid segment editor parameter set node set to effect "
                                   + self._name)
            return
        self.setCommonParameter("%s.%s" % (self._name, name), value)

    def commonParameterDefined(self, name):
        node = self._node()
        return bool(node is not None and node.GetAttribute(name))

    def parameterDefined(self, name):
        return self.commonParameterDefined("%s.%s" % (self._name, name))

    def commonParameter(self, name):
        node = self._node()
        value = node.GetAttribute(name) if node is not None else None
        return value or ""

    def parameter(self, name):
        node = self._node()
        if node is None:
            return ""
        value = node.GetAttribute("%s.%s" % (self._name, name))
        if value is None:
            value = node.GetAttribute(name)
        if value is None:
            self._editor._critical("parameter: Parameter named %s cannot be found for effect %s" % (name, self._name))
            return ""
        return value

    def integerParameter(self, name):
        try:
            return int(self.parameter(name))
        except ValueError:
            return 0

    def doubleParameter(self, name):
        try:
            return float(self.parameter(name))
        except ValueError:
            return 0.0

    def setMRMLDefaults(self):
        if self._name == "Paint":
            for key, value in PAINT_DEFAULTS.items():
                if not self.parameterDefined(key) and not self.commonParameterDefined(key):
                    self.setParameter(key, value)

    def activate(self):
        self.activations += 1

    def deactivate(self):
        self.deactivations += 1

    def selectEffect(self, name):
        self._editor.setActiveEffectByName(name)

    def interactionNodeModified(self, interactionNode):
        if interactionNode is None:
            return
        if interactionNode.GetCurrentInteractionMode() != slicer.vtkMRMLInteractionNode.ViewTransform:
            self.selectEffect("")


def build(qt, app_state):
    """The widget class; ``app_state`` is the harness (for the layout manager, the dialogs and the version)."""

    class qMRMLSegmentEditorWidget(qt.QWidget):
        def __init__(self, parent=None):
            qt.QWidget.__init__(self, parent)
            self.setObjectName("qMRMLSegmentEditorWidget")
            self._scene = None
            self._node = None
            self._segmentationNode = None  # d->SegmentationNode
            self._sourceVolumeNode = None  # d->SourceVolumeNode
            self._interactionNode = None
            self._activeEffect = None
            self._lastActiveEffect = None
            self._history = slicer.vtkSegmentationHistory()
            self._undoEnabled = True
            self._autoShowSourceVolumeNode = True
            self._viewsObserved = False
            self._observations = {}  # key -> (object, tag)
            self._effects = [Effect(self, name) for name in EFFECT_NAMES]
            self.criticalMessages = []
            app_state._editors.append(self)

        # --- helpers
        def _critical(self, message):
            self.criticalMessages.append(message)
            app_state.critical_messages.append("qMRMLSegmentEditorWidget::" + message)
            log.critical("qMRMLSegmentEditorWidget::%s", message)

        def _observe(self, key, obj, event, callback):
            self._unobserve(key)
            if obj is not None:
                tag = obj.AddObserver(event, lambda caller, ev: callback())
                self._observations[key] = (obj, tag)

        def _unobserve(self, key):
            entry = self._observations.pop(key, None)
            if entry is not None:
                entry[0].RemoveObserver(entry[1])

        def _comboNode(self):
            """What SegmentationNodeComboBox shows: hidden nodes are filtered out, nothing without a scene."""
            if self._scene is None or self._node is None:
                return None
            node = self._node.GetSegmentationNode()
            if node is None or node.GetHideFromEditors() or not self._scene.IsNodePresent(node):
                return None
            return node

        # --- scene and nodes
        def setMRMLScene(self, scene):
            if scene is self._scene:
                return
            self._scene = scene
            interactionNode = scene.GetNodeByID("vtkMRMLInteractionNodeSingleton") if scene is not None else None
            self._observe("interaction", interactionNode, vtk.vtkCommand.ModifiedEvent, self.onInteractionNodeModified)
            self._interactionNode = interactionNode
            self.updateWidgetFromMRML()
            self._observe("sceneEndClose", scene, slicer.vtkMRMLScene.EndCloseEvent, self.onMRMLSceneEndCloseEvent)

        def mrmlScene(self):
            return self._scene

        def onMRMLSceneEndCloseEvent(self):
            self.initializeParameterSetNode()
            self.updateWidgetFromMRML()

        def mrmlSegmentEditorNode(self):
            return self._node

        def setMRMLSegmentEditorNode(self, node):
            if node is self._node:
                return
            self._observe("editorNode", node, vtk.vtkCommand.ModifiedEvent, self.updateWidgetFromMRML)
            self._node = node
            if node is None:
                return
            self.initializeParameterSetNode()
            self.updateWidgetFromMRML()

        def initializeParameterSetNode(self):
            if self._node is None:
                return
            wasModifying = self._node.StartModify()
            for effect in self._effects:
                effect.setMRMLDefaults()
            self._node.EndModify(wasModifying)

        def interactionNode(self):
            return self._interactionNode

        def setSegmentationNode(self, node):
            if self._node is None:
                if node is not None:
                    self._critical("setSegmentationNode failed: need to set segment editor node first")
                return
            if self._node.GetSegmentationNode() is node:
                return
            self.setActiveEffect(None)
            self._node.SetAndObserveSegmentationNode(node)

        def segmentationNode(self):
            return self._comboNode()

        def segmentationNodeID(self):
            node = self._comboNode()
            return node.GetID() if node is not None else ""

        def setSegmentationNodeID(self, nodeID):
            if self._scene is None:
                self._critical("setSegmentationNodeID failed: MRML scene is not set")
                return
            self.setSegmentationNode(self._scene.GetNodeByID(nodeID))

        def setSourceVolumeNode(self, node):
            if app_state.version >= (5, 10):
                if self._node is not None:
                    self._node.SetAndObserveSourceVolumeNode(node)
                return
            if self._node is None or self.segmentationNode() is None:
                if node is not None:
                    self._critical("setSourceVolumeNode failed: need to set segment editor and segmentation nodes "
                                   "first")
                return
            if self._node.GetSourceVolumeNode() is node:
                return
            self._node.SetAndObserveSourceVolumeNode(node)

        def sourceVolumeNode(self):
            return self._node.GetSourceVolumeNode() if self._node is not None else None

        def sourceVolumeNodeID(self):
            node = self.sourceVolumeNode()
            return node.GetID() if node is not None and node.GetID() else ""

        def setSourceVolumeNodeID(self, nodeID):
            if self._scene is None:
                self._critical("setSourceVolumeNodeID failed: MRML scene is not set")
                return
            self.setSourceVolumeNode(self._scene.GetNodeByID(nodeID))

        # masterVolumeNode: the pre-5.3 names, still present (deprecated) in 5.6 / 5.8
        masterVolumeNode = sourceVolumeNode
        setMasterVolumeNode = setSourceVolumeNode

        def currentSegmentID(self):
            if self._node is None:
                self._critical("currentSegmentID: Invalid segment editor parameter set node")
                return ""
            return self._node.GetSelectedSegmentID() or ""

        def setCurrentSegmentID(self, segmentID):
            if self._node is not None:
                self._node.SetSelectedSegmentID(segmentID)

        def setAutoShowSourceVolumeNode(self, show):
            self._autoShowSourceVolumeNode = bool(show)

        # --- update from MRML
        def updateWidgetFromMRML(self):
            scene = self._scene
            if scene is None or scene.IsClosing() or scene.IsBatchProcessing():
                return
            if self._node is None:
                return
            node = self._node
            wasModifying = node.StartModify()
            try:
                self._updateFromSegmentationNode()
                self._updateFromSourceVolumeNode()
                self._updateEffectsSection()
            finally:
                node.EndModify(wasModifying)

        def _updateFromSegmentationNode(self):
            node = self._node.GetSegmentationNode()
            if node is not self._segmentationNode:
                self._segmentationNode = node
                self._observe("segmentationModified", node, vtk.vtkCommand.ModifiedEvent, self.updateWidgetFromMRML)
                if node is not None:
                    node.CreateDefaultDisplayNodes()
                    segmentation = node.GetSegmentation()
                    if segmentation.GetNumberOfSegments() > 0:
                        self._node.SetSelectedSegmentID(segmentation.GetNthSegmentID(0))
            self._history.SetSegmentation(node.GetSegmentation() if node is not None else None)

        def _updateFromSourceVolumeNode(self):
            segmentationNode = self._node.GetSegmentationNode()
            if segmentationNode is None or segmentationNode.GetSegmentation() is None:
                return
            volumeNode = self._node.GetSourceVolumeNode()
            if volumeNode is self._sourceVolumeNode:
                return
            self._sourceVolumeNode = volumeNode
            if volumeNode is not None and self._autoShowSourceVolumeNode:
                self._showSourceVolumeInSliceViewers()

        def _showSourceVolumeInSliceViewers(self):
            layoutManager = app_state.layout_manager
            if layoutManager is None:
                return
            volumeID = self._node.GetSourceVolumeNode().GetID()
            for name in layoutManager.sliceViewNames():
                composite = layoutManager.sliceWidget(name).mrmlSliceCompositeNode()
                if volumeID not in (composite.GetBackgroundVolumeID(), composite.GetForegroundVolumeID()):
                    composite.SetBackgroundVolumeID(volumeID)
                    composite.SetForegroundVolumeID(None)
                    composite.SetLabelVolumeID(None)

        def _updateEffectsSection(self):
            effect = self.effectByName(self._node.GetActiveEffectName() or "")
            if effect is self._activeEffect:
                return
            if self._activeEffect is not None:
                self._activeEffect.deactivate()
            if effect is not None and not self._setSourceRepresentationToBinaryLabelmap():
                effect = None
            if effect is not None:
                self._viewsObserved = True  # setupViewObservations
                interaction = self._interactionNode
                if interaction is not None and \
                        interaction.GetCurrentInteractionMode() != slicer.vtkMRMLInteractionNode.ViewTransform:
                    interaction.SetCurrentInteractionMode(slicer.vtkMRMLInteractionNode.ViewTransform)
                effect.activate()
            else:
                self.removeViewObservations()
            self._lastActiveEffect = self._activeEffect
            self._activeEffect = effect

        def _setSourceRepresentationToBinaryLabelmap(self):
            node = self._segmentationNode
            if node is None:
                return False
            segmentation = node.GetSegmentation()
            labelmap = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
            if segmentation.GetNumberOfSegments() < 1:
                segmentation.SetSourceRepresentationName(labelmap)
                return True
            if segmentation.GetSourceRepresentationName() == labelmap:
                return True
            answer = qt.QMessageBox.question(None, "Change source representation to binary labelmap?",
                                             "Editing requires binary labelmap source representation, but currently "
                                             "the source representation is %s. ..." %
                                             segmentation.GetSourceRepresentationName(),
                                             qt.QMessageBox.Yes | qt.QMessageBox.No)
            if answer != qt.QMessageBox.Yes:
                return False
            if not segmentation.CreateRepresentation(labelmap):
                return False
            segmentation.SetSourceRepresentationName(labelmap)
            return True

        def onInteractionNodeModified(self):
            if self._interactionNode is None or self._activeEffect is None:
                return
            self._activeEffect.interactionNodeModified(self._interactionNode)

        # --- effects
        def effectByName(self, name):
            if not name:
                return None
            for effect in self._effects:
                if effect.name() == name:
                    return effect
            return None

        def availableEffectNames(self):
            return [effect.name() for effect in self._effects]

        def activeEffect(self):
            return self._activeEffect

        def setActiveEffect(self, effect):
            if self._node is None:
                if effect is not None:
                    self._critical("setActiveEffect: Invalid segment editor parameter set node")
                return
            self._node.SetActiveEffectName(effect.name() if effect is not None else "")

        def setActiveEffectByName(self, name):
            self.setActiveEffect(self.effectByName(name))

        def setupViewObservations(self):
            self._viewsObserved = True

        def removeViewObservations(self):
            self._viewsObserved = False

        def viewsObserved(self):
            return self._viewsObserved

        # --- undo
        def setMaximumNumberOfUndoStates(self, n):
            self._history.SetMaximumNumberOfStates(int(n))

        def maximumNumberOfUndoStates(self):
            return self._history.GetMaximumNumberOfStates()

        def setUndoEnabled(self, enabled):
            if enabled:
                self._history.RemoveAllStates()
            self._undoEnabled = bool(enabled)

        def undoEnabled(self):
            return self._undoEnabled

        def saveStateForUndo(self):
            if self._history.GetMaximumNumberOfStates() > 0:
                self._history.SaveState()

        def _restore(self, restore):
            node = self._segmentationNode
            if node is None:
                return
            wasModifying = node.StartModify()
            try:
                restore()
                # C++ passes the display node as call data; Python cannot pass a pointer here: none is passed
                node.InvokeCustomModifiedEvent(slicer.vtkMRMLDisplayableNode.DisplayModifiedEvent)
            finally:
                node.EndModify(wasModifying)

        def undo(self):
            self._restore(self._history.RestorePreviousState)

        def redo(self):
            self._restore(self._history.RestoreNextState)

        def segmentationHistory(self):
            """Harness only: the real vtkSegmentationHistory (Slicer keeps it private)."""
            return self._history

        def setReadOnly(self, readOnly):
            if readOnly:
                self.setActiveEffect(None)

        def updateVolume(self, *args):
            pass

        # --- harness: a Paint stroke
        def paint(self, mask):
            """A Paint stroke into the selected segment: ``mask`` is a (k, j, i) array on the source volume's voxel
            grid (non-zero = painted). Requires Paint to be the active effect and a source volume, as painting in
            Slicer does. Returns True when the stroke was applied."""
            effect = self._activeEffect
            if effect is None or effect.name() != "Paint":
                raise AssertionError("paint: the Paint effect is not active in this editor")
            node = self._node
            volume = node.GetSourceVolumeNode()
            segmentationNode = node.GetSegmentationNode()
            segmentID = node.GetSelectedSegmentID()
            if volume is None or segmentationNode is None or not segmentID:
                self._critical("paint: no source volume, segmentation or selected segment: the stroke is not applied")
                return False
            mask = np.asarray(mask)
            image = slicer.vtkOrientedImageData()
            ijkToRas = vtk.vtkMatrix4x4()
            volume.GetIJKToRASMatrix(ijkToRas)
            image.SetImageToWorldMatrix(ijkToRas)
            nk, nj, ni = mask.shape
            image.SetExtent(0, ni - 1, 0, nj - 1, 0, nk - 1)
            image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
            view = vtk.util.numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(mask.shape)
            view[:] = mask != 0
            # segmentation node coordinates: the volume's world geometry brought under the segmentation's transform
            if segmentationNode.GetParentTransformNode() is not None or volume.GetParentTransformNode() is not None:
                toSegmentation = vtk.vtkGeneralTransform()
                slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(volume.GetParentTransformNode(),
                                                                     segmentationNode.GetParentTransformNode(),
                                                                     toSegmentation)
                slicer.vtkOrientedImageDataResample.TransformOrientedImage(image, toSegmentation)
            self.saveStateForUndo()
            logic = slicer.vtkSlicerSegmentEditorLogic()
            logic.SetMRMLScene(self._scene)
            logic.SetSegmentEditorNode(node)
            logic.ModifySegmentByLabelmap(segmentationNode, segmentID, image,
                                          slicer.vtkSlicerSegmentEditorLogic.ModificationModeAdd, True, False)
            return True

    qMRMLSegmentEditorWidget.__module__ = "qSlicerSegmentationsModuleWidgetsPythonQt"
    return qMRMLSegmentEditorWidget
