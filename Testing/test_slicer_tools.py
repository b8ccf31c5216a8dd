"""Which tool is armed and what disarms it, and which control points are new, on Slicer's own interaction,
selection and markups nodes (slicer-core). The Segment Editor's reactions are played as Slicer does them
(qMRMLSegmentEditorWidget: choosing an effect switches to view-transform mode; an effect deselects itself when
the mode leaves view-transform), and the lasso's close gesture as vtkSlicerMarkupsWidget does it (leave place
mode, then modify the curve)."""

import numpy as np
import pytest
import vtk

from mrml import MrmlScene

from SlicerNNInteractiveLib.slicerscene import newPromptNode
from SlicerNNInteractiveLib.tools import PromptTools, takeNewPoints

SHAPE = (12, 14, 16)


class Nodes(object):
    def __init__(self):
        self.scene = MrmlScene(np.zeros(SHAPE, np.int16))
        app = self.scene.mrml._keep[0]
        self.interaction, self.selection = app.GetInteractionNode(), app.GetSelectionNode()
        new = lambda cls, name: newPromptNode(self.scene.mrml, cls, name, (1.0, 1.0, 0.0))
        self.positive = new("vtkMRMLMarkupsFiducialNode", "positive")
        self.negative = new("vtkMRMLMarkupsFiducialNode", "negative")
        self.lasso = new("vtkMRMLMarkupsClosedCurveNode", "lasso")
        self.users = new("vtkMRMLMarkupsFiducialNode", "the user's own points")
        self.deferred, self.disarmed, self.closed = [], [], []
        self.tools = PromptTools(self.interaction, self.selection, self.deferred.append,
                                 onDisarmed=lambda tool, reason: self.disarmed.append((tool, reason)),
                                 onLassoClosed=lambda: self.closed.append(True))
        self.tools.watchLasso(self.lasso)

    def run_deferred(self):
        while self.deferred:
            self.deferred.pop(0)()

    def placing(self, node):
        return (self.interaction.GetCurrentInteractionMode() == self.interaction.Place
                and self.selection.GetActivePlaceNodeID() == node.GetID())


def click(node, x):
    node.AddControlPointWorld(vtk.vtkVector3d(float(x), 0.0, 0.0))


def test_negative_points_are_new_although_their_ids_repeat_the_positive_ones():
    n = Nodes()
    for x in range(3):
        click(n.positive, x)
        assert len(takeNewPoints(n.positive)) == 1
    click(n.negative, 10)
    click(n.negative, 11)
    assert n.negative.GetNthControlPointID(0) == n.positive.GetNthControlPointID(0)  # per-node counters
    assert [w[0] for _, _, w in takeNewPoints(n.negative)] == [10.0, 11.0]
    assert takeNewPoints(n.negative) == [] and takeNewPoints(n.positive) == []
    assert n.positive.GetNthControlPointLocked(0)  # a sent prompt is not dragged away


def test_a_point_after_a_rejected_one_is_new_although_it_reuses_the_id():
    n = Nodes()
    click(n.positive, 1)
    [(index, point_id, _)] = takeNewPoints(n.positive)
    n.positive.RemoveNthControlPoint(index)  # what the module does with a click outside the volume
    click(n.positive, 2)
    assert n.positive.GetNthControlPointID(0) == point_id  # Slicer hands the ID out again
    assert [w[0] for _, _, w in takeNewPoints(n.positive)] == [2.0]
    n.positive.RemoveAllControlPoints()
    click(n.positive, 3)
    assert len(takeNewPoints(n.positive)) == 1


def test_arming_switches_place_mode_between_our_nodes_without_reports():
    n = Nodes()
    n.tools.arm("point", n.positive)
    assert n.placing(n.positive) and n.interaction.GetPlaceModePersistence()
    n.tools.arm("point", n.negative)  # polarity switched
    n.tools.arm("lasso", n.lasso)
    assert n.placing(n.lasso)
    n.tools.arm("box")
    assert n.interaction.GetCurrentInteractionMode() == n.interaction.ViewTransform
    n.run_deferred()
    assert n.tools.active == "box" and n.disarmed == [] and n.closed == []
    n.tools.disarm()
    assert n.tools.active is None and n.disarmed == [("box", None)]
    with pytest.raises(ValueError):
        n.tools.arm("point")


