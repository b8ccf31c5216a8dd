"""The prediction device's one queue: a single thread runs every piece of device work, interactive work first.

Two kinds of work share the thread (the device is one resource; cuDNN's autotuning cache is thread-local, so the
thread that warmed the model up is the one that predicts):

* **interactive** (``run(fn, owner=lease)``): a prompt's prediction, run whole. Interactive predictions run in the
  order they came, and always before any automatic piece that waits;
* **automatic** (``run_pieces(steps, owner, cancel)``): a whole-volume model cut into pieces. ``steps(run)`` returns
  a generator; each ``next()`` on it is one piece (a sliding-window tile, the start or end of a fold, one class of
  the export) and runs on the prediction thread. A prompt that arrives during a run therefore waits at most for
  the piece in progress. Several automatic runs share what prompts leave **round-robin**: one piece of each run in
  turn, in the order the runs came, so that a long batch run never holds a short one back for its whole length.

Right after a prompt's prediction, automatic work waits a moment (``ANTICIPATE_S``) for the next prompt before it
resumes: a user clicking one point after another sends the next prompt as soon as the answer arrives, and without
that moment it would find a fresh automatic piece started every time (and wait for all of it). A prompt arriving
in that moment runs at once; otherwise automatic work resumes after it, so it costs automatic runs at most that
moment per prompt.

Code between two ``yield`` of a run is one piece: it must not keep a thread-local torch mode (``inference_mode``,
``autocast``, the thread count) across a ``yield``, since prompts and other runs execute in between.

Cancel: before each piece the run's ``cancel.CancelToken`` is checked; a cancelled run is closed on the prediction
thread (its generator's ``finally`` blocks free what it holds) and its caller gets ``RunCancelled``.

Positions (``position(owner)``, for ``/x/queue``, the agent weight and the metrics) count what really runs before:
for a prompt, the interactive predictions ahead of it and the automatic piece running (never the automatic pieces
waiting); for an automatic run, every interactive prediction queued, the piece running and one piece of each run
ahead of it in the rotation.
"""

import concurrent.futures
import contextvars
import logging
import threading
import time
from collections import deque

from .cancel import NEVER, CancelToken, RunCancelled

log = logging.getLogger("nninteractive_slicer_server")

# After a prompt, how long automatic work waits for that user's next prompt (an answer's way back to the client, its
# next request's way in: a few ms on a LAN, tens over a WAN or on a loaded server)
ANTICIPATE_S = 0.05


class _Ticket:
    """One interactive prediction."""

    __slots__ = ("owner", "fn", "args", "context", "queued_at", "started_at", "waited", "future")

    def __init__(self, owner, fn, args):
        self.owner, self.fn, self.args = owner, fn, args
        self.context = contextvars.copy_context()  # the request id of the log lines written on the prediction thread
        self.queued_at = time.perf_counter()
        self.started_at = None
        self.waited = 0.0
        self.future = concurrent.futures.Future()  # (result, seconds waited), or what fn raised


class AutoRun:
    """One automatic run in the queue: its generator of pieces, progress and times. The generator gets it as
    ``steps(run)`` and tells how many pieces it expects (``expect``) and which phase it is in (``phase``); the
    caller reads the times afterwards: ``waited`` (s spent ready but not running), ``ran`` (s per phase),
    ``longest`` (s of its longest piece: the most a prompt waited for it)."""

    def __init__(self, owner, cancel, what):
        self.owner, self.cancel, self.what = owner, cancel, what
        self.expected = 0  # pieces announced so far (the generator adds as it learns: tiles, then classes)
        self.done = 0  # pieces run
        self.phase = "predict"
        self.ran = {}
        self.waited = 0.0
        self.longest = 0.0
        self.running = False  # a piece of it is running now
        self.result = self.error = None
        self.finished = threading.Event()
        self._gen = None
        self._context = contextvars.copy_context()
        self._ready_at = time.perf_counter()

    def expect(self, pieces):
        """Announce ``pieces`` more pieces to come (for positions; never needs to be exact)."""
        self.expected += max(0, int(pieces))

    @property
    def remaining(self):
        return max(1, self.expected - self.done)

    @property
    def started(self):
        return self.done > 0 or self.running


