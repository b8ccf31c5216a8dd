"""Keep one server session in step with one image and one segment, sending each only when it changed.

The server holds the image and, as its target buffer, the segment the prompts refine. Before each prompt
``SyncedSession`` compares what it last sent with what the caller has now, cheaply: by a version the caller
supplies (Slicer: the MTime of the image data and of the segment labelmap), or, when the caller gives none, by a
checksum of the array's memory (no copy). It uploads the image again only after it changed, and the segment
again only when it was edited outside the prompts or another segment was selected.

Results are not written by ``prompt`` (which may run on a worker thread): ``apply`` writes the changed region into
the caller's labelmap in place (on the caller's thread, optionally through a masking ``write`` function), then
``segment_written`` records the segment's new version so the next prompt knows the server already has it.

When the server forgot the session (idle timeout, restart, another server behind a balancer), or the server holding
it was lost in the middle of a request (``BackendLostError``: the connection dropped or was reset, or a balancer
answered 502 / 503 / 504), ``prompt`` and ``auto_segment`` drop the session, claim a new one (a balancer sends the
claim to a live server), send the image and the current segment again, and repeat the action once: the user sees one
slower prompt. A lost request may or may not have been applied on the old server, so it is never repeated there: a
recovery always takes a new session, and at most one per call. The claim of that new session is tried up to three
times when it cannot reach a server (``RECLAIM_DELAYS``): while a server dies, a balancer may still send it there for
a moment. ``undo`` and ``reset`` on a lost session only drop it (the next prompt sends the segment to a new one).

With a dict of histories (``histories``: segment key -> ``history.PromptHistory``), every segment's prompts since its
last reset are recorded as they are sent, and whenever a segment must be sent again (a new session after a loss, a
switch back to it, an undo the server cannot do) the server's state is rebuilt from its history instead: the segment
and the prompts without predictions, which is the state of the uninterrupted session (proof in ``history``), so the
next prompt gives the same mask as if nothing had happened. The segment alone is sent (and a new history started)
when it was edited outside the prompts, another image was loaded, or no history applies.

Each new session is a new ``RemoteSession`` with its own cookie jar, so a claim after a recovery carries no
stickiness cookie naming the lost server; the old session's release (best effort, in the background) still carries
it, so that a server that is alive after all (a balancer's timeout) frees the slot.
"""

import time
import zlib

import numpy as np

from .errors import NNInteractiveError, ServerUnreachableError, SessionClosedError, SessionExpiredError
from .history import FAST, PromptHistory, Step
from .history import replay as replay_history

KINDS = ("point", "bbox", "scribble", "lasso")
RECLAIM_DELAYS = (0.25, 1.0)  # seconds between claims that fail to connect, after a recovery


def fingerprint(arr):
    """A cheap checksum of an array's content and layout (adler32 over its memory, no copy when contiguous)."""
    arr = np.ascontiguousarray(arr)
    return (arr.shape, arr.dtype.str, zlib.adler32(memoryview(arr.reshape(-1)).cast("B")))


class PromptResult:
    """What one prompt (or undo) changed: ``bbox`` (half-open, array order) and ``region`` (the new mask there);
    ``step``: the prompt as its segment's history recorded it (None without histories)."""

    def __init__(self, kind, bbox, region, ran_prediction, timings):
        self.kind = kind
        self.bbox = bbox
        self.region = region
        self.ran_prediction = ran_prediction
        self.timings = timings
        self.step = None

    @property
    def slices(self):
        return None if self.bbox is None else tuple(slice(lo, hi) for lo, hi in self.bbox)

    def __repr__(self):
        return "PromptResult(%s, bbox=%s)" % (self.kind, self.bbox)


def _write_region(segment, slices, region):
    segment[slices] = region


def _text(value):
    return value if isinstance(value, str) else None


