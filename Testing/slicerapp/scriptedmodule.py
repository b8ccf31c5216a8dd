"""``slicer.ScriptedLoadableModule`` and the application objects that load a scripted module, as in Slicer 5.8.

Stand-ins for Slicer's Base/Python/slicer/ScriptedLoadableModule.py (v5.8.0) — its classes, same semantics:

* ``ScriptedLoadableModule(parent)``: sets ``parent.title``/``categories``/... defaults, ``moduleName``, the
  icon from Resources/Icons/<name>.png, registers ``slicer.selfTests[name]``; ``resourcePath``; ``runTest``.
* ``ScriptedLoadableModuleWidget(parent)``: ``moduleName``, ``developerMode`` (from the Developer/DeveloperMode
  setting), ``self.parent`` = the given widget (or a new qMRMLWidget with a QVBoxLayout, then ``setup()`` and
  ``show()`` as in Slicer), ``self.layout`` = parent.layout(), connects ``moduleAboutToBeUnloaded(QString)`` of
  the module manager to call ``cleanup()``; ``resourcePath`` via ``slicer.util.modulePath``; ``setup()`` (the
  developer section is built only in developer mode and then only records that it was asked for);
  ``onReload()`` calls Slicer's real ``slicer.util.reloadScriptedModule``, which re-imports the file, hides the
  old widget's children, calls the old widget's ``cleanup()``, removes the layout items and calls
  ``parent.reload()``: a new widget instance and ``setup()``, not ``enter()``.
* ``ScriptedLoadableModuleLogic``: ``moduleName``, ``isSingletonParameterNode``, ``getParameterNode``,
  ``getAllParameterNodes``, ``createParameterNode``.
* ``ScriptedLoadableModuleTest``: a unittest.TestCase with ``delayDisplay`` (-> slicer.util.delayDisplay, i.e.
  recorded), ``takeScreenshot`` (recorded, no image), ``messageDelay``.

Application side (C++ in Slicer): ``ModuleRepresentation`` plays qSlicerScriptedLoadableModule
(``slicer.modules.<name lower>``: ``name``, ``path``, ``title``..., ``widgetRepresentation()``) and
``ModuleWidgetRepresentation`` plays qSlicerScriptedLoadableModuleWidget: a QWidget with a QVBoxLayout and the
``isEntered`` property; ``setPythonSource`` instantiates ``<Module>Widget(self)`` from the module already in
``sys.modules`` and stores it as ``slicer.modules.<Module>Widget``; ``setup()``/``enter()``/``exit()`` call the
Python methods (enter/exit toggle ``isEntered`` first, as qSlicerAbstractModuleWidget does); ``reload()`` =
setPythonSource + setup. ``self()`` returns the Python widget.

Not reproduced: the Reload/Test/Edit buttons of developer mode, translations (``slicer.i18n``), module
dependencies, the module panel and its help/acknowledgement section, lazy widget creation when the module is
first selected (the harness creates it when asked), ``qSlicerScriptedLoadableModule``'s own Python
``setup()`` hook.
"""

import importlib
import logging
import os
import sys
import types
import unittest

from PySide6 import QtCore

import slicer