@pytest.mark.parametrize("tool", ["point", "box", "scribble", "lasso"])
def test_choosing_a_segment_editor_effect_disarms_any_tool(tool):
    n = Nodes()
    n.tools.arm(tool, n.lasso if tool == "lasso" else n.positive)
    if tool == "lasso":
        click(n.lasso, 1)
        click(n.lasso, 2)
        click(n.lasso, 3)
    # qMRMLSegmentEditorWidget::setActiveEffect: the editor node gets the effect, the views view-transform mode.
    n.interaction.SwitchToViewTransformMode()
    n.tools.effectSelected("Paint")
    n.run_deferred()
    assert n.tools.active is None and len(n.disarmed) == 1 and n.disarmed[0][0] == tool
    assert n.closed == []  # a half-drawn lasso is not sent
    assert n.interaction.GetCurrentInteractionMode() == n.interaction.ViewTransform  # the effect keeps its mode


def test_the_lasso_is_sent_on_its_close_gesture_only():
    n = Nodes()
    n.tools.arm("lasso", n.lasso)
    for x in (1, 2, 3):
        click(n.lasso, x)
    # Double-click / right-click: vtkSlicerMarkupsWidget leaves place mode, then modifies the curve.
    n.interaction.SwitchToViewTransformMode()
    n.lasso.Modified()
    n.run_deferred()
    assert n.closed == [True] and n.tools.active == "lasso" and n.disarmed == []
    n.tools.rearm()  # what the module does after sending it: the tool stays armed
    assert n.placing(n.lasso)
    # The mouse-mode toolbar (or Esc) leaves place mode and touches no curve: nothing is sent, the tool disarms.
    click(n.lasso, 4)
    n.interaction.SwitchToViewTransformMode()
    n.run_deferred()
    assert n.closed == [True] and n.tools.active is None
    assert n.disarmed and "not sent" in n.disarmed[0][1]


def test_placing_the_users_own_markups_disarms_our_tools():
    n = Nodes()
    n.tools.arm("point", n.positive)
    n.selection.SetActivePlaceNodeID(n.users.GetID())  # the toolbar's place-node selector, still in place mode
    assert n.tools.active is None and n.disarmed[0][0] == "point"
    assert n.interaction.GetCurrentInteractionMode() == n.interaction.Place  # the user's placement goes on
    for tool in ("box", "scribble"):
        n.interaction.SwitchToViewTransformMode()
        n.tools.arm(tool)
        n.interaction.SwitchToPersistentPlaceMode()  # the toolbar's place button
        assert n.tools.active is None and n.disarmed[-1][0] == tool


def test_a_markups_node_we_add_is_not_the_user_choosing_it():
    n = Nodes()
    n.tools.arm("point", n.positive)
    # Slicer's markups logic makes a newly added markups node the active place node.
    new = n.tools.ourChange(lambda: newPromptNode(n.scene.mrml, "vtkMRMLMarkupsFiducialNode", "x", (1, 0, 0)))
    assert n.selection.GetActivePlaceNodeID() == new.GetID()
    assert n.tools.active == "point" and n.disarmed == []
    n.scene.mrml.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "the user's")  # added by someone else: disarms
    assert n.tools.active is None


def test_leaving_place_mode_disarms_the_point_tool_and_close_removes_observers():
    n = Nodes()
    n.tools.arm("point", n.positive)
    n.interaction.SwitchToViewTransformMode()
    assert n.tools.active is None and n.disarmed[0][0] == "point"
    n.tools.close()
    n.tools.arm("point", n.positive)
    n.interaction.SwitchToViewTransformMode()
    assert n.tools.active == "point"  # no longer observed


@pytest.mark.parametrize("tool", ["box", "scribble"])
def test_window_level_mode_disarms_the_box_and_the_scribble(tool):
    """The toolbar's window/level mode (AdjustWindowLevel) is not view-transform mode: Paint deselects itself there,
    and the box would keep eating the left drags window/level needs."""
    n = Nodes()
    n.tools.arm(tool)
    n.interaction.SetCurrentInteractionMode(n.interaction.AdjustWindowLevel)
    assert n.tools.active is None and n.disarmed == [(tool, "Slicer's window/level mode was chosen")]
    assert n.interaction.GetCurrentInteractionMode() == n.interaction.AdjustWindowLevel  # the user's choice stays
