"""Stand-in for ``slicer.app`` (qSlicerApplication) and its module manager.

Reproduced: ``applicationLogic()`` (a real vtkSlicerApplicationLogic on ``slicer.mrmlScene``, so
``GetInteractionNode()``/``GetSelectionNode()`` are the scene's real singletons), ``layoutManager()``,
``mrmlScene()``, ``moduleManager()`` (``module(name)``, ``moduleAboutToBeUnloaded(QString)``), ``palette()``
(light, or dark with ``SlicerApp(dark_theme=True)``), ``processEvents()`` (keeping the GIL, as PythonQt does), ``temporaryPath``,
``applicationName``/``majorVersion``/``minorVersion``, ``testingEnabled()`` (False: Slicer's util functions show
their dialogs, which the harness records), ``topLevelWidgets()`` (so Slicer's own ``slicer.util.mainWindow()``
finds the main window by its objectName ``qSlicerMainWindow``), ``setOverrideCursor``/``restoreOverrideCursor``,
``startupEnvironment()`` (a QProcessEnvironment without the launcher's PYTHONHOME/PYTHONPATH/PYTHONNOUSERSITE,
which the harness puts into ``os.environ`` as Slicer's launcher does), ``userSettings()``/``settings()``
(QSettings on the harness's INI file), and the ``aboutToQuit()`` signal (``SlicerApp.quit()`` emits it; the
process's QApplication is not quit).

Not reproduced: the Python console, the module panel's module selection (``slicer.util.selectModule`` needs a
module selector toolbar and fails here), IO manager, DICOM, extensions manager, command options other than
``testingEnabled``, ``restart``/``exit``.
"""

import os

from PySide6 import QtCore, QtGui, QtWidgets


def build(qt):
    class ModuleManager(qt.QObject):
        moduleAboutToBeUnloaded = QtCore.Signal(str)
        moduleLoaded = QtCore.Signal(str)

        def __init__(self):
            qt.QObject.__init__(self)
            self._modules = {}

        def addModule(self, representation):
            self._modules[representation.name] = representation
            self.moduleLoaded.emit(representation.name)

        def module(self, name):
            return self._modules.get(name)

        def modulesNames(self):
            return list(self._modules)

        def factoryManager(self):
            return None

    class SlicerApplication(qt.QObject):
        aboutToQuit = QtCore.Signal()

        def __init__(self, harness):
            qt.QObject.__init__(self)
            self.setObjectName("qSlicerApplication")
            self._harness = harness
            self._moduleManager = ModuleManager()
            self.applicationName = "Slicer"
            self.applicationVersion = "%d.%d.0" % harness.version
            self.majorVersion, self.minorVersion = harness.version
            self.patchVersion = 0
            self.temporaryPath = harness.temporary_path
            self.slicerHome = harness.temporary_path
            self.isInstalled = False
            self.revision = "harness"
            self.releaseType = "Stable"

        # --- MRML
        def applicationLogic(self):
            return self._harness.application_logic

        def mrmlScene(self):
            return self._harness.scene

        def layoutManager(self):
            return self._harness.layout_manager

        def moduleManager(self):
            return self._moduleManager

        # --- Qt application
        def palette(self):
            return QtGui.QPalette(self._harness.palette)

        def processEvents(self, *args):
            import pythonqt_gil

            pythonqt_gil.process_events()  # PythonQt keeps the GIL while Qt dispatches

        def topLevelWidgets(self):
            return QtWidgets.QApplication.topLevelWidgets()

        def activeWindow(self):
            return QtWidgets.QApplication.activeWindow()

        def focusWidget(self):
            return QtWidgets.QApplication.focusWidget()

        def setOverrideCursor(self, cursor):
            QtWidgets.QApplication.setOverrideCursor(QtGui.QCursor(cursor) if not isinstance(cursor, QtGui.QCursor)
                                                     else cursor)

        def restoreOverrideCursor(self):
            QtWidgets.QApplication.restoreOverrideCursor()

        def overrideCursor(self):
            return QtWidgets.QApplication.overrideCursor()

        def keyboardModifiers(self):
            return QtWidgets.QApplication.keyboardModifiers()

        def clipboard(self):
            return QtWidgets.QApplication.clipboard()

        def style(self):
            return QtWidgets.QApplication.style()

        # --- Slicer application
        def testingEnabled(self):
            return False

        def startupEnvironment(self):
            env = QtCore.QProcessEnvironment()
            for key, value in self._harness.startup_environment.items():
                env.insert(key, value)
            return env

        def environment(self):
            env = QtCore.QProcessEnvironment()
            for key, value in os.environ.items():
                env.insert(key, value)
            return env

        def userSettings(self):
            return qt.QSettings()

        def settings(self):
            return qt.QSettings()

        def revisionUserSettings(self):
            return qt.QSettings()

        def pythonConsole(self):
            return None

        def commandOptions(self):
            return None

        def isRelease(self):
            return True

    return SlicerApplication
