"""The blosc2 the Slicer module pins for Python 3.9 (Slicer 5.6 / 5.8: blosc2 2.6.2, the last line that supports it)
speaks the same wire format as the server's blosc2: arrays packed by either decode exactly with the other.

A fresh venv with the pinned blosc2 (from the package index) packs and unpacks through our wire codec in a
subprocess; this process does the other side with the test environment's blosc2."""

import os
import subprocess
import venv

import numpy as np

from conftest import REPO

from SlicerNNInteractiveLib import wire

PINNED_FOR_PYTHON_39 = "blosc2==2.6.2"  # SlicerNNInteractiveLogic.blosc2Requirement() below Python 3.10
SCRIPT = r"""
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from SlicerNNInteractiveLib import wire
import blosc2
if sys.argv[2] == "pack":
    rng = np.random.default_rng(0)
    arrays = {"image": rng.normal(100, 20, (1, 20, 33, 47)).astype(np.int16),
              "mask": (rng.random((20, 33, 47)) > 0.7).astype(np.uint8)}
    for name, arr in arrays.items():
        codec = wire.IMAGE_CODEC if name == "image" else wire.MASK_CODEC
        open(sys.argv[3] + "/" + name + ".bin", "wb").write(wire.pack_array(arr, **codec))
        np.save(sys.argv[3] + "/" + name + ".npy", arr)
else:
    for name in ("image", "mask"):
        out = wire.unpack_array(open(sys.argv[3] + "/" + name + ".ours", "rb").read())
        assert np.array_equal(out, np.load(sys.argv[3] + "/" + name + ".npy")), name
print(blosc2.__version__)
"""


def test_the_pinned_blosc2_for_python_39_interoperates(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(str(env_dir))
    python = str(env_dir / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", PINNED_FOR_PYTHON_39, "numpy"], check=True)
    lib = os.path.join(REPO, "SlicerNNInteractive")
    packed = subprocess.run([python, "-c", SCRIPT, lib, "pack", str(tmp_path)], check=True, capture_output=True,
                            text=True)
    assert packed.stdout.strip() == PINNED_FOR_PYTHON_39.split("==")[1]
    for name in ("image", "mask"):  # theirs -> ours
        arr = np.load(tmp_path / (name + ".npy"))
        assert np.array_equal(wire.unpack_array((tmp_path / (name + ".bin")).read_bytes()), arr)
        codec = wire.IMAGE_CODEC if name == "image" else wire.MASK_CODEC
        (tmp_path / (name + ".ours")).write_bytes(wire.pack_array(arr, **codec))
    subprocess.run([python, "-c", SCRIPT, lib, "unpack", str(tmp_path)], check=True)  # ours -> theirs


def test_it_is_the_pin_the_module_installs():
    module = open(os.path.join(REPO, "SlicerNNInteractive", "SlicerNNInteractive.py")).read()
    assert '"%s" if sys.version_info < (3, 10)' % PINNED_FOR_PYTHON_39 in module
