"""Benchmark: what a GUI thread that holds the GIL (Slicer's, under PythonQt) adds to each prompt.

The module's controller runs prompts on a worker thread and is driven by one timer on the GUI thread
(``Controller.tick`` every ``Controller.tick_interval_ms``). Inside Slicer the worker advances only while that
timer's Python runs (DESIGN.md section 8). This runs the same prompts twice against one server, the main loop
waiting between timer calls

  * ``free``: with ``time.sleep`` (threads run whenever they can, as in plain Python), and
  * ``gil-held``: in one libc ``usleep`` through ``ctypes.PyDLL`` that keeps the GIL (as Qt's event loop does
    under PythonQt; Testing/pythonqt_gil.py),

interleaved prompt by prompt, and prints the median submit-to-result latency of each and their difference.

    .venv/bin/python Testing/benchmark/gil_emulation.py [--prompts 20]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "Testing"))
sys.path.insert(0, os.path.join(REPO, "Testing", "models"))
sys.path.insert(0, os.path.join(REPO, "SlicerNNInteractive"))

import pythonqt_gil  # noqa: E402
from conftest import our_server  # noqa: E402
from test_equivalence import make_image  # noqa: E402
from tiny_models import make_random_model  # noqa: E402

from SlicerNNInteractiveLib.client import RemoteSession  # noqa: E402
from SlicerNNInteractiveLib.controller import BUSY_TICK_MS, IDLE_TICK_MS, Controller  # noqa: E402
from SlicerNNInteractiveLib.scene import ArrayScene  # noqa: E402


def prompt_ms(controller, n, gil_held):
    timer = pythonqt_gil.ControllerTimer(controller)
    t0 = time.perf_counter()
    controller.submit("point", {"coordinates": (16 + n % 16, 30, 18)})
    if not pythonqt_gil.run([timer], until=lambda: not controller.busy, seconds=60, gil_held=gil_held):
        raise RuntimeError("a prompt did not finish in 60 s")
    return (time.perf_counter() - t0) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=20)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="nni-gil-")
    model = make_random_model(os.path.join(tmp, "model"))
    image = make_image()[0]
    with our_server(model, tmp, "--no-autozoom", "--max-sessions", "2") as (url, _):
        errors = []
        sides = {name: Controller(ArrayScene(image), lambda: RemoteSession(url),
                                  on_error=lambda exc, job, dropped: errors.append(exc))
                 for name in ("free", "gil-held")}
        try:
            for name, c in sides.items():  # claim and upload outside the measurement
                prompt_ms(c, 0, name == "gil-held")
            times = {name: [] for name in sides}
            for n in range(args.prompts):
                for name, c in sides.items():
                    times[name].append(prompt_ms(c, n, name == "gil-held"))
        finally:
            for c in sides.values():
                c.close()
    if errors:
        raise RuntimeError("%d prompts failed, the first: %r" % (len(errors), errors[0]))
    med = {name: statistics.median(v) for name, v in times.items()}
    print("Prompt latency, submit to result, median of %d (point prompts, tiny model, image %s):"
          % (args.prompts, "x".join(str(d) for d in image.shape)))
    for name, v in times.items():
        print("  %-9s median %7.1f ms   min %7.1f   max %7.1f" % (name, med[name], min(v), max(v)))
    print("  added by the GIL-holding GUI thread: %+.1f ms per prompt (busy tick %d ms, idle tick %d ms)"
          % (med["gil-held"] - med["free"], BUSY_TICK_MS, IDLE_TICK_MS))


if __name__ == "__main__":
    main()
