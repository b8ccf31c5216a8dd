"""Every size limit of the server in one place, and the memory budget shared by all sessions.

A request declares the sizes of what it carries (a body's length, a packed array's shape and dtype) before the
server allocates anything for it; each declared size is checked here first. Over a limit that can never be met:
``TooLarge`` (413). Over the budget only because other sessions hold memory now: ``BudgetFull`` (503 with
Retry-After). Both messages give the limit and the asked size.
"""

import os
import threading
from dataclasses import dataclass

from .errors import BudgetFull, TooLarge

GiB = 1 << 30
MiB = 1 << 20


def physical_ram():
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 32 * GiB


def rss_bytes():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def session_bytes(voxels, channels, num_interaction_channels=7):
    """What a session holds for an image of ``voxels`` spatial voxels: the float32 preprocessed image and the
    float16 interaction channels (the library's dense storage; its compressed storage for huge images is smaller)."""
    return voxels * (4 * channels + 2 * num_interaction_channels)


@dataclass
class Limits:
    memory_budget: int  # bytes, all sessions' images, buffers and in-flight arrays together
    max_image_voxels: int  # spatial voxels of one image
    max_body_bytes: int  # one request body (packed arrays are compressed; an image's body is the largest)
    max_json_bytes: int = 64 * 1024  # a JSON body (points, boxes, flags) is a few hundred bytes
    max_waiting_per_lease: int = 4  # requests of one lease queued behind the one it runs; more get 429
    # Automatic models (/infer_file uploads and their jobs; see routes/auto.py and auto/jobs.py).
    max_upload_bytes: int = 2 * GiB  # one uploaded study archive (the whole multipart body)
    max_unpacked_bytes: int = 8 * GiB  # what one archive may unpack to, all files together
    max_archive_files: int = 10000  # entries (files and folders) of one archive
    max_jobs: int = 100  # jobs (uploads and POST /jobs) kept at once, any status; one more gets 503 + Retry-After
    max_jobs_per_user: int = 25  # jobs one user keeps at once; one more gets 429 (a quarter of max_jobs)
    max_job_bytes_per_user: int = 20 * GiB  # the jobs folder's bytes one user's jobs and uploads may take (413 / 429)
    job_ttl_s: float = 86400.0  # a job (its outputs, its index) is deleted this long after it ended
    max_running_jobs: int = 2  # automatic runs on server paths or uploads at once (more wait their turn)
    # A body must arrive at this many bytes per second on average (a stalled upload holds memory and a slot);
    # counted from upload_grace_s after its headers (a slow start, a TCP window opening). 408 below it.
    min_upload_rate: int = 32 * 1024
    upload_grace_s: float = 10.0

    @classmethod
    def defaults(cls, memory_budget=None, max_image_voxels=None, max_body_bytes=None, ram=None):
        """Sized from this machine: the budget is 3/4 of its RAM; one image may take up to half of the budget
        (1 channel); a body may carry that image uncompressed as float32, plus chunk headers."""
        ram = ram or physical_ram()
        budget = int(memory_budget) if memory_budget else ram * 3 // 4
        voxels = int(max_image_voxels) if max_image_voxels else max(1, budget // 2 // session_bytes(1, 1))
        body = int(max_body_bytes) if max_body_bytes else voxels * 4 + 16 * MiB
        return cls(memory_budget=budget, max_image_voxels=voxels, max_body_bytes=body)

    def describe(self):
        return ("memory budget %s, images up to %d voxels (%.0f^3), request bodies up to %s"
                % (human(self.memory_budget), self.max_image_voxels, self.max_image_voxels ** (1 / 3),
                   human(self.max_body_bytes)))

    def check_body(self, size, what="the request body"):
        if size is not None and size > self.max_body_bytes:
            raise TooLarge("%s is at least %d bytes; this server accepts at most %d (--max-body-bytes)"
                           % (what, size, self.max_body_bytes))

    def upload_due(self, received):
        """Seconds after a body's start by which ``received`` bytes of it must have arrived."""
        return self.upload_grace_s + received / float(self.min_upload_rate)

    def check_upload(self, size, what="the uploaded archive"):
        if size is not None and size > self.max_upload_bytes:
            raise TooLarge("%s is at least %d bytes; this server accepts at most %d (--max-upload-bytes)"
                           % (what, size, self.max_upload_bytes))

    def check_unpacked(self, total_bytes, files):
        """What an archive unpacks to so far (``total_bytes`` of file contents in ``files`` entries)."""
        if files > self.max_archive_files:
            raise TooLarge("the archive has more than the %d entries this server accepts (--max-archive-files)"
                           % self.max_archive_files)
        if total_bytes > self.max_unpacked_bytes:
            raise TooLarge("the archive unpacks to more than the %d bytes this server accepts (--max-unpacked-bytes)"
                           % self.max_unpacked_bytes)

    def describe_jobs(self):
        return ("uploads up to %s unpacking to at most %s in %d entries; %d job(s) kept at most (%d and %s per user), "
                "each for %.0f s after it ends" % (human(self.max_upload_bytes), human(self.max_unpacked_bytes),
                                                    self.max_archive_files, self.max_jobs, self.max_jobs_per_user,
                                                    human(self.max_job_bytes_per_user), self.job_ttl_s))

    def check_image_voxels(self, voxels, shape, what="the image"):
        if voxels > self.max_image_voxels:
            raise TooLarge("%s %s has %d voxels; this server accepts at most %d (--max-image-voxels)"
                           % (what, list(shape), voxels, self.max_image_voxels))


def human(n):
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            return "%.1f %s" % (n / size, unit)
    return "%d B" % n


def shared_budget(limits, max_sessions, max_sessions_per_user=None):
    """The server's one ``MemoryBudget`` (sessions and automatic runs), shared per user the way sessions are: a user
    may hold ``max_sessions_per_user / max_sessions`` of it (no share when every slot may be one user's)."""
    per_user = max_sessions_per_user if max_sessions_per_user and max_sessions_per_user < max_sessions else None
    share = limits.memory_budget * per_user // max_sessions if per_user else None
    return MemoryBudget(limits.memory_budget, share)


class MemoryBudget:
    """Bytes reserved by all sessions together, against one total, and by each user against their share.
    Thread-safe; reservations are held by a ``Reservation`` so that each is given back exactly once.

    ``user_share``: the most one user may hold at once (``--max-sessions-per-user`` / ``--max-sessions`` of the
    total, the way sessions are shared: one user can never take what the others need for theirs); None: no share
    beyond the total. Reservations made without a user (``user=None``) count against the total only."""

    RETRY_AFTER = 5

    def __init__(self, total, user_share=None):
        self.total = int(total)
        self.user_share = int(user_share) if user_share else None
        self._used = 0
        self._by_user = {}
        self._mu = threading.Lock()

    @property
    def used(self):
        with self._mu:
            return self._used

    def used_by(self, user):
        with self._mu:
            return self._by_user.get(user, 0)

    def reserve(self, nbytes, what, *, user=None):
        nbytes = int(nbytes)
        if nbytes > self.total:
            raise TooLarge("%s needs %d bytes; this server's memory budget is %d (--memory-budget)"
                           % (what, nbytes, self.total))
        share = self.user_share if user is not None else None
        if share is not None and nbytes > share:
            raise TooLarge("%s needs %d bytes; one user may hold at most %d of this server's memory budget "
                           "(--memory-budget x --max-sessions-per-user / --max-sessions)" % (what, nbytes, share))
        with self._mu:
            mine = self._by_user.get(user, 0)
            if share is not None and mine + nbytes > share:
                raise BudgetFull("%s needs %d bytes; %s already holds %d of the %d bytes one user may hold "
                                 "(--max-sessions-per-user of --max-sessions); close a session or wait for a request "
                                 "to end" % (what, nbytes, user, mine, share), retry_after=self.RETRY_AFTER)
            if self._used + nbytes > self.total:
                free = self.total - self._used
                raise BudgetFull("%s needs %d bytes; %d of the server's %d-byte memory budget are free now (other "
                                 "sessions hold the rest); try again later" % (what, nbytes, free, self.total),
                                 retry_after=self.RETRY_AFTER)
            self._used += nbytes
            if user is not None:
                self._by_user[user] = mine + nbytes
        return Reservation(self, nbytes, user)

    def _give_back(self, nbytes, user=None):
        with self._mu:
            self._used -= nbytes
            if user is not None:
                left = self._by_user.get(user, 0) - nbytes
                if left > 0:
                    self._by_user[user] = left
                else:
                    self._by_user.pop(user, None)


class Reservation:
    def __init__(self, budget, nbytes, user=None):
        self._budget = budget
        self.nbytes = nbytes
        self.user = user

    def split(self, nbytes):
        """Move ``nbytes`` of this reservation into a new one (given back separately)."""
        nbytes = min(int(nbytes), self.nbytes)
        self.nbytes -= nbytes
        return Reservation(self._budget, nbytes, self.user)

    def release(self):
        nbytes, self.nbytes = self.nbytes, 0
        if nbytes:
            self._budget._give_back(nbytes, self.user)
