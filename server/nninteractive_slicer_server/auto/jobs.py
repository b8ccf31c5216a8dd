"""Uploads of the automatic-model endpoints: how an uploaded study archive is unpacked, and the jobs whose outputs
wait for download. (Where a request may read and write on server paths: ``auto/paths.py``.)

* ``unpack_archive``: a zip or tar archive (gzip/bz2/xz tars too, recognised by content) unpacked into a fresh
  folder, entry by entry: no absolute names, no ``..``, no links or devices (400), the entries' count and total
  unpacked size bounded while writing (``Limits``: 413); files are created exclusively and never through a link.
* ``JobStore``: the jobs (``Job``) under the jobs folder, one folder each with its index (``job.json``, written
  atomically): an upload's archive, then ``inputs/`` and ``output/``, then ``outputs.zip``. Owned by the user who
  posted it (404 to anyone else), deleted ``job_ttl_s`` after it ended (``expire``, run by the server's reaper),
  read back after a restart. Uploads being received are spooled in ``.spool/`` and count against their user's
  share before any job exists; the runs' private copies of their inputs are made there too (``paths.py``); the
  shares (jobs kept, bytes per user, all jobs) are checked here. The runner (auto/runner.py) moves jobs through
  queued, running, done / failed / cancelled.
"""

import concurrent.futures
import json
import logging
import os
import re
import shutil
import stat
import tarfile
import tempfile
import threading
import time
import uuid
import zipfile

from ..cancel import NEVER, CancelToken
from ..errors import Busy, NotFound, TooLarge, Unavailable
from ..validate import BadInput

log = logging.getLogger("nninteractive_slicer_server")

COPY_BYTES = 1 << 20


# ---------------------------------------------------------------------------------------------------------- archives

def _member_parts(name, what):
    """The path components of an archive entry name, refused (BadInput) when absolute or climbing out."""
    if not name or "\x00" in name:
        raise BadInput("%s has an entry with an empty name" % what)
    unified = name.replace("\\", "/")
    if unified.startswith("/") or (len(unified) > 1 and unified[1] == ":"):
        raise BadInput("%s entry %r has an absolute path; entries must be relative to the archive's top" % (what, name))
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise BadInput("%s entry %r climbs out of the archive ('..'); refused" % (what, name))
    return parts


def _target(dest, parts):
    path = os.path.join(dest, *parts)
    real_parent = os.path.realpath(os.path.dirname(path))
    if not (real_parent == dest or real_parent.startswith(dest + os.sep)):  # cannot happen without links; checked
        raise BadInput("archive entry %r would land outside the study folder; refused" % "/".join(parts))
    return path


def _write(src, path, limits, counted):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError:
        raise BadInput("the archive holds %r twice" % os.path.basename(path))
    except IsADirectoryError:
        raise BadInput("the archive holds %r both as a file and as a folder" % os.path.basename(path))
    with os.fdopen(fd, "wb") as out:
        while True:
            block = src.read(COPY_BYTES)
            if not block:
                return
            counted[0] += len(block)
            limits.check_unpacked(counted[0], counted[1])
            out.write(block)


def archive_kind(source):
    """"zip", "tar" or None, from the content of ``source`` (a path or a seekable binary file)."""
    def rewind():
        if not isinstance(source, (str, os.PathLike)):
            source.seek(0)

    try:
        if zipfile.is_zipfile(source):
            return "zip"
        rewind()
        if tarfile.is_tarfile(source):
            return "tar"
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile):
        pass
    finally:
        rewind()
    return None


