"""Stand-ins for Slicer's layout manager and slice views, on real MRML slice nodes, real Qt widgets and real VTK
interactors.

``LayoutManager`` plays qSlicerLayoutManager. Each ``SliceWidget`` (qMRMLSliceWidget) has a real
``vtkMRMLSliceLogic`` that created its real ``vtkMRMLSliceNode`` and ``vtkMRMLSliceCompositeNode`` in the scene (as
Slicer's layout logic does), and a ``SliceView`` (qMRMLSliceView) whose ``VTKWidget()`` is a real QWidget of fixed
size. The slice node's dimensions follow that widget's size through ``vtkMRMLSliceLogic.ResizeSliceNode`` as in
Slicer, so ``GetXYToRAS()`` maps widget pixels (y up, device pixels) to RAS as in the application.

Events take Slicer's path: a Qt mouse or key event on the VTK widget goes first through the widget's Qt event
filters (a module's box tool sits there), then, as VTK's QVTKInteractorAdapter::ProcessEvent forwards it, to the
view's real ``vtkRenderWindowInteractor`` (``sliceView().interactorStyle().GetInteractor()``) as a VTK event with
its display position (y up) and modifier keys. Observers there run by priority: the Segment Editor's effects
(qMRMLSegmentEditorWidget::setupViewObservations, priority 1.0, may abort the event), then the interactor style at
priority 0, which here does only what Slicer's markups displayable manager does when placing control points
(``markups.Placement``: preview point, place, stop). ``renderWindow()`` is a real offscreen vtkRenderWindow with one
renderer; it is never rendered; ``scheduleRender()`` only counts calls.

Layouts (vtkMRMLLayoutLogic's descriptions, v5.8.0): conventional (2) and four-up (3) show Red, Yellow and Green,
one-up red (6) Red only, three-over-three (21) also Red+, Green+ and Yellow+. ``setLayout`` creates the slice views
a layout needs the first time (qMRMLLayoutManager's view factory keeps them afterwards: ``sliceViewNames()`` lists
every view created, as Slicer's does) and emits ``layoutChanged(int)``.

Not reproduced: rendering, displayable managers other than markups placement (no markups widgets for dragging
points, no crosshair, no rulers), the interactor style's pan, zoom and window/level (an event nobody takes does
nothing), slice controllers, 3D views, lightbox.
"""

import vtk
from PySide6 import QtCore

import slicer

VIEW_SIZE = (400, 300)  # pixels of each slice view's VTK widget
ORIENTATIONS = {"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal", "Red+": "Axial", "Yellow+": "Sagittal",
                "Green+": "Coronal"}
COLORS = {"Red": (0.95, 0.33, 0.33), "Yellow": (0.93, 0.84, 0.29), "Green": (0.43, 0.69, 0.38),
          "Red+": (0.98, 0.66, 0.62), "Yellow+": (0.96, 0.91, 0.64), "Green+": (0.78, 0.88, 0.72)}
CONVENTIONAL = 2
LAYOUTS = {CONVENTIONAL: ("Red", "Yellow", "Green"), 3: ("Red", "Yellow", "Green"), 6: ("Red",),
           21: ("Red", "Green", "Yellow", "Red+", "Green+", "Yellow+")}
QT_TO_VTK = {  # QVTKInteractorAdapter::ProcessEvent
    (QtCore.QEvent.MouseButtonPress, QtCore.Qt.LeftButton): vtk.vtkCommand.LeftButtonPressEvent,
    (QtCore.QEvent.MouseButtonRelease, QtCore.Qt.LeftButton): vtk.vtkCommand.LeftButtonReleaseEvent,
    (QtCore.QEvent.MouseButtonDblClick, QtCore.Qt.LeftButton): vtk.vtkCommand.LeftButtonDoubleClickEvent,
    (QtCore.QEvent.MouseButtonPress, QtCore.Qt.RightButton): vtk.vtkCommand.RightButtonPressEvent,
    (QtCore.QEvent.MouseButtonRelease, QtCore.Qt.RightButton): vtk.vtkCommand.RightButtonReleaseEvent,
    (QtCore.QEvent.MouseButtonPress, QtCore.Qt.MiddleButton): vtk.vtkCommand.MiddleButtonPressEvent,
    (QtCore.QEvent.MouseButtonRelease, QtCore.Qt.MiddleButton): vtk.vtkCommand.MiddleButtonReleaseEvent,
}


