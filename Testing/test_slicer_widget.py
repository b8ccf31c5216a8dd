"""The module's widget, run for real: its own code under a real Qt binding (PySide6, offscreen) behaving like
PythonQt, on Slicer's MRML from slicer-core, with stand-ins only for Slicer's application widgets
(Testing/slicerapp), against our server with the tiny trained blob model.

Every button and shortcut, every tool armed and disarmed (by the user, by a Segment Editor effect, by the
toolbar's mouse modes), points placed on real markups nodes (positive, negative, rejected), polarity, next /
reset / undo / redo, configuration, consent, test connection, local server, the timing experiment, enter / exit /
cleanup / reload, and the module's own self-test.
"""

import os
import sys

import numpy as np
import pytest
import slicer
import vtk

from conftest import free_port, our_server
from phantoms import blob_mask, dice, interior_voxel, make_phantom
from test_scene_trained import World

from slicerapp import SlicerApp

SEED = 101  # a phantom the model never saw in training
VOLUME_WORLD = World()


@pytest.fixture(scope="module")
def server(blob_model, tmp_path_factory):
    with our_server(blob_model, tmp_path_factory.mktemp("widget"), "--max-sessions", "6") as (url, _):
        yield url


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(seed=SEED)


def world(index_kji):
    k, j, i = index_kji
    return list((VOLUME_WORLD.ijk_to_ras @ np.array([i, j, k, 1.0]))[:3])


class Module(object):
    """The app, the widget, a rotated anisotropic volume shown in the slice views, helpers to read the result."""

    def __init__(self, app, phantom, url):
        self.app, self.phantom = app, phantom
        self.widget = app.load_module()
        self.widget.ui.serverUrlLineEdit.text = url
        self.widget.config.onServerSettingsChanged()
        self.volume = slicer.util.addVolumeFromArray(phantom.image.astype(np.int16), name="phantom")
        self.volume.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(VOLUME_WORLD.ijk_to_ras))
        slicer.util.setSliceViewerLayers(background=self.volume, fit=True)
        app.enter()

    @property
    def controller(self):
        return self.widget.controller

    def idle(self, seconds=60):
        self.app.pump(seconds, until=lambda: self.controller is None or not self.controller.busy)
        self.app.pump(0.05)

    def segment(self):
        scene = self.widget.getScene()
        key = scene.selected_segment()
        return scene.read_segment(key).astype(bool) if key is not None else np.zeros(self.phantom.image.shape, bool)

    def blob(self, k):
        return blob_mask(self.phantom.labels, k)

    def kinds(self):
        return [(t["kind"], t["positive"]) for t in self.controller.timings]

    def errors(self):
        return [s.text for s in self.app.shown("error")]

    def show_slice(self, view, index_kji):
        """Turn a slice view to the volume plane through ``index_kji`` (Slicer's RotateToVolumePlane)."""
        node = self.app.layout_manager.sliceWidget(view).mrmlSliceNode()
        node.RotateToVolumePlane(self.volume)
        node.JumpSliceByCentering(*world(index_kji))
        return node

    def stroke_across_blob(self, k):
        """Drag the mouse across blob ``k`` in the Red view, along a row through an interior voxel; that voxel."""
        center = interior_voxel(self.phantom.labels, k)
        self.show_slice("Red", center)
        xs = np.nonzero(self.blob(k)[center[0], center[1]])[0]
        self.app.drag("Red", self.app.view_pixel("Red", world((center[0], center[1], xs.min() + 1))),
                      self.app.view_pixel("Red", world((center[0], center[1], xs.max() - 1))), steps=8)
        self.idle()
        return center


@pytest.fixture
def module(server, phantom):
    with SlicerApp() as app:
        m = Module(app, phantom, server)
        yield m
        app.exit()
        app.cleanup()


def test_points_positive_negative_and_rejected_all_reach_the_server(module):
    m, w = module, module.widget
    m.app.press("P")
    assert w.ui.pointButton.checked and w.tools.active == "point"
    inside = interior_voxel(m.phantom.labels, 1)
    for _ in range(3):
        m.app.place_point(w.prompts.points(True), world(inside))
        m.idle()
    assert dice(m.segment(), m.blob(1)) > 0.5
    m.app.press("T")
    assert not w.isPositive() and w.ui.negativeButton.checked and not w.ui.positiveButton.checked
    outside = interior_voxel(m.phantom.labels, 2)
    for _ in range(2):  # their control-point IDs are the positive node's "1" and "2" again
        m.app.place_point(w.prompts.points(False), world(outside))
        m.idle()
    assert m.kinds() == [("point", True)] * 3 + [("point", False)] * 2
    # A click outside the volume is refused with a message and removed; the next click is sent.
    before = w.prompts.points(False).GetNumberOfControlPoints()
    m.app.place_point(w.prompts.points(False), [500.0, 500.0, 500.0])
    m.app.pump(0.1)
    assert m.errors() and "outside" in m.errors()[-1].lower()
    assert w.prompts.points(False).GetNumberOfControlPoints() == before
    m.app.place_point(w.prompts.points(False), world(outside))
    m.idle()
    assert m.kinds()[-1] == ("point", False) and len(m.kinds()) == 6


