"""nnInteractive in 3D Slicer: promptable 3D segmentation (point, box, scribble, lasso; positive and negative)
computed by an nnInteractive server, written into the Segment Editor's selected segment.

This file is the thin Slicer layer: widgets, MRML nodes, observers, shortcuts. Every decision (which voxel
a click is, how a prompt is rasterized, how a result is merged under the masking settings, what to send,
undo, recovery) lives in the pure-Python package SlicerNNInteractiveLib beside this file, tested with pytest.
Nothing is imported from that package (or from numpy) until the module is used.
"""

import logging
import os
import threading
import time

import qt
import vtk

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

SETTINGS = "SlicerNNInteractive/"
DEFAULT_URL = "http://127.0.0.1:1527"
POSITIVE_COLOR = (0.20, 0.80, 0.35)
NEGATIVE_COLOR = (0.90, 0.25, 0.25)
TOOLS = ("point", "box", "scribble", "lasso")


def settingValue(name, default=""):
    value = qt.QSettings().value(SETTINGS + name)
    return default if value is None else value


def setSettingValue(name, value):
    qt.QSettings().setValue(SETTINGS + name, value)


def slicerScene(segmentEditorNode):
    """The library's Scene on this Segment Editor node (imported on first use: it needs numpy)."""
    from SlicerNNInteractiveLib.slicerscene import SlicerScene

    return SlicerScene(segmentEditorNode)


#
# Module
#


