"""What Slicer needs from our module files, checked without Slicer: Python 3.9 syntax, ASCII, and a module file that
imports nothing but the standard library and Slicer's own modules at file scope (the rest is imported when used)."""

import ast
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE_DIR = os.path.join(REPO, "SlicerNNInteractive")
SLICER_MODULES = {"qt", "vtk", "ctk", "slicer"}


def module_files():
    for root, dirs, files in os.walk(MODULE_DIR):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.relpath(os.path.join(root, name), REPO)


@pytest.mark.parametrize("path", list(module_files()))
def test_python_39_syntax_and_ascii(path):
    data = open(os.path.join(REPO, path), "rb").read()
    assert all(b < 128 for b in data), "%s has non-ASCII bytes" % path
    tree = ast.parse(data.decode("ascii"), path, feature_version=(3, 9))
    future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in tree.body)
    for node in ast.walk(tree):
        # "int | None" in an annotation is evaluated at definition time on 3.9 unless annotations are postponed
        for ann in [getattr(node, "annotation", None), getattr(node, "returns", None)]:
            if ann is not None and not future:
                assert not any(isinstance(a, ast.BinOp) and isinstance(a.op, ast.BitOr) for a in ast.walk(ann)), (
                    "%s:%d uses an X | Y annotation, which Python 3.9 cannot evaluate" % (path, node.lineno))


def test_module_file_imports_only_stdlib_and_slicer_at_file_scope():
    path = os.path.join(MODULE_DIR, "SlicerNNInteractive.py")
    tree = ast.parse(open(path).read(), path)
    stdlib = set(sys.stdlib_module_names)
    for node in tree.body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            assert top in stdlib or top in SLICER_MODULES, (
                "SlicerNNInteractive.py imports %s at file scope; import it where it is used" % name)
