"""Where a benchmark's figures come from, for the RESULTS.md section it prints: the machine and the commit."""

import os
import platform
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine(torch_threads=None):
    """The CPU, its cores, the OS, Python, and torch (with its thread count) when the benchmark imported it."""
    text = "%s, %d CPU cores, %s, Python %s" % (cpu_name(), os.cpu_count() or 0, platform.platform(),
                                               platform.python_version())
    torch = sys.modules.get("torch")
    if torch is not None:
        text += ", torch %s" % torch.__version__
    if torch_threads is not None:
        text += ", %s torch threads" % torch_threads
    return text


def commit(tree=REPO):
    """The short commit of ``tree``, marked when tracked files differ from it; "unknown" outside a git checkout."""
    try:
        rev = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev or "unknown") + ("+local changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


RESULTS = os.path.join(REPO, "Testing", "benchmark", "RESULTS.md")


def publish(text, append):
    """Print a benchmark's RESULTS.md section, after a blank line; with ``append``, add it to that file too."""
    print()
    print(text)
    if append:
        with open(RESULTS, "a") as f:
            f.write("\n" + text)
        print("appended to %s" % RESULTS)
