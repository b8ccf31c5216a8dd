"""Automatic runs inside the server's limits, on a real server process (issue 15, point 2): every input's size comes
from its header before any pixel is read (``io.probe_series``; ``auto/inputs.py``). Bombs (a 7 KB archive holding a
gzip NIfTI that inflates to 2.4 GB, a NRRD header of 1000x1000x1200, DICOM headers of 30000x30000 slices, a float64
image whose reading outgrows the memory budget) get 413 naming the input and the limit, through /infer (server paths)
and /infer_file (uploads), and the server's RSS barely grows (printed with -s). The reading's memory comes from the
budget the sessions share: 503 + Retry-After while a session holds it, the same request runs once it is released,
and every run gives its reservation back. ``nnunet-predict`` refuses the bomb with ``--max-image-voxels``.
"""

import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib

import numpy as np
import pytest
import requests

import dicom_synth as ds
import tiny_nnunet
from conftest import SERVER_ENV, claim, our_server, post

from SlicerNNInteractiveLib import protocol as P
from SlicerNNInteractiveLib.wire import pack_array

sitk = pytest.importorskip("SimpleITK")
pydicom = pytest.importorskip("pydicom")

MiB = 1 << 20
BUDGET = 64 * MiB
MAX_VOXELS = 3000000
FLAGS = ("--no-autozoom", "--max-sessions", "2", "--memory-budget", "64M", "--max-image-voxels", str(MAX_VOXELS),
         "--max-upload-bytes", "8M", "--max-unpacked-bytes", "16M")
GROWTH_BOUND = 48 * MiB  # what a refused bomb may add to the server's RSS (the allocator keeps some of what it touched)
BOMB_SHAPE = (1000, 1000, 1200)  # i, j, k: 1.2 G voxels, 2.4 GB as int16
SMALL, MEDIUM, SESSION = (24, 40, 48), (48, 96, 96), (144, 144, 144)  # [k, j, i]


def gz_member(data):
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()


