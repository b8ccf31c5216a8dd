"""What happens between a prompt placed in the viewer and the segment changing: the module's brain.

``Controller`` decides which segment receives a prompt (the selected one, or a new one when none is
selected), keeps the positive / negative state, queues prompts in order and runs them one at a time on
one worker thread (the caller's thread never waits for the network), merges each result into the segment
under the editor's masking rules, keeps an undo stack in step with the server's, and resets or switches
segments. Every scene access happens on the caller's thread (Slicer's GUI thread), inside ``poll()``;
the worker thread only talks to the server, through ``sync.SyncedSession``.

The host calls ``tick()`` every ``tick_interval_ms()`` (Slicer: a qt.QTimer); scripts call ``wait()``. An automatic
run's result is written a step of bounded time per tick (``labelmerge.py``: one new layer, one undo step), so that
the GUI keeps drawing frames while a 100-label result goes in. In Slicer
the GUI thread holds the GIL while it waits in Qt's event loop (PythonQt runs without thread support), so the
worker and the session's heartbeat thread advance only while GUI-thread Python runs: ``tick`` polls, then sleeps
a moment to hand them the GIL, often while prompts run and seldom while a session is only kept alive.

The server's copy of the segment is kept in step cheaply: the controller keeps a *shadow* of the selected
segment (a uint8 array the size of the image) which is refreshed from the scene only when the segment's
version changed by other means (a hand edit, another segment), is updated region by region as results are
written, and is what the sync layer uploads when the server needs the segment (first prompt, after a
switch or an edit, after the server lost the session). The shadow is touched only while the worker is idle.

Each segment's prompts since its last reset are kept (``histories``, see ``history.py``): the sync layer rebuilds the
server's state from them whenever the segment is sent again, an undo the server cannot do (it keeps one level, and
none after a lost session) forgets the prompt there and the next prompt rebuilds the state without it, and after each
change the history is stored in the scene (Slicer: on the segmentation node, saved with the scene) so that a reopened
scene's segment can be continued (``continue_segment``). ``replay_elsewhere`` replays a segment's prompts on another
model or server, for the user to compare.
"""

import collections
import threading
import time
import traceback

from .background import YIELD_SECONDS
from .errors import NNInteractiveError
from .history import HistoryError, PromptHistory, image_digest, mask_digest, replay_on
from .labelmerge import STEP_SECONDS, LabelsMerge
from .polarity import Polarity
from .scene import UndoRecord
from .sync import SyncedSession

PROMPT_KINDS = ("point", "bbox", "scribble", "lasso")
RESULT_KINDS = PROMPT_KINDS + ("predict",)  # jobs whose answer is a region to merge into the segment
BUSY_TICK_MS = 5  # while prompts run: each hand-off to the worker waits for a tick
IDLE_TICK_MS = 200  # while a session exists: the heartbeat (every liveness timeout / 3) needs the GIL now and then
CANCEL_RETRY_SECONDS = 0.25  # Cancel asks the server again this often while the run's request is on its way


class ReplayCancelled(NNInteractiveError):
    """The user cancelled a replay (``Controller.cancel_replay``): nothing is written, nothing is reported."""

    def __init__(self):
        NNInteractiveError.__init__(self, "The replay was cancelled.")


def replay_segment_name(source, label=None, model=None, where=None):
    """The name of the segment a replay on another model or server makes of segment ``source``: "<source> on
    <label>", or on the server's model and its host ("Segment_1 on blobs (gpu-node:1527)")."""
    if where and "://" in where:
        where = where.split("://", 1)[1]
    if label:
        target = label
    elif model:
        target = "%s (%s)" % (model, where) if where else model
    else:
        target = where or "another server"
    return "%s on %s" % (source, target)


class Job(object):
    """One queued action: a prompt (``kind`` in PROMPT_KINDS), "predict" (run the prediction on the prompts added
    without one), "auto" (an automatic model), "undo", "reset", "connect" or "replay" (a segment's prompts on another
    server). ``run``: whether a prompt runs the prediction (False: the server only adds it)."""

    __slots__ = ("kind", "args", "positive", "segment_key", "generation", "submitted", "timings", "label",
                 "cancelled", "unsent", "run", "progress")

    def __init__(self, kind, args=None, positive=True, segment_key=None, generation=0, prepare_ms=0.0, label=None,
                 unsent=None):
        self.kind = kind
        self.args = args or {}
        self.positive = bool(positive)
        self.segment_key = segment_key
        self.generation = generation
        self.submitted = time.perf_counter()
        self.timings = {"prepare_ms": float(prepare_ms)}
        self.label = label
        self.cancelled = False
        self.unsent = unsent  # called (on the caller's thread) when the job is dropped or fails: never applied
        self.run = True
        self.progress = None  # a replay's (prompts replayed, prompts)

    def drop(self):
        """The job will never be applied: tell its owner (once)."""
        unsent, self.unsent = self.unsent, None
        if unsent is not None:
            unsent()

    def __repr__(self):
        return "Job(%s, %s, %s)" % (self.kind, "positive" if self.positive else "negative", self.segment_key)


