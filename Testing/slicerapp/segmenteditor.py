"""Stand-in for ``qSlicerSegmentationsModuleWidgetsPythonQt.qMRMLSegmentEditorWidget`` (Slicer 5.6 / 5.8 rules),
on the real ``vtkMRMLSegmentEditorNode``, scene, slice views' interactors and ``slicer.vtkSegmentationHistory``.

Reproduced from qMRMLSegmentEditorWidget.cxx (v5.8.0), method by method:

* ``setMRMLScene``: observes the interaction node singleton (ModifiedEvent -> ``onInteractionNodeModified``), the
  layout manager's ``layoutChanged(int)`` (-> ``onLayoutChanged``), the scene's EndCloseEvent and
  EndBatchProcessEvent (-> ``onMRMLSceneEndBatchProcessEvent``), then ``updateWidgetFromMRML``.
* ``setMRMLSegmentEditorNode``: observes the node's ModifiedEvent (-> ``updateWidgetFromMRML``), sets the
  effects' default parameters, updates. ``updateWidgetFromMRML`` does nothing without a scene, while the scene
  closes or batch-processes, or without an editor node, as in C++.
* The two node combo boxes keep a current node as qMRMLNodeComboBox does: ``updateWidgetFromSegmentationNode`` sets
  the segmentation combo box to the editor node's segmentation on every update, ``updateWidgetFromSourceVolumeNode``
  the source volume combo box when the source volume changed; a node that is ``HideFromEditors`` (or not in the
  scene) is not in a combo box, which then holds none (qMRMLNodeComboBox::setCurrentNodeID finds no index).
  ``segmentationNode()`` reads the combo box; so on 5.6 / 5.8 ``setSourceVolumeNode`` gives up with a critical
  message when the segmentation is hidden (``version="5.10"`` sets the node directly, as 5.10 does through
  vtkSlicerSegmentEditorLogic).
* ``onMRMLSceneEndBatchProcessEvent`` (after loading a scene, restoring a scene view, ...): the editor node's
  segmentation and source volume are reset to what the combo boxes hold (``setSegmentationNode`` deactivates the
  active effect), then the widget updates.
* Switching to a segmentation that has segments selects its first segment; the undo history follows the
  editor node's segmentation; a newly shown source volume is put in the background of the slice views where the
  segmentation is displayable (``showSourceVolumeInSliceViewers``: AutoShowSourceVolumeNode, and the
  displayable-in-view gate of qMRMLSegmentEditorWidgetPrivate::segmentationDisplayableInView) when it is not shown
  there yet.
* ``setActiveEffect`` / ``setActiveEffectByName`` only write ``ActiveEffectName`` into the editor node; the
  update that follows (``updateEffectsSectionFromMRML``) deactivates the old effect, makes binary labelmap the
  source representation (an empty segmentation is switched silently; a non-empty one in another representation
  asks the user, answered from the test's queue), sets up the view observations, switches the interaction node to
  view-transform mode when it is not, and activates the effect; no effect: the view observations are removed.
  ``onInteractionNodeModified``: while an effect is active and the interaction mode is not view-transform, the
  effect deselects itself (qSlicerSegmentEditorAbstractEffect::interactionNodeModified -> selectEffect("")).
* ``setupViewObservations``: for every slice view of the layout manager where the segmentation is displayable,
  observers at priority 1.0 on the view's interactor (mouse buttons, moves, wheel, keys, enter / leave) call the
  active effect's ``processInteractionEvents``, and abort the event (the interactor style, and so markups
  placement, does not get it) when the effect says so. ``onLayoutChanged``: while views are observed, observe the
  new layout's views and show the source volume in them.
* ``installKeyboardShortcuts(parent=None)`` (QShortcuts on the main window: 1..0 and Shift+1..0 toggle effects, Esc
  deactivates, Space toggles the last effect, z / Ctrl+Z undo, y / Ctrl+Y redo, q w / * , . > < previous / next
  segment, i toggles the intensity mask) and ``uninstallKeyboardShortcuts``.
* Undo: ``saveStateForUndo`` saves a state of the real vtkSegmentationHistory when its maximum number of states
  is above 0; ``undo``/``redo`` restore the previous / next state inside a modify blocker on the segmentation
  node and fire its DisplayModifiedEvent; ``setUndoEnabled(True)`` clears the history (False only hides the
  buttons: states are still saved).
* Effects: objects with ``name()``, ``setParameter``/``parameter`` (stored as "<Effect>.<name>" attributes of the
  editor node, numbers formatted as QString::number does), ``setCommonParameter``/``commonParameter``,
  ``parameterDefined``, ``integerParameter``/``doubleParameter``; counters ``activations``/``deactivations``.
* Paint (qSlicerSegmentEditorPaintEffect::processInteractionEvents): a left button press in a slice view starts a
  stroke at the event's world position (the view's XY-to-RAS), moves add points (more between points further
  apart than 0.2 brush diameters, paintAddPoint), the release adds the last point and applies the stroke
  (paintApply): the voxels of the source volume's grid whose centres are inside the brush (a cylinder of the brush
  diameter across the slice, one slice spacing thick; a sphere with BrushSphere) swept along the points, added to
  the selected segment by vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap (mode Add, masking on) after
  ``saveStateForUndo()``: the segmentation's SourceRepresentationModified event follows. Press, moves while
  painting and release abort the event. BrushPixelMode paints the voxel under each point at once. ``paint(mask)``
  (harness only) applies a given stroke mask the same way.

Not reproduced: every Qt child widget of the real editor (segments table, effect buttons, options, masking
section), effects other than parameters and Paint, the brush's display, Paint's segment-visibility confirmation,
wheel and +/- brush resizing, 3D views, cursors, slice-rotation warnings, terminology, surface creation,
auto-selection of a newly added segmentation node by the combo box.
"""