def test_run_automatically_off_collects_prompts_and_n_runs_them_once(module):
    """napari's Manual control: with "Run automatically" off, prompts are only added on the server (the segment does
    not change, the points stay: they were sent); Run (its button, or N) predicts once with all of them."""
    m, w = module, module.widget
    assert not w.ui.predictButton.enabled  # on by default: nothing to run by hand
    m.app.click(w.ui.autoRunCheckBox)
    assert w.ui.predictButton.enabled and w.controller.auto_run is False
    m.app.press("P")
    for k in (1, 1):
        m.app.place_point(w.prompts.points(True), world(interior_voxel(m.phantom.labels, k)))
        m.idle()
    assert not m.segment().any() and "added" in w.ui.statusLabel.text
    assert len(defined_points(w.prompts.points(True))) == 2
    m.app.press("N")
    m.idle()
    assert dice(m.segment(), m.blob(1)) > 0.5 and m.errors() == []
    assert [t["kind"] for t in w.controller.timings] == ["point", "point", "predict"]
    m.app.click(w.ui.autoRunCheckBox)  # on again: each prompt predicts at once
    m.app.place_point(w.prompts.points(True), world(interior_voxel(m.phantom.labels, 3)))
    m.idle()
    assert m.segment()[interior_voxel(m.phantom.labels, 3)] and not w.ui.predictButton.enabled


def test_polarity_buttons_and_key(module):
    m, w = module, module.widget
    m.app.click(w.ui.negativeButton)
    assert not w.isPositive() and w.ui.negativeButton.checked and not w.ui.positiveButton.checked
    m.app.click(w.ui.negativeButton)  # clicking the checked one again keeps it
    assert not w.isPositive()
    m.app.click(w.ui.positiveButton)
    assert w.isPositive() and w.ui.positiveButton.checked
    m.app.press("P")
    m.app.press("T")  # creates the negative points node: Slicer's markups logic makes it the active place node
    assert w.ui.statusLabel.text == "Point tool armed (negative prompts)."  # the status follows the polarity
    sel = slicer.app.applicationLogic().GetSelectionNode()
    assert w.tools.active == "point" and w.ui.pointButton.checked  # still armed: that change was ours
    assert sel.GetActivePlaceNodeID() == w.prompts.points(False).GetID()  # the point tool follows the polarity
    m.app.press("T")
    assert w.isPositive() and sel.GetActivePlaceNodeID() == w.prompts.points(True).GetID()
    for button in (w.ui.positiveButton, w.ui.nextSegmentButton, w.ui.pointButton):
        assert button.shortcut.isEmpty()  # no Alt+letter mnemonic (Alt+E is the Edit menu)


def test_the_segment_editors_own_keys_work_while_the_module_is_shown(module):
    """As in Slicer's Segment Editor module (enter(): installKeyboardShortcuts): 1 selects its first effect (Paint),
    Escape deselects it; its Ctrl+Z gives way to ours (which undoes the editor's steps when there is no prompt)."""
    m, w = module, module.widget
    m.app.press("B")
    assert m.app.press("1")
    assert w.editor.activeEffect() is not None and w.editor.activeEffect().name() == "Paint"
    assert w.tools.active is None and not w.ui.boxButton.checked  # choosing an effect disarms our tool
    m.app.press("Escape")
    assert w.editor.activeEffect() is None
    window = slicer.util.mainWindow()
    undo = [s for s in window.findChildren(m.app.qt.QShortcut) if s.key.toString() == "Ctrl+Z" and s.enabled]
    assert undo == [s for s in w.shortcuts if s.key.toString() == "Ctrl+Z"]
    m.app.exit()
    assert m.app.press("1") and w.editor.activeEffect() is None  # not shown: the keys are gone
    m.app.enter()