def build_module(qt):
    """The ``slicer.ScriptedLoadableModule`` module object."""
    mod = types.ModuleType("slicer.ScriptedLoadableModule", __doc__)

    class ScriptedLoadableModule(object):
        def __init__(self, parent):
            super().__init__()
            self.parent = parent
            self.moduleName = self.__class__.__name__
            parent.title = ""
            parent.categories = []
            parent.dependencies = []
            parent.contributors = ["Andras Lasso (PerkLab, Queen's University), Steve Pieper (Isomics)"]
            parent.helpText = "This module was created from a template and the help section has not yet been updated."
            parent.acknowledgementText = "This work is supported by NA-MIC, NAC, BIRN, NCIGT, and the Slicer Community."
            moduleDir = os.path.dirname(self.parent.path)
            for ext in (".svg", ".png"):
                iconPath = os.path.join(moduleDir, "Resources/Icons", self.moduleName + ext)
                if os.path.isfile(iconPath):
                    parent.icon = qt.QIcon(iconPath)
                    break
            try:
                slicer.selfTests
            except AttributeError:
                slicer.selfTests = {}
            slicer.selfTests[self.moduleName] = self.runTest

        def resourcePath(self, filename):
            return os.path.join(os.path.dirname(self.parent.path), "Resources", filename)

        def getDefaultModuleDocumentationLink(self, docPage=None):
            return "<p>For more information, see the online documentation.</p>"

        def runTest(self, msec=100, **kwargs):
            module = importlib.import_module(self.__module__)
            className = self.moduleName + "Test"
            try:
                TestCaseClass = getattr(module, className)
            except AttributeError:
                raise AssertionError("Test case class not found: %s.%s " % (self.__module__, className))
            testCase = TestCaseClass()
            testCase.messageDelay = msec
            testCase.runTest(**kwargs)

    class ScriptedLoadableModuleWidget(object):
        def __init__(self, parent=None):
            super().__init__()
            self.moduleName = self.__class__.__name__
            if self.moduleName.endswith("Widget"):
                self.moduleName = self.moduleName[:-6]
            self.developerMode = slicer.util.settingsValue("Developer/DeveloperMode", False,
                                                           converter=slicer.util.toBool)
            if not parent:
                self.parent = slicer.qMRMLWidget()
                self.parent.setLayout(qt.QVBoxLayout())
                self.parent.setMRMLScene(slicer.mrmlScene)
            else:
                self.parent = parent
            self.layout = self.parent.layout()
            if not parent:
                self.setup()
                self.parent.show()
            slicer.app.moduleManager().connect("moduleAboutToBeUnloaded(QString)", self._onModuleAboutToBeUnloaded)

        def resourcePath(self, filename):
            return os.path.join(os.path.dirname(slicer.util.modulePath(self.moduleName)), "Resources", filename)

        def cleanup(self):
            pass

        def _onModuleAboutToBeUnloaded(self, moduleName):
            if moduleName == self.moduleName:
                self.cleanup()
                slicer.app.moduleManager().disconnect("moduleAboutToBeUnloaded(QString)",
                                                      self._onModuleAboutToBeUnloaded)

        def setupDeveloperSection(self):
            if not self.developerMode:
                return
            self.developerSectionRequested = True  # the Reload/Test buttons are not built by the harness

        def setup(self):
            self.setupDeveloperSection()

        def onReload(self):
            print("\n" * 2)
            print("-" * 30)
            print("Reloading module: " + self.moduleName)
            print("-" * 30)
            print("\n" * 2)
            slicer.util.reloadScriptedModule(self.moduleName)

        def onTest(self, **kwargs):
            with slicer.util.tryWithErrorDisplay("Test failed."):
                slicer.selfTests[self.moduleName](msec=0, **kwargs)

        def onReloadAndTest(self, **kwargs):
            with slicer.util.tryWithErrorDisplay("Reload and Test failed."):
                self.onReload()
                slicer.selfTests[self.moduleName](msec=0, **kwargs)

    class ScriptedLoadableModuleLogic(object):
        def __init__(self, parent=None):
            super().__init__()
            self.moduleName = self.__class__.__name__
            if self.moduleName.endswith("Logic"):
                self.moduleName = self.moduleName[:-5]
            self.isSingletonParameterNode = True

        def getParameterNode(self):
            if self.isSingletonParameterNode:
                node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
                if node:
                    if node.GetAttribute("ModuleName") != self.moduleName:
                        node.SetAttribute("ModuleName", self.moduleName)
                    return node
            else:
                for node in self.getAllParameterNodes():
                    return node
            return slicer.mrmlScene.AddNode(self.createParameterNode())

        def getAllParameterNodes(self):
            nodes = []
            for i in range(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode")):
                node = slicer.mrmlScene.GetNthNodeByClass(i, "vtkMRMLScriptedModuleNode")
                if node.GetAttribute("ModuleName") == self.moduleName:
                    nodes.append(node)
            return nodes

        def createParameterNode(self):
            if slicer.mrmlScene is None:
                return None
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            if self.isSingletonParameterNode:
                node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def __init__(self, *args, **kwargs):
            self.moduleTestNames = []
            super().__init__(*args, **kwargs)
            self.enableScreenshots = False
            self.screenshotScaleFactor = 1.0
            self.messageDelay = 50
            self.screenshots = []

        def delayDisplay(self, message, requestedDelay=None, msec=None):
            msec = msec if msec is not None else (requestedDelay if requestedDelay is not None else self.messageDelay)
            slicer.util.delayDisplay(message, msec)

        def takeScreenshot(self, name, description, type=-1):
            self.screenshots.append((name, description, type))

        def runTest(self):
            pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        cls.__module__ = mod.__name__
        setattr(mod, cls.__name__, cls)
    mod.__all__ = ["ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                   "ScriptedLoadableModuleTest"]
    return mod


def build_representations(qt):
    class ModuleWidgetRepresentation(qt.QWidget):
        """qSlicerScriptedLoadableModuleWidget."""

        def _getEntered(self):
            return self._entered

        isEntered = QtCore.Property(bool, _getEntered)

        def __init__(self, module, parent=None):
            qt.QWidget.__init__(self, parent)
            self._entered = False
            self._module = module
            self._self = None
            self.setObjectName(module.name + "ModuleWidget")
            self.setLayout(qt.QVBoxLayout())

        def setPythonSource(self, filePath):
            moduleName = os.path.splitext(os.path.basename(filePath))[0]
            className = moduleName + "Widget"
            pyModule = sys.modules.get(moduleName)
            if pyModule is None or not hasattr(pyModule, className):
                raise RuntimeError("class %s was not found in %s" % (className, filePath))
            self._self = getattr(pyModule, className)(self)
            setattr(slicer.modules, className, self._self)
            return True

        def pythonSource(self):
            return self._module.path

        def self(self):
            return self._self

        def setup(self):
            self._self.setup()

        def enter(self):
            self._entered = True
            if hasattr(self._self, "enter"):
                self._self.enter()

        def exit(self):
            self._entered = False
            if hasattr(self._self, "exit"):
                self._self.exit()

        def reload(self):
            if not os.path.exists(self._module.path):
                return
            self.setPythonSource(self.pythonSource())
            self.setup()

        def module(self):
            return self._module

    class ModuleRepresentation(object):
        """qSlicerScriptedLoadableModule: what ``slicer.modules.<name lower>`` is."""

        def __init__(self, name, path):
            self.name = name
            self.path = path
            self.title = ""
            self.categories = []
            self.dependencies = []
            self.contributors = []
            self.helpText = ""
            self.acknowledgementText = ""
            self.icon = None
            self.hidden = False
            self.widget = None
            self.pythonModule = None

        def widgetRepresentation(self):
            return self.widget

        def createNewWidgetRepresentation(self):
            return self.widget

        def logic(self):
            return None

    return ModuleRepresentation, ModuleWidgetRepresentation


log = logging.getLogger("slicerapp")
