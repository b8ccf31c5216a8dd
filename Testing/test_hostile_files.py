"""Attacks on the files the server reads and writes for a request (issue 16, point 1), against a real server process on
loopback with named users (alice, bob, carol) and two kinds of root: one everybody shares (``--infer-root shared``)
and one folder per user (``--infer-root users/{user}``). Each attack is refused with a clear 4xx, and nothing outside
the roots is read or written:

* a symbolic link planted under an output folder is replaced by the output, never written through; a link planted
  as a folder the run makes is refused (403);
* a folder swapped for a link after its check (between a job's admission and its run, and, in this process, between
  ``ConfinedFiles``' check and its read or write) is never followed: reads and writes stay in the folder checked;
  neither is a link among a DICOM series' files, nor the ``ct.nii`` that ITK's NIfTI reader prefers to the
  ``ct.nii.gz`` it was asked for; a FIFO is refused at once;
* uploaded headers that name their data elsewhere (MetaImage ``ElementDataFile`` with ``=`` or ``:``, padded past
  64 KiB, or hidden behind a line MetaIO swallows; NRRD ``data file`` in any spelling) are refused (400) although
  SimpleITK reads the outside file through each of them (shown here first); HDF5, MINC and NIfTI / Analyze pairs
  are refused;
* a user never reaches another's folder (by path, ``..`` or a link), a user without a folder gets 403 saying so, and
  every run is logged with its user, what it read and what it wrote.
"""

import json
import os
import sys
import time

import numpy as np
import pytest
import requests

import tiny_nnunet
from conftest import SERVER_ENV, TORCH_THREADS, free_port, running
from test_auto_endpoints import SPACING, make_image, zip_bytes
from test_auto_jobs import USERS, write_keys

sitk = pytest.importorskip("SimpleITK")

LONG = 40  # stages of the job that holds the runner while a queued job's folder is swapped


class World:
    def __init__(self, root, url, tokens, log):
        self.root, self.url, self.tokens, self.log = root, url, tokens, log
        self.shared, self.users, self.outside = (os.path.join(root, d) for d in ("shared", "users", "outside"))
        self.jobs = os.path.join(root, "jobs")

    def call(self, method, path, user="alice", **kw):
        headers = dict(kw.pop("headers", {}), Authorization="Bearer " + self.tokens[user])
        return requests.request(method, self.url + path, headers=headers, timeout=120, **kw)

    def infer(self, user="alice", study=None, out=None, series=("ct.nii.gz",), **fields):
        body = dict({"nnunet_id": "tiny_organs", "study_path": study or os.path.join(self.shared, "study1"),
                     "series_folders": list(series), "output_dir": out or os.path.join(self.shared, "out")}, **fields)
        return self.call("POST", "/infer", user, json=body)

    def upload(self, files, series, user="alice", **fields):
        request = dict({"nnunet_id": "tiny_organs", "series_folders": [series], "save_nifti_inputs": True}, **fields)
        return self.call("POST", "/infer_file", user, files={"file": ("study.zip", zip_bytes(files))},
                         data={"request": json.dumps(request)})

    def wait(self, job_id, until, user="alice", timeout=300):
        deadline = time.monotonic() + timeout
        while True:
            body = self.call("GET", "/jobs/%s" % job_id, user).json()
            if until(body) or body["status"] in ("done", "failed"):
                return body
            assert time.monotonic() < deadline, "job %s stayed %s" % (job_id, body)
            time.sleep(0.05)

    def log_text(self):
        with open(self.log) as f:
            return f.read()


def write_ct(path, value=None):
    """The test CT (or a constant image of ``value``, a secret's content) as an image file at ``path``."""
    arr = make_image()[0] if value is None else np.full(make_image()[0].shape, value, np.int16)
    volume = sitk.GetImageFromArray(arr)
    volume.SetSpacing(SPACING[::-1])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sitk.WriteImage(volume, path)


