"""Server paths and uploads of the automatic-model endpoints: where a request may read and write, how an uploaded
study archive is unpacked, and the jobs whose outputs wait for download.

* ``PathGuard``: a request's paths, resolved (``..`` and symbolic links, as the file system will see them), must lie
  inside one of the operator's directories (``--infer-root``); anything else is ``Forbidden`` (403). Without any
  root, requests on server paths are off, and the answer says so. ``resolver()`` is what ``pipeline.run_study``
  calls on every path it touches.
* ``unpack_archive``: a zip or tar archive (gzip/bz2/xz tars too, recognised by content) unpacked into a fresh
  folder, entry by entry: no absolute names, no ``..``, no links or devices (400), the entries' count and total
  unpacked size bounded while writing (``Limits``: 413); files are created exclusively and never through a link.
* ``JobStore``: one folder per ``/infer_file`` job (``inputs/``, ``output/``, then ``outputs.zip``), owned by the
  user who posted it, deleted ``job_ttl_s`` after it finished (``expire``, run by the server's reaper).
"""

import logging
import os
import shutil
import stat
import tarfile
import tempfile
import threading
import time
import uuid
import zipfile

from ..errors import Forbidden, NotFound, Unavailable
from ..validate import BadInput

log = logging.getLogger("nninteractive_slicer_server")

COPY_BYTES = 1 << 20


# ---------------------------------------------------------------------------------------------------------- paths

class PathGuard:
    """The directories requests may name (each resolved once, at start-up)."""

    def __init__(self, roots=(), allowed="the directories this server allows (--infer-root)"):
        self.allowed = allowed  # how a refusal names the roots
        self.roots = []
        for root in roots:
            real = os.path.realpath(os.path.expanduser(str(root)))
            if not os.path.isdir(real):
                raise ValueError("--infer-root %s is not a directory" % root)
            if real not in self.roots:
                self.roots.append(real)

    def __bool__(self):
        return bool(self.roots)

    def require_roots(self):
        if not self.roots:
            raise Forbidden("/infer on server paths is off on this server: its operator allows no directory (start it "
                            "with --infer-root DIR to allow one); upload the study to /infer_file instead")

    def inside(self, real):
        return any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in self.roots)

    def confine(self, path, what, base=None):
        """``path`` (relative ones against ``base``, else the server's working directory, as the established server
        reads them) resolved; ``Forbidden`` unless it lies inside a root."""
        if not isinstance(path, str) or not path.strip() or "\x00" in path:
            raise BadInput("%s must be a non-empty path, got %r" % (what, path))
        joined = os.path.join(base, path) if base is not None and not os.path.isabs(path) else path
        real = os.path.realpath(joined)
        if not self.inside(real):
            raise Forbidden("%s %r is outside %s%s" % (what, path, self.allowed,
                                                       "" if self.roots else ": none is allowed"))
        return real

    def resolver(self, base=None):
        """The ``resolve_path(path, field)`` that ``pipeline.run_study`` calls for every path it reads or writes
        (study, series folders and the DICOM files found in them, output folder, masks, tmp_dir): ``confine``."""
        return lambda path, field: self.confine(path, field, base)


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


def unpack_archive(source, dest, limits):
    """Unpack the archive ``source`` (a path or a seekable binary file) into the existing, empty folder ``dest`` (see the module docstring). Returns
    ``(files, bytes)``. ``BadInput`` (400) for an archive that is not one or holds a refused entry; ``TooLarge``
    (413) past the limits."""
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

class Job:
    def __init__(self, job_id, folder, user):
        self.id, self.folder, self.user = job_id, folder, user
        self.created = time.monotonic()
        self.finished = None  # monotonic time the outputs were zipped
        self.zip_path = None

    @property
    def inputs(self):
        return os.path.join(self.folder, "inputs")

    @property
    def output(self):
        return os.path.join(self.folder, "output")


class JobStore:
    """Jobs of ``/infer_file`` under ``root`` (``None``: a temporary folder of this process, removed at close)."""

    def __init__(self, root=None, limits=None, clock=time.monotonic):
        self._own = root is None
        self.root = os.path.realpath(tempfile.mkdtemp(prefix="nninteractive-jobs-") if root is None else root)
        os.makedirs(self.root, exist_ok=True)
        self.limits = limits
        self._clock = clock
        self._jobs = {}
        self._mu = threading.Lock()

    def create(self, user):
        """A new job with empty ``inputs/`` and ``output/`` folders; 503 when ``max_jobs`` are kept already."""
        self.expire()
        with self._mu:
            if len(self._jobs) >= self.limits.max_jobs:
                raise Unavailable("this server keeps %d finished jobs already (--max-jobs); download yours, or try "
                                  "again when older ones expire" % self.limits.max_jobs, retry_after=60)
            job_id = uuid.uuid4().hex
            folder = os.path.join(self.root, job_id)
            os.makedirs(os.path.join(folder, "inputs"))
            os.makedirs(os.path.join(folder, "output"))
            job = self._jobs[job_id] = Job(job_id, folder, user)
            job.created = self._clock()
        return job

    def finish(self, job):
        """Zip the job's outputs into its folder and drop its inputs and output folders."""
        zip_path = os.path.join(job.folder, "outputs.zip")
        zip_folder(job.output, zip_path)
        for sub in (job.inputs, job.output):
            shutil.rmtree(sub, ignore_errors=True)
        job.zip_path = zip_path
        job.finished = self._clock()

    def discard(self, job):
        with self._mu:
            self._jobs.pop(job.id, None)
        shutil.rmtree(job.folder, ignore_errors=True)

    def get(self, job_id, user):
        """The finished job ``job_id`` of ``user``: NotFound (404) when unknown, unfinished, expired or another
        user's (an id names nothing to anyone else)."""
        self.expire()
        with self._mu:
            job = self._jobs.get(str(job_id))
        if job is None or job.user != user or job.zip_path is None or not os.path.isfile(job.zip_path):
            raise NotFound("no job %r: unknown, or its outputs expired (they are kept %.0f s after the job ends)"
                           % (str(job_id)[:64], self.limits.job_ttl_s))
        return job

    def expire(self):
        """Delete jobs whose outputs are older than the TTL (and unfinished ones older than twice that: left behind
        by a crash); returns how many."""
        now, ttl = self._clock(), self.limits.job_ttl_s
        with self._mu:
            old = [j for j in self._jobs.values()
                   if (j.finished is not None and now - j.finished > ttl) or
                   (j.finished is None and now - j.created > 2 * ttl)]
            for j in old:
                del self._jobs[j.id]
        for j in old:
            shutil.rmtree(j.folder, ignore_errors=True)
        if old:
            log.info("auto: deleted %d expired job(s)", len(old))
        return len(old)

    def __len__(self):
        with self._mu:
            return len(self._jobs)

    def close(self):
        if self._own:
            shutil.rmtree(self.root, ignore_errors=True)
