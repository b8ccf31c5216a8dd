"""Which prompt tool is armed and what disarms it; which markups control points are new.

Works on Slicer's interaction, selection and markups nodes (tested on the slicer-core wheel) and imports
neither Slicer nor Qt at file scope: the widget passes the nodes in, tells it when a Segment Editor effect is
chosen, and gives it a ``defer(fn)`` that runs ``fn`` once the current event has been handled (a zero-delay Qt
timer).

The rule: whichever the user picked last wins, one of our tools, a Segment Editor effect or another mouse mode
from Slicer's toolbar, and the other one is disarmed visibly (``onDisarmed(tool, reason)``). Nothing is sent as a
side effect of a mode change. A lasso is sent only when the user closes it with a double-click or a right-click:
Slicer's markups widget then leaves place mode *and then* modifies the curve node
(vtkSlicerMarkupsWidget::ProcessInteractionEvent, WidgetEventStopPlace, in Slicer 5.6 to 5.10), whereas a
mode change made anywhere else leaves place mode and touches no curve.
"""

TOOLS = ("point", "box", "scribble", "lasso")
PLACE_TOOLS = ("point", "lasso")  # the tools that place markups control points


class PromptTools(object):
    """``active`` is the armed tool or None. ``arm(tool, placeNode)`` arms one (``placeNode``: the markups node a
    point or lasso tool places into); ``disarm()`` disarms; ``effectSelected(name)`` reports the Segment Editor's
    active effect; ``watchLasso(node)`` observes the lasso curve. Call ``close()`` to remove the observers."""

    def __init__(self, interactionNode, selectionNode, defer, onDisarmed=None, onLassoClosed=None):
        self.interactionNode = interactionNode
        self.selectionNode = selectionNode
        self.defer = defer
        self.onDisarmed = onDisarmed or (lambda tool, reason: None)
        self.onLassoClosed = onLassoClosed or (lambda: None)
        self.active = None
        self.placeNode = None
        self._switching = 0  # > 0 while we change the interaction mode ourselves
        self._lassoEnd = None  # None, "pending" (place mode ended) or "closed" (then the curve was modified)
        self._observations = []
        self._lassoObservation = None
        self._observe(interactionNode, interactionNode.InteractionModeChangedEvent, self._onModeChanged)
        self._observe(interactionNode, interactionNode.EndPlacementEvent, self._onEndPlacement)
        self._observe(selectionNode, selectionNode.ActivePlaceNodeIDChangedEvent, self._onPlaceNodeChanged)

    def _observe(self, node, event, callback):
        self._observations.append((node, node.AddObserver(event, lambda caller, ev: callback())))

    def close(self):
        for node, tag in self._observations:
            node.RemoveObserver(tag)
        self._observations = []
        self.watchLasso(None)

    # ------------------------------------------------------------------ the user's choices

    def arm(self, tool, placeNode=None):
        """Arm ``tool`` (after the one armed before, which is replaced without a disarm report)."""
        if tool not in TOOLS:
            raise ValueError("unknown tool %r; use one of %s" % (tool, ", ".join(TOOLS)))
        if tool in PLACE_TOOLS and placeNode is None:
            raise ValueError("the %s tool needs the markups node it places into" % tool)
        self.active = tool
        self._lassoEnd = None
        if tool in PLACE_TOOLS:
            self.placeNode = placeNode
            self.rearm()
        else:
            self.placeNode = None
            if self._inPlaceMode():
                self.ourChange(self.interactionNode.SwitchToViewTransformMode)

    def rearm(self):
        """Put the views (back) in persistent place mode for the armed point or lasso tool."""
        node = self.placeNode
        if self.active not in PLACE_TOOLS or node is None:
            return

        def place():
            self.selectionNode.SetReferenceActivePlaceNodeClassName(node.GetClassName())
            self.selectionNode.SetActivePlaceNodeID(node.GetID())
            self.interactionNode.SwitchToPersistentPlaceMode()

        self.ourChange(place)

    def disarm(self, reason=None):
        """Disarm the armed tool; leave place mode if it is ours. ``reason`` (None: the user disarmed it) goes to
        ``onDisarmed``."""
        tool = self.active
        if tool is None:
            return
        ours = self._ourPlacement()
        self.active, self.placeNode, self._lassoEnd = None, None, None
        if ours:
            self.ourChange(self.interactionNode.SwitchToViewTransformMode)
        self.onDisarmed(tool, reason)

    def effectSelected(self, effectName):
        """The Segment Editor's active effect is now ``effectName`` (empty: none)."""
        if effectName and self.active is not None:
            self.disarm("the Segment Editor's %s effect was chosen" % effectName)

    def watchLasso(self, node):
        """Observe ``node`` (the lasso curve), or nothing when None."""
        if self._lassoObservation is not None:
            old, tag = self._lassoObservation
            old.RemoveObserver(tag)
            self._lassoObservation = None
        if node is not None:
            self._lassoObservation = (node, node.AddObserver("ModifiedEvent", lambda c, e: self._onLassoModified()))

    # ------------------------------------------------------------------ what Slicer reports

    def ourChange(self, change):
        """Run ``change()`` and return its result; the mode and place-node changes it causes are ours, not the
        user's, and disarm nothing. Adding a markups node is one: Slicer's markups logic makes a new markups node
        the active place node."""
        self._switching += 1
        try:
            return change()
        finally:
            self._switching -= 1

    def _inPlaceMode(self):
        return self.interactionNode.GetCurrentInteractionMode() == self.interactionNode.Place

    def _ourPlacement(self):
        node = self.placeNode
        return (node is not None and self._inPlaceMode()
                and self.selectionNode.GetActivePlaceNodeID() == node.GetID())

    def _onModeChanged(self):
        if self._switching or self.active is None:
            return
        if self.active in PLACE_TOOLS:
            if self._ourPlacement():
                return
            if self.active == "lasso" and not self._inPlaceMode():
                return  # a close gesture, or not: decided when the placement has ended (_onEndPlacement)
            self.disarm("another mouse mode was chosen")
        elif self.interactionNode.GetCurrentInteractionMode() != self.interactionNode.ViewTransform:
            # The box and the scribble work in view-transform mode only: Paint deselects itself in any other
            # (qSlicerSegmentEditorAbstractEffect::interactionNodeModified), and the box would keep taking the left
            # drags that window/level needs.
            self.disarm("Slicer's %s mode was chosen" % modeName(self.interactionNode))

    def _onPlaceNodeChanged(self):
        if not self._switching and self.active in PLACE_TOOLS and self._inPlaceMode() and not self._ourPlacement():
            self.disarm("another markups node is being placed")

    def _onEndPlacement(self):
        if self._switching or self.active != "lasso":
            return
        self._lassoEnd = "pending"
        self.defer(self._decideLasso)

    def _onLassoModified(self):
        if self._lassoEnd == "pending":
            self._lassoEnd = "closed"

    def _decideLasso(self):
        state, self._lassoEnd = self._lassoEnd, None
        if self.active != "lasso" or state is None:
            return
        if state == "closed":
            self.onLassoClosed()
        else:
            self.disarm("another mouse mode was chosen before the lasso was closed; it was not sent")


