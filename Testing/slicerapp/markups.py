"""Placing markups control points as Slicer's markups displayable manager and widget do it (v5.8.0), on the real
markups nodes and the real interaction and selection nodes.

While the views are in place mode, the markups widget of the active place node is in its Define state
(vtkMRMLMarkupsDisplayableManager). Its events (vtkSlicerMarkupsWidget's event translations):

* mouse move: the preview point follows the mouse (ProcessMouseMove -> UpdatePreviewPoint ->
  vtkMRMLMarkupsDisplayNode::UpdateActiveControlPointWorld with PositionPreview: the first move adds an auto-created
  control point, PointAddedEvent; later moves modify it);
* left button release: PlacePoint: the scene's undo state is saved, the preview point becomes a defined point
  (PointPositionDefinedEvent), and unless place mode is persistent (or the node needs more points) the interaction
  node goes back to view-transform mode;
* double click, right button release: WidgetEventStopPlace: SwitchToViewTransformMode, then the node's Modified();
* leaving a view, and any change of the interaction mode (the displayable manager calls every widget's Leave on
  InteractionModeChangedEvent): the auto-created preview point is removed (RemovePreviewPoint).

Views send their interactor events here (views.py); tests may also call ``preview``, ``place`` and ``stop`` with
world positions directly. Not reproduced: dragging, snapping and deleting placed points, 3D views, point
placement by the markups toolbar's "place" button other than through the interaction node.
"""

import slicer

CLICK_PIXELS = 4  # a press and release further apart than this are a drag, not a click (no point is placed)


class Placement(object):
    def __init__(self, scene, appLogic):
        self.scene = scene
        self.interaction = appLogic.GetInteractionNode()
        self.selection = appLogic.GetSelectionNode()
        self._preview = {}  # node ID -> index of its preview point
        self._press = None
        self._tag = self.interaction.AddObserver(self.interaction.InteractionModeChangedEvent,
                                                 lambda caller, event: self.leave())

    def close(self):
        self.interaction.RemoveObserver(self._tag)

    def activeNode(self):
        """The node the views place into: the active place node, while the views are in place mode."""
        if self.interaction.GetCurrentInteractionMode() != self.interaction.Place:
            return None
        node = self.scene.GetNodeByID(self.selection.GetActivePlaceNodeID() or "")
        return node if isinstance(node, slicer.vtkMRMLMarkupsNode) else None

    # ------------------------------------------------------------------ from the views' interactors
    def viewEvent(self, eventName, sliceNode, ras, xy):
        if eventName == "LeaveEvent":
            self.leave()
            return
        node = self.activeNode()
        if node is None:
            return
        if eventName == "MouseMoveEvent":
            self.preview(node, ras, sliceNode)
        elif eventName == "LeftButtonPressEvent":
            self._press = xy
        elif eventName == "LeftButtonReleaseEvent":
            press, self._press = self._press, None
            if press is not None and max(abs(press[0] - xy[0]), abs(press[1] - xy[1])) <= CLICK_PIXELS:
                self.place(node, ras, sliceNode)
        elif eventName in ("LeftButtonDoubleClickEvent", "RightButtonReleaseEvent"):
            self.stop(node)

    # ------------------------------------------------------------------ the widget's actions
    def _update(self, node, ras, sliceNode, status):
        """vtkSlicerMarkupsWidget::UpdatePreviewPoint: the display node updates (or adds) the preview point."""
        index = self._preview.get(node.GetID(), -1)
        if not 0 <= index < node.GetNumberOfControlPoints() or \
                node.GetNthControlPointPositionStatus(index) != node.PositionPreview:
            index = -1
        data = slicer.vtkMRMLInteractionEventData()
        data.SetWorldPosition([float(c) for c in ras])
        index = node.GetDisplayNode().UpdateActiveControlPointWorld(
            index, data, [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
            sliceNode.GetID() if sliceNode is not None else None, None, status)
        return index

    def preview(self, node, ras, sliceNode=None):
        self._preview[node.GetID()] = self._update(node, ras, sliceNode, node.PositionPreview)

    def place(self, node, ras, sliceNode=None):
        """PlacePoint. Returns the placed point's index."""
        self.scene.SaveStateForUndo()
        index = self._update(node, ras, sliceNode, node.PositionDefined)
        self._preview.pop(node.GetID(), None)
        required = node.GetRequiredNumberOfControlPoints()
        reached = required > 0 and node.GetNumberOfControlPoints() >= required and \
            node.GetNumberOfUndefinedControlPoints() == 0
        locked = node.GetFixedNumberOfControlPoints() and node.GetNumberOfUndefinedControlPoints() == 0
        persistent = self.interaction.GetPlaceModePersistence()
        if (reached and not persistent) or (required <= 0 and not persistent) or locked:
            self.interaction.SetCurrentInteractionMode(self.interaction.ViewTransform)
        return index

    def stop(self, node):
        """WidgetEventStopPlace (a double click or a right click while placing)."""
        self.interaction.SwitchToViewTransformMode()
        node.Modified()

    def leave(self):
        """Every widget's Leave: RemovePreviewPoint (an auto-created preview point is removed)."""
        previews, self._preview = self._preview, {}
        for nodeID, index in previews.items():
            node = self.scene.GetNodeByID(nodeID)
            if node is None or not 0 <= index < node.GetNumberOfControlPoints():
                continue
            if node.GetNthControlPointPositionStatus(index) == node.PositionPreview:
                if node.GetNthControlPointAutoCreated(index):
                    node.RemoveNthControlPoint(index)
                else:
                    node.UnsetNthControlPointPosition(index)