def test_box_drawn_on_a_slice_view(module):
    m, w = module, module.widget
    center = interior_voxel(m.phantom.labels, 3)
    m.show_slice("Red", center)
    m.app.press("B")
    assert w.ui.boxButton.checked
    ys, xs = np.nonzero(m.blob(3)[center[0]])
    a = m.app.view_pixel("Red", world((center[0], ys.min() - 2, xs.min() - 2)))
    b = m.app.view_pixel("Red", world((center[0], ys.max() + 2, xs.max() + 2)))
    m.app.drag("Red", a, b)
    m.idle()
    assert m.kinds() == [("bbox", True)] and m.errors() == []
    assert dice(m.segment(), m.blob(3)) > 0.5
    m.app.press("Escape")  # no box in progress: nothing happens
    assert w.tools.active == "box"


def test_a_box_in_a_slice_view_of_a_new_layout(module):
    m = module
    m.app.press("B")
    m.app.layout_manager.setLayout(21)  # three over three: Red+ is a new slice view
    try:
        center = interior_voxel(m.phantom.labels, 3)
        m.show_slice("Red+", center)
        ys, xs = np.nonzero(m.blob(3)[center[0]])
        m.app.drag("Red+", m.app.view_pixel("Red+", world((center[0], ys.min() - 2, xs.min() - 2))),
                   m.app.view_pixel("Red+", world((center[0], ys.max() + 2, xs.max() + 2))))
        m.idle()
        assert m.kinds() == [("bbox", True)] and dice(m.segment(), m.blob(3)) > 0.5
    finally:
        m.app.layout_manager.setLayout(2)


def close_lasso(m, node):
    """A double-click or right-click while placing the curve: vtkSlicerMarkupsWidget leaves place mode, then
    modifies the curve node (WidgetEventStopPlace)."""
    m.app.end_placement(node)


def lasso_points(m, k, slice_index):
    mask = m.blob(k)[slice_index]
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    ry, rx = (ys.max() - ys.min()) / 2 + 2, (xs.max() - xs.min()) / 2 + 2
    return [world((slice_index, cy + ry * np.sin(a), cx + rx * np.cos(a))) for a in np.linspace(0, 2 * np.pi, 12,
                                                                                              endpoint=False)]


def test_lasso_is_sent_on_its_close_gesture_and_never_on_a_mode_change(module):
    m, w = module, module.widget
    center = interior_voxel(m.phantom.labels, 2)
    m.app.press("L")
    lasso = w.prompts.lasso(True)
    for p in lasso_points(m, 2, center[0]):
        m.app.place_point(lasso, p)
    close_lasso(m, lasso)
    m.idle()
    assert m.kinds() == [("lasso", True)] and dice(m.segment(), m.blob(2)) > 0.5
    assert w.tools.active == "lasso" and lasso.GetNumberOfControlPoints() == 0  # armed again, empty
    # Half-drawn, then the toolbar's view-transform button: nothing is sent, the tool is disarmed visibly.
    for p in lasso_points(m, 2, center[0])[:5]:
        m.app.place_point(lasso, p)
    slicer.app.applicationLogic().GetInteractionNode().SwitchToViewTransformMode()  # the toolbar's arrow
    m.app.pump(0.1)
    assert m.kinds() == [("lasso", True)] and not w.ui.lassoButton.checked and w.tools.active is None
    assert "not sent" in w.ui.statusLabel.text


def test_scribble_painted_with_the_segment_editor_brush(module):
    m, w = module, module.widget
    w.logic.scribbleThickness = (1, 1, 1)
    m.app.press("S")
    assert w.ui.scribbleButton.checked and w.scribble.editor.activeEffect() is not None
    effect = w.scribble.editor.activeEffect()
    assert int(effect.parameter("BrushPixelMode")) == 0  # pixel mode would send a prompt per mouse move
    assert w.scribble.editorNode.GetSourceVolumeNode() is m.volume  # set on the node (5.6 / 5.8)
    assert w.scribble.editor.criticalMessages == []
    center = m.stroke_across_blob(1)  # painted with the mouse in the Red view (the Paint effect gets its events)
    assert m.kinds() == [("scribble", True)] and m.segment()[center]


def test_scribble_still_paints_after_a_scene_batch(module):
    """Loading a scene or restoring a scene view is a batch: the scribble's editor then resets its segmentation to
    its combo box's (qMRMLSegmentEditorWidget::onMRMLSceneEndBatchProcessEvent), which never holds our hidden one."""
    m, w = module, module.widget
    w.logic.scribbleThickness = (1, 1, 1)
    m.app.press("S")
    slicer.mrmlScene.StartState(slicer.mrmlScene.BatchProcessState)
    slicer.mrmlScene.EndState(slicer.mrmlScene.BatchProcessState)
    m.app.pump(0.05)
    assert w.ui.scribbleButton.checked and w.scribble.editor.activeEffect() is not None
    m.stroke_across_blob(1)
    assert m.kinds() == [("scribble", True)]


