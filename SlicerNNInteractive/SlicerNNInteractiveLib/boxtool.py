"""The box tool: a Qt event filter on Slicer's slice views (drag, or two clicks) drawing a live rectangle.

Qt and VTK code for the module's widget; imported when the box tool is first armed.
"""

import qt
import vtk

import slicer


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
            renderer.AddViewProp(actor)
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
            renderer.RemoveViewProp(actor)
            sliceWidget.sliceView().scheduleRender()
            self.preview = None