class SlicerNNInteractive(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "nnInteractive"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations", "Markups"]
        self.parent.contributors = ["SlicerNNInteractive contributors"]
        self.parent.helpText = (
            "Promptable 3D segmentation with nnInteractive. Place points, boxes, scribbles or lassos "
            "(positive or negative) on a volume; an nnInteractive server (on this computer or on a GPU node) "
            "returns the 3D mask, written into the segment selected in the Segment Editor below. "
            "Shortcuts while the module is shown: P point, B box, S scribble, L lasso, T positive/negative, "
            "E next segment, R reset segment, Ctrl+Z undo. Configure the server in the Configuration tab."
        )
        self.parent.acknowledgementText = (
            "nnInteractive: Isensee, Rokuss et al., DKFZ (https://github.com/MIC-DKFZ/nnInteractive). "
            "Model weights have their own license, shown by Test connection."
        )


#
# Box tool: a Qt event filter on the slice views (drag, or two clicks), with a live rectangle
#


class BoxTool(qt.QObject):
    """Captures left-button drags and click pairs in slice views while the box tool is armed.

    Events are consumed (so the view does not pan or change window/level), the rectangle is drawn as a 2D
    actor in the view, and ``onBox(sliceWidget, rasA, rasB)`` is called with the two world corners.
    """

    DRAG_PIXELS = 4

    def __init__(self, onBox, color):
        qt.QObject.__init__(self)
        self.onBox = onBox
        self.color = color
        self.installed = []  # (watched QWidget, slice widget)
        self.start = None  # (slice widget, display xy, world ras)
        self.pressed = False
        self.moved = False
        self.preview = None

    def install(self):
        self.uninstall()
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return
        for name in layoutManager.sliceViewNames():
            sliceWidget = layoutManager.sliceWidget(name)
            view = sliceWidget.sliceView()
            target = view
            try:
                target = view.VTKWidget() or view
            except AttributeError:
                pass
            target.installEventFilter(self)
            self.installed.append((target, sliceWidget))

    def uninstall(self):
        self.cancel()
        for target, _ in self.installed:
            target.removeEventFilter(self)
        self.installed = []

    def _sliceWidgetOf(self, obj):
        for target, sliceWidget in self.installed:
            if target is obj or target == obj:
                return sliceWidget
        return None

    def _display(self, obj, event):
        """Qt widget position -> VTK display (slice XY) coordinates: device pixels, y up."""
        try:
            ratio = obj.devicePixelRatioF()
        except AttributeError:
            ratio = obj.devicePixelRatio()
        pos = event.pos()
        return (pos.x() * ratio, obj.height * ratio - pos.y() * ratio - 1)

    @staticmethod
    def _ras(sliceWidget, xy):
        ras = sliceWidget.mrmlSliceNode().GetXYToRAS().MultiplyPoint([xy[0], xy[1], 0.0, 1.0])
        return [ras[0], ras[1], ras[2]]

    def eventFilter(self, obj, event):
        sliceWidget = self._sliceWidgetOf(obj)
        if sliceWidget is None:
            return False
        etype = event.type()
        if etype == qt.QEvent.KeyPress and event.key() == qt.Qt.Key_Escape and self.start is not None:
            self.cancel()
            return True
        if etype == qt.QEvent.MouseButtonDblClick and event.button() == qt.Qt.LeftButton:
            return True
        if etype == qt.QEvent.MouseButtonPress and event.button() == qt.Qt.LeftButton:
            xy = self._display(obj, event)
            if self.start is None or self.start[0] is not sliceWidget:
                self.cancel()
                self.start = (sliceWidget, xy, self._ras(sliceWidget, xy))
                self._showPreview(sliceWidget, xy, xy)
                self.moved = False
            self.pressed = True
            return True
        if etype == qt.QEvent.MouseMove and self.start is not None and self.start[0] is sliceWidget:
            xy = self._display(obj, event)
            x0, y0 = self.start[1]
            if abs(xy[0] - x0) > self.DRAG_PIXELS or abs(xy[1] - y0) > self.DRAG_PIXELS:
                self.moved = True
            self._showPreview(sliceWidget, self.start[1], xy)
            return self.pressed
        if etype == qt.QEvent.MouseButtonRelease and event.button() == qt.Qt.LeftButton:
            if self.start is None:
                return False
            self.pressed = False
            xy = self._display(obj, event)
            x0, y0 = self.start[1]
            far = abs(xy[0] - x0) > self.DRAG_PIXELS or abs(xy[1] - y0) > self.DRAG_PIXELS
            if self.start[0] is sliceWidget and far:
                # the end of a drag, or the second of two clicks
                start = self.start
                self.cancel()
                self.onBox(sliceWidget, start[2], self._ras(sliceWidget, xy))
            # else: a click without moving: the first corner; the box follows the mouse until the next click
            return True
        return False

    def _renderer(self, sliceWidget):
        return sliceWidget.sliceView().renderWindow().GetRenderers().GetFirstRenderer()

    def _showPreview(self, sliceWidget, xy0, xy1):
        if self.preview is None:
            points = vtk.vtkPoints()
            polyData = vtk.vtkPolyData()
            polyData.SetPoints(points)
            lines = vtk.vtkCellArray()
            polyData.SetLines(lines)
            mapper = vtk.vtkPolyDataMapper2D()
            mapper.SetInputData(polyData)
            actor = vtk.vtkActor2D()
            actor.SetMapper(mapper)
            actor.GetProperty().SetColor(*self.color)
            actor.GetProperty().SetLineWidth(2)
            renderer = self._renderer(sliceWidget)
            renderer.AddActor2D(actor)
            self.preview = (sliceWidget, renderer, actor, points, polyData)
        sliceWidget_, renderer, actor, points, polyData = self.preview
        points.Reset()
        for x, y in ((xy0[0], xy0[1]), (xy1[0], xy0[1]), (xy1[0], xy1[1]), (xy0[0], xy1[1])):
            points.InsertNextPoint(x, y, 0.0)
        lines = vtk.vtkCellArray()
        lines.InsertNextCell(5)
        for n in (0, 1, 2, 3, 0):
            lines.InsertCellPoint(n)
        polyData.SetLines(lines)
        points.Modified()
        polyData.Modified()
        sliceWidget.sliceView().scheduleRender()

    def cancel(self):
        self.start = None
        self.pressed = False
        if self.preview is not None:
            sliceWidget, renderer, actor, points, polyData = self.preview
            renderer.RemoveActor2D(actor)
            sliceWidget.sliceView().scheduleRender()
            self.preview = None


class Background(object):
    """Run ``fn`` on a thread; ``onDone(result, error)`` is called on the GUI thread (polled by a QTimer)."""

    def __init__(self, fn, onDone, interval=50):
        self.result = None
        self.error = None
        self.onDone = onDone
        self.thread = threading.Thread(target=self._run, args=(fn,))
        self.thread.daemon = True
        self.timer = qt.QTimer()
        self.timer.setInterval(interval)
        self.timer.connect("timeout()", self._poll)
        self.thread.start()
        self.timer.start()

    def _run(self, fn):
        try:
            self.result = fn()
        except Exception as exc:
            self.error = exc

    def _poll(self):
        if self.thread.is_alive():
            return
        self.timer.stop()
        self.onDone(self.result, self.error)


#
# Widget
#


class SlicerNNInteractiveWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.ui = None
        self.editor = None
        self.editorNode = None
        self.controller = None
        self.scene = None
        self.activeTool = None
        self.shortcuts = []
        self.boxTool = None
        self.pointNodes = {}
        self.lassoNode = None
        self.scratchNode = None
        self.scratchEditor = None
        self.scratchEditorNode = None
        self.pollTimer = None
        self.localServer = None
        self.localServerTimer = None
        self.switchingTool = False
        self.processedPointIds = set()
        self.quietErrors = None  # a list in self-tests: errors are collected instead of shown in dialogs
        self.lastMessage = ""
        self.background = None

    # ------------------------------------------------------------------ setup

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = SlicerNNInteractiveLogic()

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SlicerNNInteractive.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        import qSlicerSegmentationsModuleWidgetsPythonQt

        self.editor = qSlicerSegmentationsModuleWidgetsPythonQt.qMRMLSegmentEditorWidget()
        self.editor.setMaximumNumberOfUndoStates(10)
        self.selectEditorNode()
        self.editor.setMRMLScene(slicer.mrmlScene)
        self.layout.addWidget(self.editor)

        self.ui.busyBar.setVisible(False)
        self.updateToolIcons()
        for tool in TOOLS:
            self.toolButton(tool).connect("clicked(bool)", lambda checked, t=tool: self.onToolButton(t, checked))
        self.ui.polarityButton.connect("clicked(bool)", lambda checked: self.onTogglePolarity())
        self.ui.nextSegmentButton.connect("clicked()", self.onNextSegment)
        self.ui.resetSegmentButton.connect("clicked()", self.onResetSegment)
        self.ui.undoButton.connect("clicked()", self.onUndo)
        self.ui.showTimingsButton.connect("clicked()", self.onShowTimings)

        self.ui.serverUrlLineEdit.text = settingValue("ServerURL", DEFAULT_URL)
        self.ui.apiKeyLineEdit.text = settingValue("APIKey", "")
        self.ui.serverUrlLineEdit.connect("editingFinished()", self.onServerSettingsChanged)
        self.ui.apiKeyLineEdit.connect("editingFinished()", self.onServerSettingsChanged)
        self.ui.showApiKeyCheckBox.connect("toggled(bool)", self.onShowApiKey)
        self.ui.testConnectionButton.connect("clicked()", self.onTestConnection)
        self.ui.consentCheckBox.connect("toggled(bool)", self.onConsentToggled)
        self.ui.executablePathLineEdit.currentPath = settingValue("LocalServerExecutable", "")
        self.ui.extraArgumentsLineEdit.text = settingValue("LocalServerArguments", "")
        self.ui.startLocalServerButton.connect("clicked()", self.onStartLocalServer)
        self.ui.stopLocalServerButton.connect("clicked()", self.onStopLocalServer)
        self.ui.runTimingButton.connect("clicked()", self.onRunTiming)
        self.updateConsentCheckBox()
        self.updateServerSummary()
        self.updatePolarityUI()

        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(25)
        self.pollTimer.connect("timeout()", self.onPoll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(self.interactionNode(), slicer.vtkMRMLInteractionNode.EndPlacementEvent, self.onEndPlacement)
        self.addObserver(self.interactionNode(), slicer.vtkMRMLInteractionNode.InteractionModeChangedEvent,
                         self.onInteractionModeChanged)
        slicer.app.connect("aboutToQuit()", self.onAboutToQuit)

    def selectEditorNode(self):
        """Use the Segment Editor module's parameter node, so both show the same segmentation and settings."""
        from SlicerNNInteractiveLib.slicerscene import segmentEditorSingleton

        node = segmentEditorSingleton(slicer.mrmlScene)
        if node is not self.editorNode:
            self.editorNode = node
            self.editor.setMRMLSegmentEditorNode(node)
            self.scene = None
            if self.controller is not None:
                self.controller.scene = self.getScene()

    def enter(self):
        self.selectEditorNode()
        self.editor.updateWidgetFromMRML()
        if not self.editor.segmentationNodeID():
            segmentationNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
            if segmentationNode is None:
                segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
            self.editor.setSegmentationNode(segmentationNode)
        if self.sourceVolumeNode() is None:
            volumeNode = self.defaultVolumeNode()
            if volumeNode is not None:
                self.setSourceVolumeNode(volumeNode)
        self.installShortcuts()

    def exit(self):
        self.deactivateTools()
        self.editor.setActiveEffect(None)
        self.editor.removeViewObservations()
        self.removeShortcuts()

    def cleanup(self):
        self.exit()
        self.removeObservers()
        if self.pollTimer is not None:
            self.pollTimer.stop()
        if self.controller is not None:
            self.controller.close()
            self.controller = None
        self.onStopLocalServer()
        try:
            slicer.app.disconnect("aboutToQuit()", self.onAboutToQuit)
        except Exception:
            pass

    def onAboutToQuit(self):
        if self.controller is not None:
            self.controller.close()
            self.controller = None
        self.onStopLocalServer()

    def onReload(self):
        """Reload also the library package (Slicer's Reload re-imports only this file)."""
        import sys

        if self.controller is not None:
            self.controller.close()
            self.controller = None
        for name in list(sys.modules):
            if name == "SlicerNNInteractiveLib" or name.startswith("SlicerNNInteractiveLib."):
                del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def onSceneStartClose(self, caller, event):
        self.deactivateTools()
        self.pointNodes = {}
        self.lassoNode = None
        self.scratchNode = None
        self.scratchEditorNode = None
        if self.scratchEditor is not None:
            self.scratchEditor.setMRMLSegmentEditorNode(None)
        if self.controller is not None:
            self.controller.close()
            self.controller = None
        self.editor.setSegmentationNode(None)
        self.editor.removeViewObservations()

    def onSceneEndClose(self, caller, event):
        self.editorNode = None
        self.selectEditorNode()
        if self.parent.isEntered:
            self.editor.updateWidgetFromMRML()

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def interactionNode():
        return slicer.app.applicationLogic().GetInteractionNode()

    @staticmethod
    def selectionNode():
        return slicer.app.applicationLogic().GetSelectionNode()

    def sourceVolumeNode(self):
        try:
            return self.editor.sourceVolumeNode()
        except AttributeError:  # Slicer < 5.3
            return self.editor.masterVolumeNode()

    def setSourceVolumeNode(self, volumeNode):
        try:
            self.editor.setSourceVolumeNode(volumeNode)
        except AttributeError:  # Slicer < 5.3
            self.editor.setMasterVolumeNode(volumeNode)

    @staticmethod
    def defaultVolumeNode():
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None:
            for name in layoutManager.sliceViewNames():
                compositeNode = layoutManager.sliceWidget(name).mrmlSliceCompositeNode()
                volumeId = compositeNode.GetBackgroundVolumeID()
                if volumeId:
                    return slicer.mrmlScene.GetNodeByID(volumeId)
        return slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def toolButton(self, tool):
        return {"point": self.ui.pointButton, "box": self.ui.boxButton, "scribble": self.ui.scribbleButton,
                "lasso": self.ui.lassoButton}[tool]

    def isDarkTheme(self):
        return slicer.app.palette().color(qt.QPalette.Window).lightness() < 128

    def updateToolIcons(self):
        theme = "dark" if self.isDarkTheme() else "light"
        for tool in TOOLS:
            self.toolButton(tool).setIcon(qt.QIcon(self.resourcePath("Icons/%s/%s.png" % (theme, tool))))

    def getScene(self):
        if self.scene is None:
            self.scene = slicerScene(self.editorNode)
        return self.scene

    def serverUrl(self):
        from SlicerNNInteractiveLib.client import normalize_url

        return normalize_url(self.ui.serverUrlLineEdit.text or DEFAULT_URL)

    def apiKey(self):
        return self.ui.apiKeyLineEdit.text.strip() or None

    def reportError(self, message, details=None):
        self.lastMessage = message
        logging.error("nnInteractive: %s%s" % (message, ("\n" + details) if details else ""))
        self.ui.statusLabel.text = message.split("\n")[0]
        if self.quietErrors is not None:
            self.quietErrors.append(message)
            return
        slicer.util.errorDisplay(message, windowTitle="nnInteractive", detailedText=details)

    def setStatus(self, text):
        self.lastMessage = text
        self.ui.statusLabel.text = text

    # ------------------------------------------------------------------ shortcuts

    def installShortcuts(self):
        self.removeShortcuts()
        bindings = [
            ("P", lambda: self.activateTool("point")),
            ("B", lambda: self.activateTool("box")),
            ("S", lambda: self.activateTool("scribble")),
            ("L", lambda: self.activateTool("lasso")),
            ("T", self.onTogglePolarity),
            ("E", self.onNextSegment),
            ("R", self.onResetSegment),
            ("Ctrl+Z", self.onUndo),
        ]
        mainWindow = slicer.util.mainWindow()
        for key, callback in bindings:
            shortcut = qt.QShortcut(qt.QKeySequence(key), mainWindow)
            shortcut.connect("activated()", callback)
            # Another Ctrl+Z (the application's scene undo) may be registered: act on ambiguous presses too.
            shortcut.connect("activatedAmbiguously()", callback)
            self.shortcuts.append(shortcut)

    def removeShortcuts(self):
        for shortcut in self.shortcuts:
            shortcut.setEnabled(False)
            shortcut.setParent(None)
            shortcut.deleteLater()
        self.shortcuts = []

    # ------------------------------------------------------------------ controller

    def ensureController(self, interactive=True):
        """The controller, created on first use: checks the volume, the dependencies and the consent."""
        if self.sourceVolumeNode() is None:
            self.reportError("Select a volume first: choose it as 'Source volume' in the Segment Editor below.")
            return None
        if self.editor.segmentationNode() is None:
            segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
            segmentationNode.CreateDefaultDisplayNodes()
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(self.sourceVolumeNode())
            self.editor.setSegmentationNode(segmentationNode)
        if self.controller is not None:
            return self.controller
        try:
            self.logic.ensureDependencies(ask=interactive)
            url, apiKey = self.serverUrl(), self.apiKey()
        except Exception as exc:
            self.reportError(str(exc))
            return None
        if not self.ensureConsent(url, interactive):
            self.setStatus("Not sent: sending images to %s needs your consent (Configuration tab)." % url)
            return None
        from SlicerNNInteractiveLib.controller import Controller

        self.controller = Controller(
            self.getScene(), lambda: self.logic.connect(url, apiKey), on_busy=self.onBusy, on_error=self.onError,
            on_result=self.onResult, on_connected=self.onConnected, log=lambda msg: logging.info("nnInteractive: " + msg))
        self.controller.set_positive(self.ui.polarityButton.checked is False)
        self.controller.connect()
        return self.controller

    def dropController(self):
        if self.controller is not None:
            self.controller.close()
            self.controller = None
        self.pollTimer.stop()
        self.ui.busyBar.setVisible(False)

    def submit(self, kind, args, prepareStart):
        controller = self.ensureController()
        if controller is None:
            return None
        prepareMs = (time.perf_counter() - prepareStart) * 1e3
        job = controller.submit(kind, args, prepare_ms=prepareMs)
        self.pollTimer.start()
        return job

    def onPoll(self):
        if self.controller is None:
            self.pollTimer.stop()
            return
        self.controller.poll()
        if not self.controller.busy:
            self.pollTimer.stop()

    def onBusy(self, busy, pending):
        self.ui.busyBar.setVisible(bool(busy))
        if busy:
            self.pollTimer.start()
            self.setStatus("Segmenting..." if pending <= 1 else "Segmenting... (%d prompts queued)" % (pending - 1))

    def onResult(self, job, result, timings):
        if job.kind in ("point", "bbox", "scribble", "lasso"):
            self.setStatus("%s %s: %.0f ms (server %.0f ms)" % (
                "Positive" if job.positive else "Negative", job.kind, timings.get("total_ms", 0),
                timings.get("server_total_ms", timings.get("exchange_ms", 0))))
        elif job.kind == "undo":
            self.setStatus("Undone.")

    def onError(self, exc, job, dropped):
        from SlicerNNInteractiveLib.errors import NNInteractiveError

        message = str(exc) if isinstance(exc, (NNInteractiveError, ValueError)) else \
            "Unexpected error (%s: %s)." % (exc.__class__.__name__, exc)
        if dropped:
            message += "\n%d queued prompt(s) were not sent." % dropped
        message += "\nThe segment was not changed."
        self.reportError(message)

    def onConnected(self, capabilities):
        capabilities = capabilities or {}
        thickness = capabilities.get("preferred_scribble_thickness")
        if thickness is not None:
            self.logic.scribbleThickness = thickness
            if self.activeTool == "scribble":
                self.configureBrush()
        self.updateServerSummary(capabilities)

    # ------------------------------------------------------------------ tools

    def onToolButton(self, tool, checked):
        if checked:
            self.activateTool(tool)
        else:
            self.deactivateTools()

    def activateTool(self, tool):
        """Arm a prompt tool; it stays armed after each prompt until another tool is chosen."""
        if self.sourceVolumeNode() is None:
            self.toolButton(tool).checked = False
            self.reportError("Select a volume first: choose it as 'Source volume' in the Segment Editor below.")
            return
        self.deactivateTools()
        self.editor.setActiveEffect(None)
        self.activeTool = tool
        for name in TOOLS:
            self.toolButton(name).checked = (name == tool)
        if tool == "point":
            self.armPlacement(self.pointNode(self.isPositive()))
        elif tool == "box":
            if self.boxTool is None:
                self.boxTool = BoxTool(self.onBox, POSITIVE_COLOR)
            self.boxTool.color = self.polarityColor()
            self.boxTool.install()
        elif tool == "scribble":
            self.armScribble()
        elif tool == "lasso":
            lasso = self.getLassoNode()
            lasso.RemoveAllControlPoints()
            self.armPlacement(lasso)
        self.setStatus("%s tool armed (%s prompts)." % (tool.capitalize(), "positive" if self.isPositive() else
                                                          "negative"))

    def deactivateTools(self):
        self.activeTool = None
        if self.ui is not None:
            for name in TOOLS:
                self.toolButton(name).checked = False
        if self.boxTool is not None:
            self.boxTool.uninstall()
        if self.scratchEditor is not None:
            self.scratchEditor.setActiveEffect(None)
            self.scratchEditor.removeViewObservations()
        interactionNode = self.interactionNode()
        if interactionNode.GetCurrentInteractionMode() == interactionNode.Place:
            self.switchingTool = True
            try:
                interactionNode.SwitchToViewTransformMode()
            finally:
                self.switchingTool = False

    def armPlacement(self, markupsNode):
        from SlicerNNInteractiveLib.slicerscene import armPlacement

        self.switchingTool = True  # our own mode change: not the user leaving the tool
        try:
            armPlacement(self.selectionNode(), self.interactionNode(), markupsNode)
        finally:
            self.switchingTool = False

    def onInteractionModeChanged(self, caller, event):
        if self.switchingTool or self.activeTool not in ("point", "lasso"):
            return
        if self.interactionNode().GetCurrentInteractionMode() != self.interactionNode().Place:
            # Left place mode by other means (Esc, the toolbar, another module) -- unless the lasso just closed,
            # which re-arms itself in onEndPlacement.
            if self.activeTool == "point":
                qt.QTimer.singleShot(0, self.deactivateTools)

    # --- markups nodes for prompts (not saved with the scene)

    def pointNode(self, positive):
        key = "positive" if positive else "negative"
        node = self.pointNodes.get(key)
        if node is None or slicer.mrmlScene.GetNodeByID(node.GetID()) is None:
            from SlicerNNInteractiveLib.slicerscene import newPromptNode

            node = newPromptNode(slicer.mrmlScene, "vtkMRMLMarkupsFiducialNode", "nnInteractive %s points" % key,
                                 POSITIVE_COLOR if positive else NEGATIVE_COLOR)
            self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onPointDefined)
            self.pointNodes[key] = node
        return node

    def getLassoNode(self):
        node = self.lassoNode
        if node is None or slicer.mrmlScene.GetNodeByID(node.GetID()) is None:
            from SlicerNNInteractiveLib.slicerscene import newPromptNode

            node = newPromptNode(slicer.mrmlScene, "vtkMRMLMarkupsClosedCurveNode", "nnInteractive lasso",
                                 POSITIVE_COLOR)
            node.GetDisplayNode().SetLineThickness(0.3)
            self.lassoNode = node
        color = self.polarityColor()
        node.GetDisplayNode().SetSelectedColor(*color)
        node.GetDisplayNode().SetColor(*color)
        return node

    def clearPromptMarkups(self):
        for node in self.pointNodes.values():
            if slicer.mrmlScene.GetNodeByID(node.GetID()) is not None:
                node.RemoveAllControlPoints()
        self.processedPointIds = set()
        if self.lassoNode is not None and slicer.mrmlScene.GetNodeByID(self.lassoNode.GetID()) is not None:
            self.lassoNode.RemoveAllControlPoints()

    # --- point

    def onPointDefined(self, caller, event):
        # Deferred: the markups widget is still inside its placement call here.
        qt.QTimer.singleShot(0, lambda node=caller: self.processPoints(node))

    def processPoints(self, node):
        from SlicerNNInteractiveLib.geometry import GeometryError
        from SlicerNNInteractiveLib.slicerscene import definedWorldPoints

        positive = node is self.pointNodes.get("positive")
        for n, pointId, world in definedWorldPoints(node):
            if pointId in self.processedPointIds:
                continue
            self.processedPointIds.add(pointId)
            node.SetNthControlPointLocked(n, True)
            try:
                self.placePoint(world, positive)
            except GeometryError as exc:
                node.RemoveNthControlPoint(n)
                self.reportError(str(exc))
                return

    def placePoint(self, world, positive):
        """A point prompt at a world RAS position (also used by the self-test)."""
        start = time.perf_counter()
        args = self.getScene().pointPrompt(world)
        if self.ensureController() is None:
            return None
        self.controller.set_positive(positive)
        return self.submit("point", args, start)

    # --- box

    def onBox(self, sliceWidget, rasA, rasB):
        from SlicerNNInteractiveLib.geometry import GeometryError

        try:
            self.placeBox(sliceWidget.mrmlSliceNode(), rasA, rasB)
        except GeometryError as exc:
            self.reportError(str(exc))

    def placeBox(self, sliceNode, rasA, rasB):
        """A box prompt from two world corners drawn on a slice view (also used by the self-test)."""
        start = time.perf_counter()
        return self.submit("bbox", self.getScene().boxPrompt(sliceNode, rasA, rasB), start)

    # --- lasso

    def onEndPlacement(self, caller, event):
        if self.switchingTool or self.activeTool != "lasso":
            return
        qt.QTimer.singleShot(0, self.onLassoClosed)

    def onLassoClosed(self):
        from SlicerNNInteractiveLib.geometry import GeometryError
        from SlicerNNInteractiveLib.slicerscene import definedWorldPoints

        node = self.getLassoNode()
        points = [world for _, _, world in definedWorldPoints(node)]
        try:
            if len(points) >= 3:
                self.placeLasso(points)
            elif points:
                self.reportError("A lasso needs at least three points: click around the object, then double-click "
                                 "or right-click to close it.")
        except GeometryError as exc:
            self.reportError(str(exc))
        finally:
            if self.activeTool == "lasso":
                node.RemoveAllControlPoints()
                self.armPlacement(node)  # the tool stays armed

    def placeLasso(self, worldPoints):
        """A lasso prompt from the world positions of a closed outline (also used by the self-test)."""
        start = time.perf_counter()
        return self.submit("lasso", self.getScene().lassoPrompt(worldPoints), start)

    # --- scribble: the Segment Editor's paint brush on a hidden scratch segmentation

    def getScratch(self):
        from SlicerNNInteractiveLib.slicerscene import scratchSegmentation

        node = scratchSegmentation(slicer.mrmlScene, self.sourceVolumeNode(), self.scratchNode, self.polarityColor())
        if node is not self.scratchNode:
            self.addObserver(node.GetSegmentation(), slicer.vtkSegmentation.SourceRepresentationModified,
                             self.onScribblePainted)
            self.scratchNode = node
        return node

    def armScribble(self):
        import qSlicerSegmentationsModuleWidgetsPythonQt

        from SlicerNNInteractiveLib.slicerscene import SCRIBBLE_SEGMENT

        scratch = self.getScratch()
        if self.scratchEditor is None:
            self.scratchEditor = qSlicerSegmentationsModuleWidgetsPythonQt.qMRMLSegmentEditorWidget()
            self.scratchEditor.setMRMLScene(slicer.mrmlScene)
            self.scratchEditor.setUndoEnabled(False)
        if self.scratchEditorNode is None or slicer.mrmlScene.GetNodeByID(self.scratchEditorNode.GetID()) is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode", "nnInteractive scribble editor")
            node.SetSaveWithScene(False)
            node.SetHideFromEditors(True)
            self.scratchEditorNode = node
            self.scratchEditor.setMRMLSegmentEditorNode(node)
        self.scratchEditorNode.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere)
        self.scratchEditorNode.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
        self.scratchEditor.setSegmentationNode(scratch)
        try:
            self.scratchEditor.setSourceVolumeNode(self.sourceVolumeNode())
        except AttributeError:  # Slicer < 5.3
            self.scratchEditor.setMasterVolumeNode(self.sourceVolumeNode())
        self.scratchEditor.setCurrentSegmentID(SCRIBBLE_SEGMENT)
        self.scratchEditor.setActiveEffectByName("Paint")
        self.configureBrush()

    def configureBrush(self):
        """Brush diameter = the server's preferred scribble thickness, in voxels of the volume's slice."""
        if self.scratchEditor is None:
            return
        effect = self.scratchEditor.activeEffect()
        if effect is None:
            return
        import numpy as np

        thickness = self.logic.scribbleThickness
        voxels = float(np.max(thickness)) if thickness is not None else 2.0
        spacing = self.sourceVolumeNode().GetSpacing()
        effect.setParameter("BrushSphere", 0)
        if voxels <= 1.0:
            effect.setParameter("BrushPixelMode", 1)
        else:
            effect.setParameter("BrushPixelMode", 0)
            effect.setParameter("BrushDiameterIsRelative", 0)
            effect.setParameter("BrushAbsoluteDiameter", voxels * min(spacing))

    def onScribblePainted(self, caller, event):
        if self.activeTool == "scribble":
            qt.QTimer.singleShot(0, self.processScribble)

    def processScribble(self):
        from SlicerNNInteractiveLib.geometry import GeometryError
        from SlicerNNInteractiveLib.slicerscene import SCRIBBLE_SEGMENT

        start = time.perf_counter()
        scratch = self.scratchNode
        if scratch is None:
            return
        try:
            args = self.getScene().takeScribble(scratch, SCRIBBLE_SEGMENT)
        except GeometryError as exc:
            self.reportError(str(exc))
            return
        if args is not None:
            self.submit("scribble", args, start)

    # ------------------------------------------------------------------ polarity, segments, undo

    def isPositive(self):
        return not self.ui.polarityButton.checked

    def polarityColor(self):
        return POSITIVE_COLOR if self.isPositive() else NEGATIVE_COLOR

    def updatePolarityUI(self):
        positive = self.isPositive()
        self.ui.polarityButton.text = "Posi&tive prompt" if positive else "Nega&tive prompt"
        color = qt.QColor.fromRgbF(*self.polarityColor())
        self.ui.polarityButton.setStyleSheet("QPushButton { border: 2px solid %s; padding: 4px; }" % color.name())
        if self.controller is not None:
            self.controller.set_positive(positive)

    def onTogglePolarity(self):
        self.setPolarity(not self.isPositive())

    def setPolarity(self, positive):
        self.ui.polarityButton.checked = not positive
        self.updatePolarityUI()
        tool = self.activeTool
        if tool == "point":
            self.armPlacement(self.pointNode(positive))
        elif tool == "box" and self.boxTool is not None:
            self.boxTool.color = self.polarityColor()
        elif tool == "scribble":
            self.getScratch()
        elif tool == "lasso":
            self.getLassoNode()

    def onNextSegment(self):
        if self.ensureController() is None:
            return
        self.controller.next_segment()
        self.clearPromptMarkups()
        self.setPolarity(True)
        self.setStatus("New segment: prompts go to %s." % self.editorNode.GetSelectedSegmentID())

    def onResetSegment(self):
        if self.controller is None:
            scene = self.getScene()
            key = scene.selected_segment()
            if key is not None:
                scene.clear_segment(key)
        else:
            self.controller.reset_segment()
            self.pollTimer.start()
        self.clearPromptMarkups()
        self.setPolarity(True)
        self.setStatus("Segment reset.")

    def onUndo(self):
        if self.controller is not None and self.controller.can_undo():
            self.controller.undo()
            self.pollTimer.start()
            return
        # No prompt of ours to undo: the Segment Editor's own undo (hand edits with its effects).
        self.editor.undo()

    # ------------------------------------------------------------------ timings

    def onShowTimings(self):
        from SlicerNNInteractiveLib.controller import format_timing
        from SlicerNNInteractiveLib.timing import format_summary, summarize

        records = list(self.controller.timings) if self.controller is not None else []
        if not records:
            text = "No prompt has run yet."
        else:
            text = format_summary(summarize(records), phases=("prepare_ms", "upload_image_ms", "exchange_ms",
                                                               "server_total_ms", "apply_ms", "total_ms"))
            text += "\n\nLast prompts:\n" + "\n".join(format_timing(t) for t in records[-30:])
        dialog = qt.QDialog(slicer.util.mainWindow())
        dialog.setWindowTitle("nnInteractive timings")
        layout = qt.QVBoxLayout(dialog)
        edit = qt.QPlainTextEdit()
        edit.setReadOnly(True)
        edit.setPlainText(text)
        edit.setLineWrapMode(qt.QPlainTextEdit.NoWrap)
        font = qt.QFontDatabase.systemFont(qt.QFontDatabase.FixedFont)
        edit.setFont(font)
        layout.addWidget(edit)
        dialog.resize(900, 400)
        dialog.exec_()

    def onRunTiming(self):
        if self.ensureController() is None:
            return
        if not slicer.util.confirmOkCancelDisplay(
                "The timing experiment adds synthetic volumes of 3 sizes, runs every prompt type %d times on each "
                "and removes them again. It can take minutes. Continue?" % self.ui.repetitionsSpinBox.value):
            return
        self.deactivateTools()
        url, apiKey = self.serverUrl(), self.apiKey()
        with slicer.util.tryWithErrorDisplay("The timing experiment failed.", waitCursor=True):
            text = self.logic.runTimingExperiment(url, apiKey, reps=self.ui.repetitionsSpinBox.value)
            slicer.util.infoDisplay("Timing experiment (milliseconds, mean +- std):", windowTitle="nnInteractive",
                                    detailedText=text)

    # ------------------------------------------------------------------ configuration

    def onServerSettingsChanged(self):
        text = self.ui.serverUrlLineEdit.text.strip()
        try:
            from SlicerNNInteractiveLib.client import normalize_url

            url = normalize_url(text or DEFAULT_URL)
        except ImportError:
            url = text
        except ValueError as exc:
            self.ui.connectionInfoLabel.text = str(exc)
            return
        if url != text:
            self.ui.serverUrlLineEdit.text = url
        changed = (url != settingValue("ServerURL", DEFAULT_URL) or self.ui.apiKeyLineEdit.text.strip()
                   != settingValue("APIKey", ""))
        setSettingValue("ServerURL", url)
        setSettingValue("APIKey", self.ui.apiKeyLineEdit.text.strip())
        if changed:
            self.dropController()
            self.ui.connectionInfoLabel.text = ""
        self.updateConsentCheckBox()
        self.updateServerSummary()

    def onShowApiKey(self, show):
        self.ui.apiKeyLineEdit.echoMode = qt.QLineEdit.Normal if show else qt.QLineEdit.Password

    def onTestConnection(self):
        self.onServerSettingsChanged()
        try:
            self.logic.ensureDependencies(ask=True)
            url, apiKey = self.serverUrl(), self.apiKey()
        except Exception as exc:
            self.ui.connectionInfoLabel.text = "Failed: %s" % exc
            return
        self.ui.connectionInfoLabel.text = "Connecting to %s..." % url
        self.ui.testConnectionButton.enabled = False
        from SlicerNNInteractiveLib.client import check_server

        self.background = Background(lambda: check_server(url, api_key=apiKey), self.onTestConnectionDone)

    def onTestConnectionDone(self, info, error):
        self.ui.testConnectionButton.enabled = True
        if error is not None:
            self.ui.connectionInfoLabel.text = "Failed: %s" % error
            return
        self.ui.connectionInfoLabel.text = self.logic.describeServer(info)
        if info.get("preferred_scribble_thickness") is not None:
            self.logic.scribbleThickness = info["preferred_scribble_thickness"]
        self.updateServerSummary(info)

    def updateServerSummary(self, info=None):
        try:
            url = self.serverUrl()
        except Exception:
            url = self.ui.serverUrlLineEdit.text
        text = "Server: %s" % url
        if info:
            model = info.get("model") or info.get("server") or ""
            if model:
                text += " (%s)" % model
        self.ui.serverSummaryLabel.text = text

    def consentedServers(self):
        value = settingValue("ConsentedServers", [])
        if isinstance(value, str):
            value = [value] if value else []
        return list(value or [])

    def updateConsentCheckBox(self):
        try:
            from SlicerNNInteractiveLib.client import is_local_url

            url = self.serverUrl()
            local = is_local_url(url)
        except Exception:
            url, local = None, False
        self.ui.consentCheckBox.blockSignals(True)
        self.ui.consentCheckBox.checked = local or (url in self.consentedServers())
        self.ui.consentCheckBox.enabled = not local
        self.ui.consentCheckBox.toolTip = ("The server is on this computer: nothing leaves it." if local else
                                           "Images and segments are sent to %s for processing." % url)
        self.ui.consentCheckBox.blockSignals(False)

    def onConsentToggled(self, checked):
        url = self.serverUrl()
        servers = [s for s in self.consentedServers() if s != url]
        if checked:
            servers.append(url)
        setSettingValue("ConsentedServers", servers)

    def ensureConsent(self, url, interactive=True):
        """Slicer's catalog requires explicit consent before data leaves the computer: ask once per server."""
        from SlicerNNInteractiveLib.client import is_local_url

        if is_local_url(url) or url in self.consentedServers():
            return True
        if not interactive:
            return False
        answer = slicer.util.confirmYesNoDisplay(
            "nnInteractive sends the volume you segment (and your segment) to the server at\n\n    %s\n\n"
            "for processing. This server is not on this computer. Only send data you may share with it.\n\n"
            "Allow sending images to this server? (You can change this in the Configuration tab.)" % url,
            windowTitle="nnInteractive: send images to a server?")
        if answer:
            servers = self.consentedServers() + [url]
            setSettingValue("ConsentedServers", servers)
            self.updateConsentCheckBox()
        return bool(answer)

    # --- local server

    def onStartLocalServer(self):
        executable = self.ui.executablePathLineEdit.currentPath.strip()
        arguments = self.ui.extraArgumentsLineEdit.text
        setSettingValue("LocalServerExecutable", executable)
        setSettingValue("LocalServerArguments", arguments)
        self.onStopLocalServer()
        try:
            self.localServer = self.logic.startLocalServer(executable, arguments)
        except Exception as exc:
            self.ui.localServerStatusLabel.text = "Could not start: %s" % exc
            return
        self.ui.serverUrlLineEdit.text = self.localServer.url
        self.ui.apiKeyLineEdit.text = self.localServer.api_key
        self.onServerSettingsChanged()
        self.localServerTimer = qt.QTimer()
        self.localServerTimer.setInterval(500)
        self.localServerTimer.connect("timeout()", self.onLocalServerPoll)
        self.localServerTimer.start()
        self.onLocalServerPoll()

    def onLocalServerPoll(self):
        if self.localServer is None:
            return
        state, message = self.localServer.status()
        self.ui.localServerStatusLabel.text = message
        if state != "starting" and self.localServerTimer is not None:
            self.localServerTimer.stop()
            if state == "failed":
                self.reportError("The local server could not start.", message)
            elif state == "ready":
                self.onTestConnection()

    def onStopLocalServer(self):
        if self.localServerTimer is not None:
            self.localServerTimer.stop()
            self.localServerTimer = None
        if self.localServer is not None:
            if self.controller is not None and self.localServer.url == settingValue("ServerURL", ""):
                self.dropController()
            self.localServer.stop()
            self.localServer = None
            if self.ui is not None:
                self.ui.localServerStatusLabel.text = "Not running."


