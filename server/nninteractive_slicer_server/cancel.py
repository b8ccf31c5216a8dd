"""Cancelling an automatic run between its pieces: one token per run, set by whoever stops it.

An automatic run (``AutoSegmenter.predict``, ``pipeline.run_study``) is cut into pieces on the prediction device
(tiles, folds, export steps). Before each piece it calls ``token.check()``; a cancelled token raises ``RunCancelled``
there, so the run stops at the next boundary and frees what it holds on the way out. Who cancels: a client that went
away, ``POST /x/auto_segment/cancel`` (the lease's run), ``DELETE /jobs/{id}``, a draining server.
"""

import threading

from .errors import Problem


class RunCancelled(Problem):
    """The run was cancelled before it finished (409 for anyone still waiting on its answer)."""

    status = 409


class CancelToken:
    """Thread-safe; ``cancel`` may be called from any thread, any number of times (the first reason is kept)."""

    def __init__(self):
        self._event = threading.Event()
        self.reason = None

    def cancel(self, reason="cancelled"):
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    @property
    def cancelled(self):
        return self._event.is_set()

    def check(self):
        if self._event.is_set():
            raise RunCancelled("the automatic run was cancelled (%s)" % self.reason)


class _Never(CancelToken):
    def cancel(self, reason="cancelled"):
        pass  # shared by every run nobody can cancel: it must never be set


NEVER = _Never()  # the default of runs nobody can cancel (the command-line tools)
