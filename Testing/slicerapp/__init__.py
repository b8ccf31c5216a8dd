"""A test harness that runs a Slicer scripted module's widget outside Slicer.

Real parts: Qt (PySide6, behind a PythonQt-like ``qt`` module), Slicer's MRML, segmentation, markups and
segment-editor logic and Slicer's own ``slicer/util.py`` (slicer-core wheel), and the module's own code.
Stand-ins: only Slicer's application widgets, which have no wheel (application, layout manager and slice views,
Segment Editor widget, CTK widgets, the scripted-module loader). Each stand-in module's docstring says what
it does not reproduce.

Modules, one job each:
  pythonqt        the ``qt`` module: PythonQt semantics on PySide6
  dialogs         modal dialogs recorded, questions answered from a queue
  errors          exceptions in callbacks recorded (Slicer prints them)
  ctkwidgets      ``ctk`` and ``qMRMLWidget`` stand-ins
  views           layout manager and slice views on real slice nodes
  segmenteditor   ``qMRMLSegmentEditorWidget`` on the real editor node and segmentation history
  scriptedmodule  ``slicer.ScriptedLoadableModule`` and the module / module-widget representations
  application     ``slicer.app``
  harness         ``SlicerApp``: installs all of it, loads the module, drives it, tears down
"""

from .harness import DEFAULT_MODULE, PipInstallRefused, SlicerApp, qapplication  # noqa: F401
from .errors import CallbackError  # noqa: F401