#
# Logic
#


class SlicerNNInteractiveLogic(ScriptedLoadableModuleLogic):
    """Non-GUI parts: dependencies, server connections, the local server, the timing experiment."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.scribbleThickness = None

    @staticmethod
    def ensureDependencies(ask=True):
        """blosc2 (the wire codec's compressor) is not part of Slicer's Python: install it on first use."""
        try:
            import blosc2  # noqa: F401
        except ImportError:
            if ask and not slicer.util.confirmOkCancelDisplay(
                    "nnInteractive needs the Python package 'blosc2' to exchange images with the server. "
                    "Install it now (a few MB from PyPI)?", windowTitle="nnInteractive"):
                raise RuntimeError("The Python package blosc2 is needed; it was not installed.")
            slicer.util.pip_install("blosc2")
            import importlib

            importlib.invalidate_caches()
            importlib.import_module("blosc2")

    @staticmethod
    def connect(url, apiKey):
        """A new server session (called on the worker thread)."""
        from SlicerNNInteractiveLib.client import RemoteSession

        return RemoteSession(url, api_key=apiKey)

    @staticmethod
    def describeServer(info):
        lines = ["Connected."]
        for key, label in (("server", "Server"), ("version", "Version"), ("model", "Model"),
                           ("license", "License")):
            value = info.get(key)
            if value:
                lines.append("%s: %s" % (label, value))
        prompts = info.get("supported_interactions") or []
        if prompts:
            lines.append("Prompts: %s" % ", ".join(prompts))
        if info.get("preferred_scribble_thickness") is not None:
            lines.append("Scribble thickness: %s voxels" % (info["preferred_scribble_thickness"],))
        lines.append("Undo on the server: %s" % ("yes" if info.get("supports_undo") else "no"))
        return "\n".join(lines)

    @staticmethod
    def startLocalServer(executable, arguments=""):
        from SlicerNNInteractiveLib.localserver import LocalServer, split_arguments

        if not executable:
            raise ValueError("Choose the nninteractive-slicer-server executable first.")
        server = LocalServer(executable, split_arguments(arguments),
                             log_path=os.path.join(slicer.app.temporaryPath, "nninteractive-local-server.log"))
        server.start()
        return server

    @staticmethod
    def addSyntheticVolume(image, name="nnInteractive synthetic", spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                           directions=((1, 0, 0), (0, 1, 0), (0, 0, 1))):
        volumeNode = slicer.util.addVolumeFromArray(image, name=name)
        volumeNode.SetSpacing(*spacing)
        volumeNode.SetOrigin(*origin)
        m = vtk.vtkMatrix4x4()
        for r in range(3):
            for c in range(3):
                m.SetElement(r, c, float(directions[r][c]))
        volumeNode.SetIJKToRASDirectionMatrix(m)
        return volumeNode

    def runTimingExperiment(self, url=None, apiKey=None, reps=10, sizes=("S", "M", "L"), kinds=None, log=None):
        """The paper's timing experiment inside Slicer, on real volume and segmentation nodes.

        From the Python console::

            logic = slicer.util.getModuleLogic("SlicerNNInteractive")
            print(logic.runTimingExperiment(reps=10))

        Returns the summary table as text (and logs it); the nodes it creates are removed afterwards.
        """
        from SlicerNNInteractiveLib import timing
        from SlicerNNInteractiveLib.client import normalize_url
        from SlicerNNInteractiveLib.controller import Controller

        self.ensureDependencies(ask=False)
        url = normalize_url(url or settingValue("ServerURL", DEFAULT_URL))
        if apiKey is None:
            apiKey = settingValue("APIKey", "") or None
        log = log or (lambda msg: logging.info("nnInteractive timing: %s" % msg))
        created = []

        def makeScene(image):
            volumeNode = self.addSyntheticVolume(image, name="nnInteractive timing %dx%dx%d" % image.shape[::-1])
            segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
            segmentationNode.CreateDefaultDisplayNodes()
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
            editorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
            editorNode.SetAndObserveSegmentationNode(segmentationNode)
            try:
                editorNode.SetAndObserveSourceVolumeNode(volumeNode)
            except AttributeError:  # Slicer < 5.3
                editorNode.SetAndObserveMasterVolumeNode(volumeNode)
            created.extend([editorNode, segmentationNode, volumeNode])
            return slicerScene(editorNode)

        def makeController(scene):
            controller = Controller(scene, lambda: self.connect(url, apiKey))
            controller.last_errors = []
            controller.on_error = lambda exc, job, dropped: controller.last_errors.append(exc)
            return controller

        try:
            records = timing.run(makeScene, makeController, sizes=sizes, kinds=kinds or timing.KINDS, reps=reps,
                                 pump=slicer.app.processEvents, log=log,
                                 thickness=self.scribbleThickness or (2, 2, 2))
        finally:
            for node in created:
                if slicer.mrmlScene.IsNodePresent(node):
                    slicer.mrmlScene.RemoveNode(node)
        summary = timing.summarize(records)
        text = timing.format_summary(summary)
        text += "\n\n" + timing.format_summary(summary, phases=(
            "upload_image_ms", "encode_ms", "decode_ms", "upload_segment_ms"))
        log("\n" + text)
        self.lastTimingRecords = records
        return text


#
# Test
#


class SlicerNNInteractiveTest(ScriptedLoadableModuleTest):
    """Builds a synthetic volume, reaches a server (the configured one, NNINTERACTIVE_TEST_SERVER, or a local
    server started from the configured executable), places each prompt type through the module's own code
    paths and checks the segment. Skipped when no server can be reached."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_Prompts()

    def findServer(self):
        from SlicerNNInteractiveLib.client import check_server

        candidates = []
        if os.environ.get("NNINTERACTIVE_TEST_SERVER"):
            candidates.append((os.environ["NNINTERACTIVE_TEST_SERVER"], os.environ.get("NNINTERACTIVE_TEST_API_KEY")))
        candidates.append((settingValue("ServerURL", DEFAULT_URL), settingValue("APIKey", "") or None))
        for url, key in candidates:
            try:
                return url, key, check_server(url, api_key=key), None
            except Exception as exc:
                logging.info("nnInteractive test: %s not usable: %s" % (url, exc))
        executable = settingValue("LocalServerExecutable", "")
        if executable:
            server = SlicerNNInteractiveLogic.startLocalServer(executable, settingValue("LocalServerArguments", ""))
            if server.wait_ready(timeout=600, pump=slicer.app.processEvents):
                return server.url, server.api_key, check_server(server.url, api_key=server.api_key), server
            server.stop()
        return None, None, None, None

    def waitIdle(self, widget, timeout=120.0):
        deadline = time.monotonic() + timeout
        while widget.controller is not None and widget.controller.busy:
            slicer.app.processEvents()
            time.sleep(0.01)
            self.assertLess(time.monotonic(), deadline, "the server did not answer in time")
        slicer.app.processEvents()

    def test_Prompts(self):
        import numpy as np

        SlicerNNInteractiveLogic.ensureDependencies(ask=False)
        from SlicerNNInteractiveLib import timing

        url, apiKey, info, localServer = self.findServer()
        if url is None:
            self.skipTest("no nnInteractive server reachable: configure one in the module (or set "
                          "NNINTERACTIVE_TEST_SERVER) and run the test again")
        try:
            self.delayDisplay("Server: %s" % SlicerNNInteractiveLogic.describeServer(info).replace("\n", "; "))
            self.runPrompts(url, apiKey, np, timing)
        finally:
            if localServer is not None:
                localServer.stop()

    def runPrompts(self, url, apiKey, np, timing):
        from SlicerNNInteractiveLib.slicerscene import SCRIBBLE_SEGMENT

        # A volume with an oblique-free but non-trivial geometry: anisotropic, LPS-like directions, offset origin.
        image, truth = timing.synthetic_volume((40, 72, 64))
        volumeNode = SlicerNNInteractiveLogic.addSyntheticVolume(
            image, spacing=(0.8, 0.9, 2.0), origin=(12.0, -30.0, 5.0),
            directions=((-1, 0, 0), (0, -1, 0), (0, 0, 1)))
        slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)
        slicer.util.selectModule("SlicerNNInteractive")
        widget = slicer.modules.SlicerNNInteractiveWidget
        widget.quietErrors = []
        widget.ui.serverUrlLineEdit.text = url
        widget.ui.apiKeyLineEdit.text = apiKey or ""
        widget.onServerSettingsChanged()
        if url not in widget.consentedServers():
            setSettingValue("ConsentedServers", widget.consentedServers() + [url])
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        widget.editor.setSegmentationNode(segmentationNode)
        widget.setSourceVolumeNode(volumeNode)

        layoutManager = slicer.app.layoutManager()
        redNode = layoutManager.sliceWidget("Red").mrmlSliceNode()
        redNode.RotateToVolumePlane(volumeNode)
        ijkToRAS = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRAS)
        k, j, i = [n // 2 for n in image.shape]

        def world(ii, jj, kk):
            p = ijkToRAS.MultiplyPoint([ii, jj, kk, 1.0])
            return [p[0], p[1], p[2]]

        center = world(i, j, k)
        redNode.JumpSliceByCentering(*center)
        slicer.app.processEvents()
        scene = widget.getScene()

        def segment():
            key = scene.selected_segment()
            return scene.read_segment(key).astype(bool) if key is not None else np.zeros(image.shape, bool)

        def dice(mask):
            return 2.0 * np.count_nonzero(mask & truth) / max(1, np.count_nonzero(mask) + np.count_nonzero(truth))

        strict = os.environ.get("NNINTERACTIVE_TEST_EXPECT_MASK", "1") != "0"

        # point, through the markups node as a click would place it
        self.delayDisplay("Point prompt")
        widget.activateTool("point")
        widget.pointNode(True).AddControlPointWorld(vtk.vtkVector3d(*center))
        slicer.app.processEvents()
        self.waitIdle(widget)
        self.assertEqual(widget.quietErrors, [])
        self.assertIsNotNone(scene.selected_segment(), "a segment was created for the prompt")
        afterPoint = segment()
        if strict:
            self.assertTrue(afterPoint[k, j, i], "the clicked voxel is in the segment")
        self.delayDisplay("Point: Dice %.2f" % dice(afterPoint))

        # box, on the red slice, through the same code as a drag
        self.delayDisplay("Box prompt")
        widget.activateTool("box")
        widget.placeBox(redNode, world(i - 20, j - 22, k), world(i + 20, j + 22, k))
        self.waitIdle(widget)
        self.assertEqual(widget.quietErrors, [])
        self.delayDisplay("Box: Dice %.2f" % dice(segment()))

        # negative point outside the object, then undo restores the segment
        before = segment()
        widget.setPolarity(False)
        widget.placePoint(world(3, 3, k), positive=False)
        self.waitIdle(widget)
        widget.onUndo()
        self.waitIdle(widget)
        self.assertTrue(np.array_equal(segment(), before), "undo restores the segment")
        widget.setPolarity(True)

        # scribble, as the paint brush writes it into the scratch segmentation
        self.delayDisplay("Scribble prompt")
        widget.onResetSegment()
        self.waitIdle(widget)
        self.assertFalse(segment().any(), "reset clears the segment")
        widget.activateTool("scribble")
        stroke = np.zeros(image.shape, np.uint8)
        stroke[k, j - 1:j + 2, i - 8:i + 8] = 1
        slicer.util.updateSegmentBinaryLabelmapFromArray(stroke, widget.getScratch(), SCRIBBLE_SEGMENT, volumeNode)
        slicer.app.processEvents()
        self.waitIdle(widget)
        self.assertEqual(widget.quietErrors, [])
        if strict:
            self.assertTrue(segment()[k, j, i])
        self.delayDisplay("Scribble: Dice %.2f" % dice(segment()))

        # lasso, closed by ending the placement like a double-click does
        self.delayDisplay("Lasso prompt")
        widget.onNextSegment()
        widget.activateTool("lasso")
        lasso = widget.getLassoNode()
        for n in range(16):
            a = 2 * np.pi * n / 16
            lasso.AddControlPointWorld(vtk.vtkVector3d(*world(i + 18 * np.cos(a), j + 20 * np.sin(a), k)))
        widget.interactionNode().SwitchToViewTransformMode()
        slicer.app.processEvents()
        self.waitIdle(widget)
        self.assertEqual(widget.quietErrors, [])
        if strict:
            self.assertTrue(segment()[k, j, i])
        self.delayDisplay("Lasso: Dice %.2f" % dice(segment()))

        # an oblique view gives a message, never a wrong box
        widget.deactivateTools()
        sliceToRAS = redNode.GetSliceToRAS()
        rotation = vtk.vtkTransform()
        rotation.RotateX(20)
        oblique = vtk.vtkMatrix4x4()
        vtk.vtkMatrix4x4.Multiply4x4(rotation.GetMatrix(), sliceToRAS, oblique)
        sliceToRAS.DeepCopy(oblique)
        redNode.UpdateMatrices()
        before = segment()
        widget.onBox(layoutManager.sliceWidget("Red"), world(i - 5, j - 5, k), world(i + 5, j + 5, k))
        self.waitIdle(widget)
        self.assertTrue(widget.quietErrors and "not aligned" in widget.quietErrors[-1])
        self.assertTrue(np.array_equal(segment(), before))
        widget.quietErrors = None
        self.delayDisplay("nnInteractive self-test passed")