def build(qt):
    class VTKWidget(qt.QWidget):
        """The render widget: Qt events that no event filter took go to the view's interactor as VTK events."""

        def __init__(self, view):
            qt.QWidget.__init__(self)
            self._view = view

        def event(self, event):
            if self._view._forward(self, event):
                return True
            return qt.QWidget.event(self, event)

    class InteractorStyle(object):
        """vtkMRMLSliceViewInteractorStyle, as far as others use it: ``GetInteractor()``."""

        def __init__(self, interactor):
            self._interactor = interactor

        def GetInteractor(self):
            return self._interactor

    class SliceView(qt.QWidget):
        """qMRMLSliceView: ``VTKWidget()``, ``renderWindow()``, ``interactorStyle()``, ``scheduleRender()``,
        ``mrmlSliceNode()``."""

        def __init__(self, sliceNode, placement, parent=None):
            qt.QWidget.__init__(self, parent)
            self._sliceNode = sliceNode
            layout = qt.QVBoxLayout(self)
            layout.setContentsMargins(0, 0, 0, 0)
            self._vtkWidget = VTKWidget(self)
            self._vtkWidget.setObjectName("VTKWidget")
            self._vtkWidget.setFixedSize(*VIEW_SIZE)
            self._vtkWidget.setMouseTracking(True)
            self._vtkWidget.setFocusPolicy(QtCore.Qt.StrongFocus)
            layout.addWidget(self._vtkWidget)
            warnings = vtk.vtkObject.GetGlobalWarningDisplay()
            vtk.vtkObject.GlobalWarningDisplayOff()  # no display here: never rendered, so no window is needed
            try:
                self._renderWindow = vtk.vtkRenderWindow()
                self._renderWindow.SetOffScreenRendering(1)
            finally:
                vtk.vtkObject.SetGlobalWarningDisplay(warnings)
            self._renderWindow.SetSize(*VIEW_SIZE)
            self._renderer = vtk.vtkRenderer()
            self._renderWindow.AddRenderer(self._renderer)
            self._interactor = vtk.vtkRenderWindowInteractor()
            self._interactor.SetInteractorStyle(None)  # VTK's default style grabs the focus on a press
            self._interactor.SetRenderWindow(self._renderWindow)
            self._interactor.SetSize(*VIEW_SIZE)
            self._style = InteractorStyle(self._interactor)
            self._placement = placement
            for event in (vtk.vtkCommand.MouseMoveEvent, vtk.vtkCommand.LeftButtonPressEvent,
                          vtk.vtkCommand.LeftButtonReleaseEvent, vtk.vtkCommand.LeftButtonDoubleClickEvent,
                          vtk.vtkCommand.RightButtonReleaseEvent, vtk.vtkCommand.LeaveEvent):
                self._interactor.AddObserver(event, self._onStyleEvent, 0.0)
            self.renderRequests = 0

        def VTKWidget(self):
            return self._vtkWidget

        def renderWindow(self):
            return self._renderWindow

        def interactorStyle(self):
            return self._style

        def interactor(self):
            return self._interactor

        def scheduleRender(self):
            self.renderRequests += 1

        def forceRender(self):
            self.renderRequests += 1

        def mrmlSliceNode(self):
            return self._sliceNode

        def _forward(self, widget, event):
            """QVTKInteractorAdapter::ProcessEvent: position (device pixels, y up) and modifiers, then the event."""
            etype = event.type()
            if etype == QtCore.QEvent.Leave:
                self._interactor.InvokeEvent(vtk.vtkCommand.LeaveEvent)
                return False
            if etype == QtCore.QEvent.MouseMove:
                eid = vtk.vtkCommand.MouseMoveEvent
            elif etype in (QtCore.QEvent.MouseButtonPress, QtCore.QEvent.MouseButtonRelease,
                           QtCore.QEvent.MouseButtonDblClick):
                eid = QT_TO_VTK.get((etype, event.button()))
            elif etype == QtCore.QEvent.KeyPress:
                self._interactor.SetKeySym(event.text() or "")
                self._interactor.InvokeEvent(vtk.vtkCommand.KeyPressEvent)
                return False
            else:
                return False
            if eid is None:
                return False
            ratio = widget.devicePixelRatioF()
            position = event.position()
            modifiers = event.modifiers()
            self._interactor.SetEventInformation(
                int(position.x() * ratio), int((widget.height - 1 - position.y()) * ratio),
                int(bool(modifiers & QtCore.Qt.ControlModifier)), int(bool(modifiers & QtCore.Qt.ShiftModifier)))
            self._interactor.SetAltKey(int(bool(modifiers & QtCore.Qt.AltModifier)))
            self._interactor.InvokeEvent(eid)
            return True

        def _onStyleEvent(self, interactor, eventName):
            """The interactor style's turn (priority 0): markups placement in this view (markups.Placement)."""
            x, y = interactor.GetEventPosition()
            ras = self._sliceNode.GetXYToRAS().MultiplyPoint([x, y, 0.0, 1.0])[:3]
            self._placement.viewEvent(eventName, self._sliceNode, list(ras), (x, y))

    class SliceWidget(qt.QWidget):
        """qMRMLSliceWidget: ``mrmlSliceNode()``, ``mrmlSliceCompositeNode()``, ``sliceLogic()``, ``sliceView()``."""

        def __init__(self, name, logic, placement, parent=None):
            qt.QWidget.__init__(self, parent)
            self.setObjectName("qMRMLSliceWidget" + name)
            self._name = name
            self._logic = logic
            layout = qt.QVBoxLayout(self)
            layout.setContentsMargins(0, 0, 0, 0)
            self._view = SliceView(logic.GetSliceNode(), placement, self)
            layout.addWidget(self._view)
            w, h = VIEW_SIZE
            logic.ResizeSliceNode(w, h)

        def sliceViewName(self):
            return self._name

        def mrmlSliceNode(self):
            return self._logic.GetSliceNode()

        def mrmlSliceCompositeNode(self):
            return self._logic.GetSliceCompositeNode()

        def sliceLogic(self):
            return self._logic

        def sliceView(self):
            return self._view

        def fitSliceToBackground(self):
            self._logic.FitSliceToBackground(*VIEW_SIZE)

    class LayoutManager(qt.QObject):
        """qSlicerLayoutManager: the slice views of the layouts in LAYOUTS, created when first needed."""

        layoutChanged = QtCore.Signal(int)

        def __init__(self, scene, appLogic, placement, parent=None):
            qt.QObject.__init__(self, parent)
            self._scene, self._appLogic, self._placement = scene, appLogic, placement
            self._layout = None
            self._logics = []
            self._widgets = {}
            self._collection = vtk.vtkCollection()
            self.container = qt.QWidget()
            self.container.setObjectName("LayoutContainer")
            qt.QHBoxLayout(self.container)
            slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
            self._show(CONVENTIONAL)

        def _show(self, layout):
            if layout not in LAYOUTS:
                raise ValueError("layout %r is not one the harness has (%s)" % (layout, sorted(LAYOUTS)))
            for name in LAYOUTS[layout]:
                if name not in self._widgets:
                    self._addView(name)
            for name, widget in self._widgets.items():
                widget.setVisible(name in LAYOUTS[layout])
            self._layout = layout

        def _addView(self, name):
            logic = slicer.vtkMRMLSliceLogic()
            logic.SetMRMLApplicationLogic(self._appLogic)
            logic.SetMRMLScene(self._scene)
            sliceNode = logic.AddSliceNode(name)
            sliceNode.SetOrientation(ORIENTATIONS[name])
            sliceNode.SetDefaultOrientation(ORIENTATIONS[name])
            sliceNode.SetLayoutColor(*COLORS[name])
            self._collection.AddItem(logic)
            self._logics.append(logic)
            widget = SliceWidget(name, logic, self._placement)
            self._widgets[name] = widget
            self.container.layout().addWidget(widget)
            self._appLogic.SetSliceLogics(self._collection)

        def sliceViewNames(self):
            return list(self._widgets)

        def sliceWidget(self, name):
            return self._widgets.get(name)

        def threeDWidget(self, index):
            return None

        def threeDViewCount(self):
            return 0

        def setLayout(self, layout):
            layout = int(layout)
            if layout == self._layout:
                return
            self._show(layout)
            self.layoutChanged.emit(layout)

        def layout(self):
            return self._layout

        def mrmlSliceLogics(self):
            return self._collection

        def release(self):
            self.container.close()
            for logic in self._logics:
                logic.SetMRMLScene(None)

    return LayoutManager
