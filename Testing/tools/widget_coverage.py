"""Statement coverage of the module file by the test suite, and which of the widget's handlers ran.

    .venv/bin/python Testing/tools/widget_coverage.py [pytest args]   # default: the widget and Slicer tests

Handlers are the widget's methods that Qt signals, shortcuts, timers and MRML observers call (``on*``), plus
the tool and placement entry points they lead to; a handler counts as run when a line of its body ran.
"""

import ast
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
MODULE = os.path.join(REPO, "SlicerNNInteractive", "SlicerNNInteractive.py")
DEFAULT_TESTS = ["Testing/test_slicer_widget.py", "Testing/test_slicer_widget_smoke.py"]


def main():
    tests = sys.argv[1:] or DEFAULT_TESTS
    out = os.path.join(tempfile.mkdtemp(prefix="nni-cov-"), "coverage.json")
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--cov=" + os.path.dirname(MODULE),
                    "--cov-report=json:" + out] + tests, cwd=REPO, check=True)
    data = json.load(open(out))["files"]
    entry = next(v for k, v in data.items() if k.endswith("SlicerNNInteractive/SlicerNNInteractive.py"))
    executed = set(entry["executed_lines"])
    summary = entry["summary"]
    print("SlicerNNInteractive.py statement coverage: %.1f %% (%d of %d statements)"
          % (summary["percent_covered"], summary["covered_lines"], summary["num_statements"]))
    tree = ast.parse(open(MODULE).read())
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SlicerNNInteractiveWidget")
    handlers = [f for f in widget.body if isinstance(f, ast.FunctionDef)
                and (f.name.startswith("on") or f.name in ("activateTool", "disarmTool", "processPoints",
                                                           "processScribble", "setPolarity", "enter", "exit",
                                                           "cleanup", "setup"))]
    missed = [f.name for f in handlers
              if not any(line in executed for line in range(f.body[0].lineno, f.end_lineno + 1))]
    print("widget handlers run: %d of %d%s" % (len(handlers) - len(missed), len(handlers),
                                             (" (not run: %s)" % ", ".join(missed)) if missed else ""))


if __name__ == "__main__":
    main()