def snapshot(folder):
    """Every file under ``folder`` with its bytes (what an attack must leave as it was)."""
    out = {}
    for dirpath, _dirs, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, quiet_model):
    root = str(tmp_path_factory.mktemp("hostile-files"))
    models = os.path.join(root, "models")
    tiny_nnunet.make_tiny_nnunet(models)
    spec = tiny_nnunet.write_spec(os.path.join(root, "model-serve-spec.yaml"), models)
    tokens = write_keys(os.path.join(root, "users.keys"))
    w = World(root, None, tokens, os.path.join(root, "server.log"))
    write_ct(os.path.join(w.shared, "study1", "ct.nii.gz"))
    write_ct(os.path.join(w.users, "alice", "study", "ct.nii.gz"))
    os.makedirs(os.path.join(w.users, "bob"))  # carol has no folder
    write_ct(os.path.join(w.outside, "study", "ct.nii.gz"), value=777)  # a valid image: followed, it would run
    with open(os.path.join(w.outside, "victim.nii.gz"), "wb") as f:
        f.write(b"precious: never overwritten")
    os.makedirs(w.jobs)
    port = free_port()
    w.url = "http://127.0.0.1:%d" % port
    cmd = [sys.executable, "-m", "nninteractive_slicer_server", "--model-dir", quiet_model, "--device", "cpu",
           "--port", str(port), "--torch-n-threads", TORCH_THREADS, "--model-serve-spec", spec, "--keys-file",
           os.path.join(root, "users.keys"), "--infer-root", w.shared, "--infer-root",
           os.path.join(w.users, "{user}"), "--jobs-dir", w.jobs, "--max-running-jobs", "1"]
    with running(cmd, w.url, w.log, env=SERVER_ENV):
        yield w


@pytest.fixture
def outside_untouched(world):
    """The test leaves every file outside the roots as it was, and adds none."""
    before = snapshot(world.outside)
    yield
    assert snapshot(world.outside) == before
    assert not os.listdir(os.path.join(world.jobs, ".spool"))  # no private copy outlives its run


# ---------------------------------------------------------------------------------------------------------- outputs

def test_a_link_planted_under_an_output_folder_is_replaced_not_written_through(world, outside_untouched):
    out = os.path.join(world.shared, "planted")
    os.makedirs(os.path.join(out, "stage_0"))
    planted = os.path.join(out, "stage_0", "prediction.nii.gz")
    os.symlink(os.path.join(world.outside, "victim.nii.gz"), planted)
    r = world.infer(out=out)
    assert r.status_code == 200, r.text
    assert r.json()["nifti_prediction"] == [planted]
    assert not os.path.islink(planted) and sitk.ReadImage(planted).GetSize() == make_image()[0].shape[::-1]

    out = os.path.join(world.shared, "planted_folder")
    os.makedirs(out)
    os.symlink(world.outside, os.path.join(out, "stage_0"))  # the folder the run makes, planted as a link
    r = world.infer(out=out)
    assert r.status_code == 403, r.text
    assert "symbolic link ('stage_0')" in r.json()["detail"] and "--infer-root" in r.json()["detail"]


def test_folders_swapped_for_links_after_the_job_was_admitted_are_not_followed(world, outside_untouched):
    """The paths of a job are checked when it is posted (202) and opened when it runs: a folder swapped for a link in
    between (the job waits behind another) is refused then, for an input and for an output folder alike."""
    swap = os.path.join(world.shared, "swap")
    write_ct(os.path.join(swap, "study", "ct.nii.gz"))
    os.makedirs(os.path.join(swap, "out"))
    os.makedirs(os.path.join(world.outside, "out"))
    long_job = world.call("POST", "/jobs", json={
        "nnunet_id": ["tiny_organs"] * LONG, "study_path": os.path.join(world.shared, "study1"),
        "series_folders": ["ct.nii.gz"], "output_dir": os.path.join(world.shared, "long")}).json()["job_id"]
    world.wait(long_job, lambda b: b["status"] == "running")
    reading = world.call("POST", "/jobs", json={
        "nnunet_id": "tiny_organs", "study_path": os.path.join(swap, "study"), "series_folders": ["ct.nii.gz"],
        "output_dir": os.path.join(swap, "read_out")})
    writing = world.call("POST", "/jobs", json={
        "nnunet_id": "tiny_organs", "study_path": os.path.join(world.shared, "study1"),
        "series_folders": ["ct.nii.gz"], "output_dir": os.path.join(swap, "out", "result")})
    assert reading.status_code == writing.status_code == 202, (reading.text, writing.text)
    assert world.call("GET", "/jobs/%s" % reading.json()["job_id"]).json()["status"] == "queued"
    os.rename(os.path.join(swap, "study"), os.path.join(swap, "study.checked"))
    os.symlink(os.path.join(world.outside, "study"), os.path.join(swap, "study"))
    os.rename(os.path.join(swap, "out"), os.path.join(swap, "out.checked"))
    os.symlink(os.path.join(world.outside, "out"), os.path.join(swap, "out"))
    assert world.call("DELETE", "/jobs/%s" % long_job).json()["status"] == "cancelled"
    for job, link in ((reading, "study"), (writing, "out")):
        body = world.wait(job.json()["job_id"], lambda b: False)
        assert body["status"] == "failed" and body["error_status"] == 403, body
        assert "symbolic link (%r)" % link in body["error"]
    assert not os.path.exists(os.path.join(swap, "read_out", "stage_0"))
    assert os.listdir(os.path.join(world.outside, "out")) == []