def shadowedBy(keys, shortcuts):
    """The enabled ``shortcuts`` (QShortcuts: ``key`` a QKeySequence property, ``enabled``) on one of ``keys``
    (key sequences as text, "Ctrl+Z")."""
    keys = set(keys)
    return [s for s in shortcuts if s.enabled and s.key.toString() in keys]


def modeName(interactionNode):
    """The interaction mode in the words of Slicer's mouse-mode toolbar."""
    mode = interactionNode.GetCurrentInteractionMode()
    names = {interactionNode.Place: "place", interactionNode.ViewTransform: "view-transform",
             getattr(interactionNode, "AdjustWindowLevel", -1): "window/level"}
    return names.get(mode, "mouse (%d)" % mode)


def removePoint(node, pointId):
    """Remove the control point ``pointId`` of ``node`` if both are still there (its prompt was never sent)."""
    if node.GetScene() is None:
        return
    index = node.GetControlPointIndexByID(pointId)
    if index >= 0:
        node.RemoveNthControlPoint(index)


def takeNewPoints(node):
    """``[(index, id, (x, y, z) world)]`` of the node's placed control points not taken before, which are locked
    as they are taken (a sent prompt cannot be dragged away from what it did).

    The lock is the mark, not the control-point ID: Slicer's IDs are per-node counters ("1", "2", ...) and
    ``RemoveNthControlPoint`` hands a removed point's ID out again (vtkMRMLMarkupsNode::GenerateUniqueControlPointID),
    so IDs repeat across the positive and negative nodes and after a rejected click."""
    from .slicerscene import definedWorldPoints

    new = [(n, pointId, world) for n, pointId, world in definedWorldPoints(node)
           if not node.GetNthControlPointLocked(n)]
    for n, _, _ in new:
        node.SetNthControlPointLocked(n, True)
    return new
