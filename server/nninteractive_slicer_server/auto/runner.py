"""The run limit of automatic studies: ``max_running_jobs`` threads of their own run the jobs (unpacking an upload,
the study, zipping its outputs), never the request thread pool; a request only queues its job and, when it answers
synchronously, waits for it.

* Order: the next job is the oldest of the user with the fewest jobs running, so one user's many jobs never hold
  everyone else's back; ``position`` says how many jobs start before a queued one.
* Cancel (``cancel``: ``DELETE /jobs/{id}``, a synchronous client that went away): a queued job leaves the queue at
  once; a running one stops at its next piece (its ``CancelToken`` is checked before the run, between the study's
  steps and inside the study, see cancel.py). Either way it is then removed with its files.
* Drain (SIGTERM, shutdown.py): ``drain`` starts no more jobs and fails the queued ones (503: submit again); the
  running ones are work in progress that the shutdown waits for until its deadline, when ``stop_running`` cancels
  them and marks them failed (their index says so before the process ends).
* Outcomes: done (the result), failed (the error and its HTTP status; a failed synchronous job leaves nothing
  behind, an asynchronous one keeps its index until it expires), cancelled (removed). ``job.future`` gets the
  result or the exception for whoever waits.
"""

import collections
import contextvars
import itertools
import logging
import threading

from ..cancel import RunCancelled
from ..errors import Draining, OutOfMemory, Problem, is_out_of_memory
from ..logs import request_id_var
from ..validate import BadInput
from .jobs import CANCELLED, DONE, FAILED, RUNNING

log = logging.getLogger("nninteractive_slicer_server")

DRAIN_RETRY_AFTER = 10


def refusal_when_draining():
    """What a new study gets from a server that is shutting down (the route's early check and ``submit``'s)."""
    return Draining("this server is shutting down and takes no new automatic run; send the study again in a moment "
                    "(a balancer sends it to another server)", retry_after=DRAIN_RETRY_AFTER)


