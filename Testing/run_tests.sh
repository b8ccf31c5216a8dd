#!/usr/bin/env bash
# Install everything the tests need into .venv (torch pinned to a CPU build) and run them.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c Testing/constraints.txt "./server[test]"
exec .venv/bin/python -m pytest -q Testing "$@"