def test_the_check_and_the_open_are_one(tmp_path):
    """In this process, through ``ConfinedFiles`` (scratch on another file system: copies, not hard links): a folder
    checked, then swapped for a link, is refused when it is read; an output folder held open, then swapped for a link,
    still receives the output in the folder that was checked."""
    from nninteractive_slicer_server.auto.paths import PathGuard
    from nninteractive_slicer_server.errors import Forbidden

    root = tmp_path / "root"
    write_ct(str(root / "study" / "ct.nii.gz"))
    write_ct(str(tmp_path / "elsewhere" / "ct.nii.gz"), value=777)
    (root / "out").mkdir()
    (tmp_path / "elsewhere_out").mkdir()
    scratch = "/dev/shm" if os.path.isdir("/dev/shm") else None
    guard = PathGuard([str(root)])
    try:
        with guard.files("alice", scratch=scratch, limit=1 << 30) as files:
            series = str(root / "study" / "ct.nii.gz")
            assert files.kind(series, "series_folders") == "file"  # checked ...
            os.rename(str(root / "study"), str(root / "study.checked"))
            os.symlink(str(tmp_path / "elsewhere"), str(root / "study"))  # ... then swapped
            with pytest.raises(Forbidden, match=r"symbolic link \('study'\)"):
                files.read(series, "series_folders")
            os.unlink(str(root / "study"))
            os.rename(str(root / "study.checked"), str(root / "study"))
            copy = files.read(series, "series_folders")
            copied = scratch is not None and os.stat(scratch).st_dev != os.stat(str(root)).st_dev
            assert (files.copied > 0) == copied and sitk.GetArrayFromImage(sitk.ReadImage(copy)).max() != 777

            out = files.output(str(root / "out"), "output_dir")  # held open ...
            os.rename(str(root / "out"), str(root / "out.checked"))
            os.symlink(str(tmp_path / "elsewhere_out"), str(root / "out"))  # ... then swapped
            written = out.write("prediction.nii.gz", lambda p: sitk.WriteImage(sitk.ReadImage(copy), p) or True)
            assert written == str(root / "out" / "prediction.nii.gz")  # as the client named it
            assert os.listdir(str(tmp_path / "elsewhere_out")) == []
            assert os.listdir(str(root / "out.checked")) == ["prediction.nii.gz"]  # where it was checked
    finally:
        guard.close()


def test_fifos_and_links_among_a_series_files_are_refused_at_once(world, outside_untouched):
    import dicom_synth

    study = os.path.join(world.shared, "odd")
    os.makedirs(study)
    os.mkfifo(os.path.join(study, "ct.nii.gz"))  # opened for reading, it would block until a writer comes
    r = world.infer(study=study, out=os.path.join(study, "out"))
    assert r.status_code == 400, r.text
    assert "'ct.nii.gz' is not a regular file" in r.json()["detail"]
    series = os.path.join(study, "dicom")
    dicom_synth.write_stack(series, dicom_synth.volume((3, 8, 8)))
    os.symlink(os.path.join(world.outside, "victim.nii.gz"), os.path.join(series, "IM9999.dcm"))
    r = world.infer(study=study, out=os.path.join(study, "out"), series=["dicom"], is_dicom=True)
    assert r.status_code == 403, r.text
    assert "symbolic link ('IM9999.dcm')" in r.json()["detail"]