class JobRunner:
    def __init__(self, store, workers=2):
        self.store = store
        self.workers = max(1, int(workers))
        self._queue = []  # waiting jobs, in submission order
        self._running = {}  # job id -> job
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._draining = self._closed = False
        self._threads = [threading.Thread(target=self._loop, name="nninteractive-job-%d" % i, daemon=True)
                         for i in range(self.workers)]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ submitting

    def submit(self, job, work):
        """Queue ``job``: ``work(job)`` runs on a runner thread in the submitting request's context (its log lines
        carry the request id) and returns the result. ``Draining`` (503) once the server is shutting down."""
        job.work = work
        job.context = contextvars.copy_context()
        with self._cv:
            if self._draining:
                raise refusal_when_draining()
            job.seq = next(self._seq)
            self._queue.append(job)
            self._cv.notify()
        return job

    def _pick(self, queue, running_per_user):
        return min(queue, key=lambda j: (running_per_user[j.user], j.seq))

    def position(self, job):
        """``{"ahead", "running", "workers"}`` for a queued job (``ahead``: the jobs that start before it, were
        nothing to end meanwhile); None when it is not queued."""
        with self._cv:
            if job not in self._queue:
                return None
            per_user = collections.Counter(j.user for j in self._running.values())
            queue, ahead = list(self._queue), 0
            while True:
                nxt = self._pick(queue, per_user)
                if nxt is job:
                    break
                ahead += 1
                per_user[nxt.user] += 1
                queue.remove(nxt)
            return {"ahead": ahead, "running": len(self._running), "workers": self.workers}

    def stats(self):
        with self._cv:
            return {"queued": len(self._queue), "running": len(self._running), "workers": self.workers}

    def active(self):
        """Jobs queued or running (work in progress for the shutdown)."""
        with self._cv:
            return len(self._queue) + len(self._running)

    def running(self):
        with self._cv:
            return len(self._running)

    # ------------------------------------------------------------------ running

    def _loop(self):
        while True:
            with self._cv:
                while not self._queue or self._draining:
                    if self._closed:
                        return
                    self._cv.wait()
                job = self._pick(self._queue, collections.Counter(j.user for j in self._running.values()))
                self._queue.remove(job)
                self._running[job.id] = job
                job.status, job.started = RUNNING, self.store.clock()
            self.store.save(job)
            try:
                job.context.run(self._run, job)
            except BaseException:  # never lose a runner thread
                log.exception("auto: error finishing job %s", job.id)
                with self._cv:
                    self._running.pop(job.id, None)

    def _run(self, job):
        try:
            job.token.check()
            outcome, value = DONE, job.work(job)
        except RunCancelled as exc:
            outcome, value = CANCELLED, exc
        except (Problem, BadInput) as exc:
            outcome, value = FAILED, exc
        except Exception as exc:
            outcome = FAILED
            if is_out_of_memory(exc):
                value = OutOfMemory("the server ran out of memory (or its device failed) running this study (%s); "
                                    "try again later, or with fewer folds" % type(exc).__name__)
            else:
                log.exception("auto: job %s failed", job.id)
                value = Problem("the automatic segmentation failed: internal error; request id %s (the server log "
                                "has the details)" % request_id_var.get())
        self._finish(job, outcome, value)

    def _finish(self, job, outcome, value):
        with self._cv:  # one decision with cancel(): a job is either finished here or cancelled there
            self._running.pop(job.id, None)
            if job.token.cancelled:
                if getattr(job, "stopped", None):
                    outcome, value = FAILED, job.stopped
                else:
                    outcome = CANCELLED
                    value = value if isinstance(value, RunCancelled) else RunCancelled(
                        "the automatic run was cancelled (%s)" % job.token.reason)
            job.status, job.finished = outcome, self.store.clock()
            self._cv.notify_all()
        if outcome == DONE:
            job.result = value
            self.store.save(job)
            job.future.set_result(value)
            log.info("auto: job %s done", job.id)
        elif outcome == CANCELLED:
            self.store.discard(job)
            job.future.set_exception(value)
            log.info("auto: job %s cancelled (%s); its files are deleted", job.id, job.token.reason)
        else:
            self._failed(job, value)

    def _failed(self, job, exc):
        job.status = FAILED
        job.error = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
        job.error_status = getattr(exc, "status", 400 if isinstance(exc, BadInput) else 500)
        if job.finished is None:
            job.finished = self.store.clock()
        if job.sync:
            self.store.discard(job)
        else:
            self.store.clear_files(job)
            self.store.save(job)
        if not job.future.done():
            job.future.set_exception(exc)
        log.info("auto: job %s failed (%d): %s", job.id, job.error_status, job.error)

    # ------------------------------------------------------------------ stopping

    def cancel(self, job, reason):
        """Cancel an unfinished job: True when it was queued (now removed) or running (it stops at its next piece,
        then is removed); False when it had finished already."""
        with self._cv:
            if job in self._queue:
                self._queue.remove(job)
                queued = True
            elif self._running.get(job.id) is job:
                queued = False
            else:
                return False
            job.token.cancel(reason)
            job.status = CANCELLED
        if queued:
            job.finished = self.store.clock()
            self.store.discard(job)
            job.future.set_exception(RunCancelled("the automatic run was cancelled (%s)" % reason))
            log.info("auto: job %s cancelled before it started (%s)", job.id, reason)
        return True

    def drain(self, reason="the server is shutting down"):
        """Start no more jobs; fail the queued ones (503: submit again). Returns how many were queued."""
        with self._cv:
            self._draining = True
            queued, self._queue = self._queue, []
        for job in queued:
            job.token.cancel(reason)
            self._failed(job, Draining("%s before this job started; submit it again (to another server, or once "
                                       "this one is back)" % reason, retry_after=DRAIN_RETRY_AFTER))
        return len(queued)

    def stop_running(self, reason):
        """Cancel the running jobs and mark them failed now (their index says so even if the process ends before
        they reach their next piece). Returns how many."""
        with self._cv:
            running = [j for j in self._running.values() if getattr(j, "stopped", None) is None]
        for job in running:
            job.stopped = Draining("%s; submit the study again" % reason, retry_after=DRAIN_RETRY_AFTER)
            job.token.cancel(reason)
            job.status, job.finished = FAILED, self.store.clock()
            job.error, job.error_status = job.stopped.detail, job.stopped.status
            self.store.save(job)
        return len(running)

    def close(self):
        self.drain("the server stopped")
        self.stop_running("the server stopped before the job finished")
        with self._cv:
            self._closed = True
            self._cv.notify_all()
