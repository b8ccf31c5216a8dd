"""The module's widget run outside Slicer: real PySide6 behind a PythonQt-like ``qt`` module, Slicer's real MRML and
``slicer/util.py`` (slicer-core wheel), stand-ins only for Slicer's application widgets (Testing/slicerapp).

The first tests pin the harness's own behaviours (PythonQt semantics, dialogs, shortcuts, the Segment Editor
rules, tear-down), the last ones drive the module: setup, enter, every button and every shortcut with a server
URL nothing listens on, exit, Reload, cleanup. They assert on the harness and on what any version of the module
must do (never raise into Qt, report errors through Slicer's dialogs), not on today's widget details.
"""

import os
import socket
import sys

import numpy as np
import pytest

pytest.importorskip("PySide6")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from slicerapp import CallbackError, PipInstallRefused, SlicerApp  # noqa: E402


def dead_url():
    """A loopback URL nothing listens on (the port was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return "http://127.0.0.1:%d" % s.getsockname()[1]


@pytest.fixture
def app():
    with SlicerApp() as harness:
        yield harness


# ---------------------------------------------------------------------------------------------- PythonQt


def test_properties_are_attributes_and_win_over_methods(app):
    qt = app.qt
    button = qt.QPushButton("Go")
    button.checkable = True
    button.checked = True
    assert button.isChecked() and button.checked is True
    button.enabled = False
    assert button.enabled is False and not button.isEnabled()
    button.toolTip = "tip"
    assert button.toolTip == "tip"
    assert button.text == "Go"  # the property, not QAbstractButton.text()
    button.name = "goButton"
    assert button.objectName == "goButton" and button.name == "goButton"  # a property: not callable
    assert isinstance(button.height, int)
    line = qt.QLineEdit()
    line.text = "abc"
    assert line.text == "abc"
    line.echoMode = qt.QLineEdit.Password
    assert line.echoMode == qt.QLineEdit.Password
    spin = qt.QSpinBox()
    spin.value = 7
    assert spin.value == 7
    label = qt.QLabel()
    label.text = "x"
    assert label.text == "x"
    assert isinstance(button, qt.QWidget) and isinstance(button, qt.QAbstractButton)
    assert button.className() == "QPushButton"
    # a property that is also a virtual method: C++ looks the method up for a Python override while the property is
    # read (and whenever the widget's geometry changes: an editable combo box); that lookup finds the method
    combo = qt.QComboBox()
    assert combo.sizeHint.width() > 0
    combo.editable = True
    assert combo.editable is True and combo.sizeHint.width() > 0

    class Sub(qt.QPushButton):  # Python attributes win over Qt properties, as in PythonQt
        def text(self):
            return "python"

    sub = Sub()
    assert sub.text() == "python"
    sub.anything = 3
    assert sub.anything == 3
    # the names module code uses
    assert qt.QEvent.KeyPress and qt.Qt.Key_Escape and qt.Qt.LeftButton and qt.QPalette.Window
    assert qt.QLineEdit.Normal != qt.QLineEdit.Password and qt.QPlainTextEdit.NoWrap is not None
    assert not qt.QFontDatabase.systemFont(qt.QFontDatabase.FixedFont).family() == ""
    assert qt.QColor.fromRgbF(0.2, 0.8, 0.35).name().startswith("#")
    assert qt.QIcon(os.path.join(os.path.dirname(__file__), "..", "SlicerNNInteractive", "Resources", "Icons",
                                 "SlicerNNInteractive.png")).isNull() is False


def test_signals_by_signature(app):
    qt = app.qt
    calls = []
    button = qt.QPushButton()
    button.checkable = True
    assert button.connect("clicked(bool)", lambda checked: calls.append(("bool", checked, button.checked)))
    assert button.connect("clicked()", lambda: calls.append(("none",)))
    button.connect("clicked(bool)", lambda: calls.append(("trimmed",)))  # PythonQt passes what fn accepts
    button.click()
    assert ("bool", True, True) in calls  # checkable buttons have toggled when clicked(bool) fires
    assert ("none",) in calls and ("trimmed",) in calls

    def onToggled(checked):
        calls.append(("toggled", checked))

    box = qt.QCheckBox()
    box.connect("toggled(bool)", onToggled)
    box.checked = True
    assert calls[-1] == ("toggled", True)
    assert box.disconnect("toggled(bool)", onToggled)
    box.checked = False
    assert calls[-1] == ("toggled", True)
    with pytest.raises(ValueError):
        button.connect("noSuchSignal()", onToggled)

    line = qt.QLineEdit()
    line.connect("textChanged(QString)", lambda text: calls.append(("text", text)))
    line.text = "hi"
    assert calls[-1] == ("text", "hi")

    fired = []
    qt.QTimer.singleShot(0, lambda: fired.append("single"))
    timer = qt.QTimer()
    timer.setInterval(5)
    timer.connect("timeout()", lambda: fired.append("tick"))
    timer.start()
    app.pump(0.05)
    timer.stop()
    assert "single" in fired and "tick" in fired


def test_threads_advance_only_while_gui_thread_python_gives_the_gil_up(app):
    """Slicer's GUI thread keeps the GIL while it waits in Qt's event loop (PythonQt without thread support), so a
    thread makes progress only while a callback on the GUI thread releases it (DESIGN.md section 8)."""
    import threading
    import time

    qt = app.qt
    steps = []
    stop = threading.Event()

    def worker():  # a thread that needs the GIL 40 times, as a network request does between its reads
        while len(steps) < 40 and not stop.is_set():
            time.sleep(0.001)
            steps.append(1)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        app.pump(0.3)  # no Python of ours runs: the thread starves
        assert len(steps) < 5, "the harness lets threads run freely (%d steps)" % len(steps)
        timer = qt.QTimer()
        timer.setInterval(5)
        timer.connect("timeout()", lambda: time.sleep(0.001))  # what Controller.tick does
        timer.start()
        app.pump(10, until=lambda: len(steps) >= 40)
        timer.stop()
    finally:
        stop.set()


def test_a_modal_dialog_runs_the_event_loop_and_dialogs_can_stack(app):
    import slicer

    qt = app.qt
    ticks = []
    timer = qt.QTimer()
    timer.setInterval(5)
    timer.connect("timeout()", lambda: ticks.append(1))
    timer.start()
    slicer.util.infoDisplay("first")
    assert ticks, "timers fire while a modal dialog is open (QDialog::exec runs a nested event loop)"
    timer.stop()
    qt.QTimer.singleShot(0, lambda: slicer.util.errorDisplay("second, shown over the first"))
    slicer.util.infoDisplay("first again")
    assert [(s.text, s.depth) for s in app.shown()][-2:] == [("first again", 1), ("second, shown over the first", 2)]
    assert app.dialogs.max_depth == 2


def test_exceptions_in_callbacks_fail_the_test(app):
    qt = app.qt
    button = qt.QPushButton()
    button.connect("clicked()", lambda: 1 / 0)
    button.click()  # PythonQt prints and carries on: so does the click
    with pytest.raises(CallbackError, match="ZeroDivisionError"):
        app.pump()
    qt.QTimer.singleShot(0, lambda: [][1])
    with pytest.raises(CallbackError, match="IndexError"):
        app.pump(0.02)

    class Filter(qt.QObject):
        def eventFilter(self, obj, event):
            raise RuntimeError("in filter")

    widget = app.layout_manager.sliceWidget("Red").sliceView().VTKWidget()
    f = Filter()
    widget.installEventFilter(f)
    app.mouse("Red", "press", 10, 10)
    widget.removeEventFilter(f)
    with pytest.raises(CallbackError, match="in filter"):
        app.check_errors()


def test_dialogs_are_recorded_and_answered(app):
    import slicer

    qt = app.qt
    slicer.util.errorDisplay("bad", windowTitle="T", detailedText="more")
    slicer.util.infoDisplay("fine")
    slicer.util.warningDisplay("careful")
    assert [(s.kind, s.text) for s in app.shown()] == [("error", "bad"), ("info", "fine"), ("warning", "careful")]
    assert app.shown("error")[0].detailedText == "more"
    app.dialogs.answers.extend([True, False, True])
    assert slicer.util.confirmOkCancelDisplay("go?") is True
    assert slicer.util.confirmYesNoDisplay("sure?") is False
    assert qt.QMessageBox.question(None, "t", "q?", qt.QMessageBox.Yes | qt.QMessageBox.No) == qt.QMessageBox.Yes
    dialog = qt.QDialog(slicer.util.mainWindow())
    layout = qt.QVBoxLayout(dialog)
    layout.addWidget(qt.QLabel("inside"))
    assert dialog.exec_() == qt.QDialog.Rejected  # returns at once
    assert app.shown("dialog")[-1].widget_texts == ["inside"]
    slicer.util.delayDisplay("note", 500)
    assert app.shown("dialog")[-1].text == "note"
    assert slicer.util.confirmOkCancelDisplay("no answer queued") is False
    assert app.dialogs.unanswered()
    app.dialogs.shown.clear()  # else the tear-down fails the test on the unanswered question


def test_shortcuts_fire_through_qt(app):
    import slicer

    qt = app.qt
    hits = []
    window = slicer.util.mainWindow()
    assert window is app.main_window  # Slicer's own mainWindow(), finding qSlicerMainWindow
    p = qt.QShortcut(qt.QKeySequence("P"), window)
    p.connect("activated()", lambda: hits.append("P"))
    undo = qt.QShortcut(qt.QKeySequence("Ctrl+Z"), window)
    undo.connect("activated()", lambda: hits.append("undo"))
    undo.connect("activatedAmbiguously()", lambda: hits.append("undo-ambiguous"))
    assert app.press("P"), "offscreen Qt should deliver key presses to the shortcut map"
    assert app.press("Ctrl+Z")
    assert hits == ["P", "undo"]
    # a second Ctrl+Z on the main window (the Segment Editor module installs one while it is shown): Qt hands
    # ambiguous presses to the shortcuts in turn, as activatedAmbiguously()
    other = qt.QShortcut(qt.QKeySequence("Ctrl+Z"), window)
    other.connect("activatedAmbiguously()", lambda: hits.append("other-ambiguous"))
    del hits[:]
    app.press("Ctrl+Z")
    app.press("Ctrl+Z")
    assert sorted(hits) == ["other-ambiguous", "undo-ambiguous"]
    line = qt.QLineEdit(window)
    line.setFocus()
    app.pump()
    del hits[:]
    app.press("P", widget=line)  # a line edit with focus takes plain letters, as in Slicer
    assert hits == [] and line.text == "p"


def test_edit_undo_action_option():
    with SlicerApp(edit_undo_action=True) as harness:
        assert harness.press("Ctrl+Z")
        assert harness.scene_undo_calls == 1


def test_application_standins(app):
    import slicer

    logic = slicer.app.applicationLogic()
    interaction = logic.GetInteractionNode()
    assert interaction is slicer.mrmlScene.GetNodeByID("vtkMRMLInteractionNodeSingleton")
    assert logic.GetSelectionNode() is slicer.mrmlScene.GetNodeByID("vtkMRMLSelectionNodeSingleton")
    layout = slicer.app.layoutManager()
    assert list(layout.sliceViewNames()) == ["Red", "Yellow", "Green"]
    orientations = [layout.sliceWidget(n).mrmlSliceNode().GetOrientation() for n in layout.sliceViewNames()]
    assert orientations == ["Axial", "Sagittal", "Coronal"]
    red = layout.sliceWidget("Red")
    assert red.mrmlSliceCompositeNode().GetLayoutName() == "Red"
    assert red.sliceView().renderWindow().GetRenderers().GetFirstRenderer() is not None
    # XY-to-RAS and the harness's inverse agree
    x, y = app.view_pixel("Red", (3.0, -4.0, 0.0))
    height = red.sliceView().VTKWidget().height
    ras = red.mrmlSliceNode().GetXYToRAS().MultiplyPoint([x, height - 1 - y, 0, 1])
    assert np.allclose(ras[:3], (3.0, -4.0, 0.0))
    # the launcher's Python variables are in os.environ, not in the startup environment
    assert os.environ["PYTHONNOUSERSITE"] == "1" and "PYTHONHOME" in os.environ
    env = slicer.util.startupEnvironment()  # Slicer's own function on the stand-in app
    assert not {"PYTHONHOME", "PYTHONPATH", "PYTHONNOUSERSITE"} & set(env)
    assert env.get("PATH") == app.startup_environment.get("PATH")
    assert os.path.isdir(slicer.app.temporaryPath)
    assert slicer.app.palette().color(app.qt.QPalette.Window).lightness() > 128
    with pytest.raises(PipInstallRefused):
        slicer.util.pip_install("blosc2")
    assert app.pip_requests == [("blosc2", {})]
    settings = app.qt.QSettings()
    settings.setValue("Some/Key", "v")
    assert app.qt.QSettings().value("Some/Key") == "v"
    assert settings.fileName().startswith(app.tmp)


def test_tear_down_restores_slicer_and_sys_modules():
    import slicer

    before_modules = set(sys.modules)
    before_slicer = dict(vars(slicer))
    environ = dict(os.environ)
    with SlicerApp() as harness:
        harness.load_module()
        assert "qt" in sys.modules and slicer.app is harness.app
    assert "qt" not in sys.modules and "ctk" not in sys.modules
    assert not any(name == "SlicerNNInteractive" or name.startswith("qSlicer") for name in sys.modules)
    assert set(sys.modules) - before_modules <= {n for n in sys.modules if not n.startswith(("slicer", "Slicer"))}
    assert not hasattr(slicer, "app") and not hasattr(slicer, "mrmlScene")
    assert all(vars(slicer).get(k) is v for k, v in before_slicer.items())
    assert dict(os.environ) == environ


# ---------------------------------------------------------------------------------------------- Segment Editor


def add_volume(shape=(8, 24, 20)):
    import slicer

    image = np.zeros(shape, np.int16)
    image[2:6, 6:18, 5:15] = 100
    node = slicer.util.addVolumeFromArray(image, name="volume")
    node.SetSpacing(1.0, 1.0, 2.0)
    return node


def test_segment_editor_rules(app):
    import slicer
    import qSlicerSegmentationsModuleWidgetsPythonQt as widgets

    scene = slicer.mrmlScene
    volume = add_volume()
    editor = widgets.qMRMLSegmentEditorWidget()
    editorNode = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.setMRMLSegmentEditorNode(editorNode)
    editor.setMRMLScene(scene)
    hidden = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    hidden.SetHideFromEditors(True)
    hidden.GetSegmentation().AddEmptySegment("s", "s")
    editor.setSegmentationNode(hidden)
    assert editorNode.GetSegmentationNode() is hidden and editor.segmentationNode() is None
    editor.setSourceVolumeNode(volume)  # 5.6 / 5.8: gives up, the combo box shows no segmentation
    assert editor.sourceVolumeNode() is None and "need to set segment editor" in editor.criticalMessages[-1]
    editorNode.SetAndObserveSourceVolumeNode(volume)  # what works on every version
    editor.setCurrentSegmentID("s")
    assert editor.currentSegmentID() == "s"

    interaction = slicer.app.applicationLogic().GetInteractionNode()
    interaction.SwitchToPersistentPlaceMode()
    editor.setActiveEffectByName("Paint")
    paint = editor.activeEffect()
    assert paint.name() == "Paint" and editorNode.GetActiveEffectName() == "Paint"
    assert interaction.GetCurrentInteractionMode() == interaction.ViewTransform  # activation ends placement
    paint.setParameter("BrushAbsoluteDiameter", 2.5)
    paint.setParameter("BrushSphere", 0)
    assert paint.parameter("BrushAbsoluteDiameter") == "2.5" and paint.integerParameter("BrushSphere") == 0
    assert editorNode.GetAttribute("Paint.BrushAbsoluteDiameter") == "2.5"

    modified = []
    hidden.GetSegmentation().AddObserver(slicer.vtkSegmentation.SourceRepresentationModified,
                                         lambda caller, event: modified.append(event))
    stroke = np.zeros((8, 24, 20), np.uint8)
    stroke[3, 10:12, 8:12] = 1
    editor.setMaximumNumberOfUndoStates(5)
    assert editor.paint(stroke)
    assert modified, "a Paint stroke signals SourceRepresentationModified"
    painted = slicer.util.arrayFromSegmentBinaryLabelmap(hidden, "s", volume)
    assert painted.sum() == stroke.sum()
    editor.undo()
    assert slicer.util.arrayFromSegmentBinaryLabelmap(hidden, "s", volume).sum() == 0
    editor.redo()
    assert slicer.util.arrayFromSegmentBinaryLabelmap(hidden, "s", volume).sum() == stroke.sum()

    interaction.SwitchToSinglePlaceMode()  # leaving view-transform deselects the effect
    assert editor.activeEffect() is None and editorNode.GetActiveEffectName() == ""
    assert paint.deactivations == 1


def test_segment_editor_510_sets_the_source_volume_directly():
    import slicer

    with SlicerApp(version=(5, 10)) as harness:
        import qSlicerSegmentationsModuleWidgetsPythonQt as widgets

        volume = add_volume()
        editor = widgets.qMRMLSegmentEditorWidget()
        editor.setMRMLScene(slicer.mrmlScene)
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        editor.setMRMLSegmentEditorNode(node)
        hidden = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        hidden.SetHideFromEditors(True)
        editor.setSegmentationNode(hidden)
        editor.setSourceVolumeNode(volume)
        assert editor.sourceVolumeNode() is volume and not harness.critical_messages


def paint_ready_editor(app, hidden=False):
    """An editor (its own node) on a volume and a segmentation with one selected segment, Paint active."""
    import slicer
    import qSlicerSegmentationsModuleWidgetsPythonQt as widgets

    volume = add_volume()
    slicer.util.setSliceViewerLayers(background=volume, fit=True)
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segmentation.GetSegmentation().AddEmptySegment("s", "s")
    segmentation.SetHideFromEditors(hidden)
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor = widgets.qMRMLSegmentEditorWidget()
    editor.setMRMLScene(slicer.mrmlScene)
    editor.setMRMLSegmentEditorNode(node)
    node.SetAndObserveSegmentationNode(segmentation)
    node.SetAndObserveSourceVolumeNode(volume)
    node.SetSelectedSegmentID("s")
    editor.setActiveEffectByName("Paint")
    paint = editor.activeEffect()
    paint.setParameter("BrushDiameterIsRelative", 0)
    paint.setParameter("BrushAbsoluteDiameter", 2.0)
    return editor, segmentation, volume


def test_paint_is_driven_by_the_views_interactor_events(app):
    """A drag in a slice view reaches the Paint effect through the view's interactor (priority 1.0 observers of
    setupViewObservations), paints along the stroke on release, and aborts the events it takes."""
    import slicer

    editor, segmentation, volume = paint_ready_editor(app)
    red = app.layout_manager.sliceWidget("Red")
    red.mrmlSliceNode().JumpSliceByCentering(*volume_world(volume, (10, 12, 4)))
    placed = []
    red.sliceView().interactor().AddObserver("LeftButtonReleaseEvent", lambda c, e: placed.append(e), 0.0)
    start, end = app.view_pixel("Red", volume_world(volume, (6, 12, 4))), app.view_pixel("Red", volume_world(volume, (14, 12, 4)))
    app.drag("Red", start, end)
    painted = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, "s", volume)
    assert painted[4, 12, 6:15].all() and not painted[3].any() and not painted[5].any()  # one slice, the stroke
    assert placed == [] and editor.activeEffect().strokes == 1  # the release went to Paint, not to the style
    editor.undo()
    assert not slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, "s", volume).any()
    segmentation.GetDisplayNode().SetViewNodeIDs([app.layout_manager.sliceWidget("Yellow").mrmlSliceNode().GetID()])
    editor.setupViewObservations()  # not displayable in Red any more: Red is not observed
    app.drag("Red", start, end)
    assert editor.activeEffect().strokes == 1 and placed == ["LeftButtonReleaseEvent"]


def volume_world(volume, ijk):
    import vtk

    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    return list(m.MultiplyPoint(list(ijk) + [1]))[:3]


def test_a_scene_batch_resets_an_editor_on_a_hidden_segmentation(app):
    """qMRMLSegmentEditorWidget::onMRMLSceneEndBatchProcessEvent: the editor node gets the combo box's segmentation,
    which never holds a hidden one: the effect is deactivated."""
    import slicer

    editor, segmentation, volume = paint_ready_editor(app, hidden=True)
    assert editor.activeEffect() is not None
    slicer.mrmlScene.StartState(slicer.mrmlScene.BatchProcessState)
    slicer.mrmlScene.EndState(slicer.mrmlScene.BatchProcessState)
    assert editor.activeEffect() is None and editor.mrmlSegmentEditorNode().GetSegmentationNode() is None


def test_a_layout_change_adds_views_and_the_editor_observes_them(app):
    import slicer

    editor, segmentation, volume = paint_ready_editor(app)
    app.layout_manager.setLayout(21)  # three over three: Red+, Green+, Yellow+ are new
    assert set(app.layout_manager.sliceViewNames()) == {"Red", "Yellow", "Green", "Red+", "Green+", "Yellow+"}
    new = app.layout_manager.sliceWidget("Red+")
    assert new.mrmlSliceCompositeNode().GetBackgroundVolumeID() == volume.GetID()  # the source volume is shown
    new.mrmlSliceNode().JumpSliceByCentering(*volume_world(volume, (10, 12, 4)))
    app.drag("Red+", app.view_pixel("Red+", volume_world(volume, (6, 12, 4))),
             app.view_pixel("Red+", volume_world(volume, (14, 12, 4))))
    assert slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, "s", volume)[4, 12, 6:15].all()


def test_the_editors_keyboard_shortcuts(app):
    editor, segmentation, volume = paint_ready_editor(app)
    editor.setActiveEffect(None)
    editor.installKeyboardShortcuts()
    assert app.press("1")  # the first effect: Paint
    assert editor.activeEffect() is not None and editor.activeEffect().name() == "Paint"
    app.press("Escape")
    assert editor.activeEffect() is None
    editor.uninstallKeyboardShortcuts()
    app.pump()
    app.press("1")
    assert editor.activeEffect() is None


def test_markups_placement_goes_through_a_preview_point(app):
    """vtkSlicerMarkupsWidget in place mode: the preview point follows the mouse, a click places it, leaving place
    mode removes the preview; a double click places its first click's point, then stops placing and modifies the
    node."""
    import slicer

    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsClosedCurveNode")
    node.CreateDefaultDisplayNodes()
    events = []
    for name in ("PointAddedEvent", "PointPositionDefinedEvent", "PointRemovedEvent", "ModifiedEvent"):
        event = getattr(slicer.vtkMRMLMarkupsNode, name, name)
        node.AddObserver(event, lambda c, e, name=name: events.append(name))
    selection = slicer.app.applicationLogic().GetSelectionNode()
    selection.SetReferenceActivePlaceNodeClassName(node.GetClassName())
    selection.SetActivePlaceNodeID(node.GetID())
    interaction = slicer.app.applicationLogic().GetInteractionNode()
    interaction.SwitchToPersistentPlaceMode()
    app.mouse("Red", "move", 100, 100, button=app.qt.Qt.NoButton)
    assert node.GetNumberOfControlPoints() == 1 and node.GetNthControlPointPositionStatus(0) == node.PositionPreview
    assert events[0] == "PointAddedEvent"
    app.click("Red", 120, 100)
    app.mouse("Red", "move", 140, 110, button=app.qt.Qt.NoButton)
    assert [node.GetNthControlPointPositionStatus(n) for n in range(2)] == [node.PositionDefined, node.PositionPreview]
    del events[:]
    app.double_click("Red", 160, 120)
    assert interaction.GetCurrentInteractionMode() == interaction.ViewTransform
    assert node.GetNumberOfDefinedControlPoints() == 2 and node.GetNumberOfControlPoints() == 2  # no preview left
    assert "PointPositionDefinedEvent" in events and events[-1] == "ModifiedEvent"  # placed, then stopped


def test_place_point_needs_place_mode(app):
    import slicer

    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    defined = []
    node.AddObserver(slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, lambda c, e: defined.append(e))
    with pytest.raises(AssertionError, match="place mode"):
        app.place_point(node, (1, 2, 3))
    selection = slicer.app.applicationLogic().GetSelectionNode()
    selection.SetReferenceActivePlaceNodeClassName(node.GetClassName())
    selection.SetActivePlaceNodeID(node.GetID())
    interaction = slicer.app.applicationLogic().GetInteractionNode()
    interaction.SwitchToSinglePlaceMode()
    app.place_point(node, (1, 2, 3))
    assert defined and node.GetNumberOfControlPoints() == 1
    assert interaction.GetCurrentInteractionMode() == interaction.ViewTransform  # single place mode ends


# ---------------------------------------------------------------------------------------------- the module


def module_buttons(app):
    """Every button of the module's panel (ours, not the Segment Editor stand-in's: it has none)."""
    qt = app.qt
    return [b for b in app.panel.findChildren(qt.QAbstractButton) if b.objectName]


def module_shortcuts(app):
    return [s for s in app.main_window.findChildren(app.qt.QShortcut) if s.isEnabled()]


def place_if_armed(app, ras):
    """What a user does when a tool arms placement: click in a view (a control point where the tool wants it)."""
    import slicer

    interaction = app.application_logic.GetInteractionNode()
    node = slicer.mrmlScene.GetNodeByID(app.application_logic.GetSelectionNode().GetActivePlaceNodeID() or "")
    if interaction.GetCurrentInteractionMode() == interaction.Place and node is not None:
        app.place_point(node, ras)
        return True
    return False


def test_module_without_server():
    """setup, enter, every button, every shortcut, a click in the views whenever a tool arms placement; the
    server URL is one nothing listens on. Which questions the module asks is its business: unanswered ones get
    the negative answer."""
    import slicer

    with SlicerApp(allow_unanswered=True) as app:
        app.qt.QSettings().setValue("SlicerNNInteractive/ServerURL", dead_url())
        widget = app.load_module()  # setup()
        assert app.widget is widget and not app.panel.isEntered
        volume = add_volume()
        ijk_to_ras = slicer.util.vtkMatrixFromArray(np.eye(4))
        volume.GetIJKToRASMatrix(ijk_to_ras)
        center = list(ijk_to_ras.MultiplyPoint([10, 12, 4, 1]))[:3]
        app.enter()
        assert app.panel.isEntered
        app.pump(0.05)

        placed = 0
        for button in module_buttons(app):
            if button.isEnabled():
                app.click(button)
                app.pump(0.05)  # raises on exceptions in callbacks
                placed += place_if_armed(app, center)
                app.drag("Red", app.view_pixel("Red", center), (300, 60))  # a box, should a tool want one
                app.pump(0.05)
        shortcuts = module_shortcuts(app)
        assert shortcuts, "the module installs its shortcuts on enter()"
        fired = []
        for shortcut in shortcuts:
            shortcut.activated.connect(lambda s=shortcut: fired.append(s))
            shortcut.activatedAmbiguously.connect(lambda s=shortcut: fired.append(s))
        for shortcut in shortcuts:
            assert app.press(shortcut.key.toString(), widget=app.main_window)  # key: a property
            app.pump(0.05)
            placed += place_if_armed(app, center)
        assert set(fired) == set(shortcuts), "every shortcut fired through Qt's shortcut map"
        app.pump(0.5)
        assert placed, "some tool armed point placement"

        # nothing raised into Qt (pump checks), and the dead server was reported through Slicer's dialogs
        assert app.shown("error"), [repr(s) for s in app.shown()]
        app.exit()
        assert not app.panel.isEntered
        app.pump(0.05)


def test_reload_and_cleanup(app):
    first = app.load_module()
    app.enter()
    second = app.reload()  # developer-mode Reload: cleanup() of the old widget, a new widget, setup()
    assert second is not first and app.widget is second
    assert app.panel.isEntered  # Reload leaves the module shown; Slicer does not call enter() again
    app.pump(0.05)
    app.exit()
    app.cleanup()  # as on application exit: moduleAboutToBeUnloaded -> cleanup()
    app.pump(0.05)
