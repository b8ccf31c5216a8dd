"""Build hook: the server ships the Slicer module's pure-Python library, which lives once, outside server/.

Everything declarative is in pyproject.toml; this file only says where ``SlicerNNInteractiveLib`` comes from:

* building from a clone (``pip install ./server``, ``python -m build server``): from
  ``../SlicerNNInteractive/SlicerNNInteractiveLib``, the one copy in the repository. ``sdist`` copies it, and the
  repository's LICENSE, into the source distribution it writes (never into the working tree), so
* building from that sdist (what ``python -m build`` does for the wheel, and what pip does with a published
  sdist): from ``./SlicerNNInteractiveLib`` inside the unpacked sdist.
"""

import glob
import os

from setuptools import setup
from setuptools.command.sdist import sdist

HERE = os.path.dirname(os.path.abspath(__file__))
LIB = "SlicerNNInteractiveLib"
IN_SDIST = os.path.join(HERE, LIB)                                    # an unpacked sdist
IN_REPO = os.path.join(HERE, os.pardir, "SlicerNNInteractive", LIB)  # a clone
REPO_LICENSE = os.path.join(HERE, os.pardir, "LICENSE")

if os.path.isfile(os.path.join(IN_SDIST, "__init__.py")):
    lib_dir = LIB
elif os.path.isfile(os.path.join(IN_REPO, "__init__.py")):
    lib_dir = os.path.join(os.pardir, "SlicerNNInteractive", LIB)
else:
    raise SystemExit("nninteractive-slicer-server: %s not found: build from a clone of the whole repository "
                     "(server/ needs ../SlicerNNInteractive) or from the sdist" % LIB)


class SdistWithLibrary(sdist):
    """Writes the library from outside server/ into the sdist, as ``SlicerNNInteractiveLib/``."""

    def make_release_tree(self, base_dir, files):
        outside = [f for f in files if os.path.normpath(f).startswith(os.pardir + os.sep)]
        super().make_release_tree(base_dir, [f for f in files if f not in outside])
        if lib_dir == LIB:  # already inside: this sdist is made from an sdist
            return
        prefix = os.path.normpath(lib_dir) + os.sep
        for f in outside:
            rel = os.path.normpath(f)
            if not rel.startswith(prefix):
                raise SystemExit("nninteractive-slicer-server: unexpected file outside server/ in the sdist: %s" % f)
            dest = os.path.join(base_dir, LIB, rel[len(prefix):])
            self.mkpath(os.path.dirname(dest))
            self.copy_file(f, dest)
        if os.path.isfile(REPO_LICENSE) and not os.path.exists(os.path.join(base_dir, "LICENSE")):
            self.copy_file(REPO_LICENSE, os.path.join(base_dir, "LICENSE"))
        # The sdist's file list names the library where the sdist has it (a new file: the one there may be a hard
        # link to the working tree's).
        for sources in glob.glob(os.path.join(base_dir, "*.egg-info", "SOURCES.txt")):
            listed = lib_dir.replace(os.sep, "/") + "/"
            with open(sources) as fh:
                names = [LIB + "/" + n[len(listed):] if n.startswith(listed) else n for n in fh.read().splitlines()]
            os.remove(sources)
            with open(sources, "w") as fh:
                fh.write("\n".join(sorted(set(names) | {"LICENSE"})) + "\n")


setup(package_dir={LIB: lib_dir}, cmdclass={"sdist": SdistWithLibrary})
