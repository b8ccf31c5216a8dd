"""Exceptions raised where Slicer only prints them: Qt slots, timer callbacks, event filters, VTK observers.

PythonQt prints such a traceback to Slicer's Python console and carries on; VTK's Python observers do the same
through ``PyErr_Print``, which calls ``sys.excepthook``. While the harness is active it replaces
``sys.excepthook`` with ``ErrorLog.hook`` and routes the callbacks it wraps (see ``pythonqt.call_python``) here,
so a test can fail on them (``SlicerApp.check_errors()`` is called by ``pump`` and at tear-down).
"""

import sys
import traceback


class ErrorLog(object):
    def __init__(self):
        self.errors = []  # (where, exception, formatted traceback)
        self._previous_hook = None

    def report(self, exc_info, where):
        text = "".join(traceback.format_exception(*exc_info))
        self.errors.append((where, exc_info[1], text))
        sys.stderr.write("[slicerapp] exception in %s (Slicer would print it and continue):\n%s" % (where, text))

    def hook(self, exc_type, exc, tb):
        self.report((exc_type, exc, tb), "a callback (sys.excepthook)")

    def install(self):
        self._previous_hook = sys.excepthook
        sys.excepthook = self.hook

    def uninstall(self):
        if self._previous_hook is not None:
            sys.excepthook = self._previous_hook
            self._previous_hook = None

    def take(self):
        errors, self.errors = self.errors, []
        return errors


_current = None  # the active harness's ErrorLog


def set_current(log):
    global _current
    _current = log


def report_exception(exc_info, where):
    if _current is not None:
        _current.report(exc_info, where)
    else:
        traceback.print_exception(*exc_info)


class CallbackError(AssertionError):
    """Raised in the test for exceptions that Slicer would only have printed."""
