"""A main loop that holds the GIL the way Slicer's GUI thread does (DESIGN.md section 8).

Slicer does not enable PythonQt's thread support, so its GUI thread keeps the GIL while it waits in Qt's event
loop; other Python threads run only while GUI-thread Python code runs (a timer callback, an observer) and gives
the GIL up. Here the waiting is one call to libc ``usleep`` through ``ctypes.PyDLL`` (which keeps the GIL) until
the next timer is due, and the timers' callbacks run at their real intervals, as Qt would call them.
"""

import ctypes
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