@pytest.mark.parametrize("tool", ["point", "box", "scribble", "lasso"])
def test_a_segment_editor_effect_or_the_toolbar_disarms_our_tools(module, tool):
    m, w = module, module.widget
    m.app.press(tool[0].upper())
    assert w.tools.active == tool
    w.editor.setActiveEffectByName("Threshold")  # the user picks an effect in the Segment Editor below
    m.app.pump(0.05)
    assert w.tools.active is None and not w.toolButton(tool).checked
    assert "effect" in w.ui.statusLabel.text
    if tool == "box":
        assert w.boxTool.installed == []  # left clicks go to the effect again
    if tool == "scribble":
        assert w.scribble.editor.activeEffect() is None
    # And the other way round: our tool deselects the effect.
    m.app.press(tool[0].upper())
    assert w.tools.active == tool and w.editor.activeEffect() is None
    # The toolbar's place mode for the user's own markups disarms it as well.
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "mine")
    slicer.app.applicationLogic().GetSelectionNode().SetActivePlaceNodeID(node.GetID())
    slicer.app.applicationLogic().GetInteractionNode().SwitchToPersistentPlaceMode()
    m.app.pump(0.05)
    assert w.tools.active is None and not w.toolButton(tool).checked
    assert m.controller is None or m.kinds() == []  # nothing was sent by any of this


@pytest.mark.parametrize("tool", ["box", "scribble"])
def test_the_toolbars_window_level_mode_disarms_box_and_scribble(module, tool):
    """Window/level from Slicer's mouse-mode toolbar: the scribble's hidden Paint deselects itself and the box's
    filter lets the left drags through to the view again."""
    m, w = module, module.widget
    m.app.press(tool[0].upper())
    interactor = m.app.layout_manager.sliceWidget("Red").sliceView().interactor()
    presses = []
    interactor.AddObserver("LeftButtonPressEvent", lambda caller, event: presses.append(event), 0.5)
    interaction = slicer.app.applicationLogic().GetInteractionNode()
    interaction.SetCurrentInteractionMode(interaction.AdjustWindowLevel)
    m.app.pump(0.05)
    assert w.tools.active is None and not w.toolButton(tool).checked and "window/level" in w.ui.statusLabel.text
    assert w.scribble is None or w.scribble.editor.activeEffect() is None
    m.app.drag("Red", (100, 100), (200, 150))
    assert presses == ["LeftButtonPressEvent"]  # the view gets the drag: window/level works
    assert m.controller is None or m.kinds() == []


def test_next_reset_undo_redo_with_the_segment_editor(module):
    m, w = module, module.widget
    m.app.press("P")
    m.app.place_point(w.prompts.points(True), world(interior_voxel(m.phantom.labels, 1)))
    m.idle()
    first = m.segment().copy()
    assert first.any()
    m.app.place_point(w.prompts.points(True), world(interior_voxel(m.phantom.labels, 4)))
    m.idle()
    second = m.segment().copy()
    m.app.press("Ctrl+Z")  # ours: the last prompt, in step with the server
    m.idle()
    assert np.array_equal(m.segment(), first)
    m.app.press("R")
    m.idle()
    assert not m.segment().any() and w.isPositive()
    m.app.press("Ctrl+Z")  # nothing of ours left: the Segment Editor's undo brings the segment back
    m.app.pump(0.05)
    assert np.array_equal(m.segment(), first)
    w.editor.redo()  # and its redo clears it again
    m.app.pump(0.05)
    assert not m.segment().any()
    w.editor.undo()
    w.editor.undo()  # our undo of the second prompt, then the second prompt itself, are editor steps too
    m.app.pump(0.05)
    assert np.array_equal(m.segment(), second)
    key = w.getScene().selected_segment()
    m.app.press("E")
    assert w.getScene().selected_segment() != key and not m.segment().any()
    m.app.place_point(w.prompts.points(True), world(interior_voxel(m.phantom.labels, 2)))
    m.idle()
    assert dice(m.segment(), m.blob(2)) > 0.5 and m.errors() == []
    m.app.click(w.ui.undoButton)
    m.idle()
    assert not m.segment().any()


