"""``SlicerApp``: puts the stand-ins in place, loads a scripted module as Slicer does and drives it.

    with SlicerApp() as app:
        widget = app.load_module()          # module + widget created, setup() called
        app.enter()                         # isEntered = True, widget.enter()
        app.click(widget.ui.pointButton)    # real QPushButton.click()
        app.press("P")                      # a real key press on the main window: QShortcut fires
        app.pump(0.2)                       # Qt's event loop for 0.2 s, holding the GIL as Slicer does
        app.dialogs.answers.append(True)    # the next question is answered OK / Yes (a dialog's loop runs meanwhile)
        errors = app.shown("error")         # dialogs shown by slicer.util.errorDisplay and friends
        app.reload()                        # developer-mode Reload: cleanup() old, setup() new, no enter()
        app.save_scene(path); app.load_scene(path)  # File > Save as .mrb; opening it again
        app.exit(); app.cleanup()

While active: ``sys.modules`` has ``qt`` (pythonqt.py), ``ctk``, ``qSlicerSegmentationsModuleWidgetsPythonQt`` and
``slicer.ScriptedLoadableModule``; the real ``slicer`` package (slicer-core wheel) gets ``app``, ``mrmlScene``,
``modules``, ``qMRMLWidget``, ``qSlicerScriptedLoadableModule(Widget)`` and ``slicer.util.pip_install`` is
replaced by a recorder (raising unless ``allow_pip`` is set); every other ``slicer.util`` function is Slicer's
own. ``os.environ`` holds the launcher's PYTHONHOME / PYTHONPATH / PYTHONNOUSERSITE (as inside Slicer), QSettings
write to an INI file in a temporary folder, ``sys.excepthook`` records exceptions of callbacks.
On exit all of it is undone: ``slicer`` has its old attributes, ``sys.modules`` its old entries (modules of the
module under test and the stand-ins are removed; third-party modules imported meanwhile stay), ``os.environ``,
``sys.path``, ``sys.excepthook`` and the QSettings format are restored, and windows are closed.

The QApplication is created once per process (offscreen platform unless QT_QPA_PLATFORM is set).
"""

import importlib.util
import os
import shutil
import sys
import tempfile
import types

from PySide6 import QtCore, QtGui, QtTest, QtWidgets

import pythonqt_gil
import slicer
import slicer.util

from . import application, ctkwidgets, dialogs, errors, markups, pythonqt, scriptedmodule, segmenteditor, views

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_MODULE = os.path.join(REPO, "SlicerNNInteractive", "SlicerNNInteractive.py")
LAUNCHER_VARIABLES = ("PYTHONHOME", "PYTHONPATH", "PYTHONNOUSERSITE")
OWN_MODULE_PREFIXES = ("qSlicer", "qMRML", "slicer.")

_QAPP = None


def qapplication():
    """The process's QApplication (created on first use, offscreen unless QT_QPA_PLATFORM is set)."""
    global _QAPP
    app = QtWidgets.QApplication.instance()
    if app is None:
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
        app = QtWidgets.QApplication(["slicerapp"])
    _QAPP = app
    return app


class PipInstallRefused(RuntimeError):
    pass