class _Future(object):
    __slots__ = ("done", "result", "error", "trace")

    def __init__(self):
        self.done = threading.Event()
        self.result = None
        self.error = None
        self.trace = None


class _Worker(object):
    """One daemon thread running submitted callables in order."""

    def __init__(self, name="nninteractive-worker"):
        self._queue = collections.deque()
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=name)
        self._thread.daemon = True
        self._thread.start()

    def submit(self, fn):
        fut = _Future()
        with self._cv:
            if self._stopped:
                raise RuntimeError("the worker thread was stopped")
            self._queue.append((fn, fut))
            self._cv.notify()
        return fut

    def _loop(self):
        while True:
            with self._cv:
                while not self._queue and not self._stopped:
                    self._cv.wait()
                if self._stopped and not self._queue:
                    return
                fn, fut = self._queue.popleft()
            try:
                fut.result = fn()
            except BaseException as exc:  # reported to the caller's thread, never lost
                fut.error = exc
                fut.trace = traceback.format_exc()
            fut.done.set()

    def stop(self):
        """Returns at once; a callable in progress finishes, queued ones are dropped."""
        with self._cv:
            self._stopped = True
            self._queue.clear()
            self._cv.notify()


class _QueueWatcher(object):
    """Asks the server where the prompt in flight stands in its GPU queue, every ``interval`` seconds, on a daemon
    thread (the answer comes on the heartbeat's connection, beside the prompt), while ``active()`` is true."""

    def __init__(self, ask, active, interval=0.5):
        self.latest = None
        self._ask, self._active, self._interval = ask, active, interval
        self._stopped = None  # the running thread's stop event

    def start(self):
        if self._stopped is not None and not self._stopped.is_set():
            return  # already watching
        stopped = self._stopped = threading.Event()
        self.latest = None
        threading.Thread(target=self._loop, args=(stopped,), name="nninteractive-queue", daemon=True).start()

    def _loop(self, stopped):
        while not stopped.wait(self._interval) and self._active():
            answer = self._ask()
            if not stopped.is_set():
                self.latest = answer
        stopped.set()

    def stop(self):
        if self._stopped is not None:
            self._stopped.set()
        self.latest = None