def test_a_sibling_the_reader_would_prefer_is_never_read(world, outside_untouched):
    """ITK's NIfTI reader, asked for ``ct.nii.gz``, reads ``ct.nii`` when one lies beside it (shown here first): a
    link planted under that name would lead it anywhere. The server's copy holds only the file named."""
    study = os.path.join(world.shared, "sibling")
    write_ct(os.path.join(study, "ct.nii.gz"))
    write_ct(os.path.join(world.outside, "secret.nii"), value=777)
    try:
        os.symlink(os.path.join(world.outside, "secret.nii"), os.path.join(study, "ct.nii"))
        assert sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(study, "ct.nii.gz"))).max() == 777
        r = world.infer(study=study, out=os.path.join(study, "out"), save_nifti_inputs=True)
        assert r.status_code == 200, r.text
        read = sitk.GetArrayFromImage(sitk.ReadImage(r.json()["nifti_inputs"][0]))
        np.testing.assert_array_equal(read, make_image()[0])  # the file named, not its sibling
    finally:
        os.unlink(os.path.join(world.outside, "secret.nii"))


def test_copies_of_inputs_are_bounded(tmp_path):
    """Inputs copied (not hard-linked: the private folder is on another file system) count against the limit."""
    from nninteractive_slicer_server.auto.paths import PathGuard
    from nninteractive_slicer_server.errors import TooLarge

    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(str(tmp_path)).st_dev:
        pytest.skip("needs a private folder on another file system")
    (tmp_path / "big.nii").write_bytes(bytes(3 << 20))
    guard = PathGuard([str(tmp_path)])
    try:
        with guard.files("alice", scratch="/dev/shm", limit=2 << 20) as files:
            with pytest.raises(TooLarge, match="--max-unpacked-bytes"):
                files.read(str(tmp_path / "big.nii"), "series_folders")
    finally:
        guard.close()


# ---------------------------------------------------------------------------------------------------------- formats