def test_without_a_server_segments_still_work_and_prompts_say_why(phantom):
    with SlicerApp() as app:
        m = Module(app, phantom, "http://127.0.0.1:%d" % free_port())
        w = m.widget
        m.app.click(w.ui.nextSegmentButton)
        keys = w.getScene().segment_keys()
        assert len(keys) == 1 and w.getScene().selected_segment() == keys[0]
        m.app.press("E")
        assert len(w.getScene().segment_keys()) == 2
        m.app.press("P")
        m.app.place_point(w.prompts.points(True), world(interior_voxel(phantom.labels, 1)))
        m.idle()
        assert m.errors() and "Cannot reach" in m.errors()[-1] and "not changed" in m.errors()[-1]
        assert not m.segment().any()
        m.app.click(w.ui.resetSegmentButton)
        m.app.click(w.ui.undoButton)
        m.app.pump(0.05)
        app.exit()
        app.cleanup()


def defined_points(node):
    return [n for n in range(node.GetNumberOfControlPoints())
            if node.GetNthControlPointPositionStatus(n) == node.PositionDefined]


def test_an_unreachable_server_gives_one_message_per_click_and_unsent_points_go(phantom):
    """Each click against a server that is not there: one error dialog (never two stacked: the prompt queued behind
    the failed connection is not tried again while the first dialog's event loop runs), and the point, never sent,
    does not stay on the view as if it had been a prompt."""
    with SlicerApp() as app:
        m = Module(app, phantom, "http://127.0.0.1:%d" % free_port())
        w = m.widget
        m.app.press("P")
        for clicks in (1, 2):
            m.app.place_point(w.prompts.points(True), world(interior_voxel(phantom.labels, 1)))
            m.idle()
            assert len(m.errors()) == clicks and app.dialogs.max_depth == 1, [(s.text, s.depth) for s in app.shown()]
            assert "Cannot reach" in m.errors()[-1] and defined_points(w.prompts.points(True)) == []
        app.exit()
        app.cleanup()


def test_points_declined_or_rejected_are_removed_and_the_rest_are_sent(module):
    m, w = module, module.widget
    m.app.press("P")
    node = w.prompts.points(True)
    # two points that arrive together, the first outside the volume: it is refused (one message), the second sent
    w.tools.ourChange(lambda: None)
    node.AddControlPointWorld(vtk.vtkVector3d(500.0, 500.0, 500.0))
    node.AddControlPointWorld(vtk.vtkVector3d(*world(interior_voxel(m.phantom.labels, 1))))
    m.idle()
    assert len(m.errors()) == 1 and "outside" in m.errors()[0].lower()
    assert m.kinds() == [("point", True)] and len(defined_points(node)) == 1 and node.GetNthControlPointLocked(0)
    # a remote server whose consent is declined: nothing is sent and the point goes
    w.ui.serverUrlLineEdit.text = "http://gpu-node.invalid:1527"
    w.config.onServerSettingsChanged()
    m.app.dialogs.answers.append(False)
    m.app.place_point(node, world(interior_voxel(m.phantom.labels, 2)))
    m.app.pump(0.1)
    assert "consent" in w.ui.statusLabel.text and len(defined_points(node)) == 1 and len(m.kinds()) == 1


def test_configuration_consent_and_test_connection(module, server):
    m, w = module, module.widget
    w.ui.serverUrlLineEdit.text = "gpu-node:1527"
    w.config.onServerSettingsChanged()
    assert w.ui.serverUrlLineEdit.text == "http://gpu-node:1527"
    assert w.ui.consentCheckBox.enabled and not w.ui.consentCheckBox.checked
    m.app.click(w.ui.consentCheckBox)
    assert "http://gpu-node:1527" in w.settings.consented()
    m.app.click(w.ui.consentCheckBox)
    assert "http://gpu-node:1527" not in w.settings.consented()
    # A prompt for a remote server asks first; "No" sends nothing.
    m.app.dialogs.answers.append(False)
    m.app.press("P")
    m.app.place_point(w.prompts.points(True), world(interior_voxel(m.phantom.labels, 1)))
    m.app.pump(0.1)
    assert m.app.shown("question") and "consent" in w.ui.statusLabel.text
    assert m.controller is None or m.controller.timings == []
    w.ui.serverUrlLineEdit.text = "ftp://x"
    w.config.onServerSettingsChanged()
    assert "http" in w.ui.connectionInfoLabel.text
    w.ui.serverUrlLineEdit.text = server
    m.app.click(w.ui.testConnectionButton)
    m.app.pump(30, until=lambda: w.ui.testConnectionButton.enabled)
    assert w.ui.connectionInfoLabel.text.startswith("Connected") and "Prompts:" in w.ui.connectionInfoLabel.text
    assert not w.ui.consentCheckBox.enabled and w.ui.consentCheckBox.checked  # this computer: nothing leaves it
    w.ui.caBundlePathLineEdit.currentPath = "/etc/my-ca.pem"  # a private CA for an https server
    assert module_settings(m.app, "CABundle") == "/etc/my-ca.pem"
    w.ui.caBundlePathLineEdit.currentPath = ""
    m.app.click(w.ui.showApiKeyCheckBox)
    import qt

    assert w.ui.apiKeyLineEdit.echoMode == qt.QLineEdit.Normal
    w.ui.serverUrlLineEdit.text = "http://127.0.0.1:%d" % free_port()
    m.app.click(w.ui.testConnectionButton)
    m.app.pump(30, until=lambda: w.ui.testConnectionButton.enabled)
    assert w.ui.connectionInfoLabel.text.startswith("Failed: Cannot reach")
    m.app.click(w.ui.showTimingsButton)
    assert m.app.shown("dialog")
    w.showQueuePosition({"waiting": True, "ahead": 2, "expected_wait_seconds": 3.2, "running": False})
    assert w.ui.busyBar.textVisible and w.ui.busyBar.format == "Waiting for the GPU: 2 ahead (~3 s)"
    w.showQueuePosition(None)  # running, or a server that does not tell
    assert not w.ui.busyBar.textVisible


