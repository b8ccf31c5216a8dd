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


def test_the_module_and_its_library_need_no_python_newer_than_3_9():
    """Slicer 5.6 and 5.8 run Python 3.9. No 3.9 interpreter installs from the registries this project reaches
    (Debian bookworm has 3.11 only; PyPI has no CPython builds), so vermin, made for this, reads every file of the
    module and its library for language features, modules, functions and arguments newer than 3.9."""
    import subprocess

    vermin = os.path.join(os.path.dirname(sys.executable), "vermin")
    result = subprocess.run([vermin, "--target=3.9-", "--violations", "--no-tips", "--eval-annotations", MODULE_DIR],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


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


def ui_widget_names():
    import xml.etree.ElementTree as ET

    root = ET.parse(os.path.join(MODULE_DIR, "Resources", "UI", "SlicerNNInteractive.ui")).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def widget_text(widget):
    for prop in widget.findall("property"):
        if prop.get("name") == "text":
            return prop.find("string").text
    return None


def test_every_ui_widget_the_module_uses_is_in_the_ui_file():
    """The module file and the sections it hands its ``ui`` to (configtab.py, autosection.py, historysection.py)."""
    import re

    used = set()
    for name in ("SlicerNNInteractive.py", "SlicerNNInteractiveLib/configtab.py",
                 "SlicerNNInteractiveLib/autosection.py", "SlicerNNInteractiveLib/historysection.py"):
        source = open(os.path.join(MODULE_DIR, name)).read()
        found = set(re.findall(r"\bui\.([A-Za-z_]\w*)", source))
        assert found, name
        used |= found
    assert not used - set(ui_widget_names()), sorted(used - set(ui_widget_names()))


# The underlined letter of each button is its shortcut (issue: "shown by the underlined letter in its label").
BUTTON_SHORTCUTS = {"pointButton": "P", "boxButton": "B", "scribbleButton": "S", "lassoButton": "L",
                    "positiveButton": "T", "negativeButton": "T", "nextSegmentButton": "E", "resetSegmentButton": "R", "undoButton": "Z",
                    "predictButton": "N"}


def test_each_button_underlines_the_key_of_its_shortcut():
    import re

    widgets = ui_widget_names()
    source = open(os.path.join(MODULE_DIR, "SlicerNNInteractive.py")).read()
    bound = set(re.findall(r'\("((?:Ctrl\+)?[A-Z])", ', source))
    for button, key in BUTTON_SHORTCUTS.items():
        text = widget_text(widgets[button])
        assert "&" + key.lower() in text.lower(), (button, text)
        assert key in bound or "Ctrl+" + key in bound, (button, key, sorted(bound))


def test_resources_the_module_loads_exist_and_are_packaged():
    import struct

    cmake = open(os.path.join(MODULE_DIR, "CMakeLists.txt")).read()
    paths = ["UI/SlicerNNInteractive.ui", "Icons/SlicerNNInteractive.png"]
    paths += ["Icons/%s/%s.png" % (theme, tool) for theme in ("light", "dark")
              for tool in ("point", "box", "scribble", "lasso")]
    for path in paths:
        assert os.path.isfile(os.path.join(MODULE_DIR, "Resources", path)), path
        assert "Resources/" + path.replace("SlicerNNInteractive", "${MODULE_NAME}") in cmake, path
    # The extension icon for the Extensions Index: a 128x128 PNG.
    head = open(os.path.join(REPO, "Resources", "SlicerNNInteractive.png"), "rb").read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24]) == (128, 128)


def test_extension_screenshots_exist_in_the_repository():
    import re

    cmake = open(os.path.join(os.path.dirname(MODULE_DIR), "CMakeLists.txt")).read()
    urls = re.search(r'set\(EXTENSION_SCREENSHOTURLS "([^"]*)"\)', cmake).group(1).split()
    assert urls
    for url in urls:
        path = url.split("/main/", 1)[1]
        assert os.path.isfile(os.path.join(os.path.dirname(MODULE_DIR), path)), url