class Controller(object):
    """See the module docstring.

    ``scene``: a ``scene.Scene``; ``connect``: returns a new ``client.RemoteSession`` (called on the worker).
    Callbacks (all called on the caller's thread, from ``poll()`` or the submitting call):
    ``on_busy(busy, pending)``, ``on_error(exc, job)``, ``on_result(job, result, timings)``,
    ``on_connected(capabilities)``, and ``before_write(segment_key)`` just before the controller changes a segment
    (a result, a reset, an undo): Slicer saves the Segment Editor's undo state there, so that the editor's own
    Undo / Redo covers every change of ours.
    """

    def __init__(self, scene, connect, on_busy=None, on_error=None, on_result=None, on_connected=None,
                 log=None, before_write=None, polarity=None):
        self.scene = scene
        self._connect = connect
        self.histories = {}  # segment key -> history.PromptHistory, kept across sessions and reconnections
        self.sync = SyncedSession(connect, self.histories)
        self._image_digest = (None, None)  # ((image key, version), digest) of the last image a history was stored for
        self.on_busy = on_busy
        self.on_error = on_error
        self.on_result = on_result
        self.on_connected = on_connected
        self.before_write = before_write or (lambda key: None)
        self.log = log or (lambda msg: None)
        self.polarity = polarity or Polarity()  # the host's, when it shows it
        self.capabilities = None
        self.timings = []  # one dict per finished interaction
        self._pending = collections.deque()
        self._inflight = None  # (job, future)
        self._applying = None  # (job, labelmerge.LabelsMerge, timings): an automatic run's result being written
        self.apply_step_seconds = STEP_SECONDS  # the longest a poll() writes an automatic result before returning
        self.auto_run = True  # False: prompts are only added on the server until predict() (napari's Manual control)
        self._worker = None
        self._generation = 0
        self._undo = []
        self._shadow = None
        self._shadow_key = None
        self._shadow_version = None
        self._resync = False
        self._busy_reported = False
        self._queue_watch = _QueueWatcher(lambda: self.sync.queue_position(), lambda: self.busy)

    # ------------------------------------------------------------------ prompt state

    @property
    def positive(self):
        return self.polarity.positive

    def set_positive(self, positive=True):
        self.polarity.set(positive)

    def toggle_positive(self):
        return self.polarity.toggle()

    def current_segment(self, create=True):
        """The segment prompts go to: the selected one, or a new one (selected) when none is."""
        key = self.scene.selected_segment()
        if key is None and create:
            key = self.scene.add_segment()
            self.log("Created segment %s for the prompts" % key)
        return key

    @property
    def busy(self):
        return self._inflight is not None or bool(self._pending) or self._applying is not None

    @property
    def pending(self):
        """Jobs queued, running or being written, not counting a cancelled one that is still finishing on the
        server."""
        running = self._inflight is not None and not self._inflight[0].cancelled
        return len(self._pending) + (1 if running else 0) + (1 if self._applying is not None else 0)

    @property
    def current(self):
        """The job running on the server or being written (None: none, or a cancelled one finishing)."""
        if self._applying is not None:
            return self._applying[0]
        if self._inflight is not None and not self._inflight[0].cancelled:
            return self._inflight[0]
        return None

    def _count(self, kind):
        """Jobs of ``kind`` queued, running or being written (not cancelled ones)."""
        current = self.current
        return sum(1 for j in self._pending if j.kind == kind) + (1 if current is not None and current.kind == kind
                                                                  else 0)

    def auto_pending(self):
        """Automatic runs queued, running or being written (not cancelled ones)."""
        return self._count("auto")

    # ------------------------------------------------------------------ actions (caller's thread)

    def submit(self, kind, args, positive=None, prepare_ms=0.0, label=None, unsent=None):
        """Queue a prompt for the current segment (created if needed). ``args`` as ``SyncedSession.prompt`` takes
        them, in array order. ``unsent()`` is called should the prompt never be applied (it failed, or was dropped
        behind a failure, a reset or a disconnection). Returns the Job."""
        if kind not in PROMPT_KINDS:
            raise ValueError("unknown prompt kind %r" % (kind,))
        key = self.current_segment()
        job = Job(kind, args, self.positive if positive is None else positive, key, self._generation, prepare_ms,
                  label, unsent)
        job.run = self.auto_run
        self._enqueue(job)
        return job

    def predict(self):
        """Queue one prediction on the prompts added without one (``auto_run`` off), for the current segment.
        Returns the Job."""
        job = Job("predict", segment_key=self.current_segment(), generation=self._generation)
        self._enqueue(job)
        return job

    def connect(self):
        """Claim a session in the background (so the first prompt does not wait); ``on_connected`` reports."""
        self._enqueue(Job("connect", generation=self._generation))

    def next_segment(self):
        """Add an empty segment, select it, prompts positive again. Returns its key."""
        key = self.scene.add_segment()
        self.polarity.set(True)
        return key

    def reset_segment(self):
        """Clear the current segment and its prompts (here at once, on the server in queue order). Prompts of
        this segment still queued are dropped; a result already on its way is discarded."""
        key = self.scene.selected_segment()
        self.polarity.set(True)
        if key is None:
            return None
        self._generation += 1
        for job in self._pending:
            if job.segment_key == key and job.kind != "connect":
                job.drop()
        self._pending = collections.deque(j for j in self._pending if j.segment_key != key or j.kind == "connect")
        self._undo = [r for r in self._undo if r.segment_key != key]
        self.before_write(key)
        self.scene.clear_segment(key)
        self._enqueue(Job("reset", segment_key=key, generation=self._generation))
        return key

    def auto_segment(self, model, label=None, **fields):
        """Queue the server's automatic model ``model`` on the image: each label it finds becomes a new segment
        (the model's name, colour and terminology), written under the editor's masking rules; refine any of them
        with prompts (selecting it makes it the starting mask). ``label``: the model's name for messages. Returns
        the Job."""
        job = Job("auto", {"model": model, "fields": fields}, generation=self._generation, label=label or model)
        self._enqueue(job)
        return job

    def cancel_auto(self):
        """Drop automatic segmentations queued, running or not yet written. A running one is stopped on the server
        (``POST /x/auto_segment/cancel``, asked from a thread of its own: the worker waits for the run's answer), and
        its result is discarded should it arrive anyway (a server without that endpoint finishes the run). A result
        that has started to be written is finished (a few frames), not cancelled. Returns how many were
        cancelled."""
        cancelled = self._cancel("auto")
        if self._inflight is not None and self._inflight[0] in cancelled:
            threading.Thread(target=self._cancel_on_server, args=(self._inflight[0], self.sync),
                             name="nninteractive-cancel", daemon=True).start()
        if self._applying is not None and not self._applying[1].writing:
            cancelled.append(self._applying[0])
            self._applying = None
        self._report_busy()
        return len(cancelled)

    def _cancel_on_server(self, job, sync):
        """Ask until the server stops the run, says it cannot, or the run's answer came back: the request may still
        be on its way (a claim, the image upload) when Cancel is pressed."""
        while True:
            try:
                answer = sync.cancel_auto()
            except Exception as exc:  # the run's own answer reports what matters; this only saves the server's time
                self.log("Could not ask the server to stop the automatic run: %s" % exc)
                return
            inflight = self._inflight
            if answer is not False or inflight is None or inflight[0] is not job:
                break
            time.sleep(CANCEL_RETRY_SECONDS)
        self.log({True: "The server stopped the automatic run", False: "The server had no automatic run to stop",
                  None: "The server cannot stop automatic runs: it finishes this one, its result is discarded"}[answer])

    def can_undo(self):
        """Whether Ctrl+Z is ours (a prompt to undo, or prompts in the queue); otherwise leave it to the editor."""
        if self._pending or self._inflight is not None:
            return True
        return self._undoable() is not None

    def _undoable(self):
        if not self._undo:
            return None
        record = self._undo[-1]
        key = record.segment_key
        if key != self.scene.selected_segment() or key != self._shadow_key:
            return None
        if key not in self.scene.segment_keys() or self.scene.segment_version(key) != self._shadow_version:
            return None  # edited by hand since: the editor's own undo is the right one
        return record

    def undo(self):
        """Queue an undo of the last prompt of the current segment. Returns False when there is none."""
        if not self.can_undo():
            return False
        self._enqueue(Job("undo", segment_key=self.scene.selected_segment(), generation=self._generation))
        return True

    def _enqueue(self, job):
        self._pending.append(job)
        self.poll()

    # ------------------------------------------------------------------ the pump (caller's thread)

    def poll(self):
        """Apply a finished job and start the next. Cheap (an automatic run's result is written in steps of
        ``apply_step_seconds``); call it from a timer while ``busy``."""
        if self._applying is not None and not self._apply_step():
            self._report_busy()
            return
        if self._inflight is not None:
            job, fut = self._inflight
            if not fut.done.is_set():
                self._report_busy()
                return
            self._inflight = None
            self._finish(job, fut)
        while self._inflight is None and self._applying is None and self._pending:
            job = self._pending.popleft()
            try:
                self._start(job)
            except Exception as exc:  # preparing failed (the scene changed under us): report, keep going
                self._fail(job, exc, traceback.format_exc())
        self._report_busy()

    def queue_position(self):
        """The latest word from the server on the prompt in flight: ``{"ahead", "expected_wait_seconds", "running",
        "waiting", "queued"}``, or None (not asked yet, idle, or a server that does not tell)."""
        return self._queue_watch.latest if self.busy else None

    def tick(self):
        """``poll()``, then hand the GIL to the worker and heartbeat threads for a moment (see the module
        docstring). For the host's timer, every ``tick_interval_ms()``."""
        self.poll()
        if self.busy or self.sync.connected:
            time.sleep(YIELD_SECONDS)

    def tick_interval_ms(self):
        """How often the host should call ``tick``: often while busy, seldom while a session is kept alive,
        never (None) without one."""
        if self.busy:
            return BUSY_TICK_MS
        return IDLE_TICK_MS if self.sync.connected else None

    def wait(self, timeout=120.0, interval=0.005):
        """Poll until idle (for scripts and tests). Raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while self.busy:
            self.poll()
            if not self.busy:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("nnInteractive did not finish within %.0f s" % timeout)
            time.sleep(interval)

    def _report_busy(self):
        busy = self.busy
        if self.on_busy is not None and (busy or self._busy_reported):
            self.on_busy(busy, self.pending)
        self._busy_reported = busy

    def _run(self, job, fn):
        if self._worker is None:
            self._worker = _Worker()
        resync, self._resync = self._resync, False
        sync = self.sync

        def task():
            if resync:
                sync.reset()
            return fn()

        self._inflight = (job, self._worker.submit(task))
        if job.kind in RESULT_KINDS or job.kind == "auto":
            self._queue_watch.start()

    def _prepare_shadow(self, key):
        """Make the shadow hold segment ``key`` as it is now; a full read only when it changed."""
        version = self.scene.segment_version(key)
        if key == self._shadow_key and version == self._shadow_version:
            return version
        if key != self._shadow_key or self._undo:
            self._undo = []  # another segment, or a hand edit: the prompt history no longer applies
        shape = self.scene.shape
        out = self._shadow if (self._shadow is not None and self._shadow.shape == shape) else None
        self._shadow = self.scene.read_segment(key, out=out)
        self._shadow_key, self._shadow_version = key, version
        return version

    def _start(self, job):
        t0 = time.perf_counter()
        if job.kind == "connect":
            sync = self.sync
            self._run(job, lambda: sync.session.capabilities if hasattr(sync.session, "capabilities") else {})
            return
        if job.kind == "auto":
            self._start_auto(job, t0)
            return
        if job.segment_key not in self.scene.segment_keys():
            self.log("Segment %s was removed; its queued %s is dropped" % (job.segment_key, job.kind))
            job.drop()
            return
        if job.kind == "reset":
            sync, key = self.sync, job.segment_key
            self._run(job, lambda: sync.reset(key))
            return
        if job.kind == "replay":
            self._start_replay(job)
            return
        if job.kind == "undo":
            self._start_undo(job, t0)
            return
        key = job.segment_key
        image, image_key, image_version = self._image_for_worker()
        version = self._prepare_shadow(key)
        shadow, sync = self._shadow, self.sync
        kind, args, positive, run = job.kind, job.args, job.positive, job.run
        job.timings["prepare_ms"] += (time.perf_counter() - t0) * 1e3
        job.timings["queued_ms"] = (t0 - job.submitted) * 1e3
        if kind == "predict":
            self._run(job, lambda: sync.predict(image, shadow, image_key, image_version, key, version))
            return
        self._run(job, lambda: sync.prompt(kind, args, image, shadow, positive, image_key, image_version, key,
                                           version, run_prediction=run))

    def _image_for_worker(self):
        """The image, its key and version; a copy when it will be uploaded (from the worker thread, while the scene
        may change or close), otherwise the view of the volume's memory."""
        scene = self.scene
        image = scene.image_array()
        image_key, image_version = scene.image_key(), scene.image_version()
        if not self.sync.has_image(image_key, image_version):
            image = image.copy()
        return image, image_key, image_version

    def _start_auto(self, job, t0):
        image, image_key, image_version = self._image_for_worker()
        job.args["image_key"] = image_key
        spacing, sync = self.scene.spacing(), self.sync
        model, fields = job.args["model"], job.args["fields"]
        job.timings["prepare_ms"] += (time.perf_counter() - t0) * 1e3
        self._run(job, lambda: sync.auto_segment(model, image, spacing, fields, image_key, image_version))

    def _start_apply(self, job, result):
        """One new segment per label found, all in one new layer, written under the editor's masking rules as one
        undo step, in steps of bounded time (labelmerge.py)."""
        bbox, region, labels, timings = result
        if self.scene.image_key() != job.args.get("image_key"):
            raise NNInteractiveError("The source volume changed while the automatic segmentation ran, so its result "
                                     "was not written. Run it again on the volume shown now.")
        if region is None:
            self._record_timing(job, None, dict(timings, apply_ms=0.0, segments=[]))
            return
        merge = LabelsMerge(self.scene, bbox, region, labels, before_write=lambda: self.before_write(None))
        self._applying = (job, merge, timings)
        self._apply_step()

    def _apply_step(self):
        """One bounded step of the result being written; True when it is written (or failed)."""
        job, merge, timings = self._applying
        try:
            done = merge.step(self.apply_step_seconds)
        except Exception as exc:
            self._applying = None
            self._fail(job, exc, traceback.format_exc())
            return True
        if not done:
            return False
        self._applying = None
        self._record_timing(job, None, dict(timings, apply_ms=merge.total_seconds * 1e3, apply_steps=merge.steps,
                                            apply_max_step_ms=merge.max_step_seconds * 1e3, segments=merge.keys))
        return True

    def _start_undo(self, job, t0):
        record = self._undoable()
        if record is None:
            self.log("Nothing to undo")
            return
        self._undo.pop()
        key = record.segment_key
        self.before_write(key)
        self.scene.restore(record)
        if key in record.regions:
            self._shadow[tuple(slice(lo, hi) for lo, hi in record.bbox)] = record.regions[key]
        self._shadow_version = self.scene.segment_version(key)
        job.timings["apply_ms"] = (time.perf_counter() - t0) * 1e3
        sync = self.sync
        in_step = record.server_step == self._server_step() and sync.supports_undo
        if sync.has_history(key):  # the history can rebuild the server's state without this prompt
            version, run = self._shadow_version, record.kind == "predict"
            self._run(job, lambda: sync.undo_prompt(key, version, in_step, run))
        elif in_step:
            self._run(job, sync.undo)
        else:
            self._run(job, sync.reset)  # the server cannot go back: the next prompt sends the segment again

    def _server_step(self):
        return self.sync.server_generation

    def _finish(self, job, fut):
        if fut.error is not None:
            self._fail(job, fut.error, fut.trace)
            return
        if job.kind == "connect":
            self.capabilities = fut.result
            if self.on_connected is not None:
                self.on_connected(fut.result)
            return
        if job.kind == "reset":
            self.scene.store_history(job.segment_key, None)
            return
        if job.kind == "replay":
            self._finish_replay(job, fut.result)
            return
        if job.kind == "auto":
            if not job.cancelled:
                try:
                    self._start_apply(job, fut.result)
                except Exception as exc:
                    self._fail(job, exc, traceback.format_exc())
            return
        key = job.segment_key
        if job.kind == "undo":
            # Only when the server went back too (it keeps one level); otherwise the sync layer sends the
            # restored segment with the next prompt.
            if key in self.scene.segment_keys() and fut.result is not None and fut.result.ran_prediction:
                self.sync.segment_written(key, self._shadow_version)
            self._store_history(key)
            self._record_timing(job, fut.result)
            return
        result = fut.result
        if job.generation != self._generation or key not in self.scene.segment_keys():
            # The segment was reset (or removed) while this prompt ran: drop its result; the server forgets it
            # with the reset queued behind.
            job.drop()
            return
        t0 = time.perf_counter()
        record = None
        if result.region is not None and result.bbox is not None:
            if self._shadow_key == key and self.scene.segment_version(key) != self._shadow_version:
                # Edited by hand while the prompt ran: merge into what is there now, send it next time.
                self._shadow_key = None
            self.before_write(key)
            new_region, record = self.scene.merge(key, result.bbox, result.region)
            self.sync.note_written(result, new_region)  # the editor's masking may have changed the result
            if self._shadow_key == key:
                self._shadow[result.slices] = new_region
        if self._shadow_key == key:
            self._shadow_version = self.scene.segment_version(key)
            self.sync.segment_written(key, self._shadow_version)
        if record is None:
            record = UndoRecord(result.bbox or [[0, 0]] * 3, {})  # the server still took a step
        record.segment_key, record.kind = key, job.kind
        record.server_step = self._server_step()
        self._undo.append(record)
        self._store_history(key)
        result.timings["apply_ms"] = (time.perf_counter() - t0) * 1e3
        self._record_timing(job, result)

    def _record_timing(self, job, result, extra=None):
        timings = dict(job.timings)
        if result is not None and getattr(result, "timings", None):
            timings.update(result.timings)
        timings.update(extra or {})
        timings["total_ms"] = (time.perf_counter() - job.submitted) * 1e3
        timings["kind"] = job.kind
        timings["positive"] = job.positive
        if job.label:
            timings["label"] = job.label
        self.timings.append(timings)
        if timings.get("recovered"):
            self.log("The server session was lost (%s); continued on a new one, the image and segment sent again%s"
                     % (timings["recovered"], ", then the segment's earlier %s" % timings["replayed"]
                        if timings.get("replayed") else ""))
        if timings.get("replay_failed"):
            self.log("The segment's earlier prompts could not be sent again (%s); it was sent alone, as a new start"
                     % timings["replay_failed"])
        self.log(format_timing(timings))
        if self.on_result is not None:
            self.on_result(job, result, timings)

    def _fail(self, job, exc, trace=None):
        # Nothing was written to the segment. Prompts queued behind a failed prompt or a failed connection would fail
        # the same way (and report again): they are dropped, counted in this one report.
        dropped = 0
        job.drop()
        if job.kind in RESULT_KINDS or job.kind == "connect":
            behind = [j for j in self._pending if j.kind in RESULT_KINDS or (job.kind == "connect" and j.kind == "auto")]
            for j in behind:
                j.drop()
            dropped = sum(1 for j in behind if j.kind in RESULT_KINDS)
            self._pending = collections.deque(j for j in self._pending if j not in behind)
        if job.cancelled:
            return
        if not isinstance(exc, NNInteractiveError):
            self.log("Unexpected error in %s:\n%s" % (job.kind, trace or ""))
        if job.kind == "undo":
            self._resync = True  # restored here, not on the server: send the segment with the next prompt
        if self.on_error is not None:
            self.on_error(exc, job, dropped)

    def disconnect(self):
        """Release the server session (in the background) and drop queued prompts; the next prompt claims a new
        session and sends the image and segment again (after the server settings changed, say)."""
        self._stop()
        old, self.sync = self.sync, SyncedSession(self._connect, self.histories)
        self._undo = []
        old.close()

    # ------------------------------------------------------------------ prompt histories (caller's thread)

    def _image_digest_now(self):
        state = (self.scene.image_key(), self.scene.image_version())
        if self._image_digest[0] != state:
            self._image_digest = (state, image_digest(self.scene.image_array()))
        return self._image_digest[1]

    def _store_history(self, key):
        """Keep segment ``key``'s prompt history in the scene, with what checks it when read back (the volume's geometry
        and voxels, the segment as the last prompt left it); remove what is kept when nothing can be continued."""
        if not self.scene.keeps_histories or key not in self.scene.segment_keys():
            return
        history = self.histories.get(key)
        if history is None or key != self._shadow_key or history.version is None \
                or history.version != self._shadow_version:
            self.scene.store_history(key, None)
            return
        history.state = mask_digest(self._shadow)  # also lets the sync layer recognise these voxels later
        self.scene.store_history(key, history.to_json(self.scene.ijk_to_ras(), self._image_digest_now(),
                                                      history.state))

    def stored_history(self, key=None):
        """The prompt history kept in the scene for segment ``key`` (default: the selected one), read and checked:
        ``(summary, None)`` when it can be continued (``continue_segment``), ``(None, why)`` when it cannot (none, or
        corrupt, foreign, or the segment changed since), for the module to offer "Continue" or say why not."""
        key = key or self.scene.selected_segment()
        try:
            history, _ = self._checked_history(key)
        except HistoryError as exc:
            return None, str(exc)
        return history.summary(), None

    def _checked_history(self, key, adopt=False):
        if key is None or key not in self.scene.segment_keys():
            raise HistoryError("Select a segment first.")
        text = self.scene.stored_history(key) if self.scene.keeps_histories else None
        if text is None:
            raise HistoryError("Segment %s has no saved prompts." % key)
        history = PromptHistory.from_json(text)
        if adopt:  # the next prompt is on this segment: the shadow holds it as it is now (read only if it changed)
            version, segment = self._prepare_shadow(key), self._shadow
        elif key == self._shadow_key and self.scene.segment_version(key) == self._shadow_version:
            version, segment = self._shadow_version, self._shadow
        else:  # only a look: the shadow may be in use by a prompt in progress
            segment = self.scene.read_segment(key)
            version = self.scene.segment_version(key)
        history.check(self.scene.shape, self.scene.ijk_to_ras(), key, self._image_digest_now(), segment)
        return history, version

    def continue_segment(self, key=None):
        """Continue segment ``key`` (default: the selected one) of a reopened scene where its saved prompts left it:
        the next prompt on it first rebuilds the server's state from them, so it gives the mask it would have given
        before the scene was closed. Returns the history's summary. Raises HistoryError (the reason, for the user)
        when there is none or it cannot be used (corrupt, of another version, image or segment, or the segment
        changed since); nothing of it is used then. Only while idle (``busy`` false)."""
        if self.busy:
            raise HistoryError("Wait until the prompts in progress have finished, then continue.")
        key = key or self.scene.selected_segment()
        history, version = self._checked_history(key, adopt=True)
        self.sync.adopt_history(key, history, version, (self.scene.image_key(), self.scene.image_version()))
        summary = history.summary()
        self.log("Continuing %s from its %d saved prompts" % (key, summary["prompts"]))
        return summary

    def replay_elsewhere(self, connect, key=None, label=None, where=None):
        """Queue a replay of segment ``key``'s prompts (default: the selected one's, since its last reset) with
        predictions on the server ``connect()`` claims a session on (another nnInteractive checkpoint or server). The
        mask it ends with becomes a new segment named after the segment and ``label`` (default: the server's model
        and ``where``, see ``replay_segment_name``), not selected and written without masking (the other segments are
        untouched), for the user to compare; ``on_result(job, (new key, mask, report), timings)`` reports it. This
        controller's own session and segments are not changed. It runs in the queue like a prompt (one prediction per
        prompt replayed): prompts placed meanwhile wait for it; ``job.progress`` is (prompts replayed, prompts), and
        ``cancel_replay`` stops it between two prompts. ``where``: the server, as the user knows it (its host and
        port), for messages. Returns the Job."""
        key = key or self.scene.selected_segment()
        if key is None or not self.sync.has_history(key):
            raise HistoryError("Segment %s has no prompts to replay." % (self.scene.segment_name(key) if key else key))
        job = Job("replay", {"connect": connect, "where": where}, segment_key=key, generation=self._generation,
                  label=label)
        job.progress = (0, len(self.histories[key].steps))
        self._enqueue(job)
        return job

    def cancel_replay(self):
        """Stop replays queued or running (a running one after the prompt on its way; its session is released and
        nothing is written). Returns how many were cancelled."""
        cancelled = self._cancel("replay")
        self._report_busy()
        return len(cancelled)

    def _cancel(self, kind):
        """Drop the queued jobs of ``kind`` and mark the running one cancelled (its result is discarded). Returns
        them."""
        cancelled = [j for j in self._pending if j.kind == kind]
        self._pending = collections.deque(j for j in self._pending if j.kind != kind)
        for job in cancelled:
            job.drop()
        if self._inflight is not None and self._inflight[0].kind == kind and not self._inflight[0].cancelled:
            self._inflight[0].cancelled = True
            cancelled.append(self._inflight[0])
        return cancelled

    def replay_pending(self):
        """Replays queued or running (not cancelled ones)."""
        return self._count("replay")

    def _start_replay(self, job):
        history = self.histories.get(job.segment_key)
        if history is None or not history.steps:
            name = self.scene.segment_name(job.segment_key)
            self._fail(job, HistoryError("Segment %s has no prompts to replay." % name))
            return
        snapshot, image, connect = history.copy(), self.scene.image_array().copy(), job.args["connect"]
        total = len(snapshot.steps)
        job.progress = (0, total)

        def step_done(n):  # on the worker, after each prompt: the GUI thread reads the progress, sets cancelled
            job.progress = (n + 1, total)
            if job.cancelled:
                raise ReplayCancelled()

        def task():
            if job.cancelled:
                raise ReplayCancelled()
            session = connect()
            try:
                mask, report = replay_on(snapshot, session, image, on_step=step_done)
                info = getattr(session, "server_info", None)
                report["model"] = info.get("model") if isinstance(info, dict) else None
                report["url"] = getattr(session, "server_url", None)
                return mask, report
            finally:
                close = getattr(session, "close", None)  # an in-process session (scripts) has none
                if close is not None:
                    close()

        self._run(job, task)

    def _finish_replay(self, job, result):
        from .rasterize import crop_to_bbox

        if job.cancelled:
            return
        mask, report = result
        selected = self.scene.selected_segment()
        name = replay_segment_name(self.scene.segment_name(job.segment_key), job.label, report.get("model"),
                                   job.args.get("where") or report.get("url"))
        new = self.scene.add_segment(name)
        if selected is not None:
            self.scene.select_segment(selected)  # the user's prompts keep going to their segment
        cropped = crop_to_bbox(mask)
        if cropped is not None:
            self.before_write(new)
            self.scene.write_segment_region(new, cropped[1], cropped[0])
            self.scene.layers_modified([new])
        self._record_timing(job, (new, mask, report), {"replayed": report["prompts"], "segments": [new],
                                                       "segment_name": name})

    def _stop(self):
        self._queue_watch.stop()
        for job in list(self._pending) + ([self._inflight[0]] if self._inflight is not None else []):
            job.drop()
        self._pending.clear()
        self._inflight = None
        self._applying = None
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.stop()
        self._report_busy()

    def close(self):
        """Returns at once: queued prompts are dropped, one in flight ends on its own with its result ignored, and
        the server session is released in the background. No session is claimed afterwards."""
        self._stop()
        self.sync.close()


PHASES = (
    ("prepare_ms", "prepare"),
    ("queued_ms", "queued"),
    ("upload_image_ms", "upload image"),
    ("upload_segment_ms", "upload segment"),
    ("replay_ms", "replay"),
    ("encode_ms", "encode"),
    ("exchange_ms", "network+server"),
    ("server_total_ms", "server"),
    ("decode_ms", "decode"),
    ("apply_ms", "apply"),
    ("total_ms", "total"),
)


def format_timing(t):
    """One line describing one interaction's timings."""
    parts = ["%s:" % t.get("kind", "?")]
    for key, name in PHASES:
        if key in t:
            parts.append("%s %.1f ms" % (name, t[key]))
    if "bytes_sent" in t:
        parts.append("sent %d B, received %d B" % (t["bytes_sent"], t.get("bytes_received", 0)))
    return ", ".join(parts)
