#!/usr/bin/env bash
# CI: the server package as it would be published. `python -m build server` makes the sdist and a wheel; a wheel
# is built again from the unpacked sdist, where no ../SlicerNNInteractive exists; both carry the shared library
# (codec and protocol once, byte for byte the repository's), pass `twine check`, and the sdist's wheel, installed
# in a fresh venv (torch pinned by Testing/constraints.txt), serves the tiny trained model: /healthz, the version,
# one point prompt with the library's client, all run from outside the source tree. Uses .venv for the build tools.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
START=$SECONDS
WORK=$(mktemp -d "${TMPDIR:-/tmp}/check_package.XXXXXX")
SERVER_PID=
cleanup() {
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
step() { echo "check_package: $* ($((SECONDS - START)) s)"; }
export HF_HUB_OFFLINE=1 NO_PROXY=127.0.0.1,localhost PYTHONDONTWRITEBYTECODE=1
unset PYTHONPATH

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q build twine
VERSION=$(.venv/bin/python -c "import ast, sys; t = ast.parse(open(sys.argv[1]).read()); print(next(n.value.value \
for n in t.body if isinstance(n, ast.Assign) and n.targets[0].id == '__version__'))" \
    server/nninteractive_slicer_server/__init__.py)
step "building nninteractive-slicer-server $VERSION"

.venv/bin/python -m build server --outdir "$WORK/dist" > "$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
SDIST="$WORK/dist/nninteractive_slicer_server-$VERSION.tar.gz"
mkdir "$WORK/src"
tar xzf "$SDIST" -C "$WORK/src"
.venv/bin/python -m build --wheel "$WORK/src/nninteractive_slicer_server-$VERSION" --outdir "$WORK/from-sdist" \
    > "$WORK/build-from-sdist.log" 2>&1 || { cat "$WORK/build-from-sdist.log"; exit 1; }
WHEEL="$WORK/from-sdist/nninteractive_slicer_server-$VERSION-py3-none-any.whl"
.venv/bin/python -m twine --no-color check --strict "$WORK"/dist/* "$WHEEL"
step "built the sdist, and a wheel from it"

.venv/bin/python - "$SDIST" "$WORK/dist/nninteractive_slicer_server-$VERSION-py3-none-any.whl" "$WHEEL" <<'EOF'
import collections, os, sys, tarfile, zipfile

sdist, built_wheel, wheel = sys.argv[1:]
LIB = "SlicerNNInteractiveLib"
repo_lib = {f: open(os.path.join("SlicerNNInteractive", LIB, f), "rb").read()
            for f in os.listdir(os.path.join("SlicerNNInteractive", LIB)) if f.endswith(".py")}


def check(names, read, where):
    counts = collections.Counter(names)
    assert all(c == 1 for c in counts.values()), "%s: files listed twice: %s" % (where, [n for n, c in counts.items() if c > 1])
    for base in ("wire.py", "protocol.py"):  # the codec and the protocol exist once, in the library
        found = [n for n in names if n.endswith(".py") and read(n) == repo_lib[base]]
        assert found == ["%s/%s" % (LIB, base)], "%s: the library's %s found as %s" % (where, base, found)
    lib = {n.split("/", 1)[1]: n for n in names if n.startswith(LIB + "/") and n.endswith(".py")}
    assert set(lib) == set(repo_lib), "%s: library files %s, repository has %s" % (where, sorted(lib), sorted(repo_lib))
    for f, n in lib.items():
        assert read(n) == repo_lib[f], "%s: %s differs from the repository's" % (where, n)
    assert not [n for n in names if ".." in n.split("/")], where


with tarfile.open(sdist) as t:
    root = os.path.basename(sdist)[:-len(".tar.gz")] + "/"
    files = {m.name[len(root):]: m for m in t.getmembers() if m.isfile()}
    check(list(files), lambda n: t.extractfile(files[n]).read(), "sdist")
    assert {"LICENSE", "pyproject.toml", "setup.py", "README.md"} <= set(files), sorted(files)
for w in (built_wheel, wheel):
    with zipfile.ZipFile(w) as z:
        names = z.namelist()
        check(names, z.read, os.path.basename(w))
        tops = {n.split("/", 1)[0] for n in names}
        assert tops - {n for n in tops if n.endswith(".dist-info")} == {LIB, "nninteractive_slicer_server"}, tops
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "no LICENSE in " + w
with zipfile.ZipFile(built_wheel) as a, zipfile.ZipFile(wheel) as b:
    assert sorted(a.namelist()) == sorted(b.namelist()), "build's wheel and the sdist's wheel differ"
print("check_package: sdist and wheels hold both packages, the library once and as in the repository")
EOF

python3 -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --no-compile -c "$REPO/Testing/constraints.txt" "$WHEEL"
step "installed the wheel in a fresh venv"

cd "$WORK"  # nothing from the source tree on the path from here on
PORT=$("$WORK/venv/bin/python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$WORK/venv/bin/nninteractive-slicer-server" --device cpu --model-dir "$REPO/Testing/models/blobs" --port "$PORT" \
    --no-torch-compile --torch-n-threads 2 > "$WORK/server.log" 2>&1 &
SERVER_PID=$!
"$WORK/venv/bin/python" - "$WORK/venv" "http://127.0.0.1:$PORT" "$VERSION" "$SERVER_PID" <<'EOF' || { tail -n 40 "$WORK/server.log"; exit 1; }
import os, sys, time

import numpy as np
import requests

import nninteractive_slicer_server
import SlicerNNInteractiveLib
from SlicerNNInteractiveLib.client import RemoteSession, check_server

venv, url, version, pid = sys.argv[1:]
for m in (nninteractive_slicer_server, SlicerNNInteractiveLib):
    assert os.path.realpath(m.__file__).startswith(os.path.realpath(venv) + os.sep), m.__file__
deadline = time.monotonic() + 180
while True:
    assert os.path.exists("/proc/%s" % pid) and open("/proc/%s/stat" % pid).read().split()[2] != "Z", "server exited"
    try:
        if requests.get(url + "/healthz", timeout=1).status_code == 200:
            break
    except requests.RequestException:
        pass
    assert time.monotonic() < deadline, "no /healthz in 180 s"
    time.sleep(0.3)
info = check_server(url)
assert info["server_version"] == version, info
# one bright ball on a noisy background, the kind of image the tiny trained model knows; a click in its middle
rng = np.random.default_rng(0)
image = (100 + 10 * rng.standard_normal((64, 64, 64))).astype(np.float32)
ball = np.sum((np.indices(image.shape) - 32.0) ** 2, axis=0) <= 10 ** 2
image[ball] += 400
mask = np.zeros(image.shape, np.uint8)
with RemoteSession(url) as s:
    s.set_image(image[None])
    s.set_target_buffer(mask)
    s.add_point_interaction((32, 32, 32), include_interaction=True)
dice = 2 * np.sum((mask > 0) & ball) / (np.sum(mask > 0) + np.sum(ball))
assert dice > 0.8, "Dice %.3f" % dice
print("check_package: the installed server %s (%s) segmented the ball: Dice %.3f" % (version, info["model"], dice))
EOF
kill "$SERVER_PID"  # SIGTERM: uvicorn shuts down gracefully
for _ in $(seq 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.3; done
if kill -0 "$SERVER_PID" 2>/dev/null; then
    tail -n 20 "$WORK/server.log"; echo "check_package: the server did not stop within 30 s of SIGTERM" >&2; exit 1
fi
wait "$SERVER_PID" || true
SERVER_PID=
step "served from the fresh venv and stopped; done"