def nifti_header(size, datatype=4, bitpix=16):
    """A NIfTI-1 header (352 bytes, data at 352) declaring ``size`` (i, j, k) voxels of ``datatype``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "one.nii")
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((1, 1, 1), np.int16)), path)
        with open(path, "rb") as f:
            raw = bytearray(f.read()[:352])
    struct.pack_into("<8h", raw, 40, 3, *size, 1, 1, 1, 1)
    struct.pack_into("<hh", raw, 70, datatype, bitpix)
    return bytes(raw)


def gzip_bomb(size):
    """A .nii.gz whose data really inflates to ``size`` int16 zeros: one gzip member per MiB (gzip readers go on
    through concatenated members), 2.4 MB on disk for 2.4 GB, and a few KB once zipped."""
    zero = gz_member(b"\0" * MiB)
    return gz_member(nifti_header(size)) + zero * (int(np.prod(size, dtype=object)) * 2 // MiB + 1)


def nrrd_bomb(size):
    head = ("NRRD0004\ntype: short\ndimension: 3\nsizes: %d %d %d\nspacings: 1 1 1\nendian: little\n"
            "encoding: gzip\n\n" % size)
    return head.encode() + gz_member(b"\0" * 1024)


def write_dicom_bomb(folder, side=30000):
    ids = ds.SeriesIds()
    os.makedirs(folder, exist_ok=True)
    for k in range(3):
        path = os.path.join(folder, "b%d.dcm" % k)
        ds.write_slice(path, np.zeros((4, 4)), ids, ipp=[0, 0, k], iop=[1, 0, 0, 0, 1, 0], pixel_spacing=(1, 1))
        d = pydicom.dcmread(path)
        d.Rows = d.Columns = side
        d.save_as(path)


def write_image(path, shape, seed=0):
    img = sitk.GetImageFromArray(np.random.RandomState(seed).normal(0, 50, shape).astype(np.int16))
    sitk.WriteImage(img, path)


@pytest.fixture(scope="module")
def world(quiet_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("auto-limits")
    tiny_nnunet.make_tiny_nnunet(str(root / "models"))
    spec = tiny_nnunet.write_spec(str(root / "spec.yaml"), str(root / "models"))
    study, jobs = root / "allowed" / "study", root / "jobs"
    study.mkdir(parents=True)
    jobs.mkdir()
    write_image(str(study / "small.nii.gz"), SMALL)
    write_image(str(study / "medium.nii.gz"), MEDIUM, seed=1)
    (study / "bomb.nii.gz").write_bytes(gzip_bomb(BOMB_SHAPE))
    (study / "bomb.nrrd").write_bytes(nrrd_bomb(BOMB_SHAPE))
    # 140^3 = 2.7 M voxels (under the voxel limit) of float64: reading it needs more than the 64 MB budget
    (study / "wide.nii.gz").write_bytes(gz_member(nifti_header((140, 140, 140), datatype=64, bitpix=64)))
    write_dicom_bomb(str(study / "dicom_bomb"))
    flags = FLAGS + ("--model-serve-spec", spec, "--infer-root", str(root / "allowed"), "--jobs-dir", str(jobs))
    with our_server(quiet_model, root, *flags) as (url, proc):
        yield type("World", (), dict(url=url, pid=proc.pid, study=str(study), root=str(root), spec=spec))


def rss(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024


def reserved(world):
    return requests.get(world.url + P.PATH_SERVER_INFO, timeout=30).json()["memory_reserved"]


def infer(world, series, is_dicom=False, out="out"):
    return requests.post(world.url + "/infer", timeout=300, json={
        "nnunet_id": "tiny", "study_path": world.study, "series_folders": [series], "is_dicom": is_dicom,
        "output_dir": os.path.join(world.root, "allowed", out)})


def infer_file(world, series, is_dicom=False):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        top = os.path.join(world.study, series)
        paths = [os.path.join(top, f) for f in sorted(os.listdir(top))] if os.path.isdir(top) else [top]
        for p in paths:
            zf.write(p, os.path.relpath(p, world.study))
    request = {"nnunet_id": "tiny", "series_folders": [series], "is_dicom": is_dicom}
    return requests.post(world.url + "/infer_file", timeout=300, files={"file": ("study.zip", buf.getvalue())},
                         data={"request": json.dumps(request)}), len(buf.getvalue())


BOMBS = [  # series, is_dicom, words the answer must hold
    ("bomb.nii.gz", False, ["'bomb.nii.gz'", "[1200, 1000, 1000]", "1200000000 voxels", str(MAX_VOXELS),
                            "--max-image-voxels"]),
    ("bomb.nrrd", False, ["'bomb.nrrd'", "1200000000 voxels", "--max-image-voxels"]),
    ("dicom_bomb", True, ["'dicom_bomb'", "[3, 30000, 30000]", "2700000000 voxels", "--max-image-voxels"]),
    ("wide.nii.gz", False, ["reading the study", "140x140x140", str(BUDGET), "--memory-budget"]),
]


@pytest.mark.parametrize("route", ["/infer", "/infer_file"])
@pytest.mark.parametrize("series,is_dicom,words", BOMBS, ids=[b[0] for b in BOMBS])
def test_bombs_are_refused_from_their_headers_before_memory_grows(world, route, series, is_dicom, words):
    before = rss(world.pid)
    if route == "/infer":
        r, sent = infer(world, series, is_dicom), 0
    else:
        r, sent = infer_file(world, series, is_dicom)
    grown = rss(world.pid) - before
    print("%-11s %-12s %8s bytes sent -> HTTP %d, server RSS %+.1f MB" % (route, series, sent or "-", r.status_code,
                                                                           grown / MiB))
    assert r.status_code == 413, r.text
    body = r.json()
    for w in words:
        assert w in body["detail"], (w, body["detail"])
    assert body["status"] == "failed" and body["error"] == body["detail"]
    if route == "/infer_file":
        assert world.root not in r.text  # no server path in the answer (an /infer answer echoes the client's own)
    assert grown < GROWTH_BOUND, grown
    assert reserved(world) == 0


def test_a_run_inside_the_limits_gives_its_reservation_back(world):
    r = infer(world, "small.nii.gz", out="small")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "done"
    assert reserved(world) == 0


def _read_bytes(world, series):
    """What the server reserves to read ``series`` with the tiny model: the same estimate, in this process."""
    from nninteractive_slicer_server.auto import inputs
    from nninteractive_slicer_server.auto.paths import LocalFiles
    from nninteractive_slicer_server.auto.pipeline import plan_request
    from nninteractive_slicer_server.auto.predictors import AutoSegmenter
    from nninteractive_slicer_server.auto.registry import load_registry

    registry = load_registry(world.spec)
    plan = plan_request(registry, AutoSegmenter(registry), {
        "nnunet_id": "tiny", "study_path": world.study, "series_folders": [series], "output_dir": "/nowhere"})
    return inputs.prepare(plan, LocalFiles(), registry).nbytes


def test_budget_held_by_a_session_is_503_until_it_is_released(world):
    lease = claim(world.url)
    image = (np.random.RandomState(2).normal(100, 20, SESSION).astype(np.int16))[None]
    r = post(world.url, lease, P.PATH_SET_IMAGE, pack_array(image, codec="lz4", clevel=1), meta={})
    assert r.status_code == 200, r.text
    held, need = reserved(world), _read_bytes(world, "medium.nii.gz")
    assert held + need > BUDGET >= need  # the test's premise: it fits the budget, not what the session leaves
    for r in (infer(world, "medium.nii.gz", out="medium"), infer_file(world, "medium.nii.gz")[0]):
        assert r.status_code == 503, r.text
        assert int(r.headers["Retry-After"]) > 0
        assert "needs %d bytes" % need in r.json()["detail"] and "free now" in r.json()["detail"]
        assert reserved(world) == held  # the refused run holds nothing
    post(world.url, lease, P.PATH_RELEASE)  # the session is freed in the background, its memory then returns
    for _ in range(100):
        r = infer(world, "medium.nii.gz", out="medium")
        if r.status_code != 503:
            break
        time.sleep(0.1)
    assert r.status_code == 200, r.text
    assert reserved(world) == 0


def test_nnunet_predict_refuses_the_bomb_with_its_voxel_limit(world, tmp_path):
    code = "import sys; from nninteractive_slicer_server.auto.predict_cli import main; sys.exit(main())"
    p = subprocess.run([sys.executable, "-c", code, "-i", world.study, "-s", "bomb.nii.gz", "--nnunet_id", "tiny",
                        "-o", str(tmp_path / "out"), "--model-serve-spec", world.spec, "--device", "cpu", "-q",
                        "--max-image-voxels", "5000000"], env=dict(SERVER_ENV, OMP_NUM_THREADS="2"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr
    assert "1200000000 voxels; this server accepts at most 5000000 (--max-image-voxels)" in p.stderr
    assert json.loads(p.stdout)["status"] == "failed"
    assert not (tmp_path / "out" / "stage_0").exists()