class SlicerApp(object):
    """The Slicer application around a scripted module, for one test. See the module docstring."""

    def __init__(self, module_path=DEFAULT_MODULE, version=(5, 8), dark_theme=False, launcher_environment=True,
                 allow_pip=False, allow_unanswered=False, edit_undo_action=False):
        self.module_path = os.path.abspath(module_path)
        self.module_name = os.path.splitext(os.path.basename(self.module_path))[0]
        self.version = tuple(version)
        self.dark_theme = dark_theme
        self.launcher_environment = launcher_environment
        self.allow_pip = allow_pip  # False: pip_install raises; True: recorded only; callable: called
        self.allow_unanswered = allow_unanswered
        self.edit_undo_action = edit_undo_action
        self.dialogs = dialogs.DIALOGS
        self.errors = errors.ErrorLog()
        self.pip_requests = []
        self.critical_messages = []  # qCritical() of stand-ins (Slicer prints them to its log)
        self.scene_undo_calls = 0  # triggers of the main window's Edit > Undo (Ctrl+Z) action
        self.shortcut_fallbacks = []
        self._editors = []
        self._active = False
        self._unloaded = False
        self.panel = None

    # ------------------------------------------------------------------ set up / tear down
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.stop(check=exc_type is None)
        return False

    def start(self):
        self.qapp = qapplication()
        self._saved_top_level = set(QtWidgets.QApplication.topLevelWidgets())
        self._saved_modules = dict(sys.modules)
        self._saved_slicer = dict(vars(slicer))
        self._saved_util = dict(vars(slicer.util))
        self._saved_path = list(sys.path)
        self._saved_environ = dict(os.environ)
        self._saved_settings_format = QtCore.QSettings.defaultFormat()
        self._saved_names = (QtCore.QCoreApplication.organizationName(), QtCore.QCoreApplication.organizationDomain(),
                             QtCore.QCoreApplication.applicationName())
        self.tmp = tempfile.mkdtemp(prefix="slicerapp-")
        self.temporary_path = os.path.join(self.tmp, "SlicerTemp")
        os.makedirs(self.temporary_path)
        self._active = True
        try:
            self._install()
        except Exception:
            self.stop(check=False)
            raise

    def _install(self):
        pythonqt.new_generation()
        self.errors.install()
        errors.set_current(self.errors)
        self.dialogs.reset()

        # settings: a fresh INI file (QSettings() in module code and in slicer.util read it)
        QtCore.QSettings.setDefaultFormat(QtCore.QSettings.IniFormat)
        QtCore.QSettings.setPath(QtCore.QSettings.IniFormat, QtCore.QSettings.UserScope,
                                 os.path.join(self.tmp, "settings"))
        QtCore.QCoreApplication.setOrganizationName("slicer.org")
        QtCore.QCoreApplication.setOrganizationDomain("slicer.org")
        QtCore.QCoreApplication.setApplicationName("Slicer")

        # the launcher's environment, as Slicer's processes have it
        self.startup_environment = dict(self._saved_environ)
        for key in LAUNCHER_VARIABLES:
            self.startup_environment.pop(key, None)
        if self.launcher_environment:
            os.environ["PYTHONHOME"] = os.path.join(self.tmp, "Slicer-python-home")
            os.environ["PYTHONPATH"] = os.path.join(self.tmp, "Slicer-lib", "Python", "site-packages")
            os.environ["PYTHONNOUSERSITE"] = "1"

        # modules: qt, ctk and the stand-ins
        self.qt = qt = pythonqt.build_qt_module()
        self.ctk = ctk = ctkwidgets.build(qt)
        sys.modules["qt"] = qt
        sys.modules["ctk"] = ctk

        # MRML: a scene with the logics Slicer's modules register, and the application logic
        self.scene, self.application_logic, self._logics = new_scene()
        if self.dark_theme:
            palette = QtGui.QPalette(QtGui.QColor(45, 45, 45))
            palette.setColor(QtGui.QPalette.Window, QtGui.QColor(45, 45, 45))
        else:
            palette = QtGui.QPalette(QtGui.QColor(240, 240, 240))
            palette.setColor(QtGui.QPalette.Window, QtGui.QColor(240, 240, 240))
        self.palette = palette

        self.placement = markups.Placement(self.scene, self.application_logic)
        LayoutManager = views.build(qt)
        self.layout_manager = LayoutManager(self.scene, self.application_logic, self.placement)
        SlicerApplication = application.build(qt)
        self.app = SlicerApplication(self)

        # main window: central views, a module panel. qSlicerMainWindow.ui (5.6-5.10) defines EditUndoAction with
        # Ctrl+Z but adds it to no menu or toolbar (its toolbar is deleted), so it takes no key press; with
        # edit_undo_action=True it is added to an Edit menu, to test a module against an ambiguous Ctrl+Z.
        self.main_window = qt.QMainWindow()
        self.main_window.setObjectName("qSlicerMainWindow")
        self.main_window.setWindowTitle("3D Slicer (test harness)")
        self.main_window.setCentralWidget(self.layout_manager.container)
        self.module_panel = qt.QDockWidget("Modules", self.main_window)
        self.module_panel.setObjectName("PanelDockWidget")
        self.main_window.addDockWidget(QtCore.Qt.LeftDockWidgetArea, self.module_panel)
        if self.edit_undo_action:
            menu = self.main_window.menuBar().addMenu("Edit")
            self.edit_undo_action = QtGui.QAction("Undo", self.main_window)
            self.edit_undo_action.setObjectName("EditUndoAction")
            self.edit_undo_action.setShortcut(QtGui.QKeySequence("Ctrl+Z"))
            self.edit_undo_action.triggered.connect(self._on_scene_undo)
            menu.addAction(self.edit_undo_action)
        self.main_window.moduleSelector = lambda: _ModuleSelector(self)
        self.main_window.resize(1400, 800)
        self.main_window.show()
        self.main_window.activateWindow()
        self.window_active = QtTest.QTest.qWaitForWindowActive(self.main_window, 2000)

        # the slicer package: application objects on the real package, real util with pip_install recorded
        self.modules = types.ModuleType("slicer.modules")
        for module in loadable_modules(self.scene, self.application_logic, self._logics):
            setattr(self.modules, module.name.lower(), module)
        ModuleRepresentation, ModuleWidgetRepresentation = scriptedmodule.build_representations(qt)
        self._ModuleRepresentation = ModuleRepresentation
        self._ModuleWidgetRepresentation = ModuleWidgetRepresentation
        slm = scriptedmodule.build_module(qt)
        sys.modules["slicer.ScriptedLoadableModule"] = slm
        editor_module = types.ModuleType("qSlicerSegmentationsModuleWidgetsPythonQt")
        editor_module.qMRMLSegmentEditorWidget = segmenteditor.build(qt, self)
        sys.modules["qSlicerSegmentationsModuleWidgetsPythonQt"] = editor_module
        for name, value in (("app", self.app), ("mrmlScene", self.scene), ("modules", self.modules),
                            ("ScriptedLoadableModule", slm), ("qMRMLWidget", ctk.qMRMLWidget),
                            ("qSlicerScriptedLoadableModule", ModuleRepresentation),
                            ("qSlicerScriptedLoadableModuleWidget", ModuleWidgetRepresentation),
                            ("qMRMLSegmentEditorWidget", editor_module.qMRMLSegmentEditorWidget)):
            setattr(slicer, name, value)
        slicer.util.pip_install = self._pip_install

        # a modal dialog that is not routed through exec_ (created by C++): close and record it
        self._modal_guard = QtCore.QTimer()
        self._modal_guard.setInterval(20)
        self._modal_guard.timeout.connect(self._close_modal)
        self._modal_guard.start()

    def stop(self, check=True):
        """Tear down. As Slicer exits: ``aboutToQuit()``, the module is unloaded (``cleanup()``) unless the test
        did it, the scene is cleared; then everything the harness changed is restored. With ``check``, raises for
        exceptions in callbacks and unanswered questions (after restoring)."""
        if not self._active:
            return
        self._active = False
        problems = []
        try:
            if check:
                problems.extend(self._problems())
            if self.panel is not None:
                self.quit()
                if not self._unloaded:
                    self.cleanup()
            QtWidgets.QApplication.processEvents()
            self.scene.Clear(0)
            QtWidgets.QApplication.processEvents()
            if check:
                problems.extend(self._problems("while Slicer exits"))
        finally:
            self._teardown()
        if problems:
            raise problems[0]

    def _problems(self, when=""):
        found = []
        for check in (self.check_errors, self.check_dialogs):
            try:
                check()
            except AssertionError as exc:
                if when:
                    exc.args = ("%s: %s" % (when, exc.args[0]),) + exc.args[1:]
                found.append(exc)
        return found

    def _teardown(self):
        pythonqt.new_generation()
        try:
            self._modal_guard.stop()
        except Exception:
            pass
        for widget in QtWidgets.QApplication.topLevelWidgets():
            if widget not in self._saved_top_level:
                widget.close()
                widget.deleteLater()
        try:
            self.layout_manager.release()
            self.placement.close()
        except Exception:
            pass
        QtWidgets.QApplication.processEvents()
        QtCore.QCoreApplication.sendPostedEvents(None, QtCore.QEvent.DeferredDelete)
        # slicer package and util
        for name in list(vars(slicer)):
            if name not in self._saved_slicer:
                delattr(slicer, name)
        for name, value in self._saved_slicer.items():
            if vars(slicer).get(name, object()) is not value:
                setattr(slicer, name, value)
        for name, value in self._saved_util.items():
            if vars(slicer.util).get(name, object()) is not value:
                setattr(slicer.util, name, value)
        # sys.modules: drop what the harness and the module under test added, put back what they replaced
        ours = self._own_module_names()
        for name in list(sys.modules):
            if name not in self._saved_modules and self._is_own(name, ours):
                del sys.modules[name]
        for name, module in self._saved_modules.items():
            if sys.modules.get(name) is not module:
                sys.modules[name] = module
        sys.path[:] = self._saved_path
        os.environ.clear()
        os.environ.update(self._saved_environ)
        QtCore.QSettings.setDefaultFormat(self._saved_settings_format)
        org, domain, name = self._saved_names
        QtCore.QCoreApplication.setOrganizationName(org)
        QtCore.QCoreApplication.setOrganizationDomain(domain)
        QtCore.QCoreApplication.setApplicationName(name)
        self.errors.uninstall()
        errors.set_current(None)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _own_module_names(self):
        return (self.module_name, self.module_name + "Lib")

    def _is_own(self, name, ours):
        top = name.split(".")[0]
        return name in ("qt", "ctk") or name.startswith(OWN_MODULE_PREFIXES) or top in ours

    # ------------------------------------------------------------------ loading the module
    def load_module(self, setup=True):
        """Import the module file as Slicer does and create its widget (``setup()`` unless setup=False).
        Returns the Python widget (``slicer.modules.<Name>Widget``)."""
        directory = os.path.dirname(self.module_path)
        if directory not in sys.path:
            sys.path.insert(0, directory)  # Slicer adds each scripted module's folder to sys.path
        spec = importlib.util.spec_from_file_location(self.module_name, self.module_path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[self.module_name] = module
        spec.loader.exec_module(module)
        self.representation = representation = self._ModuleRepresentation(self.module_name, self.module_path)
        self.module_instance = getattr(module, self.module_name)(representation)
        setattr(self.modules, self.module_name.lower(), representation)
        self.app.moduleManager().addModule(representation)
        self.panel = self._ModuleWidgetRepresentation(representation)
        representation.widget = self.panel
        self.module_panel.setWidget(self.panel)
        self.panel.setPythonSource(self.module_path)
        if setup:
            self.setup()
        return self.widget

    @property
    def widget(self):
        """The module's current Python widget (a new one after ``reload()``)."""
        return getattr(self.modules, self.module_name + "Widget")

    def setup(self):
        self.panel.setup()

    def enter(self):
        self.panel.enter()

    def exit(self):
        self.panel.exit()

    def cleanup(self):
        """As when Slicer unloads the module (application exit): ``moduleAboutToBeUnloaded(name)`` is emitted and
        ScriptedLoadableModuleWidget calls ``cleanup()``."""
        self._unloaded = True
        self.app.moduleManager().moduleAboutToBeUnloaded.emit(self.module_name)

    def reload(self):
        """Developer-mode Reload (the Reload button calls the widget's ``onReload``)."""
        self.widget.onReload()
        return self.widget

    def quit(self):
        """Emit ``slicer.app``'s ``aboutToQuit()`` (the QApplication keeps running)."""
        self.app.aboutToQuit.emit()

    # ------------------------------------------------------------------ driving
    def press(self, keys, widget=None):
        """Press a key sequence (``"P"``, ``"Ctrl+Z"``) as the user would: a real key event through Qt's shortcut
        machinery, sent to ``widget`` or the focus widget or the main window. A QLineEdit with focus takes plain
        letters, as in Slicer. Returns True when the key went through the real path."""
        sequence = QtGui.QKeySequence(keys)
        combination = sequence[0]
        key = combination.key()
        modifiers = combination.keyboardModifiers()
        self.main_window.activateWindow()
        if not (self.window_active or QtTest.QTest.qWaitForWindowActive(self.main_window, 1000)):
            # Without an active window Qt's shortcut map ignores the key: trigger the shortcuts directly.
            self.shortcut_fallbacks.append(keys)
            for shortcut in self.main_window.findChildren(QtGui.QShortcut):
                if shortcut.key() == sequence and shortcut.isEnabled():
                    shortcut.activated.emit()
            return False
        target = widget or QtWidgets.QApplication.focusWidget() or self.main_window
        QtTest.QTest.keyClick(target, key, modifiers)
        return True

    def mouse(self, view, kind, x, y, button=QtCore.Qt.LeftButton, modifiers=QtCore.Qt.NoModifier):
        """A synthetic mouse event (``"press"``, ``"move"``, ``"release"``, ``"double"``) at widget pixel (x, y) of
        a slice view's VTK widget: through the widget's Qt event filters, then to the view's interactor (views.py).
        Returns whether it was accepted."""
        target = self.layout_manager.sliceWidget(view).sliceView().VTKWidget()
        types_ = {"press": QtCore.QEvent.MouseButtonPress, "release": QtCore.QEvent.MouseButtonRelease,
                  "move": QtCore.QEvent.MouseMove, "double": QtCore.QEvent.MouseButtonDblClick}
        position = QtCore.QPointF(x, y)
        # a move carries the buttons held (``button``: NoButton for a hover), press and release the one button
        buttons = QtCore.Qt.NoButton if kind == "release" else button
        event = QtGui.QMouseEvent(types_[kind], position, target.mapToGlobal(position),
                                  QtCore.Qt.NoButton if kind == "move" else button, buttons, modifiers)
        return QtWidgets.QApplication.sendEvent(target, event)

    def drag(self, view, start, end, steps=4, button=QtCore.Qt.LeftButton):
        self.mouse(view, "move", *start, button=QtCore.Qt.NoButton)
        self.mouse(view, "press", *start, button=button)
        for n in range(1, steps + 1):
            self.mouse(view, "move", start[0] + (end[0] - start[0]) * n / steps,
                       start[1] + (end[1] - start[1]) * n / steps, button=button)
        self.mouse(view, "release", *end, button=button)

    def click(self, button_or_view, x=None, y=None, button=QtCore.Qt.LeftButton):
        """``click(qtButton)``: a real ``QAbstractButton.click()`` (nothing happens when it is disabled, as for a
        user). ``click(view, x, y)``: the mouse moves to widget pixel (x, y) of a slice view, presses and releases."""
        if x is None:
            QtWidgets.QAbstractButton.click(button_or_view)
            return
        self.mouse(button_or_view, "move", x, y, button=QtCore.Qt.NoButton)
        self.mouse(button_or_view, "press", x, y, button=button)
        self.mouse(button_or_view, "release", x, y, button=button)

    def double_click(self, view, x, y):
        """What Qt sends for a double click: press, release, double-click, release."""
        self.click(view, x, y)
        self.mouse(view, "double", x, y)  # (QTest sends the same four)
        self.mouse(view, "release", x, y)

    def view_pixel(self, view, ras):
        """Widget pixel (x, y) of a RAS point in a slice view (the inverse of the view's XY-to-RAS, y flipped)."""
        import vtk

        sliceNode = self.layout_manager.sliceWidget(view).mrmlSliceNode()
        rasToXY = vtk.vtkMatrix4x4()
        vtk.vtkMatrix4x4.Invert(sliceNode.GetXYToRAS(), rasToXY)
        x, y, _, _ = rasToXY.MultiplyPoint(list(ras) + [1.0])
        height = self.layout_manager.sliceWidget(view).sliceView().VTKWidget().height
        return x, height - 1 - y

    def place_point(self, node, ras, view="Red"):
        """Place a control point at a world position as a click in a view does (markups.Placement: the preview point
        follows the mouse there, then the click places it, and single place mode ends). The click must be one that
        Slicer turns into a point: place mode with this node as the active place node."""
        interaction = self.application_logic.GetInteractionNode()
        selection = self.application_logic.GetSelectionNode()
        assert interaction.GetCurrentInteractionMode() == interaction.Place, \
            "a click places no point: the views are not in place mode"
        assert selection.GetActivePlaceNodeID() == node.GetID(), \
            "a click places no point in %s: the active place node is %s" % (node.GetID(),
                                                                            selection.GetActivePlaceNodeID())
        sliceNode = self.layout_manager.sliceWidget(view).mrmlSliceNode()
        self.placement.preview(node, ras, sliceNode)
        return self.placement.place(node, ras, sliceNode)

    def end_placement(self, node=None):
        """What a double-click or right-click does while placing (WidgetEventStopPlace): back to view-transform mode
        (InteractionModeChangedEvent, the preview point removed, EndPlacementEvent), then the node is modified."""
        node = node or self.placement.activeNode()
        if node is None:
            self.application_logic.GetInteractionNode().SwitchToViewTransformMode()
            return
        self.placement.stop(node)

    def pump(self, seconds=0.0, until=None, check=True):
        """Run Qt's event loop for ``seconds`` (or until ``until()`` is true, at most ``seconds``, then raise if it is
        still false), holding the GIL as Slicer's GUI thread does (Testing/pythonqt_gil.run_qt): other Python threads
        advance only while the module's own callbacks give the GIL up. Raises ``CallbackError`` for exceptions in
        callbacks unless check=False."""
        reached = pythonqt_gil.run_qt(seconds, until)
        QtCore.QCoreApplication.sendPostedEvents(None, QtCore.QEvent.DeferredDelete)
        if not reached:
            raise AssertionError("pump: condition not reached in %.1f s" % seconds)
        if check:
            self.check_errors()

    # ------------------------------------------------------------------ scene files
    def save_scene(self, path):
        """File > Save as a .mrb (qSlicerSceneBundleWriter): the application logic writes the scene and its data into
        a folder (SaveSceneToSlicerDataBundleDirectory), which is zipped into ``path``."""
        folder = os.path.join(tempfile.mkdtemp(dir=self.temporary_path), os.path.splitext(os.path.basename(path))[0])
        os.makedirs(folder)
        if not self.application_logic.SaveSceneToSlicerDataBundleDirectory(folder, None):
            raise AssertionError("the scene could not be saved into %s" % folder)
        if not self.application_logic.Zip(path, folder):
            raise AssertionError("the scene could not be zipped into %s" % path)

    def load_scene(self, path):
        """Opening a .mrb (qSlicerSceneBundleReader): the application logic unpacks it and connects the scene to its
        .mrml (OpenSlicerDataBundle: the scene is cleared, then the file imported, with the scene's close, import and
        batch events); Qt's event loop then runs for a moment, as after a load."""
        if not self.application_logic.OpenSlicerDataBundle(path, tempfile.mkdtemp(dir=self.temporary_path)):
            raise AssertionError("the scene %s could not be opened" % path)
        self.pump(0.05)

    # ------------------------------------------------------------------ reading what happened
    def shown(self, kind=None):
        """Dialogs shown so far (``dialogs.Shown``), optionally of one kind: error, warning, info, question,
        message, dialog, file, input."""
        return [s for s in self.dialogs.shown if kind is None or s.kind == kind]

    def check_errors(self):
        found = self.errors.take()
        if found:
            where, exc, text = found[0]
            raise errors.CallbackError("%d exception(s) in callbacks; first in %s:\n%s" % (len(found), where, text))

    def check_dialogs(self):
        unanswered = self.dialogs.unanswered()
        if unanswered and not self.allow_unanswered:
            raise AssertionError("questions shown without a queued answer: %r" % (unanswered,))

    # ------------------------------------------------------------------ internals
    def _pip_install(self, requirements, **kwargs):
        self.pip_requests.append((requirements, kwargs))
        if callable(self.allow_pip):
            return self.allow_pip(requirements, **kwargs)
        if not self.allow_pip:
            raise PipInstallRefused("slicer.util.pip_install(%r) in a test (set allow_pip to allow it)"
                                    % (requirements,))
        return None

    def _on_scene_undo(self, *args):
        self.scene_undo_calls += 1
        self.scene.Undo()

    def _close_modal(self):
        widget = QtWidgets.QApplication.activeModalWidget()
        if widget is not None:
            self.dialogs.shown.append(dialogs.Shown("dialog", QtWidgets.QWidget.windowTitle(widget),
                                                    QtWidgets.QWidget.windowTitle(widget), answered=False))
            widget.close()


class LoadableModule(object):
    """A C++ loadable module as ``slicer.modules.<name>`` shows it: ``name``, ``title``, ``logic()``; no widget."""

    def __init__(self, name, logic):
        self.name = name
        self.title = name
        self._logic = logic

    def logic(self):
        return self._logic

    def widgetRepresentation(self):
        return None


def loadable_modules(scene, appLogic, logics):
    """The C++ modules whose logic Slicer's util.py and module code reach through ``slicer.modules``."""
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLApplicationLogic(appLogic)
    volumes.SetMRMLScene(scene)
    logics.append(volumes)
    segmentations, markups = logics[1], logics[2]
    return [LoadableModule("Segmentations", segmentations), LoadableModule("Markups", markups),
            LoadableModule("Volumes", volumes), LoadableModule("Colors", appLogic.GetColorLogic()),
            LoadableModule("SegmentEditor", None)]


class _ModuleSelector(object):
    """The main window's module selector, for ``slicer.util.selectModule``: selecting the loaded module shows it
    (enter()); no other module exists here."""

    def __init__(self, harness):
        self.harness = harness

    def selectModule(self, name):
        if name != self.harness.module_name:
            raise RuntimeError("no module %s in the test harness" % name)
        if not self.harness.panel.isEntered:
            self.harness.enter()


def new_scene():
    """A MRML scene as Slicer's application sets it up (Testing/mrml.py: application logic with the interaction and
    selection singletons, default color nodes, the segmentations and markups logics): (scene, app logic, logics)."""
    from mrml import new_mrml_scene

    scene = new_mrml_scene()
    return scene, scene._keep[0], scene._keep