class DeviceQueue:
    """The one prediction thread and what waits for it (see the module docstring). ``initializer(*initargs)`` runs
    once on the thread (the current CUDA device is per thread). ``listeners`` are called with (seconds waited,
    seconds run) after each interactive prediction (the metrics)."""

    RECENT = 20  # interactive predictions in the moving average
    RECENT_PIECES = 50  # automatic pieces in theirs

    def __init__(self, initializer=None, initargs=(), name="nninteractive-gpu", anticipate_s=ANTICIPATE_S):
        self._initializer, self._initargs, self._name = initializer, tuple(initargs), name
        self._anticipate_s = float(anticipate_s)
        self._anticipate_until = None  # after a prompt: automatic work waits until then for the next prompt
        self._cv = threading.Condition()
        self._interactive = deque()  # _Ticket, in order; the first may be running
        self._runs = deque()  # AutoRun, in rotation order; the first gets the next automatic piece
        self._current = None  # what runs now: a _Ticket or an AutoRun
        self._current_started = None
        self._recent = deque(maxlen=self.RECENT)
        self._recent_pieces = deque(maxlen=self.RECENT_PIECES)
        self._thread = None
        self._closing = False
        self.listeners = []

    # ------------------------------------------------------------------ submitting

    def submit(self, fn, *args, owner=None):
        """Queue ``fn(*args)`` for the prediction thread, before any automatic piece; returns a
        ``concurrent.futures.Future`` of (result, seconds waited). ``owner`` (the lease) names it for ``position``.
        The event loop awaits it (``asyncio.wrap_future``) without a worker thread in between."""
        ticket = _Ticket(owner, fn, args)
        with self._cv:
            self._admit()
            self._interactive.append(ticket)
            self._cv.notify()
        return ticket.future

    def run(self, fn, *args, owner=None):
        """``submit``, waiting in this thread: returns (result, seconds waited), or raises what ``fn`` raised."""
        return self.submit(fn, *args, owner=owner).result()

    def run_pieces(self, steps, owner=None, cancel=None, what="an automatic run", expected=0):
        """Run the generator ``steps(run)`` piece by piece on the prediction thread (see the module docstring);
        returns ``(value it returned, run)``. Raises what a piece raised, or ``RunCancelled``. ``expected``: the
        pieces it will take, as far as known before it starts (for positions)."""
        run = AutoRun(owner, cancel or NEVER, what)
        run.expect(expected)
        run.cancel.check()
        run._gen = steps(run)
        with self._cv:
            self._admit()
            self._runs.append(run)
            self._cv.notify()
        run.finished.wait()
        if run.error is not None:
            raise run.error
        return run.result, run

    def _admit(self):
        if self._closing:
            raise RuntimeError("the prediction thread is shut down")
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()

    def shutdown(self, wait=True):
        """Stop the thread: interactive predictions queued still run, automatic runs are cancelled."""
        with self._cv:
            self._closing = True
            self._cv.notify()
            thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()

    # ------------------------------------------------------------------ the prediction thread

    def _loop(self):
        if self._initializer is not None:
            try:
                self._initializer(*self._initargs)
            except Exception:
                log.exception("the prediction thread's initializer failed")
        while True:
            with self._cv:
                while not self._interactive and not self._runs and not self._closing:
                    self._cv.wait()
                while not self._interactive and not self._closing and self._anticipate_until is not None:
                    left = self._anticipate_until - time.perf_counter()
                    if left <= 0:
                        break
                    self._cv.wait(left)  # the next prompt, or the moment's end
                self._anticipate_until = None
                if self._interactive:
                    item = self._interactive[0]
                elif self._runs:
                    item = self._runs[0]
                    if self._closing:
                        item.cancel = _shutting_down()
                else:
                    return  # closing and nothing left
                self._current, self._current_started = item, time.perf_counter()
                if isinstance(item, AutoRun):
                    item.running = True
            if isinstance(item, _Ticket):
                self._interactive_step(item)
            else:
                self._automatic_step(item)

    def _interactive_step(self, ticket):
        ticket.started_at = time.perf_counter()
        ticket.waited = ticket.started_at - ticket.queued_at
        result = error = None
        started = ticket.future.set_running_or_notify_cancel()  # False: its request was cancelled while it waited
        if started:
            try:
                result = ticket.context.run(ticket.fn, *ticket.args)
            except BaseException as exc:  # handed to the caller, whatever it is
                error = exc
        ran = time.perf_counter() - ticket.started_at
        with self._cv:
            self._interactive.popleft()
            self._current = None
            if started:
                self._recent.append(ran)
                self._anticipate_until = time.perf_counter() + self._anticipate_s
        if not started:
            return
        if error is not None:
            ticket.future.set_exception(error)
        else:
            ticket.future.set_result((result, ticket.waited))
        del error  # the exception's traceback holds this frame
        for listener in list(self.listeners):
            try:
                listener(ticket.waited, ran)
            except Exception:
                log.exception("error in a prediction listener")

    def _automatic_step(self, run):
        started = time.perf_counter()
        run.waited += started - run._ready_at
        finished = False
        try:
            run.cancel.check()
            run._context.run(next, run._gen)
        except StopIteration as stop:
            run.result, finished = stop.value, True
        except RunCancelled as exc:
            run.error, finished = exc, True
            self._close(run)
        except BaseException as exc:
            run.error, finished = exc, True
        ended = time.perf_counter()
        run.ran[run.phase] = run.ran.get(run.phase, 0.0) + (ended - started)
        run.longest = max(run.longest, ended - started)
        run._ready_at = ended
        with self._cv:
            run.running = False
            self._current = None
            if finished:
                self._runs.remove(run)
            else:
                run.done += 1
                self._recent_pieces.append(ended - started)
                if self._runs and self._runs[0] is run:
                    self._runs.rotate(-1)  # round-robin: the next run gets the next automatic piece
        if finished:
            if isinstance(run.error, RunCancelled):  # logged with its request's id
                run._context.run(log.info, "%s cancelled (%s) after %d of about %d pieces", run.what,
                                 run.cancel.reason, run.done, run.expected)
            run._gen = None  # what the generator's frame held goes with it
            run.finished.set()

    @staticmethod
    def _close(run):
        """Close a cancelled run's generator here, on the prediction thread: its ``finally`` blocks free what it
        holds on the device."""
        try:
            run._context.run(run._gen.close)
        except Exception:
            log.exception("error while closing a cancelled automatic run")

    # ------------------------------------------------------------------ what clients see

    def __len__(self):
        """What a prediction sent now would wait behind: interactive predictions queued or running, and the
        automatic piece running (automatic pieces that wait never go before a prompt)."""
        with self._cv:
            return len(self._interactive) + (1 if isinstance(self._current, AutoRun) else 0)

    def automatic_runs(self):
        """``(runs in progress, pieces they have left)``."""
        with self._cv:
            return len(self._runs), sum(r.remaining for r in self._runs)

    def mean_seconds(self):
        """Moving average of the last interactive predictions' durations; None before the first."""
        with self._cv:
            return _mean(self._recent)

    def position(self, owner):
        """Where ``owner``'s work stands: ``{"ahead", "expected_wait_seconds", "running", "waiting", "queued"}``.

        * an interactive prediction of ``owner`` queued: ``ahead`` counts the interactive predictions before it and
          the automatic piece running; ``running`` while it runs;
        * else an automatic run of ``owner``: ``ahead`` counts what runs before its next piece (every interactive
          prediction queued, and one piece of each run before it in the rotation, the one running included; 0
          while its own piece runs); ``running`` once it has started; ``pieces: {"done", "expected"}``;
        * else what a prediction sent now would face (``waiting`` false).

        ``expected_wait_seconds``: until that starts, from the moving averages of interactive predictions and of
        automatic pieces, less what the one running has already run; null while what is ahead was never timed.
        ``queued``: interactive predictions queued or running plus the pieces automatic runs have left."""
        now = time.perf_counter()
        with self._cv:
            tickets, runs = list(self._interactive), list(self._runs)
            current, elapsed = self._current, now - (self._current_started or now)
            mean, mean_piece = _mean(self._recent), _mean(self._recent_pieces)
            progress = {id(r): (r.done, r.expected, r.started) for r in runs}
            queued = len(tickets) + sum(r.remaining for r in runs)
        mine = next((i for i, t in enumerate(tickets) if t.owner is owner), None) if owner is not None else None
        run = next((r for r in runs if r.owner is owner), None) if owner is not None and mine is None else None
        piece_running = isinstance(current, AutoRun)
        out = {}
        if mine is not None:
            ahead, pieces, running = tickets[:mine], [current] if piece_running else [], tickets[mine] is current
        elif run is not None:
            done, expected, running = progress[id(run)]
            ahead, pieces = ([], []) if current is run else (tickets, runs[:runs.index(run)])
            out["pieces"] = {"done": done, "expected": max(expected, done + 1)}
        else:
            ahead, pieces, running = tickets, [current] if piece_running else [], False
        wait = 0.0
        for t in ahead:
            wait = None if wait is None or mean is None else wait + max(0.0, mean - (elapsed if t is current else 0))
        for r in pieces:
            wait = None if wait is None or mean_piece is None else \
                wait + max(0.0, mean_piece - (elapsed if r is current else 0))
        if mean is None and mean_piece is None:
            wait = None  # nothing was ever timed
        out.update({"ahead": len(ahead) + len(pieces),
                    "expected_wait_seconds": None if wait is None else round(wait, 3),
                    "running": bool(running), "waiting": (mine is not None or run is not None) and not running,
                    "queued": queued})
        return out


def _mean(values):
    return sum(values) / len(values) if values else None


def _shutting_down():
    """The cancel token of runs still in the queue when the thread shuts down."""
    token = CancelToken()
    token.cancel("the server is shutting down")
    return token
