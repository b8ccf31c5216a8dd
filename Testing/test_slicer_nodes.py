"""The nodes the prompt tools use, made by the module's own functions on a real MRML scene (slicer-core):
prompt markups, the scratch segmentation the brush paints into, the Segment Editor's parameter node, place mode,
and the MRML events the module listens to."""

import numpy as np
import vtk

import slicer

from mrml import MrmlScene, add_linear_transform, write_segment

from SlicerNNInteractiveLib.tools import PromptTools
from SlicerNNInteractiveLib.slicerscene import (
    SCRIBBLE_SEGMENT,
    definedWorldPoints,
    newPromptNode,
    scratchSegmentation,
    segmentEditorSingleton,
)

SHAPE = (12, 14, 16)


def events(node, event):
    seen = []
    node.AddObserver(event, lambda caller, ev: seen.append(ev))
    return seen


def test_prompt_points_are_not_saved_and_report_world_positions_when_defined():
    scene = MrmlScene(np.zeros(SHAPE, np.int16))
    node = newPromptNode(scene.mrml, "vtkMRMLMarkupsFiducialNode", "nnInteractive positive points", (0.2, 0.8, 0.35))
    assert node.IsA("vtkMRMLMarkupsFiducialNode") and not node.GetSaveWithScene()
    display = node.GetDisplayNode()
    assert np.allclose(display.GetSelectedColor(), (0.2, 0.8, 0.35)) and not display.GetPointLabelsVisibility()
    defined = events(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent)
    shift = np.eye(4)
    shift[:3, 3] = [10.0, 0.0, -5.0]
    node.SetAndObserveTransformNodeID(add_linear_transform(scene.mrml, shift).GetID())
    node.AddControlPointWorld(vtk.vtkVector3d(1.0, 2.0, 3.0))
    assert len(defined) == 1  # the event the module processes a click on
    [(n, point_id, world)] = definedWorldPoints(node)
    assert n == 0 and point_id == node.GetNthControlPointID(0) and np.allclose(world, (1.0, 2.0, 3.0))
    local = [0.0, 0.0, 0.0]
    node.GetNthControlPointPosition(0, local)
    assert np.allclose(local, (-9.0, 2.0, 8.0))  # stored in the node's own coordinates
    # A point without a defined position (not placed yet) is not a prompt.
    node.AddControlPoint(vtk.vtkVector3d(0.0, 0.0, 0.0))
    node.UnsetNthControlPointPosition(1)
    assert len(definedWorldPoints(node)) == 1


def test_place_mode_is_persistent_for_the_prompt_node():
    scene = MrmlScene(np.zeros(SHAPE, np.int16))
    app = scene.mrml._keep[0]
    interaction, selection = app.GetInteractionNode(), app.GetSelectionNode()
    lasso = newPromptNode(scene.mrml, "vtkMRMLMarkupsClosedCurveNode", "nnInteractive lasso", (1.0, 0.0, 0.0))
    changed = events(interaction, slicer.vtkMRMLInteractionNode.InteractionModeChangedEvent)
    ended = events(interaction, slicer.vtkMRMLInteractionNode.EndPlacementEvent)
    PromptTools(interaction, selection, defer=lambda fn: None).arm("lasso", lasso)
    assert interaction.GetCurrentInteractionMode() == interaction.Place and interaction.GetPlaceModePersistence()
    assert selection.GetActivePlaceNodeID() == lasso.GetID()
    assert selection.GetActivePlaceNodeClassName() == "vtkMRMLMarkupsClosedCurveNode"
    assert changed
    interaction.SwitchToViewTransformMode()  # what closing the curve (or Esc) does
    assert ended  # the event the module sends a lasso on


