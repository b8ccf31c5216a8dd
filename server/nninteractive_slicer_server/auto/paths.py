"""Where a request may read and write on the server, and how it is kept there (issue 16, point 1).

* ``PathGuard``: the operator's directories (``--infer-root``, repeatable), each opened once at start-up and its
  descriptor held. ``{user}`` in a root (``--infer-root /data/{user}``) gives every key holder a folder of their own:
  the part before ``{user}`` is held, the caller's folder is opened below it for each run, and a user never sees
  another's. Without any root, requests on server paths are off (403 saying so). ``files(user, ...)`` gives the
  ``ConfinedFiles`` one run touches them through.
* ``ConfinedFiles``: a path a request names is made absolute against its base and ``..`` is collapsed as text; it
  must then lie inside a root (403 otherwise). Every directory below the root is opened relative to its parent's
  descriptor with ``O_NOFOLLOW``, so a symbolic link below a root is never followed (403), whenever it appears:
  nothing is checked by name and opened again later by name. Files are opened the same way (``O_NONBLOCK``: a FIFO
  never blocks), and only regular files are read.
* Reading: SimpleITK, pydicom and highdicom open files by name, so they read a private copy (``read``): each file is
  hard-linked (the same inode, nothing copied) from the held directory into a folder of this run that only the
  server can reach (under the jobs folder's ``.spool``, mode 0700), or copied through its descriptor when a link
  cannot be made (another file system, or the server does not own it); a link that turns out to be a symbolic link
  is removed and refused. Copies count against ``limit`` (``--max-unpacked-bytes``: 413). The file's format is then
  checked on the copy (``formats.identify``), so what is checked is what is read. (``/proc/self/fd/N`` paths were the
  other way: Linux only, one descriptor per DICOM file held through the read, and ITK chooses its readers by the
  file's name; ``Testing/benchmark/staging_cost.py`` measures the copy.)
* Writing (``output``): an output is written by its writer into the run's private folder, then moved into the output
  directory through that directory's held descriptor (``rename``; copied into a temporary name there and renamed
  when the private folder is on another file system): a link planted under that name is replaced, never written
  through, and a reader sees the old file or the new one, never half of one.
* ``LocalFiles``: the commands (``nnunet-predict``) on their user's own files: paths as given, nothing confined.

Refusals are logged with the user, the field and the path (``repr``: a name cannot forge a log line).
"""

import errno
import logging
import os
import shutil
import stat
import tempfile
import uuid

from ..errors import Forbidden, TooLarge
from ..validate import BadInput

log = logging.getLogger("nninteractive_slicer_server")

USER = "{user}"
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
O_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_NOFOLLOW | O_CLOEXEC
O_FILE = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | O_CLOEXEC
O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | O_CLOEXEC
COPY_BYTES = 1 << 20
OPERATOR_ROOTS = "the directories this server allows (--infer-root)"


def check_path(path, what):
    if not isinstance(path, str) or not path.strip() or "\x00" in path:
        raise BadInput("%s must be a non-empty path, got %r" % (what, path))


# ---------------------------------------------------------------------------------------------------------- roots