def unpack_archive(source, dest, limits, cancel=NEVER):
    """Unpack the archive ``source`` (a path or a seekable binary file) into the existing, empty folder ``dest`` (see
    the module docstring). Returns ``(files, bytes)``. ``BadInput`` (400) for an archive that is not one or holds a
    refused entry; ``TooLarge`` (413) past the limits; ``RunCancelled`` between entries once ``cancel`` is set."""
    dest = os.path.realpath(dest)
    kind = archive_kind(source)
    if kind is None:
        raise BadInput("the uploaded file is not a zip or tar archive (tar.gz, tgz, tar.bz2 and tar.xz work too)")
    counted = [0, 0]  # bytes, entries
    files = 0
    try:
        if kind == "zip":
            with zipfile.ZipFile(source) as zf:
                for info in zf.infolist():
                    cancel.check()
                    counted[1] += 1
                    limits.check_unpacked(counted[0], counted[1])
                    parts = _member_parts(info.filename, "the zip archive")
                    mode = info.external_attr >> 16
                    if stat.S_ISLNK(mode):
                        raise BadInput("the zip archive entry %r is a symbolic link; links are refused" % info.filename)
                    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: no type recorded (DOS, writestr)
                        raise BadInput("the zip archive entry %r is not a file or folder; refused" % info.filename)
                    if not parts:
                        continue
                    target = _target(dest, parts)
                    if info.is_dir():
                        os.makedirs(target, exist_ok=True)
                        continue
                    limits.check_unpacked(counted[0] + info.file_size, counted[1])  # declared: refuse early
                    with zf.open(info) as src:
                        _write(src, target, limits, counted)
                    files += 1
        else:
            opened = tarfile.open(source, "r:*") if isinstance(source, (str, os.PathLike)) else \
                tarfile.open(fileobj=source, mode="r:*")
            with opened as tf:
                for member in tf:
                    cancel.check()
                    counted[1] += 1
                    limits.check_unpacked(counted[0], counted[1])
                    parts = _member_parts(member.name, "the tar archive")
                    if member.issym() or member.islnk():
                        raise BadInput("the tar archive entry %r is a link; links are refused" % member.name)
                    if not (member.isfile() or member.isdir()):
                        raise BadInput("the tar archive entry %r is not a file or folder; refused" % member.name)
                    if not parts:
                        continue
                    target = _target(dest, parts)
                    if member.isdir():
                        os.makedirs(target, exist_ok=True)
                        continue
                    limits.check_unpacked(counted[0] + member.size, counted[1])
                    src = tf.extractfile(member)
                    with src:
                        _write(src, target, limits, counted)
                    files += 1
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zipfile.LargeZipFile) as exc:
        raise BadInput("the uploaded archive is damaged (%s)" % exc)
    except NotImplementedError as exc:  # a zip compression method Python lacks
        raise BadInput("the uploaded archive cannot be read here (%s)" % exc)
    return files, counted[0]


def zip_folder(folder, zip_path):
    """Every file under ``folder`` into ``zip_path`` (names relative to ``folder``'s parent, as the established
    server's download zips are laid out: ``output/...``); links are not followed."""
    parent = os.path.dirname(folder)
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                if os.path.islink(full) or not os.path.isfile(full):
                    continue
                zf.write(full, os.path.relpath(full, parent))
    return zip_path


# ---------------------------------------------------------------------------------------------------------- jobs

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)
UPLOAD, PATHS = "upload", "paths"  # a study uploaded (unpacked in the job's folder), or on server paths
INDEX = "job.json"  # a job's index file, in its folder
UPLOAD_FILE = "upload"  # the received archive, in its job's folder until unpacked
SPOOL = ".spool"  # uploads being received, under the jobs folder (never the system's temporary folder)
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
RESTARTED = ("the server stopped before this job finished (it was restarted); submit the study again")


