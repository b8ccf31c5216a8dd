"""Stand-ins for the CTK and MRML widget classes that module .ui files and ``slicer.util`` use.

Only what the module's .ui file and Slicer's util.py touch is reproduced:

* ``ctkCollapsibleButton``: a checkable button with the ``collapsed`` property (``collapsed == not checked``);
  collapsing hides its child widgets as CTK does. Not reproduced: painting, ``collapsedHeight``, animation.
* ``ctkPathLineEdit``: a widget with an inner QLineEdit and the ``currentPath`` property and
  ``currentPathChanged(QString)`` signal; ``filters``/``nameFilters``/``settingKey`` are plain properties.
  Not reproduced: the browse button's file dialog, the history combo box, path validation.
* ``ctkMessageBox``: Slicer's ``slicer.util.messageBox`` uses it; a QMessageBox (so ``exec_()`` is recorded, see
  dialogs.py) with the ``dontShowAgainSettingsKey``/``dontShowAgainVisible`` properties (recorded, never
  checked).
* ``qMRMLWidget``: a QWidget with ``setMRMLScene``/``mrmlScene`` and the ``mrmlSceneChanged(vtkMRMLScene*)``
  signal, emitted with the scene as an opaque Python object. Not reproduced: the .ui's scene propagation to child
  MRML widgets (there are none besides the Segment Editor stand-in, which the module sets itself).
"""

import types

from PySide6 import QtCore

from . import pythonqt

_CTK = None


def build(qt):
    """The ``ctk`` module and the ``qMRMLWidget`` class (built once per process), registered with qt.QUiLoader."""
    global _CTK
    if _CTK is not None:
        return _CTK

    class ctkCollapsibleButton(qt.QPushButton):
        contentsCollapsed = QtCore.Signal(bool)

        def __init__(self, *args):
            qt.QPushButton.__init__(self, *args)
            self.setCheckable(True)
            self.setChecked(True)
            self.toggled.connect(self._onToggled)

        def _onToggled(self, checked):
            for child in self.findChildren(qt.QWidget, options=QtCore.Qt.FindDirectChildrenOnly):
                child.setVisible(checked)
            self.contentsCollapsed.emit(not checked)

        def _getCollapsed(self):
            return not self.isChecked()

        def _setCollapsed(self, collapsed):
            self.setChecked(not collapsed)

        collapsed = QtCore.Property(bool, _getCollapsed, _setCollapsed)

    class ctkPathLineEdit(qt.QWidget):
        currentPathChanged = QtCore.Signal(str)

        def __init__(self, *args):
            qt.QWidget.__init__(self, *args)
            layout = qt.QHBoxLayout(self)
            layout.setContentsMargins(0, 0, 0, 0)
            self._lineEdit = qt.QLineEdit()
            layout.addWidget(self._lineEdit)
            self._lineEdit.textChanged.connect(self.currentPathChanged.emit)
            self._filters = 0
            self._nameFilters = []
            self._settingKey = ""

        def _getPath(self):
            return self._lineEdit.text

        def _setPath(self, path):
            self._lineEdit.text = path or ""

        currentPath = QtCore.Property(str, _getPath, _setPath)

        def setCurrentPath(self, path):
            self._setPath(path)

        def addCurrentPathToHistory(self):
            pass

        def lineEdit(self):
            return self._lineEdit

        filters = QtCore.Property(int, lambda self: self._filters, lambda self, v: setattr(self, "_filters", int(v)))
        nameFilters = QtCore.Property("QStringList", lambda self: self._nameFilters,
                                      lambda self, v: setattr(self, "_nameFilters", list(v)))
        settingKey = QtCore.Property(str, lambda self: self._settingKey,
                                     lambda self, v: setattr(self, "_settingKey", v))

    class ctkMessageBox(qt.QMessageBox):
        def __init__(self, *args):
            qt.QMessageBox.__init__(self, *args)
            self._dontShowAgainSettingsKey = ""
            self._dontShowAgainVisible = False

        dontShowAgainSettingsKey = QtCore.Property(
            str, lambda self: self._dontShowAgainSettingsKey,
            lambda self, v: setattr(self, "_dontShowAgainSettingsKey", v))
        dontShowAgainVisible = QtCore.Property(
            bool, lambda self: self._dontShowAgainVisible, lambda self, v: setattr(self, "_dontShowAgainVisible", v))

    class qMRMLWidget(qt.QWidget):
        mrmlSceneChanged = QtCore.Signal(object)

        def __init__(self, *args):
            qt.QWidget.__init__(self, *args)
            self._scene = None

        def setMRMLScene(self, scene):
            if scene is self._scene:
                return
            self._scene = scene
            self.mrmlSceneChanged.emit(scene)

        def mrmlScene(self):
            return self._scene

    ctk = types.ModuleType("ctk", "CTK stand-ins of the test harness (only what module code uses)")
    for cls in (ctkCollapsibleButton, ctkPathLineEdit, ctkMessageBox):
        cls.__module__ = "ctk"
        setattr(ctk, cls.__name__, cls)
        pythonqt.register_widget_class(cls.__name__, cls)
    pythonqt.register_widget_class("qMRMLWidget", qMRMLWidget)
    ctk.qMRMLWidget = qMRMLWidget  # kept here; the harness puts it on the slicer package
    _CTK = ctk
    return ctk