def module_settings(app, name):
    import qt

    return qt.QSettings().value("SlicerNNInteractive/" + name)


def test_consent_box_and_url_helpers_work_before_blosc2_is_installed(phantom, monkeypatch):
    monkeypatch.setitem(sys.modules, "blosc2", None)  # "import blosc2" raises ImportError
    installs = []

    def pip_install(requirement, **kwargs):
        installs.append(requirement)
        monkeypatch.delitem(sys.modules, "blosc2")

    with SlicerApp(allow_pip=pip_install) as app:
        m = Module(app, phantom, "http://127.0.0.1:1527")
        w = m.widget
        assert w.ui.consentCheckBox.checked and not w.ui.consentCheckBox.enabled  # the default URL is local
        app.dialogs.answers.append(True)  # "Install blosc2 now?"
        w.logic.ensureDependencies(ask=True)
        assert installs == [w.logic.blosc2Requirement()] and "==" in installs[0]
        assert not [q for q in app.shown() if "send" in q.text.lower()]  # no consent asked for this computer
        app.exit()
        app.cleanup()


def test_local_server_starts_without_slicers_python_variables(module, tmp_path):
    m, w = module, module.widget
    executable = tmp_path / "nninteractive-slicer-server"  # what pip installs: a script starting the server
    executable.write_text('#!/bin/sh\nexec "%s" -m nninteractive_slicer_server "$@"\n' % sys.executable)
    executable.chmod(0o755)
    w.ui.executablePathLineEdit.currentPath = str(executable)
    w.ui.extraArgumentsLineEdit.text = "--device cpu --torch-n-threads 1 --model-dir '%s'" % os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "models", "blobs")
    m.app.click(w.ui.startLocalServerButton)
    server = w.config.localServer
    assert server is not None, w.ui.localServerStatusLabel.text
    environ = open("/proc/%d/environ" % server.process.pid, "rb").read().split(b"\0")
    names = set(e.split(b"=", 1)[0].decode() for e in environ if e)
    assert "NN_INTERACTIVE_API_KEY" in names and not names & {"PYTHONHOME", "PYTHONPATH", "PYTHONNOUSERSITE"}
    assert server.api_key not in " ".join(server.argv())
    m.app.pump(120, until=lambda: w.ui.testConnectionButton.enabled and "Running" in
               w.ui.localServerStatusLabel.text and w.ui.connectionInfoLabel.text.startswith("Connected"))
    assert w.ui.serverUrlLineEdit.text == server.url
    process = server.process
    w = m.app.reload()  # developer Reload: the user's local server keeps running, the new widget follows it
    assert w.config.localServer is server and process.poll() is None
    m.app.pump(30, until=lambda: "Running" in w.ui.localServerStatusLabel.text)
    m.app.click(w.ui.stopLocalServerButton)
    assert w.config.localServer is None and w.ui.localServerStatusLabel.text == "Not running."
    assert process.poll() is not None
    w.ui.executablePathLineEdit.currentPath = "/no/such/server"
    m.app.click(w.ui.startLocalServerButton)
    assert "does not exist" in w.ui.localServerStatusLabel.text