class Job:
    """One automatic run. ``kind`` UPLOAD: its folder holds ``upload`` (the archive), then ``inputs/`` and
    ``output/``, then ``outputs.zip``; PATHS: a study on server paths, its folder holds only the index. A job without
    a folder is the synchronous ``/infer``'s run (never stored). ``request``: the fields as the client gave them
    (echoed; no server path for uploads); ``fields``: what the run gets. ``token`` cancels it; ``future`` holds
    its answer (the result, or the exception) for whoever waits on it."""

    def __init__(self, job_id, user, kind, folder=None, request=None, created=None):
        self.id, self.user, self.kind, self.folder = job_id, user, kind, folder
        self.status = QUEUED
        self.created, self.started, self.finished = created, None, None
        self.request = request
        self.fields = None
        self.result = None
        self.error, self.error_status = None, None
        self.progress = None
        self.bytes = 0  # what its folder holds on disk
        self.sync = False  # a client waits on the answer: a failed sync job leaves nothing behind
        self.token = CancelToken()
        self.future = concurrent.futures.Future()

    @property
    def inputs(self):
        return os.path.join(self.folder, "inputs")

    @property
    def output(self):
        return os.path.join(self.folder, "output")

    @property
    def upload(self):
        return os.path.join(self.folder, UPLOAD_FILE)

    @property
    def zip_path(self):
        return os.path.join(self.folder, "outputs.zip")

    def say(self, message, fraction=None, **_more):
        """The run's progress (``pipeline.run_study``'s ``progress``): kept for ``GET /jobs/{id}``, without the job's
        own folder in it."""
        text = str(message)
        if self.folder:
            text = text.replace(self.folder + os.sep, "").replace(self.folder, ".")
        self.progress = {"message": text[:500]}
        if isinstance(fraction, (int, float)) and not isinstance(fraction, bool):
            self.progress["fraction"] = round(min(1.0, max(0.0, float(fraction))), 4)

    def index(self):
        return {"id": self.id, "user": self.user, "kind": self.kind, "status": self.status, "created": self.created,
                "started": self.started, "finished": self.finished, "request": self.request, "result": self.result,
                "error": self.error, "error_status": self.error_status, "progress": self.progress,
                "bytes": self.bytes}

    @classmethod
    def from_index(cls, data, folder):
        """A job read back from its index (``ValueError`` when the index is not one of ours)."""
        if not (isinstance(data, dict) and data.get("id") == os.path.basename(folder) and
                isinstance(data.get("user"), str) and data.get("kind") in (UPLOAD, PATHS) and
                data.get("status") in (QUEUED, RUNNING) + FINISHED):
            raise ValueError("not a job index")
        job = cls(data["id"], data["user"], data["kind"], folder, data.get("request"), data.get("created"))
        for key in ("status", "started", "finished", "result", "error", "error_status", "progress"):
            setattr(job, key, data.get(key))
        job.bytes = int(data.get("bytes") or 0)
        return job

    def public(self):
        """What its owner sees (``GET /jobs/{id}``): no server path of the jobs folder."""
        out = {"job_id": self.id, "status": self.status, "kind": self.kind, "created": self.created,
               "started": self.started, "finished": self.finished, "progress": self.progress,
               "request": self.request}
        if self.status == DONE:
            out["result"] = self.result
            if self.kind == UPLOAD:
                out["download"] = "/download/%s" % self.id
        if self.status == FAILED:
            out.update(error=self.error, error_status=self.error_status)
        return out


class Receipt:
    """An upload being received for ``user``: its bytes count against the user's share of the jobs folder while
    they arrive (``add``), before any job exists."""

    def __init__(self, store, user):
        self.store, self.user, self.bytes = store, user, 0

    def add(self, nbytes):
        with self.store._mu:
            self.store._check_bytes(self.user, self.bytes + nbytes, self.bytes)
            self.bytes += nbytes
            self.store._receiving[self.user] = self.store._receiving.get(self.user, 0) + nbytes

    def close(self):
        with self.store._mu:
            self.store._release(self)


