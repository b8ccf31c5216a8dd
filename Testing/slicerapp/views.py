"""Stand-ins for Slicer's layout manager and slice views, on real MRML slice nodes and real Qt widgets.

``LayoutManager`` plays qSlicerLayoutManager for the three slice views of the conventional layout (Red axial,
Yellow sagittal, Green coronal). Each ``SliceWidget`` (qMRMLSliceWidget) has a real ``vtkMRMLSliceLogic`` that
created its real ``vtkMRMLSliceNode`` and ``vtkMRMLSliceCompositeNode`` in the scene (as Slicer's layout logic
does), and a ``SliceView`` (qMRMLSliceView) whose ``VTKWidget()`` is a real QWidget of fixed size: it can get
event filters and receives the synthetic mouse and key events a test sends. The slice node's dimensions follow
that widget's size through ``vtkMRMLSliceLogic.ResizeSliceNode`` as in Slicer, so ``GetXYToRAS()`` maps widget
pixels (y up, device pixels) to RAS as in the application. ``renderWindow()`` is a real offscreen
vtkRenderWindow with one renderer; it is never rendered; ``scheduleRender()`` only counts calls.

Not reproduced: rendering, displayable managers (no markups widgets: placing a control point by clicking does
nothing here; tests place points as ``SlicerApp.place_point`` does), VTK interactor styles (a mouse event that
no event filter consumes does not pan, zoom or change window/level), slice controllers, 3D views, layout
switching (``setLayout`` only records the number and emits ``layoutChanged(int)``), lightbox.
"""

import vtk
from PySide6 import QtCore

import slicer

VIEWS = (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal"))
VIEW_SIZE = (400, 300)  # pixels of each slice view's VTK widget


def build(qt):
    class SliceView(qt.QWidget):
        """qMRMLSliceView: ``VTKWidget()``, ``renderWindow()``, ``scheduleRender()``, ``mrmlSliceNode()``."""

        def __init__(self, sliceNode, parent=None):
            qt.QWidget.__init__(self, parent)
            self._sliceNode = sliceNode
            layout = qt.QVBoxLayout(self)
            layout.setContentsMargins(0, 0, 0, 0)
            self._vtkWidget = qt.QWidget()
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
            self.renderRequests = 0

        def VTKWidget(self):
            return self._vtkWidget

        def renderWindow(self):
            return self._renderWindow

        def scheduleRender(self):
            self.renderRequests += 1

        def forceRender(self):
            self.renderRequests += 1

        def mrmlSliceNode(self):
            return self._sliceNode

    class SliceWidget(qt.QWidget):
        """qMRMLSliceWidget: ``mrmlSliceNode()``, ``mrmlSliceCompositeNode()``, ``sliceLogic()``, ``sliceView()``."""

        def __init__(self, name, logic, parent=None):
            qt.QWidget.__init__(self, parent)
            self.setObjectName("qMRMLSliceWidget" + name)
            self._name = name
            self._logic = logic
            layout = qt.QVBoxLayout(self)
            layout.setContentsMargins(0, 0, 0, 0)
            self._view = SliceView(logic.GetSliceNode(), self)
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
        """qSlicerLayoutManager for the conventional layout's three slice views."""

        layoutChanged = QtCore.Signal(int)

        def __init__(self, scene, appLogic, parent=None):
            qt.QObject.__init__(self, parent)
            self._layout = 2  # vtkMRMLLayoutNode::SlicerLayoutConventionalView
            self._logics = []
            self._widgets = {}
            self.container = qt.QWidget()
            self.container.setObjectName("LayoutContainer")
            layout = qt.QHBoxLayout(self.container)
            slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
            collection = vtk.vtkCollection()
            for name, orientation in VIEWS:
                logic = slicer.vtkMRMLSliceLogic()
                logic.SetMRMLApplicationLogic(appLogic)
                logic.SetMRMLScene(scene)
                sliceNode = logic.AddSliceNode(name)
                sliceNode.SetOrientation(orientation)
                sliceNode.SetDefaultOrientation(orientation)
                sliceNode.SetLayoutColor(*{"Red": (0.95, 0.33, 0.33), "Yellow": (0.93, 0.84, 0.29),
                                           "Green": (0.43, 0.69, 0.38)}[name])
                collection.AddItem(logic)
                self._logics.append(logic)
                widget = SliceWidget(name, logic)
                self._widgets[name] = widget
                layout.addWidget(widget)
            appLogic.SetSliceLogics(collection)
            self._collection = collection

        def sliceViewNames(self):
            return [name for name, _ in VIEWS]

        def sliceWidget(self, name):
            return self._widgets.get(name)

        def threeDWidget(self, index):
            return None

        def threeDViewCount(self):
            return 0

        def setLayout(self, layout):
            self._layout = int(layout)
            self.layoutChanged.emit(self._layout)

        def layout(self):
            return self._layout

        def mrmlSliceLogics(self):
            return self._collection

        def release(self):
            self.container.close()
            for logic in self._logics:
                logic.SetMRMLScene(None)

    return LayoutManager
