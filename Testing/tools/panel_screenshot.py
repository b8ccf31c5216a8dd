"""Render the module's panel (its own .ui, driven by its own widget code) offscreen to a PNG.

    .venv/bin/python Testing/tools/panel_screenshot.py [OUT.png]   # default: Resources/Screenshots/prompts.png

It runs the widget in the test harness (Testing/slicerapp: PySide6 with PythonQt's behaviour, Slicer's MRML from
slicer-core), arms the point tool with negative prompts so the states show, and grabs the module's own widgets
(the Segment Editor below them is Slicer's and is not drawn here). A screenshot taken inside Slicer can replace
it at any time.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "Testing"))
sys.path.insert(0, os.path.join(REPO, "SlicerNNInteractive"))

import numpy as np  # noqa: E402

import slicer  # noqa: E402
from slicerapp import SlicerApp  # noqa: E402


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(REPO, "Resources", "Screenshots", "prompts.png")
    with SlicerApp() as app:
        widget = app.load_module()
        volume = slicer.util.addVolumeFromArray(np.zeros((8, 8, 8), np.int16), name="volume")
        slicer.util.setSliceViewerLayers(background=volume)
        app.enter()
        app.press("P")
        app.press("T")
        app.pump(0.1)
        panel = widget.ui.tabWidget.parentWidget()
        panel.resize(420, panel.sizeHint.height())
        app.pump(0.1)
        if not panel.grab().save(out):
            raise SystemExit("could not write %s" % out)
        app.exit()
        app.cleanup()
    print("wrote", out)


if __name__ == "__main__":
    main()