def test_scratch_segmentation_follows_the_volume_and_signals_each_stroke():
    scene = MrmlScene(np.zeros(SHAPE, np.int16), ijk_to_ras=np.diag([0.5, 0.7, 2.0, 1.0]))
    transform = add_linear_transform(scene.mrml, np.diag([1.0, -1.0, 1.0, 1.0]))
    scene.volume_node.SetAndObserveTransformNodeID(transform.GetID())
    scratch = scratchSegmentation(scene.mrml, scene.volume_node)
    assert not scratch.GetSaveWithScene() and scratch.GetHideFromEditors()
    assert scratch.GetTransformNodeID() == transform.GetID()
    assert scratch.GetNodeReference(scratch.GetReferenceImageGeometryReferenceRole()) is scene.volume_node
    assert scratchSegmentation(scene.mrml, scene.volume_node, scratch) is scratch  # re-used
    strokes = events(scratch.GetSegmentation(), slicer.vtkSegmentation.SourceRepresentationModified)
    painted = np.zeros(SHAPE, bool)
    painted[5, 3:9, 4] = True
    write_segment(scratch, SCRIBBLE_SEGMENT, painted, scene.volume_node)  # as the paint effect writes
    assert strokes  # the event the module sends a scribble on
    args = scene.takeScribble(scratch, SCRIBBLE_SEGMENT)
    assert args["interaction_bbox"] == [[5, 6], [3, 9], [4, 5]] and args["mask"].all()
    # Taken: the scratch segment is empty for the next stroke, and taking again from it signals nothing (each
    # signal makes the module take again: a signal here would loop forever).
    assert scene.scribblePrompt(scratch, SCRIBBLE_SEGMENT) is None
    del strokes[:]
    assert scene.takeScribble(scratch, SCRIBBLE_SEGMENT) is None and strokes == []
    # Another volume: the same node moves to its grid and transform.
    other = MrmlScene(np.zeros((4, 5, 6), np.int16), scene=scene.mrml)
    assert scratchSegmentation(scene.mrml, other.volume_node, scratch) is scratch
    assert scratch.GetNodeReference(scratch.GetReferenceImageGeometryReferenceRole()) is other.volume_node
    assert not scratch.GetTransformNodeID()
    # Removed from the scene (scene closed): a new one is made.
    scene.mrml.RemoveNode(scratch)
    assert scratchSegmentation(scene.mrml, other.volume_node, scratch) is not scratch


def test_segment_editor_parameter_node_is_the_shared_singleton():
    scene = MrmlScene(np.zeros(SHAPE, np.int16))
    node = segmentEditorSingleton(scene.mrml)
    assert node.GetSingletonTag() == "SegmentEditor" and node.GetScene() is scene.mrml
    assert segmentEditorSingleton(scene.mrml) is node


def test_a_segment_from_an_automatic_model_carries_its_name_colour_and_terminology():
    scene = MrmlScene(np.zeros(SHAPE, np.int16))
    liver = {"category": {"CodeValue": "123037004", "CodingSchemeDesignator": "SCT",
                          "CodeMeaning": "Anatomical Structure"},
             "type": {"CodeValue": "10200004", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Liver"}}
    key = scene.add_segment("liver", (0.8, 0.4, 0.3), liver)
    segment = scene.segmentation_node.GetSegmentation().GetSegment(key)
    assert segment.GetName() == "liver" and np.allclose(segment.GetColor(), (0.8, 0.4, 0.3))
    value = vtk.mutable("")
    assert segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), value)
    entry = str(value)
    parts = entry.split("~")  # Slicer's serialization: context~category~type~modifier~anatomic context~region~mod
    assert len(parts) == 7 and parts[1] == "SCT^123037004^Anatomical Structure" and parts[2] == "SCT^10200004^Liver"
    assert scene.selected_segment() == key and scene.spacing() == (1.0, 1.0, 1.0)


def test_prompt_nodes_are_found_again_by_role_and_a_lasso_is_taken_once():
    """A widget after a developer Reload finds the prompt nodes the one before made (no second set); the lasso
    curve is emptied as it is taken, and fewer than three points say what to do."""
    import pytest

    from SlicerNNInteractiveLib.geometry import GeometryError
    from SlicerNNInteractiveLib.slicerscene import PromptNodes

    scene = MrmlScene(np.zeros(SHAPE, np.int16))
    colors = {True: (0.2, 0.8, 0.35), False: (0.9, 0.25, 0.25)}
    adopted = []
    first = PromptNodes(scene.mrml, colors, lambda fn: fn(), adopted.append, adopted.append)
    positive, lasso = first.points(True), first.lasso(False)
    assert first.isPositive(positive) and not first.isPositive(first.points(False))
    assert lasso.GetDisplayNode().GetColor() == colors[False]
    second = PromptNodes(scene.mrml, colors, lambda fn: fn(), adopted.append, adopted.append)
    assert second.points(True) is positive and second.lasso(True) is lasso  # found by role, not made again
    assert len(adopted) == 3 + 2  # each widget takes each node it uses into use (observes it) once
    for x in (1, 2):
        lasso.AddControlPointWorld(vtk.vtkVector3d(x, 1.0, 1.0))
    with pytest.raises(GeometryError, match="three points"):
        scene.takeLasso(lasso)
    assert lasso.GetNumberOfControlPoints() == 0 and scene.takeLasso(lasso) is None