class Root:
    """One allowed directory (``text`` as the operator wrote it). A plain one is held open for the server's life; a
    template holds the directory before its first ``{user}`` component (``base``) and keeps the rest (``tail``)."""

    def __init__(self, text):
        if not isinstance(text, str) or not text.strip() or "\x00" in text:
            raise ValueError("--infer-root %r is not a directory" % (text,))
        given = os.path.abspath(os.path.expanduser(text))
        parts = given.split(os.sep)
        cut = next((i for i, p in enumerate(parts) if USER in p), len(parts))
        self.text = text
        self.tail = parts[cut:]
        self.base_given = os.sep.join(parts[:cut]) or os.sep
        self.base_real = os.path.realpath(self.base_given)
        if not os.path.isdir(self.base_real):
            raise ValueError("--infer-root %s is not a directory%s" % (
                text, " (the folder before {user} must exist)" if self.tail else ""))
        self.fd = os.open(self.base_real, O_DIR & ~os.O_NOFOLLOW)  # the operator's own path: links in it are theirs

    @property
    def key(self):
        return (self.base_real, tuple(self.tail))

    def prefixes(self, user):
        """The absolute spellings of this root for ``user`` (as given and resolved) and the components below the held
        directory to open; ``Forbidden`` for a user name that is not one path component."""
        if not self.tail:
            return [self.base_given, self.base_real], []
        if not user or os.sep in user or user in (".", "..") or "\x00" in user:
            raise Forbidden("your user name %r cannot name a folder under --infer-root %s" % (user, self.text))
        tail = [p.replace(USER, user) for p in self.tail]
        return [os.path.join(self.base_given, *tail), os.path.join(self.base_real, *tail)], tail

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def check_root(text):
    """Start-up check of one ``--infer-root`` (ValueError saying what is wrong)."""
    Root(text).close()


class PathGuard:
    """The directories requests may name (``--infer-root``), opened once at start-up."""

    def __init__(self, roots=(), allowed=OPERATOR_ROOTS):
        self.allowed = allowed  # how a refusal names the roots
        self._roots = []
        for text in roots:
            root = Root(str(text))
            if any(r.key == root.key for r in self._roots):
                root.close()
                continue
            self._roots.append(root)

    @property
    def roots(self):
        return [r.text for r in self._roots]

    def __bool__(self):
        return bool(self._roots)

    def require_roots(self):
        if not self._roots:
            raise Forbidden("/infer on server paths is off on this server: its operator allows no directory (start it "
                            "with --infer-root DIR to allow one); upload the study to /infer_file instead")

    def files(self, user, base=None, scratch=None, limit=None, folder=None, allowed=None):
        """What one run of ``user`` may read and write: the roots (``folder``: a folder of the server's own, such as a
        job's, before them), relative paths taken against ``base``; private copies under ``scratch``."""
        own = [Root(folder)] if folder is not None else []
        return ConfinedFiles(own + self._roots, user, allowed or self.allowed, base, scratch, limit, owned=own)

    def close(self):
        for root in self._roots:
            root.close()


def folder_files(folder, allowed, user, base=None, scratch=None, limit=None):
    """A run confined to one folder of the server's own (an upload job's)."""
    return PathGuard().files(user, base, scratch, limit, folder=folder, allowed=allowed)


# ---------------------------------------------------------------------------------------------------------- one run

class Place:
    """A request's path inside a root: ``shown`` (absolute, as the client spelled it), the root's directory
    descriptor and the components below it."""

    def __init__(self, shown, root_fd, parts, path, what):
        self.shown, self.root_fd, self.parts, self.path, self.what = shown, root_fd, parts, path, what


