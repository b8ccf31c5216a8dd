"""One call on a background thread, collected by the caller's thread (Slicer: a timer on the GUI thread).

Each ``poll()`` also hands the GIL to the thread for a moment: in Slicer the GUI thread keeps the GIL while idle
(PythonQt runs without thread support), so the call advances only while GUI-thread Python runs and sleeps.
"""

import threading
import time

YIELD_SECONDS = 0.001


class BackgroundCall(object):
    """``fn()`` on a daemon thread. ``poll()`` returns True once it ended; then ``result`` or ``error`` is set."""

    def __init__(self, fn):
        self.result = None
        self.error = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name="nninteractive-call")
        self._thread.daemon = True
        self._thread.start()

    def _run(self, fn):
        try:
            self.result = fn()
        except Exception as exc:
            self.error = exc

    def poll(self):
        if self._thread.is_alive():
            time.sleep(YIELD_SECONDS)
        return not self._thread.is_alive()
