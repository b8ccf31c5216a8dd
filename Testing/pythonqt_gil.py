"""A main loop that holds the GIL the way Slicer's GUI thread does (DESIGN.md section 8).

Slicer does not enable PythonQt's thread support, so its GUI thread keeps the GIL while it waits in Qt's event
loop; other Python threads run only while GUI-thread Python code runs (a timer callback, an observer) and gives
the GIL up. Here the waiting is one call to libc ``usleep`` through ``ctypes.PyDLL`` (which keeps the GIL) until
the next timer is due, and the timers' callbacks run at their real intervals, as Qt would call them (``run``); and,
for the Qt harness (Testing/slicerapp), Qt's own event loop entered through ``ctypes.PyDLL`` (``run_qt``).
"""

import ctypes
import os
import time

_LIBC = ctypes.PyDLL(None)  # PyDLL: the call keeps the GIL (ctypes.CDLL would release it)
_LIBC.usleep.argtypes = [ctypes.c_uint]


def hold_gil(seconds):
    """Wait ``seconds`` without giving the GIL up, like Qt's event loop under PythonQt."""
    if seconds > 0:
        _LIBC.usleep(int(seconds * 1e6))


def run(timers, until=None, seconds=60.0, gil_held=True):
    """Call ``timer.fire()`` every ``timer.interval_ms()`` ms (None: stopped) until ``until()`` is true or
    ``seconds`` have passed; wait in between holding the GIL (``gil_held``) or, for comparison, with a plain
    ``time.sleep`` that lets threads run freely. Returns True when ``until()`` became true."""
    wait = hold_gil if gil_held else time.sleep
    deadline = time.monotonic() + seconds
    due = {id(t): time.monotonic() for t in timers}
    while True:
        if until is not None and until():
            return True
        now = time.monotonic()
        if now > deadline:
            return False
        next_due = deadline
        for t in timers:
            interval = t.interval_ms()
            if interval is None:  # stopped: no Python runs for it
                due[id(t)] = now
                continue
            if now >= due[id(t)]:
                t.fire()
                due[id(t)] = time.monotonic() + interval / 1e3
            next_due = min(next_due, due[id(t)])
        wait(max(0.0, next_due - time.monotonic()))


class ControllerTimer(object):
    """The module's timer over a Controller: fires ``tick`` every ``tick_interval_ms``."""

    def __init__(self, controller):
        self.controller = controller

    def interval_ms(self):
        return self.controller.tick_interval_ms()

    def fire(self):
        self.controller.tick()


# --- Qt's own event loop, holding the GIL as PythonQt does

HELD_SWITCH_INTERVAL = 0.5  # s: while the harness loop waits, a thread that wants the GIL gets it only voluntarily
WAKE_MS = 10  # the loop wakes this often to check its deadline and condition (a timer with no Python slot)
_process_events = []


def _qt_process_events():
    """QCoreApplication::processEvents(flags), the C++ function called through ctypes.PyDLL, or None where PySide6's
    Qt library cannot be found. PySide6's own binding releases the GIL inside it; PythonQt does not."""
    if not _process_events:
        import PySide6

        fn = None
        path = os.path.join(os.path.dirname(PySide6.__file__), "Qt", "lib", "libQt6Core.so.6")
        if os.path.exists(path):
            fn = ctypes.PyDLL(path)["_ZN16QCoreApplication13processEventsE6QFlagsIN10QEventLoop17ProcessEventsFlagEE"]
            fn.argtypes, fn.restype = [ctypes.c_int], None
        _process_events.append(fn)
    return _process_events[0]


def process_events(wait=False):
    """One pass of Qt's event loop on this (the GUI) thread without giving the GIL up: timers, posted and window
    events, and the Python callbacks they call. ``wait``: first block until an event arrives (keep a timer running)."""
    from PySide6 import QtCore

    flags = QtCore.QEventLoop.ProcessEventsFlag.AllEvents
    if wait:
        flags = flags | QtCore.QEventLoop.ProcessEventsFlag.WaitForMoreEvents
    fn = _qt_process_events()
    if fn is None:  # no Qt library to call: PySide6's binding (threads then run while it waits) and a held pause
        QtCore.QCoreApplication.processEvents(flags)
        hold_gil(WAKE_MS / 1e3 if wait else 0)
        return
    fn(int(flags.value) if hasattr(flags, "value") else int(flags))


def run_qt(seconds=0.0, until=None):
    """Run Qt's event loop as Slicer's GUI thread does: it waits in C++ holding the GIL, so other Python threads run
    only while a Python callback gives the GIL up (``time.sleep``, blocking calls). Until ``until()`` is true (checked
    after every event) or ``seconds`` have passed; returns ``until()`` (or True without one). The switch interval is
    raised meanwhile, so that the loop's own checks give no thread a turn (Slicer's loop runs no Python)."""
    import sys

    from PySide6 import QtCore

    deadline = time.monotonic() + seconds
    wake = QtCore.QTimer()
    wake.setInterval(WAKE_MS)
    wake.start()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(HELD_SWITCH_INTERVAL)
    try:
        process_events(wait=False)
        while True:
            if until is not None and until():
                return True
            if time.monotonic() >= deadline:
                return until is None
            process_events(wait=True)
    finally:
        sys.setswitchinterval(interval)
        wake.stop()