class JobStore:
    """Jobs under ``root`` (``None``: a temporary folder of this process, removed at close): one folder per job with
    its index (``job.json``, written atomically), owned by the user who posted it. An operator's folder survives a
    restart: finished jobs are read back, unfinished ones marked failed (``RESTARTED``). Finished jobs are deleted
    ``job_ttl_s`` after they ended (``expire``, run by the server's reaper). Shares: ``max_jobs`` kept at once
    (503 + Retry-After: others hold them), ``max_jobs_per_user`` of one user (429), ``max_job_bytes_per_user`` of
    disk for one user's jobs and uploads in progress (413 for one upload larger than that, 429 otherwise)."""

    RETRY_AFTER = 60

    def __init__(self, root=None, limits=None, clock=time.time):
        self._own = root is None
        self.root = os.path.realpath(tempfile.mkdtemp(prefix="nninteractive-jobs-") if root is None else root)
        os.makedirs(self.root, exist_ok=True)
        self.spool = os.path.join(self.root, SPOOL)
        shutil.rmtree(self.spool, ignore_errors=True)  # uploads a stopped server was receiving
        os.makedirs(self.spool, mode=0o700)
        self.limits = limits
        self.clock = clock
        self._jobs = {}
        self._receiving = {}  # user -> bytes of their uploads being received
        self._mu = threading.Lock()
        self.reloaded = self._reload()

    # ------------------------------------------------------------------ start-up

    def _reload(self):
        """Read back the jobs of an earlier run of the server; returns how many."""
        n = 0
        for name in sorted(os.listdir(self.root)):
            folder = os.path.join(self.root, name)
            if name == SPOOL or os.path.islink(folder) or not os.path.isdir(folder):
                continue
            try:
                with open(os.path.join(folder, INDEX), encoding="utf-8") as f:
                    job = Job.from_index(json.load(f), folder)
                if not JOB_ID.match(name):
                    raise ValueError("not a job id")
            except (OSError, ValueError) as exc:  # a job folder left half-made by a crash
                log.warning("auto: removing %s from the jobs folder: not a job of this server (%s)", name, exc)
                shutil.rmtree(folder, ignore_errors=True)
                continue
            if job.status in (QUEUED, RUNNING) or (job.status == DONE and job.kind == UPLOAD and
                                                   not os.path.isfile(job.zip_path)):
                job.status, job.finished = FAILED, self.clock()
                job.error, job.error_status = RESTARTED, 503
                job.result = None
                self._clear_files(job)
                self.save(job)
            self._jobs[job.id] = job
            n += 1
        if n:
            log.info("auto: %d job(s) read back from %s", n, self.root)
        return n

    # ------------------------------------------------------------------ uploads and shares

    def spool_file(self):
        """A new, empty file under the jobs folder for an upload being received: (open binary file, path)."""
        path = os.path.join(self.spool, uuid.uuid4().hex)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        return os.fdopen(fd, "wb"), path

    def receiving(self, user):
        return Receipt(self, user)

    def _release(self, receipt):
        left = self._receiving.get(receipt.user, 0) - receipt.bytes
        if left > 0:
            self._receiving[receipt.user] = left
        else:
            self._receiving.pop(receipt.user, None)
        receipt.bytes = 0

    def _check_bytes(self, user, nbytes, counted=0):
        """Under the lock: may ``user`` hold ``nbytes`` more (``counted`` of them already in ``_receiving``)?"""
        quota = self.limits.max_job_bytes_per_user
        if nbytes > quota:
            raise TooLarge("the upload is at least %d bytes; one user's jobs may take at most %d bytes on this server "
                           "(--max-job-bytes-per-user)" % (nbytes, quota))
        used = sum(j.bytes for j in self._jobs.values() if j.user == user) + self._receiving.get(user, 0) - counted
        if used + nbytes > quota:
            raise Busy("your jobs and uploads take %d of the %d bytes one user may keep on this server "
                       "(--max-job-bytes-per-user); download the outputs you need and DELETE /jobs/{id} the jobs you "
                       "are done with, or wait until they expire (%.0f s after they end)"
                       % (used, quota, self.limits.job_ttl_s), retry_after=self.RETRY_AFTER)

    def _check_counts(self, user):
        if len(self._jobs) >= self.limits.max_jobs:
            raise Unavailable("this server keeps %d jobs already (--max-jobs); try again when older ones are "
                              "downloaded or expire" % self.limits.max_jobs, retry_after=self.RETRY_AFTER)
        mine = sum(1 for j in self._jobs.values() if j.user == user)
        if mine >= self.limits.max_jobs_per_user:
            raise Busy("you keep %d jobs on this server, the most one user may (--max-jobs-per-user); download the "
                       "outputs you need and DELETE /jobs/{id} the jobs you are done with, or wait until they expire "
                       "(%.0f s after they end)" % (mine, self.limits.job_ttl_s), retry_after=self.RETRY_AFTER)

    def check_admission(self, user, nbytes=0):
        """Would a job of ``nbytes`` (an upload's declared size) be taken now? Raises what ``create`` would: checked
        before an upload is received, so a client that cannot get a job sends nothing."""
        self.expire()
        with self._mu:
            self._check_counts(user)
            if nbytes:
                self._check_bytes(user, nbytes)

    # ------------------------------------------------------------------ jobs

    def create(self, user, kind, request, receipt=None, spooled=None):
        """A new job of ``user`` (queued, its index written), once its upload (``spooled``, counted by ``receipt``)
        has arrived and been checked: the upload moves into the job's folder. Raises ``check_admission``'s refusals."""
        self.expire()
        job_id = uuid.uuid4().hex
        folder = os.path.join(self.root, job_id)
        with self._mu:
            self._check_counts(user)
            job = Job(job_id, user, kind, folder, request, self.clock())
            os.makedirs(folder, mode=0o700)
            if spooled is not None:
                os.replace(spooled, job.upload)
                job.bytes = receipt.bytes
                self._release(receipt)
            self._jobs[job_id] = job
        self.save(job)
        return job

    def save(self, job):
        """Write the job's index atomically (a crash leaves the old index or the new one, never half of one)."""
        if job.folder is None:
            return
        tmp = os.path.join(job.folder, ".%s.%s" % (INDEX, uuid.uuid4().hex[:8]))
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(job.index(), f, separators=(",", ":"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(job.folder, INDEX))
        except OSError as exc:
            log.warning("auto: could not write the index of job %s (%s)", job.id, exc)
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def measure(self, job):
        """Count what the job's folder holds now (its owner's share of the disk)."""
        total = 0
        for dirpath, _dirs, files in os.walk(job.folder):
            for name in files:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size
                except OSError:
                    pass
        job.bytes = total

    def zip_outputs(self, job):
        """Zip the job's outputs into its folder and drop its inputs and output folders."""
        zip_folder(job.output, job.zip_path)
        for sub in (job.inputs, job.output):
            shutil.rmtree(sub, ignore_errors=True)
        self.measure(job)

    def _clear_files(self, job):
        """Everything of the job's folder but its index."""
        for name in os.listdir(job.folder):
            if name == INDEX:
                continue
            path = os.path.join(job.folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        self.measure(job)

    def clear_files(self, job):
        if job.folder is not None and os.path.isdir(job.folder):
            self._clear_files(job)

    def discard(self, job):
        """Delete the job's folder, then forget the job (once it answers 404, its files are gone)."""
        if job.folder is not None:
            shutil.rmtree(job.folder, ignore_errors=True)
        with self._mu:
            self._jobs.pop(job.id, None)

    def find(self, job_id, user):
        """``user``'s job ``job_id``; NotFound (404) when unknown, expired or another user's (an id names nothing to
        anyone else)."""
        self.expire()
        job_id = str(job_id)
        with self._mu:
            job = self._jobs.get(job_id) if JOB_ID.match(job_id) else None
        if job is None or job.user != user:
            raise NotFound("no job %r: unknown, or it expired (a job is kept %.0f s after it ends), or it was deleted"
                           % (job_id[:64], self.limits.job_ttl_s))
        return job

    def download(self, job_id, user):
        """The outputs zip of ``user``'s finished upload job (404 otherwise, saying why to its owner)."""
        job = self.find(job_id, user)
        if job.kind != UPLOAD:
            raise NotFound("job %s ran on server paths: its outputs are where its request put them (output_dir)"
                           % job.id)
        if job.status != DONE or not os.path.isfile(job.zip_path):
            raise NotFound("job %s has no outputs to download: it is %s (GET /jobs/%s says more)"
                           % (job.id, job.status, job.id))
        return job

    def of_user(self, user):
        with self._mu:
            return sorted((j for j in self._jobs.values() if j.user == user), key=lambda j: j.created or 0)

    def expire(self):
        """Delete the jobs that ended more than ``job_ttl_s`` ago; returns how many."""
        now, ttl = self.clock(), self.limits.job_ttl_s
        with self._mu:
            old = [j for j in self._jobs.values() if j.status in FINISHED and now - (j.finished or now) > ttl]
            for j in old:
                del self._jobs[j.id]
        for j in old:
            shutil.rmtree(j.folder, ignore_errors=True)
        if old:
            log.info("auto: deleted %d expired job(s)", len(old))
        return len(old)

    def counts(self):
        with self._mu:
            jobs = list(self._jobs.values())
        out = {s: 0 for s in (QUEUED, RUNNING) + FINISHED}
        for j in jobs:
            out[j.status] += 1
        out["kept"] = len(jobs)
        return out

    def __len__(self):
        with self._mu:
            return len(self._jobs)

    def close(self):
        if self._own:
            shutil.rmtree(self.root, ignore_errors=True)