class ConfinedFiles:
    """The files one run may touch (see the module's notes). Close it (``with``) to close its descriptors and remove
    its private folder."""

    def __init__(self, roots, user, allowed, base=None, scratch=None, limit=None, owned=()):
        self.roots, self.user, self.allowed, self.base = roots, user, allowed, base
        self.scratch_parent = scratch
        self.limit = limit
        self.copied = 0
        self._scratch = None
        self._fds = []  # descriptors this run opened and keeps (users' roots, output folders)
        self._user_roots = {}
        self._owned = list(owned)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
        for root in self._owned:
            root.close()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    # ------------------------------------------------------------------ refusals

    def _forbid(self, place_or_path, what, why):
        path = getattr(place_or_path, "path", place_or_path)
        log.warning("auto: refused %s %r of user %r: %s", what, path, self.user, why)
        return Forbidden("%s %r %s" % (what, path, why))

    def _link(self, place, name):
        return self._forbid(place, place.what, "goes through a symbolic link (%r): links inside %s are not followed"
                            % (name, self.allowed))

    # ------------------------------------------------------------------ where

    def locate(self, path, what):
        """``path`` made absolute (against the run's base) and normalized, as the client spelled it; ``Forbidden``
        outside every root."""
        return self._place(path, what).shown

    def _place(self, path, what):
        """The ``Place`` of ``path`` (``Forbidden`` outside every root)."""
        check_path(path, what)
        joined = os.path.join(self.base if self.base is not None else os.getcwd(), path)
        shown = os.path.normpath(joined)
        for root in self.roots:
            prefixes, tail = root.prefixes(self.user)
            for prefix in prefixes:
                top = prefix.rstrip(os.sep) or os.sep
                if shown == top or shown.startswith(top.rstrip(os.sep) + os.sep):
                    rel = os.path.relpath(shown, top)
                    parts = [] if rel == "." else rel.split(os.sep)
                    return Place(shown, self._root_fd(root, tail, path, what), parts, path, what)
        raise self._forbid(path, what, "is outside %s%s" % (self.allowed, "" if self.roots else ": none is allowed"))

    def _root_fd(self, root, tail, path, what):
        if not tail:
            return root.fd
        key = id(root)
        if key not in self._user_roots:
            try:
                fd = self._walk(root.fd, tail, Place(os.path.join(root.base_given, *tail), None, tail, path, what))
            except BadInput:
                raise self._forbid(path, what, "is in your folder %s under --infer-root %s, which does not exist; ask "
                                   "the operator to create it" % (os.path.join(root.base_given, *tail), root.text))
            self._fds.append(fd)
            self._user_roots[key] = fd
        return self._user_roots[key]

    def _walk(self, start_fd, parts, place, create=False):
        """A new descriptor of the directory ``parts`` below ``start_fd``, every component opened without following
        links (``create``: missing ones are made)."""
        fd = os.open(".", O_DIR, dir_fd=start_fd)
        try:
            for part in parts:
                try:
                    nfd = os.open(part, O_DIR, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise BadInput("%s %s does not exist" % (place.what, place.path))
                    try:
                        os.mkdir(part, 0o777, dir_fd=fd)
                    except FileExistsError:
                        pass
                    nfd = self._open_dir(fd, part, place)
                except OSError as exc:
                    nfd = self._dir_error(fd, part, place, exc)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_dir(self, fd, part, place):
        """A descriptor of the folder ``part`` of ``fd``, not through a link."""
        try:
            return os.open(part, O_DIR, dir_fd=fd)
        except OSError as exc:
            return self._dir_error(fd, part, place, exc)

    def _dir_error(self, fd, part, place, exc):
        """Raise what opening the folder ``part`` of ``fd`` failed for (``exc``), said for the client."""
        try:
            st = os.stat(part, dir_fd=fd, follow_symlinks=False)
        except OSError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise self._link(place, part)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            raise BadInput("%s %s: %r is not a folder" % (place.what, place.path, part))
        if isinstance(exc, PermissionError):
            raise self._forbid(place, place.what, "cannot be opened by the server (permission denied at %r)" % part)
        if isinstance(exc, FileNotFoundError):
            raise BadInput("%s %s does not exist" % (place.what, place.path))
        raise BadInput("%s %s cannot be opened (%s)" % (place.what, place.path, exc.strerror or exc))

    def _parent(self, place):
        """``(descriptor of the folder holding it, its name)``; the name is None for a root itself."""
        if not place.parts:
            return os.open(".", O_DIR, dir_fd=place.root_fd), None
        return self._walk(place.root_fd, place.parts[:-1], place), place.parts[-1]

    def kind(self, path, what):
        """``"dir"``, ``"file"``, ``"other"`` or None (missing) of ``path``; ``Forbidden`` through a link."""
        place = self._place(path, what)
        try:
            fd, name = self._parent(place)
        except BadInput:
            return None
        try:
            if name is None:
                return "dir"
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return None
            if stat.S_ISLNK(st.st_mode):
                raise self._link(place, name)
            return "dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"
        finally:
            os.close(fd)

    def check_output(self, path, what):
        """Refuse now an output folder that could not be made: outside the roots, through a link, under a file."""
        place = self._place(path, what)
        fd = os.open(".", O_DIR, dir_fd=place.root_fd)
        try:
            for part in place.parts:
                try:
                    os.stat(part, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    return  # made by the run
                nfd = self._open_dir(fd, part, place)
                os.close(fd)
                fd = nfd
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ reading

    def _scratch_dir(self):
        """A fresh folder of this run's private folder."""
        if self._scratch is None:
            parent = self.scratch_parent or tempfile.gettempdir()
            self._scratch = tempfile.mkdtemp(prefix="run-", dir=parent)  # mode 0700
        return tempfile.mkdtemp(dir=self._scratch)

    def read(self, path, what):
        """A private copy of the file or folder ``path`` (a folder: the regular files directly in it; sub-folders are
        left out), for readers that open by name."""
        place = self._place(path, what)
        fd, name = self._parent(place)
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False) if name is not None else None
            if st is None or stat.S_ISDIR(st.st_mode):
                folder = self._walk(fd, [name], place) if name is not None else os.open(".", O_DIR, dir_fd=fd)
                try:
                    return self._stage_folder(folder, place)
                finally:
                    os.close(folder)
            if stat.S_ISLNK(st.st_mode):
                raise self._link(place, name)
            dest = os.path.join(self._scratch_dir(), name)
            self._stage_file(fd, name, dest, place)
            return dest
        except FileNotFoundError:
            raise BadInput("%s %s does not exist" % (what, path))
        finally:
            os.close(fd)

    def _stage_folder(self, folder_fd, place):
        dest = self._scratch_dir()
        with os.scandir(folder_fd) as it:
            entries = sorted(((e.name, e.is_symlink(), e.is_dir(follow_symlinks=False)) for e in it))
        for name, is_link, is_dir in entries:
            if is_link:
                raise self._link(place, name)
            if not is_dir:
                self._stage_file(folder_fd, name, os.path.join(dest, name), place)
        return dest

    def _stage_file(self, dir_fd, name, dest, place):
        """``dest`` made the file ``name`` of ``dir_fd``: a hard link of it, else a copy read through a descriptor
        opened without following links; only a regular file."""
        try:
            os.link(name, dest, src_dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            raise BadInput("%s %s: %r does not exist" % (place.what, place.path, name))
        except OSError:
            self._copy_file(dir_fd, name, dest, place)
            return
        st = os.lstat(dest)
        if not stat.S_ISREG(st.st_mode):
            os.unlink(dest)
            if stat.S_ISLNK(st.st_mode):
                raise self._link(place, name)
            raise BadInput("%s %s: %r is not a regular file" % (place.what, place.path, name))

    def _copy_file(self, dir_fd, name, dest, place):
        try:
            src = os.open(name, O_FILE, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._link(place, name)
            if isinstance(exc, PermissionError):
                raise self._forbid(place, place.what, "cannot be read by the server (permission denied at %r)" % name)
            raise BadInput("%s %s: %r cannot be read (%s)" % (place.what, place.path, name, exc.strerror or exc))
        with os.fdopen(src, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise BadInput("%s %s: %r is not a regular file" % (place.what, place.path, name))
            with open(dest, "xb") as out:
                while True:
                    block = f.read(COPY_BYTES)
                    if not block:
                        return
                    self.copied += len(block)
                    if self.limit is not None and self.copied > self.limit:
                        raise TooLarge("the files this request names take more than %d bytes, the most one study may "
                                       "take on this server (--max-unpacked-bytes)" % self.limit)
                    out.write(block)

    # ------------------------------------------------------------------ writing

    def output(self, path, what):
        """The output folder ``path`` (made if missing, every component without following links)."""
        place = self._place(path, what)
        fd = self._walk(place.root_fd, place.parts, place, create=True)
        self._fds.append(fd)
        return ConfinedOutput(self, fd, place.shown, place)


class ConfinedOutput:
    """An output folder held open: ``write`` puts a file in it, ``sub`` a folder."""

    def __init__(self, files, fd, shown, place):
        self.files, self.fd, self.shown, self.place = files, fd, shown, place

    def sub(self, name):
        fd = self.files._walk(self.fd, [name], self.place, create=True)
        self.files._fds.append(fd)
        return ConfinedOutput(self.files, fd, os.path.join(self.shown, name), self.place)

    def write(self, name, writer):
        """``writer(path)`` writes the file ``name`` (returning something false when it writes nothing); the path
        of the output (as shown to the client) once it is in place, else None."""
        tmp = os.path.join(self.files._scratch_dir(), name)
        if not writer(tmp) or not os.path.isfile(tmp):
            return None
        self._publish(tmp, name)
        return os.path.join(self.shown, name)

    def copy(self, source, name):
        """The file ``name`` of the output folder ``source`` copied into this one (the commands' ``copy_final``)."""
        src = os.open(name, O_FILE, dir_fd=source.fd)
        tmp = os.path.join(self.files._scratch_dir(), name)
        with os.fdopen(src, "rb") as f, open(tmp, "xb") as out:
            shutil.copyfileobj(f, out, COPY_BYTES)
        self._publish(tmp, name)
        return os.path.join(self.shown, name)

    def _publish(self, tmp, name):
        try:
            try:
                os.rename(tmp, name, dst_dir_fd=self.fd)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                self._copy_in(tmp, name)
        except IsADirectoryError:
            raise BadInput("%s %s already holds a folder named %r where an output goes; remove it, or choose another "
                           "%s" % (self.place.what, self.place.path, name, self.place.what))

    def _copy_in(self, tmp, name):
        """Another file system: copied into a new temporary name of the folder, then renamed over ``name``."""
        part = ".%s.%s.part" % (name, uuid.uuid4().hex[:12])
        fd = os.open(part, O_NEW, 0o666, dir_fd=self.fd)
        try:
            with os.fdopen(fd, "wb") as out, open(tmp, "rb") as f:
                shutil.copyfileobj(f, out, COPY_BYTES)
            os.rename(part, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            try:
                os.unlink(part, dir_fd=self.fd)
            except OSError:
                pass
            raise


# ---------------------------------------------------------------------------------------------------------- commands

class LocalFiles:
    """The commands' files: the user's own, read and written where they are named."""

    user = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        pass

    def locate(self, path, what):
        check_path(path, what)
        return os.path.abspath(os.path.expanduser(path))

    def kind(self, path, what):
        p = self.locate(path, what)
        return "dir" if os.path.isdir(p) else "file" if os.path.isfile(p) else "other" if os.path.exists(p) else None

    def check_output(self, path, what):
        self.locate(path, what)

    def read(self, path, what):
        p = self.locate(path, what)
        if not os.path.exists(p):
            raise BadInput("%s %s does not exist" % (what, path))
        return p

    def output(self, path, what):
        p = self.locate(path, what)
        os.makedirs(p, exist_ok=True)
        return LocalOutput(p)


class LocalOutput:
    def __init__(self, path):
        self.shown = path

    def sub(self, name):
        p = os.path.join(self.shown, name)
        os.makedirs(p, exist_ok=True)
        return LocalOutput(p)

    def write(self, name, writer):
        p = os.path.join(self.shown, name)
        return p if writer(p) and os.path.isfile(p) else None

    def copy(self, source, name):
        p = os.path.join(self.shown, name)
        shutil.copyfile(os.path.join(source.shown, name), p)
        return p