class SyncedSession:
    def __init__(self, connect, histories=None):
        """``connect()`` returns a new ``RemoteSession`` (it claims a lease); called lazily and after expiry.
        ``histories``: a dict to keep each segment's ``PromptHistory`` in (see the module docstring), or None."""
        self._connect = connect
        self.histories = histories
        self.replays = 0  # server states rebuilt from a history
        self.last_replay = None  # the last one's report (history.replay), or {"error": why} when it fell back
        self._description = (None, None)  # (session, who answers it), see _describe
        self._closed = False
        self._session = None
        self._image_state = None  # (key, version) of the image the server has
        self._segment_state = None  # (key, version) of the segment the server's target buffer holds
        self.uploads = {"image": 0, "segment": 0}
        self.recoveries = 0  # sessions replaced after the server forgot one or was lost
        self._reclaiming = False  # the next claim follows a recovery (see _claim)
        self.last_recovery = None  # why the last one was (the error's message)
        # Changes whenever the server's state stops following from the prompts alone (new session, image or
        # segment upload): an undo recorded under another generation cannot be undone on the server.
        self.server_generation = 0

    @property
    def session(self):
        if self._session is None:
            if self._closed:
                raise SessionClosedError("This connection to the server was closed.")
            session = self._claim()
            if self._closed:  # closed while claiming: give the new lease back at once
                session.close()
                raise SessionClosedError("This connection to the server was closed.")
            self._session = session
            self._image_state = self._segment_state = None
            self.server_generation += 1
        return self._session

    def _claim(self):
        """``connect()``; right after a recovery, a claim that could not reach a server is tried again after
        ``RECLAIM_DELAYS`` (a balancer may still send it to the dying server for a moment)."""
        delays, self._reclaiming = (RECLAIM_DELAYS if self._reclaiming else ()), False
        for delay in delays:
            try:
                return self._connect()
            except ServerUnreachableError:  # refused, dropped, a balancer's 502 / 504; not capacity, keys, TLS
                time.sleep(delay)
                if self._closed:
                    raise SessionClosedError("This connection to the server was closed.")
        return self._connect()

    @property
    def connected(self):
        """Whether a server session is held now."""
        return self._session is not None

    def queue_position(self):
        """Where the prompt in flight stands in the server's GPU queue (``RemoteSession.queue_position``), or None
        without a session or a server that tells. Claims nothing; safe beside a prompt in progress."""
        session = self._session
        ask = getattr(session, "queue_position", None)
        return ask() if ask is not None else None

    def cancel_auto(self):
        """Ask the server to stop this session's automatic run in progress (``RemoteSession.cancel_auto_segment``):
        True, False (none is running: not yet, or no session yet), or None (a server that cannot). Claims nothing;
        safe beside the run in progress."""
        session = self._session
        if session is None:
            return False
        cancel = getattr(session, "cancel_auto_segment", None)
        return cancel() if cancel is not None else None

    def has_image(self, key, version):
        """Whether the server holds the image ``key`` at ``version`` (then a prompt sends no image)."""
        return version is not None and (key, version) == self._image_state

    @property
    def supports_undo(self):
        """Whether the current server session can undo its last prompt (nnInteractive keeps one level)."""
        return self._session is not None and bool(self._session.supports_undo)

    # ------------------------------------------------------------------ state

    def _image_changed(self, image, key, version):
        state = (key, version if version is not None else fingerprint(image))
        return state != self._image_state, state

    def _sync_image(self, image, image_key, image_version, timings):
        """Send the image when the server does not hold it (and declare a target buffer of its shape)."""
        t0 = time.perf_counter()
        changed, image_state = self._image_changed(image, image_key, image_version)
        timings["detect_ms"] = (time.perf_counter() - t0) * 1e3
        session = self.session
        if changed:
            t1 = time.perf_counter()
            session.set_image(image if image.ndim == 4 else image[None])
            session.declare_target_buffer(image.shape[-3:], "uint8")
            timings["upload_image_ms"] = (time.perf_counter() - t1) * 1e3
            self._image_state, self._segment_state = image_state, None
            self.uploads["image"] += 1
            self.server_generation += 1
        return session

    def _sync(self, image, segment, image_key, image_version, segment_key, segment_version, timings):
        if segment.shape != image.shape[-3:]:
            raise ValueError("the segment's shape %s does not match the image's %s" % (segment.shape, image.shape[-3:]))
        session = self._sync_image(image, image_key, image_version, timings)
        seg_state = (segment_key, segment_version if segment_version is not None else fingerprint(segment))
        if seg_state != self._segment_state:
            history = self._history(segment_key)
            mode = None if history is None else history.replay_mode(seg_state[1], self._image_state, segment)
            if mode is None or not self._replay(session, history, segment, mode, timings):
                t1 = time.perf_counter()
                if segment.any():
                    session.add_initial_seg_interaction(
                        segment if segment.dtype == np.uint8 else segment.astype(np.uint8), run_prediction=False)
                else:
                    session.reset_interactions()
                timings["upload_segment_ms"] = (time.perf_counter() - t1) * 1e3
                if self.histories is not None:
                    self._start_history(segment_key, segment, seg_state[1], timings)
            self._segment_state = seg_state
            self.uploads["segment"] += 1
            self.server_generation += 1

    # ------------------------------------------------------------------ histories

    def _history(self, key):
        """Segment ``key``'s history, or None (none recorded, or no histories kept)."""
        return self.histories.get(key) if self.histories is not None else None

    def _start_history(self, key, segment, version, timings):
        """A new history for segment ``key``, starting from ``segment`` (just sent as the initial segmentation)."""
        t0 = time.perf_counter()
        history = PromptHistory.start(segment.shape, segment, key)
        history.version, history.image_state = version, self._image_state
        self.histories[key] = history
        timings["history_ms"] = (time.perf_counter() - t0) * 1e3

    def _replay(self, session, history, segment, mode, timings):
        """Rebuild the server's state for a segment from its history. False when it could not (the server refused a
        prompt, say another model's capabilities): the caller then sends the segment alone."""
        t0 = time.perf_counter()
        try:
            report = replay_history(history, session, segment=segment if mode == FAST else None, mode=mode)
        except SessionExpiredError:
            raise
        except (NNInteractiveError, ValueError) as exc:  # HistoryError and a server's 400 included
            self.last_replay = {"error": str(exc)}
            timings["replay_failed"] = str(exc)
            return False
        timings["replay_ms"] = (time.perf_counter() - t0) * 1e3
        timings["replayed"] = "%d prompt%s (%s)" % (report["prompts"], "" if report["prompts"] == 1 else "s", mode)
        self.replays += 1
        self.last_replay = report
        return True

    def _record(self, kind, args, positive, result):
        """Add a prompt the server just took to its segment's history."""
        if self.histories is None or self._segment_state is None or self._closed:
            return
        key = self._segment_state[0]
        history = self.histories.get(key)
        if history is None:
            return
        step = Step.from_args(kind, args, positive, history.shape)
        if step is None or not history.add(step, self._describe()):
            del self.histories[key]  # it could not be replayed faithfully: the segment alone is sent next time
            return
        result.step = step
        if result.region is not None:
            step.written = [list(b) for b in result.bbox]
            history.version = None  # until segment_written says what the segment holds now

    def _record_prediction(self, result):
        """A Run's result (prompts added without a prediction, then one prediction) belongs to the last of those
        prompts in its segment's history: a replay adds every prompt without a prediction and starts from the
        server's buffer as it is now, so nothing else changes. A result that cannot be placed so ends the history
        (the segment alone is sent next time)."""
        if self.histories is None or self._segment_state is None or result.region is None:
            return
        key = self._segment_state[0]
        history = self.histories.get(key)
        if history is None:
            return
        last = history.steps[-1] if history.steps else None
        if last is None or last.written is not None:
            del self.histories[key]
            return
        result.step = last
        last.written = [list(b) for b in result.bbox]
        history.version = None  # until segment_written says what the segment holds now

    def _describe(self):
        """Who answers this session, for the history: its URL, and the model and version when the server says."""
        session = self._session
        if self._description[0] is not session:
            info = getattr(session, "server_info", None)  # RemoteSession asks our server's /x/info once
            info = info if isinstance(info, dict) else {}
            self._description = (session, {
                "url": _text(getattr(session, "server_url", None)), "model": _text(info.get("model")),
                "version": _text(info.get("version")) or _text(getattr(session, "INFERENCE_SESSION_VERSION", None))})
        return self._description[1]

    def has_history(self, segment_key):
        """Whether segment ``segment_key`` has recorded prompts (an undo can then rebuild the server's state)."""
        return bool(getattr(self._history(segment_key), "steps", None))

    def adopt_history(self, segment_key, history, version, image_state):
        """Continue segment ``segment_key`` from ``history`` (read back from a saved scene and checked against the
        segment, now at ``version``, and the image ``image_state`` = (key, version)): the next prompt on it rebuilds
        the server's state from the history first."""
        history.version, history.image_state = version, image_state
        self.histories[segment_key] = history
        if self._segment_state is not None and self._segment_state[0] == segment_key:
            self._segment_state = None

    def note_written(self, result, written):
        """Say how ``result``'s region was written into the segment (``written``: what the segment holds in the
        result's box now). When masking changed it, the segment no longer equals the server's buffer there: the
        history keeps the server's region, so that a replay rebuilds that buffer (``PromptHistory.server_segment``)."""
        step = result.step if result is not None else None
        if step is not None and result.region is not None and not np.array_equal(np.asarray(written) != 0,
                                                                                  result.region != 0):
            step.cut(result.region)

    # ------------------------------------------------------------------ actions

    def prompt(self, kind, args, image, segment, positive=True, image_key=None, image_version=None,
               segment_key=None, segment_version=None, run_prediction=True):
        """Send one prompt, first syncing image and segment if needed. Returns a ``PromptResult``. With
        ``run_prediction=False`` the server only adds it (nothing changes until ``predict``).

        ``kind`` is point / bbox / scribble / lasso; ``args``: ``{"coordinates": (i0, i1, i2)}``,
        ``{"bbox": [[lo, hi]] * 3}``, or ``{"mask": array, "interaction_bbox": box or None}``, all in array order.
        ``image`` is [x, y, z] or [c, x, y, z]; ``segment`` the caller's labelmap [x, y, z] (read, not written).
        After a recovery (see the module docstring) the result's ``timings["recovered"]`` says why.
        """
        if kind not in KINDS:
            raise ValueError("unknown prompt kind %r; use one of %s" % (kind, ", ".join(KINDS)))
        recovered = None
        for attempt in (0, 1):
            timings = {} if recovered is None else {"recovered": recovered}
            try:
                self._sync(image, segment, image_key, image_version, segment_key, segment_version, timings)
                return self._send(kind, args, bool(positive), timings, bool(run_prediction))
            except SessionExpiredError as exc:  # BackendLostError included
                if attempt:
                    raise
                recovered = self._recover(exc)
        raise AssertionError("unreachable")

    def auto_segment(self, model, image, spacing, fields=None, image_key=None, image_version=None):
        """Run the server's automatic model ``model`` on the image (sent first if the server does not hold it).
        Returns ``(bbox, region, labels, timings)`` as ``RemoteSession.auto_segment``. Recovers an expired session
        like ``prompt``. The server's prompt state is untouched: the next prompt sends its segment as usual."""
        recovered = None
        for attempt in (0, 1):
            timings = {} if recovered is None else {"recovered": recovered}
            try:
                session = self._sync_image(image, image_key, image_version, timings)
                bbox, region, labels, server = session.auto_segment(model, spacing=spacing, **(fields or {}))
                timings.update({"server_%s_ms" % k: v * 1e3 for k, v in server.items()})
                return bbox, region, labels, timings
            except SessionExpiredError as exc:  # BackendLostError included
                if attempt:
                    raise
                recovered = self._recover(exc)
        raise AssertionError("unreachable")

    def _send(self, kind, args, positive, timings, run=True):
        s = self.session
        if kind == "point":
            s.add_point_interaction(args["coordinates"], include_interaction=positive, run_prediction=run)
        elif kind == "bbox":
            s.add_bbox_interaction(args["bbox"], include_interaction=positive, run_prediction=run)
        else:
            method = s.add_scribble_interaction if kind == "scribble" else s.add_lasso_interaction
            method(args["mask"], include_interaction=positive, run_prediction=run,
                   interaction_bbox=args.get("interaction_bbox"))
        result = self._result(kind, run, timings)
        self._record(kind, args, positive, result)
        return result

    def predict(self, image, segment, image_key=None, image_version=None, segment_key=None, segment_version=None):
        """Run the prediction on the prompts added without one (``prompt(..., run_prediction=False)``), the image and
        segment synced first. Returns a ``PromptResult``. A server that forgot the session forgot those prompts too:
        with the segment's history (which recorded them as the server took them) a new session is rebuilt from it and
        the prediction runs there, as in the uninterrupted session (once: lost again, the error says to Run again);
        without one, the session is dropped (the next action claims a new one) and the error says to place them
        again."""
        recovered = None
        for attempt in (0, 1):
            timings = {} if recovered is None else {"recovered": recovered}
            replays = self.replays
            try:
                self._sync(image, segment, image_key, image_version, segment_key, segment_version, timings)
                if recovered is not None and self.replays == replays:
                    # No history rebuilt them (it no longer applied, or the server refused it): the segment went
                    # alone, as a new start, and the prompts collected since the last Run are gone.
                    raise NNInteractiveError("The server lost this session (%s), and with it the prompts placed "
                                             "since the last Run: place them again, then Run." % recovered)
                ran = self.session._predict() is not None  # the official sessions' (and ours') name for /predict
                break
            except SessionExpiredError as exc:  # BackendLostError included
                lost = self._recover(exc)
                if attempt:  # lost again: the history still holds the prompts, the next Run rebuilds them
                    raise SessionExpiredError("The server was lost again (%s). The prompts placed are kept: Run "
                                              "again." % lost)
                if not self.has_history(segment_key):
                    raise SessionExpiredError("The server lost this session (%s), and with it the prompts placed "
                                              "since the last Run: place them again, then Run." % lost)
                recovered = lost
        result = self._result("predict", ran, timings)
        self._record_prediction(result)
        return result

    def _result(self, kind, ran, timings):
        s = self._session
        timings.update(s.last_timing)
        return PromptResult(kind, s.last_bbox, s.last_region, ran, timings)

    def undo(self):
        """Undo the last prompt on the server; ``apply`` the result to restore the region. None when the
        server session is gone. When the server had nothing left to undo (it keeps one level), its segment no
        longer follows the caller's: the next prompt sends the segment again."""
        if self._session is None:
            return None
        key = self._segment_state[0] if self._segment_state is not None else None
        try:
            ran = self._session.undo()
        except SessionExpiredError as exc:  # BackendLostError included: nothing to undo on a new session
            self._recover(exc)
            return None
        result = self._result("undo", ran, {})
        history = self._history(key)
        if not ran:
            self._segment_state = None
            if history is not None:  # the caller may restore its segment by itself: send that, not a replay
                del self.histories[key]
        elif history is not None:
            history.pop()
            if result.region is not None:
                history.version = None  # until segment_written
        return result

    def undo_prompt(self, segment_key, version, in_step=True, run=False):
        """Undo the last prompt of segment ``segment_key``, whose segment the caller has already restored (it is now
        at ``version``). With ``in_step`` (the server's state follows the caller's prompts) the server undoes it too;
        otherwise, or when the server cannot (it keeps one level) or was lost, the history forgets the prompt and the
        next prompt rebuilds the server's state from it. ``run``: what is undone is a Run (``predict``): its prompts
        stay, only its result goes. Returns the server's ``PromptResult``, or None."""
        history = self._history(segment_key)
        if history is None or not history.steps:
            if in_step:
                return self.undo()
            self.reset()
            return None
        result = None
        if in_step and self._session is not None and self._segment_state is not None \
                and self._segment_state[0] == segment_key:
            try:
                if self._session.undo():
                    result = self._result("undo", True, {})
            except SessionExpiredError as exc:  # BackendLostError included
                self._recover(exc)
        if run:
            history.unpredict()
        else:
            history.pop()
        history.version = version
        self._segment_state = (segment_key, version) if result is not None else None
        return result

    def reset(self, segment_key=None):
        """Forget the server's interactions; the next prompt sends the current segment again. ``segment_key``: the
        segment that was cleared, whose history ends here."""
        self._segment_state = None
        if segment_key is not None and self.histories is not None:
            self.histories.pop(segment_key, None)
        if self._session is not None and self._image_state is not None:
            try:
                self._session.reset_interactions()
            except SessionExpiredError as exc:  # BackendLostError included
                self._recover(exc)

    def apply(self, result, segment, write=None):
        """Write ``result``'s region into ``segment`` in place (through ``write(segment, slices, region)`` if given).
        Returns the slices written, or None when nothing changed."""
        if result is None or result.region is None:
            return None
        t0 = time.perf_counter()
        (write or _write_region)(segment, result.slices, result.region)
        if write is not None:
            self.note_written(result, segment[result.slices])
        result.timings["apply_ms"] = (time.perf_counter() - t0) * 1e3
        return result.slices

    def segment_written(self, segment_key, version=None, segment=None):
        """Record that the server's target buffer and the caller's segment now agree (after ``apply``): pass the
        segment's new ``version``, or the ``segment`` itself to checksum it."""
        if version is None:
            if segment is None:
                raise ValueError("pass the segment's new version, or the segment to checksum")
            version = fingerprint(segment)
        self._segment_state = (segment_key, version)
        history = self._history(segment_key)
        if history is not None:
            history.version = version

    def prompt_and_apply(self, kind, args, image, segment, positive=True, write=None):
        """For scripts: prompt, write the result into ``segment`` and record it (checksums, no versions needed)."""
        result = self.prompt(kind, args, image, segment, positive)
        if self.apply(result, segment, write) is not None:
            self.segment_written(None, segment=segment)
        return result

    def _recover(self, exc):
        """Give up the current session after ``exc`` (expired or lost); the next action claims a new one."""
        self.recoveries += 1
        self.last_recovery = str(exc)
        self._drop_session()
        self._reclaiming = True
        return self.last_recovery

    def _drop_session(self):
        session, self._session = self._session, None
        self._image_state = self._segment_state = None
        if session is not None:
            session.close()

    def close(self):
        """Release the session (in the background) and never claim another."""
        self._closed = True
        self._drop_session()