def test_timing_experiment_on_a_single_session_server(phantom, quiet_model, tmp_path):
    with our_server(quiet_model, tmp_path, "--no-autozoom", "--max-sessions", "1") as (url, _):
        with SlicerApp() as app:
            m = Module(app, phantom, url)
            w = m.widget
            w.onNextSegment()
            w.setSourceVolumeNode(None)  # it builds its own volumes: no source volume needed
            w.getController().sync.session  # the module holds the server's only session
            w.ui.repetitionsSpinBox.value = 1
            w.logic.timingSizes = ("S",)
            app.dialogs.answers.append(True)
            during = []

            def meanwhile():  # the experiment pumps events for minutes: what the user can do meanwhile
                if w.dispatch.paused is not None and not during:
                    during.append(w.ui.runTimingButton.enabled)
                    m.app.click(w.ui.runTimingButton)  # a second experiment: the button is disabled
                    during.append(w.submit("point", {"coordinates": (4, 4, 4)}, 0.0))  # a prompt: refused
                    during.append(w.ui.statusLabel.text)

            watcher = app.qt.QTimer()
            watcher.setInterval(20)
            watcher.connect("timeout()", meanwhile)
            watcher.start()
            m.app.click(w.ui.runTimingButton)
            info = [s for s in app.shown("info") if "Timing experiment" in s.text]
            assert info and "point" in info[-1].detailedText and m.errors() == []
            assert during[:2] == [False, None] and "timing experiment is running" in during[2]
            assert len(info) == 1 and len(app.shown("question")) == 1
            assert w.ui.runTimingButton.enabled and w.dispatch.paused is None
            # Closing the scene stops an experiment in progress (its volumes are going), with a message.
            app.dialogs.answers.append(True)
            watcher.disconnect("timeout()", meanwhile)
            watcher.connect("timeout()", lambda: w.dispatch.paused is not None and slicer.mrmlScene.Clear(0))
            m.app.click(w.ui.runTimingButton)
            watcher.stop()
            assert "failed" in m.errors()[-1] and "scene was closed" in m.errors()[-1]
            assert w.ui.runTimingButton.enabled
            app.exit()
            app.cleanup()


def hidden_helper_nodes():
    """IDs of the module's helper nodes in the scene (not saved with it)."""
    return sorted(n.GetID() for n in slicer.util.getNodes("*").values()
                  if not n.GetSaveWithScene() and n.GetName().startswith("nnInteractive"))


def test_enter_exit_reload_and_cleanup(module):
    m, w = module, module.widget
    m.app.press("S")  # creates the hidden scratch segmentation
    m.app.exit()
    assert w.tools.active is None
    m.app.press("P")
    assert w.tools.active is None  # the module is not shown: its keys are Slicer's again
    segmentation = w.editor.segmentationNode()
    w.editor.setSegmentationNode(None)
    slicer.mrmlScene.RemoveNode(segmentation)
    m.app.enter()
    assert not w.editor.segmentationNode().GetHideFromEditors()  # never the hidden scratch segmentation
    for key in ("P", "L", "S"):
        m.app.press(key)  # every helper node exists: points, lasso, scribble segmentation and its editor node
    helpers = hidden_helper_nodes()
    new = m.app.reload()
    assert new is not w
    for key in ("L", "S", "P"):
        m.app.press(key)
    assert hidden_helper_nodes() == helpers  # the new widget uses the nodes the old one made: none twice
    assert new.tools.active == "point"  # shortcuts work at once after Reload
    m.app.place_point(new.prompts.points(True), world(interior_voxel(m.phantom.labels, 1)))
    m.app.pump(60, until=lambda: new.controller is not None and new.controller.timings)
    assert new.tickTimer.isActive()  # keeps the session alive while the user looks at the result
    m.app.quit()
    assert new.controller is None


def test_the_modules_self_test_passes(server, monkeypatch):
    monkeypatch.setenv("NNINTERACTIVE_TEST_SERVER", server)
    with SlicerApp() as app:
        app.load_module()
        module = sys.modules["SlicerNNInteractive"]
        test = module.SlicerNNInteractiveTest()
        test.runTest()
        app.exit()
        app.cleanup()


def test_the_self_test_skips_offline_before_installing_anything(monkeypatch):
    """CTest without a server: the self-test must skip, not fail on installing blosc2."""
    import unittest

    monkeypatch.delenv("NNINTERACTIVE_TEST_SERVER", raising=False)
    monkeypatch.setitem(sys.modules, "blosc2", None)  # not installed
    with SlicerApp() as app:
        app.load_module()
        import qt

        qt.QSettings().setValue("SlicerNNInteractive/ServerURL", "http://127.0.0.1:%d" % free_port())
        with pytest.raises(unittest.SkipTest):
            sys.modules["SlicerNNInteractive"].SlicerNNInteractiveTest().test_Prompts()
        assert app.pip_requests == []
        app.cleanup()