def metaimage_header(tmp_path, data_file, sep="=", pad=0, swallowed=False):
    """A MetaImage header of the test CT whose ElementDataFile is ``data_file`` (``sep``: '=' or ':'); ``pad`` bytes
    of comment fields before it (past the 64 KiB the old check read); ``swallowed``: an ``ElementDataFile = LOCAL``
    line first, which MetaIO swallows as the missing values of ``Offset``."""
    write_ct(str(tmp_path / "h.mhd"))
    lines = []
    for line in (tmp_path / "h.mhd").read_text().splitlines():
        if line.startswith("ElementDataFile"):
            lines += ["Comment = %s" % ("x" * 400)] * (pad // 410)
            lines.append("ElementDataFile %s %s" % (sep, data_file))
        elif swallowed and line.startswith("Offset"):
            lines += ["Offset =", "ElementDataFile = LOCAL"]
        else:
            lines.append(line)
    return ("\n".join(lines) + "\n").encode()


def nrrd_header(data_file, field="data file", pad=0):
    shape = make_image()[0].shape
    return ("NRRD0004\ntype: short\ndimension: 3\nsizes: %d %d %d\nspacings: %g %g %g\nencoding: raw\n"
            "endian: little\n%s%s: %s\n\n" % (shape[2], shape[1], shape[0], SPACING[2], SPACING[1], SPACING[0],
                                              "# %s\n" % ("x" * 400) * (pad // 403), field, data_file)).encode()


DETACHED = [
    ("ct.mha", lambda t, s: metaimage_header(t, s), "ElementDataFile must be LOCAL"),
    ("ct.mha", lambda t, s: metaimage_header(t, s, sep=":"), "ElementDataFile must be LOCAL"),
    ("ct.mha", lambda t, s: metaimage_header(t, s, pad=80 << 10), "ElementDataFile must be LOCAL"),
    ("ct.mha", lambda t, s: metaimage_header(t, s, swallowed=True), "names ElementDataFile more than once"),
    ("ct.mhd", lambda t, s: metaimage_header(t, "../../../../../../../../../.." + s), "ElementDataFile must be LOCAL"),
    ("ct.nhdr", lambda t, s: nrrd_header(s), "'data file'"),
    ("ct.nrrd", lambda t, s: nrrd_header(s, "DATA FILE"), "'data file'"),
    ("ct.nrrd", lambda t, s: nrrd_header(s, "datafile", pad=80 << 10), "'data file'"),
]


@pytest.mark.parametrize("name,header,words", DETACHED, ids=[
    "mha-equals", "mha-colon", "mha-padded", "mha-swallowed-local", "mhd-dotdot", "nhdr", "nrrd-upper", "nrrd-padded"])
def test_headers_that_name_their_data_elsewhere_are_refused(world, tmp_path, outside_untouched, name, header,
                                                             words):
    """SimpleITK reads an outside file through each header (shown first, in this process); the server refuses the
    header, uploaded or on a server path, before any reader sees it."""
    secret = os.path.join(world.outside, "secret.raw")
    with open(secret, "wb") as f:
        f.write(np.full(make_image()[0].shape, 4242, np.int16).tobytes())
    try:
        text = header(tmp_path, secret)
        (tmp_path / name).write_bytes(text)
        assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name))).max() == 4242  # the attack is real
        r = world.upload([(name, text)], name)
        assert r.status_code == 400, r.text
        assert words in r.json()["detail"] and "this server reads NIfTI" in r.json()["detail"]
        on_path = os.path.join(world.shared, "headers")
        os.makedirs(on_path, exist_ok=True)
        with open(os.path.join(on_path, name), "wb") as f:
            f.write(text)
        r = world.infer(study=on_path, out=os.path.join(on_path, "out"), series=[name], save_nifti_inputs=True)
        assert r.status_code == 400, r.text
        assert words in r.json()["detail"]
        assert not os.path.exists(os.path.join(on_path, "out", "stage_0"))
    finally:
        os.unlink(secret)
    for target in ("/etc/passwd",):  # the classic: refused the same way
        r = world.upload([(name, header(tmp_path, target))], name)
        assert r.status_code == 400 and words in r.json()["detail"], r.text


def test_hdf5_minc_and_pairs_are_refused(world, tmp_path, outside_untouched):
    written = {}
    for name in ("ct.h5", "ct.mnc", "ct.hdr", "ct.img"):
        try:
            write_ct(str(tmp_path / name))
        except RuntimeError:
            continue  # this SimpleITK lacks the writer (.img: written with its .hdr)
    for name in sorted(os.listdir(str(tmp_path))):
        with open(str(tmp_path / name), "rb") as f:
            written[name] = f.read()
    assert {"ct.h5", "ct.mnc", "ct.hdr", "ct.img"} <= set(written)
    cases = [("ct.h5", "HDF5"), ("ct.mnc", "HDF5"), ("ct.hdr", "pair"), ("ct.img", "not an image file")]
    for name, words in cases:
        r = world.upload(list(written.items()), name)
        assert r.status_code == 400, r.text
        assert words in r.json()["detail"] and "this server reads NIfTI" in r.json()["detail"], r.text
    r = world.upload([("ct.nii.gz", written["ct.h5"])], "ct.nii.gz")  # named as NIfTI: the content decides
    assert r.status_code == 400 and "HDF5" in r.json()["detail"], r.text


# ---------------------------------------------------------------------------------------------------------- users

def test_users_are_kept_apart_inside_their_roots(world, outside_untouched):
    alice = os.path.join(world.users, "alice")
    before = snapshot(alice)
    for study in (os.path.join(alice, "study"), os.path.join(world.users, "bob", "..", "alice", "study")):
        r = world.infer("bob", study=study, out=os.path.join(world.users, "bob", "out"))
        assert r.status_code == 403 and "outside" in r.json()["detail"], r.text
    r = world.infer("bob", study=os.path.join(world.users, "bob"), out=os.path.join(alice, "out"))
    assert r.status_code == 403, r.text
    os.symlink(alice, os.path.join(world.users, "bob", "peek"))
    r = world.infer("bob", study=os.path.join(world.users, "bob", "peek", "study"),
                    out=os.path.join(world.users, "bob", "out"))
    assert r.status_code == 403 and "symbolic link ('peek')" in r.json()["detail"], r.text
    r = world.infer("carol", study=os.path.join(world.users, "carol"), out=os.path.join(world.users, "carol", "o"))
    assert r.status_code == 403 and "does not exist; ask the operator" in r.json()["detail"], r.text
    assert snapshot(alice) == before
    assert not os.path.exists(os.path.join(world.users, "carol"))

    r = world.infer("alice", study=os.path.join(alice, "study"), out=os.path.join(alice, "out"))
    assert r.status_code == 200, r.text
    log = world.log_text()
    assert "of user \"alice\" reads {\"study_path\": \"%s\"" % os.path.join(alice, "study") in log
    assert "of user \"alice\" wrote [\"%s\"]" % os.path.join(alice, "out", "stage_0", "prediction.nii.gz") in log
    assert "refused study_path %r of user 'bob'" % os.path.join(alice, "study") in log