import logging

import numpy as np
from PySide6 import QtCore
import vtk
import vtk.util.numpy_support

import slicer

MAXIMUM_POINT_DISTANCE_IN_STROKE = 0.2  # brush diameters (qSlicerSegmentEditorPaintEffectPrivate)
INTERACTOR_EVENTS = ("LeftButtonPressEvent", "LeftButtonReleaseEvent", "LeftButtonDoubleClickEvent",
                     "RightButtonPressEvent", "RightButtonReleaseEvent", "RightButtonDoubleClickEvent",
                     "MiddleButtonPressEvent", "MiddleButtonReleaseEvent", "MiddleButtonDoubleClickEvent",
                     "MouseMoveEvent", "MouseWheelForwardEvent", "MouseWheelBackwardEvent", "MouseWheelLeftEvent",
                     "MouseWheelRightEvent", "KeyPressEvent", "KeyReleaseEvent", "EnterEvent", "LeaveEvent")
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

    def processInteractionEvents(self, interactor, eventName, viewWidget):
        """Returns whether the event is consumed (abortEvent)."""
        return False


class PaintEffect(Effect):
    """qSlicerSegmentEditorPaintEffect: strokes from the slice views' interactor events (see the module docstring)."""

    def __init__(self, editor):
        Effect.__init__(self, editor, "Paint")
        self.points = []  # the stroke's points, world coordinates
        self.painting = False
        self.strokes = 0

    def deactivate(self):
        Effect.deactivate(self)
        self.points, self.painting = [], False

    def diameter(self, sliceNode):
        if self.integerParameter("BrushDiameterIsRelative"):
            return self.doubleParameter("BrushRelativeDiameter") / 100.0 * sliceNode.GetFieldOfView()[0]
        return self.doubleParameter("BrushAbsoluteDiameter")

    def processInteractionEvents(self, interactor, eventName, viewWidget):
        if eventName not in ("LeftButtonPressEvent", "LeftButtonReleaseEvent", "MouseMoveEvent", "LeaveEvent"):
            return False
        sliceNode = viewWidget.mrmlSliceNode()
        x, y = interactor.GetEventPosition()
        world = list(sliceNode.GetXYToRAS().MultiplyPoint([x, y, 0.0, 1.0])[:3])
        modifiers = interactor.GetShiftKey() or interactor.GetControlKey() or interactor.GetAltKey()
        if eventName == "LeftButtonPressEvent" and not modifiers:
            self.painting = True
            self.points = []
            self._addPoint(viewWidget, world, None)
            return True
        if eventName == "MouseMoveEvent" and self.painting:
            self._addPoint(viewWidget, world, self.points[-1] if self.points else None)
            return False
        if eventName == "LeftButtonReleaseEvent" and self.painting:
            self._addPoint(viewWidget, world, self.points[-1] if self.points else None)
            self.painting = False
            self.apply(viewWidget)
            return True
        return False

    def _addPoint(self, viewWidget, world, last):
        """paintAddPoint: points in between when the stroke moves more than 0.2 brush diameters at once."""
        if last is not None:
            step = MAXIMUM_POINT_DISTANCE_IN_STROKE * self.doubleParameter("BrushAbsoluteDiameter")
            length = float(np.linalg.norm(np.subtract(world, last)))
            for n in range(int(length / step) - 1 if step > 0 else 0):
                w = float(n + 1) / (int(length / step))
                self.points.append(list(w * np.asarray(last) + (1.0 - w) * np.asarray(world)))
        self.points.append(list(world))
        if self.integerParameter("BrushPixelMode"):
            self.apply(viewWidget)

    def apply(self, viewWidget):
        """paintApply: the brush swept along the stroke, on the source volume's voxel grid, added to the segment."""
        points, self.points = self.points, []
        node = self._node()
        volume = node.GetSourceVolumeNode() if node is not None else None
        if volume is None or not points:
            return
        sliceNode = viewWidget.mrmlSliceNode()
        mask = np.zeros(slicer.util.arrayFromVolume(volume).shape, np.uint8)
        ijkToRas = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(ijkToRas)
        toWorld = slicer.util.arrayFromVTKMatrix(ijkToRas)
        transform = volume.GetParentTransformNode()
        if transform is not None:
            toWorld = slicer.util.arrayFromTransformMatrix(transform, toWorld=True) @ toWorld
        toIJK = np.linalg.inv(toWorld)
        normal = slicer.util.arrayFromVTKMatrix(sliceNode.GetSliceToRAS())[:3, 2]
        normal = normal / np.linalg.norm(normal)
        if self.integerParameter("BrushPixelMode"):
            for p in points:
                k = np.round(toIJK @ np.append(p, 1.0))[:3].astype(int)
                if all(0 <= k[a] < mask.shape[2 - a] for a in range(3)):
                    mask[k[2], k[1], k[0]] = 1
        else:
            radius = self.diameter(sliceNode) / 2.0
            half = self._sliceSpacing(viewWidget) / 2.0
            spacing = np.asarray(volume.GetSpacing())
            reach = int(np.ceil(max(radius, half) / spacing.min())) + 1
            for p in points:
                center = (toIJK @ np.append(p, 1.0))[:3]
                lo = np.maximum(np.floor(center - reach).astype(int), 0)
                hi = np.minimum(np.ceil(center + reach).astype(int) + 1, mask.shape[::-1])
                if np.any(hi <= lo):
                    continue
                ii, jj, kk = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
                ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel(), np.ones(ii.size)])
                offset = (toWorld @ ijk)[:3].T - np.asarray(p)
                if self.integerParameter("BrushSphere"):
                    inside = np.linalg.norm(offset, axis=1) <= radius
                else:
                    across = offset @ normal
                    inside = (np.abs(across) <= half) & (
                        np.linalg.norm(offset - np.outer(across, normal), axis=1) <= radius)
                sel = ijk[:3, inside].astype(int)
                mask[sel[2], sel[1], sel[0]] = 1
        self.strokes += 1
        self._editor.paint(mask)

    @staticmethod
    def _sliceSpacing(viewWidget):
        """qSlicerSegmentEditorAbstractEffect::sliceSpacing: the prescribed spacing, else the lowest volume slice
        spacing of the view's slice logic."""
        sliceNode = viewWidget.mrmlSliceNode()
        if sliceNode.GetSliceSpacingMode() == slicer.vtkMRMLSliceNode.PrescribedSliceSpacingMode:
            return sliceNode.GetPrescribedSliceSpacing()[2]
        return viewWidget.sliceLogic().GetLowestVolumeSliceSpacing()[2]


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
            self._effects = [PaintEffect(self) if name == "Paint" else Effect(self, name) for name in EFFECT_NAMES]
            self._segmentationCombo = None  # qMRMLNodeComboBox::currentNode() of the two node selectors
            self._sourceCombo = None
            self._viewObservations = []  # (interactor, tag)
            self._shortcuts = []
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

        def _inComboBox(self, node):
            """``node`` if a node combo box can show it (qMRMLNodeComboBox lists no hidden nodes), else None."""
            if node is None or self._scene is None or node.GetHideFromEditors() or not self._scene.IsNodePresent(node):
                return None
            return node

        def _comboNode(self):
            """SegmentationNodeComboBox->currentNode()."""
            return self._inComboBox(self._segmentationCombo)

        # --- scene and nodes
        def setMRMLScene(self, scene):
            if scene is self._scene:
                return
            self._scene = scene
            interactionNode = scene.GetNodeByID("vtkMRMLInteractionNodeSingleton") if scene is not None else None
            self._observe("interaction", interactionNode, vtk.vtkCommand.ModifiedEvent, self.onInteractionNodeModified)
            self._interactionNode = interactionNode
            layoutManager = app_state.layout_manager
            if layoutManager is not None:
                layoutManager.layoutChanged.connect(self.onLayoutChanged)
            self.updateWidgetFromMRML()
            self._observe("sceneEndClose", scene, slicer.vtkMRMLScene.EndCloseEvent, self.onMRMLSceneEndCloseEvent)
            self._observe("sceneEndBatch", scene, slicer.vtkMRMLScene.EndBatchProcessEvent,
                          self.onMRMLSceneEndBatchProcessEvent)

        def mrmlScene(self):
            return self._scene

        def onMRMLSceneEndCloseEvent(self):
            self.initializeParameterSetNode()
            self.updateWidgetFromMRML()

        def onMRMLSceneEndBatchProcessEvent(self):
            if self._scene is None:
                return
            if self._node is not None:
                if self._node.GetSegmentationNode() is not self._comboNode():
                    self.setSegmentationNode(self._comboNode())
                if self._node.GetSourceVolumeNode() is not self._inComboBox(self._sourceCombo):
                    self.setSourceVolumeNode(self._inComboBox(self._sourceCombo))
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
            self._segmentationCombo = self._inComboBox(node)
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
            self._sourceCombo = self._inComboBox(volumeNode)
            if volumeNode is not None and self._autoShowSourceVolumeNode:
                self._showSourceVolumeInSliceViewers()

        def _segmentationDisplayableInView(self, viewNode):
            """qMRMLSegmentEditorWidgetPrivate::segmentationDisplayableInView."""
            node = self._node.GetSegmentationNode() if self._node is not None else None
            if node is None or viewNode is None:
                return False
            return any(node.GetNthDisplayNode(n) is not None and
                       node.GetNthDisplayNode(n).IsDisplayableInView(viewNode.GetID())
                       for n in range(node.GetNumberOfDisplayNodes()))

        def _showSourceVolumeInSliceViewers(self):
            layoutManager = app_state.layout_manager
            if layoutManager is None or self._node.GetSourceVolumeNode() is None:
                return
            volumeID = self._node.GetSourceVolumeNode().GetID()
            logics = layoutManager.mrmlSliceLogics()
            for n in range(logics.GetNumberOfItems()):
                logic = logics.GetItemAsObject(n)
                if not self._segmentationDisplayableInView(logic.GetSliceNode()):
                    continue
                composite = logic.GetSliceCompositeNode()
                if volumeID not in (composite.GetBackgroundVolumeID(), composite.GetForegroundVolumeID()):
                    composite.SetBackgroundVolumeID(volumeID)
                    composite.SetForegroundVolumeID(None)
                    composite.SetLabelVolumeID(None)

        def onLayoutChanged(self, layoutIndex):
            if self._viewsObserved:
                self.setupViewObservations()
                if self._autoShowSourceVolumeNode:
                    self._showSourceVolumeInSliceViewers()

        def _updateEffectsSection(self):
            effect = self.effectByName(self._node.GetActiveEffectName() or "")
            if effect is self._activeEffect:
                return
            if self._activeEffect is not None:
                self._activeEffect.deactivate()
            if effect is not None and not self._setSourceRepresentationToBinaryLabelmap():
                effect = None
            if effect is not None:
                self.setupViewObservations()
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
            self.removeViewObservations()
            layoutManager = app_state.layout_manager
            if layoutManager is None:
                return
            for name in layoutManager.sliceViewNames():
                sliceWidget = layoutManager.sliceWidget(name)
                if not self._segmentationDisplayableInView(sliceWidget.mrmlSliceNode()):
                    continue
                interactor = sliceWidget.sliceView().interactorStyle().GetInteractor()
                for event in INTERACTOR_EVENTS:
                    holder = []
                    tag = interactor.AddObserver(
                        event, lambda caller, eventName, w=sliceWidget, h=holder: self._processEvents(
                            caller, eventName, w, h), 1.0)
                    holder.append(tag)
                    self._viewObservations.append((interactor, tag))
            self._viewsObserved = True

        def removeViewObservations(self):
            for interactor, tag in self._viewObservations:
                interactor.RemoveObserver(tag)
            self._viewObservations = []
            self._viewsObserved = False

        def _processEvents(self, interactor, eventName, sliceWidget, holder):
            """qMRMLSegmentEditorWidget::processEvents: to the active effect; its answer may abort the event."""
            if self._scene is None or self._scene.IsClosing() or self._node is None or self._activeEffect is None:
                return
            if self._activeEffect.processInteractionEvents(interactor, eventName, sliceWidget):
                interactor.GetCommand(holder[0]).SetAbortFlag(1)

        def viewsObserved(self):
            return self._viewsObserved

        # --- keyboard shortcuts
        def installKeyboardShortcuts(self, parent=None):
            self.uninstallKeyboardShortcuts()
            parent = parent or slicer.util.mainWindow()

            def add(key, slot):
                shortcut = qt.QShortcut(qt.QKeySequence(key), parent)
                shortcut.activated.connect(slot)
                self._shortcuts.append(shortcut)

            for index in range(1, 11):
                add(str(index % 10), lambda i=index: self._selectEffectShortcut(i))
                add("Shift+%d" % (index % 10), lambda i=index: self._selectEffectShortcut(i + 10))
            add(QtCore.Qt.Key_Escape, lambda: self._selectEffectShortcut(0))
            add(QtCore.Qt.Key_Space, lambda: self._selectEffectShortcut(-1))
            add(QtCore.Qt.Key_Z, self.undo)
            add(qt.QKeySequence.Undo, self.undo)
            add(QtCore.Qt.Key_Y, self.redo)
            add(qt.QKeySequence.Redo, self.redo)
            for previous, following in ((QtCore.Qt.Key_Q, QtCore.Qt.Key_W), (QtCore.Qt.Key_Slash, QtCore.Qt.Key_Asterisk),
                                        (QtCore.Qt.Key_Comma, QtCore.Qt.Key_Period),
                                        (QtCore.Qt.Key_Greater, QtCore.Qt.Key_Less)):
                add(previous, lambda: self.selectSegmentAtOffset(-1))
                add(following, lambda: self.selectSegmentAtOffset(+1))
            add(QtCore.Qt.Key_I, self.toggleSourceVolumeIntensityMaskEnabled)

        def uninstallKeyboardShortcuts(self):
            for shortcut in self._shortcuts:
                shortcut.setParent(None)
                shortcut.deleteLater()
            self._shortcuts = []

        def keyboardShortcuts(self):
            """Harness only: the QShortcuts installKeyboardShortcuts made (Slicer keeps them private)."""
            return list(self._shortcuts)

        def _selectEffectShortcut(self, index):
            """onSelectEffectShortcut: index 0 deactivates, -1 re-activates the last effect, N toggles effect N."""
            if index >= 0:
                effect = self._effects[index - 1] if 0 < index <= len(self._effects) else None
                self.setActiveEffect(None if effect is self._activeEffect else effect)
            else:
                self.setActiveEffect(self._lastActiveEffect)

        def selectSegmentAtOffset(self, offset):
            node = self._node.GetSegmentationNode() if self._node is not None else None
            if node is None or node.GetSegmentation().GetNumberOfSegments() == 0:
                return
            ids = list(node.GetSegmentation().GetSegmentIDs())
            current = self._node.GetSelectedSegmentID()
            index = ids.index(current) + offset if current in ids else 0
            self._node.SetSelectedSegmentID(ids[max(0, min(len(ids) - 1, index))])

        def toggleSourceVolumeIntensityMaskEnabled(self):
            if self._node is not None:
                self._node.SetSourceVolumeIntensityMask(not self._node.GetSourceVolumeIntensityMask())

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