@pytest.fixture(scope="module")
def auto_server(blob_model, tmp_path_factory):
    """Our server with the tiny trained automatic model (auto_blobs) too."""
    tmp = tmp_path_factory.mktemp("widget-auto")
    models = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")
    spec = tmp / "model-serve-spec.yaml"
    spec.write_text("model_folder: %s\nmodels:\n  - id: auto_blobs\n    rel_path: auto_blobs\n"
                    "    name: Blobs (tiny trained model)\n    default_args: {use_folds: [0], tta: false}\n" % models)
    with our_server(blob_model, tmp, "--max-sessions", "4", "--model-serve-spec", str(spec)) as (url, _):
        yield url


def test_automatic_segmentation_then_refinement(auto_server):
    """Test connection lists the server's automatic models; Run adds one segment per label (names from the model),
    through the session (the volume is uploaded once); a prompt refines one; Cancel discards a run."""
    phantom = make_phantom(seed=103, dark=(2,))
    with SlicerApp() as app:
        m = Module(app, phantom, auto_server)
        w = m.widget
        assert not w.ui.runAutoButton.enabled  # no models listed yet
        m.app.click(w.ui.testConnectionButton)
        m.app.pump(30, until=lambda: w.ui.testConnectionButton.enabled)
        assert w.ui.autoModelComboBox.count == 1 and w.ui.runAutoButton.enabled
        assert "bright_blob" in w.ui.autoInfoLabel.text and "Automatic models" in w.ui.connectionInfoLabel.text
        m.app.click(w.ui.runAutoButton)
        assert w.ui.cancelAutoButton.enabled
        m.idle()
        scene = w.getScene()
        segmentation = scene.segmentationNode().GetSegmentation()
        named = {segmentation.GetSegment(k).GetName(): k for k in scene.segment_keys()}
        assert set(named) == {"bright_blob", "dark_blob"} and m.errors() == []
        w.editor.undo()  # the whole run is one step of the Segment Editor's undo
        assert scene.segment_keys() == []
        w.editor.redo()
        assert sorted(scene.segment_keys()) == sorted(named.values())
        dark = scene.read_segment(named["dark_blob"]).astype(bool)
        assert dice(dark, m.blob(2)) > 0.9 and "2 segment(s)" in w.ui.statusLabel.text
        w.editor.setCurrentSegmentID(named["dark_blob"])
        m.app.press("P")
        m.app.press("T")
        m.app.place_point(w.prompts.points(False), world(interior_voxel(phantom.labels, 2)))
        m.idle()
        assert scene.read_segment(named["dark_blob"]).astype(bool)[m.blob(2)].mean() < 0.2
        assert w.controller.sync.uploads["image"] == 1  # the automatic run and the prompt shared the upload
        m.app.click(w.ui.runAutoButton)
        m.app.click(w.ui.cancelAutoButton)
        m.idle()
        assert "cancelled" in w.ui.statusLabel.text and len(scene.segment_keys()) == 2
        app.exit()
        app.cleanup()


def test_one_automatic_run_at_a_time_its_status_kept_and_another_server_forgets_the_models(auto_server):
    phantom = make_phantom(seed=103, dark=(2,))
    with SlicerApp() as app:
        m = Module(app, phantom, auto_server)
        w = m.widget
        m.app.click(w.ui.testConnectionButton)
        m.app.pump(30, until=lambda: w.ui.testConnectionButton.enabled)
        statuses = []
        shown = w.messages.status
        w.messages.status = lambda text: (statuses.append(text), shown(text))
        m.app.click(w.ui.runAutoButton)
        assert not w.ui.runAutoButton.enabled and w.ui.cancelAutoButton.enabled
        m.app.click(w.ui.runAutoButton)  # disabled: a second run would add every segment twice
        m.idle()
        assert len(w.getScene().segment_keys()) == 2 and m.errors() == []
        assert statuses[0].startswith("Automatic segmentation with Blobs")
        assert all(t.startswith("Automatic segmentation") for t in statuses[:-1]), statuses  # not "Segmenting..."
        assert "2 segment(s)" in statuses[-1]
        assert w.ui.runAutoButton.enabled and not w.ui.cancelAutoButton.enabled
        w.ui.serverUrlLineEdit.text = "http://127.0.0.1:%d" % free_port()
        w.config.onServerSettingsChanged()  # another server: the old one's model ids mean nothing there
        assert w.ui.autoModelComboBox.count == 0 and not w.ui.runAutoButton.enabled
        assert "Test connection" in w.ui.autoInfoLabel.text
        app.exit()
        app.cleanup()
