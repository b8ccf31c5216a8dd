"""The automatic-model endpoints over HTTP, on real server processes: the established model server's (/model_info,
/request-params, /readyz, /infer, /infer_file, /download, /expire) and ours (/x/auto_segment on a session's image),
with the key, path confinement, upload limits and safe unpacking; then one label of an automatic segmentation
refined with a prompt (add_initial_seg_interaction), against the in-process oracles (AutoSegmenter, and
nnInteractiveInferenceSession for the refinement).

The interactive model is the speckle one (random weights whose masks depend on their input, autozoom off): a prompt
after an initial segmentation gives a different mask for a different initial segmentation, so the oracle comparison
shows that the server refined the label it was sent. The automatic model is tiny_nnunet's random two-label model.
"""

import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest
import requests
import torch

import tiny_nnunet
from conftest import SERVER_ENV, TORCH_THREADS, free_port, official_server, running

from SlicerNNInteractiveLib.client import RemoteSession
from SlicerNNInteractiveLib.errors import BadRequestError

KEY = "auto-endpoints-key"
ESTABLISHED_FIELDS = ("nnunet_id", "study_path", "series_folders", "output_dir", "class_idx", "checkpoint_name",
                      "is_dicom", "tta", "use_folds", "proba_threshold", "min_confidence", "intersect_with",
                      "min_intersection", "crop_from", "crop_padding", "cascade_mode", "save_proba_map",
                      "save_nifti_inputs", "save_rt_struct_output", "suffix")
SHAPE, SPACING = (24, 40, 48), (1.5, 1.0, 0.8)  # array order [k, j, i], anisotropic: the axis order matters
UPLOAD_LIMIT, UNPACKED_LIMIT, ARCHIVE_FILES = 1 << 20, 2 << 20, 50


def make_image(shape=SHAPE, seed=3):
    rng = np.random.RandomState(seed)
    img = rng.normal(0, 50, shape)
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    img += 400 * (((zz - 12) ** 2 + (yy - 20) ** 2 + (xx - 24) ** 2) < 64)
    return img.astype(np.int16)[None]


@pytest.fixture(scope="module")
def world(tmp_path_factory, speckle_model):
    root = tmp_path_factory.mktemp("auto-endpoints")
    models = root / "models"
    tiny_nnunet.make_tiny_nnunet(str(models), license_text="Tiny test model licence (CC-BY 4.0)")
    spec = tiny_nnunet.write_spec(str(root / "model-serve-spec.yaml"), str(models))
    allowed, outside, jobs = root / "allowed", root / "outside", root / "jobs"
    for d in (allowed / "study1", outside, jobs):
        d.mkdir(parents=True)
    import SimpleITK as sitk

    volume = sitk.GetImageFromArray(make_image()[0])
    volume.SetSpacing(SPACING[::-1])  # SimpleITK: (i, j, k)
    sitk.WriteImage(volume, str(allowed / "study1" / "ct.nii.gz"))
    (outside / "secret.nii.gz").write_bytes(b"not yours")
    os.symlink(str(outside), str(allowed / "link_out"))  # a link inside the root to a folder outside it
    port = free_port()
    url = "http://127.0.0.1:%d" % port
    cmd = [sys.executable, "-m", "nninteractive_slicer_server", "--model-dir", speckle_model, "--device", "cpu",
           "--port", str(port), "--torch-n-threads", TORCH_THREADS, "--no-autozoom", "--max-sessions", "4",
           "--model-serve-spec", spec, "--infer-root", str(allowed), "--jobs-dir", str(jobs),
           "--max-upload-bytes", str(UPLOAD_LIMIT), "--max-unpacked-bytes", str(UNPACKED_LIMIT),
           "--max-archive-files", str(ARCHIVE_FILES)]
    env = dict(SERVER_ENV, NN_INTERACTIVE_API_KEY=KEY)
    with running(cmd, url, str(root / "server.log"), env=env):
        yield type("World", (), dict(url=url, spec=spec, models=str(models), allowed=str(allowed),
                                     outside=str(outside), jobs=str(jobs), root=str(root)))


def call(world, method, path, key=KEY, **kw):
    headers = dict(kw.pop("headers", {}))
    if key:
        headers["Authorization"] = "Bearer " + key
    return requests.request(method, world.url + path, headers=headers, timeout=120, **kw)


def infer(world, **fields):
    body = dict({"nnunet_id": "tiny_organs", "study_path": os.path.join(world.allowed, "study1"),
                 "series_folders": ["ct.nii.gz"], "output_dir": os.path.join(world.allowed, "out1")}, **fields)
    return call(world, "POST", "/infer", json={k: v for k, v in body.items() if v is not None})


# ---------------------------------------------------------------------------------------------------------- key

@pytest.mark.parametrize("method,path", [("GET", "/model_info"), ("GET", "/request-params"), ("GET", "/readyz"),
                                         ("POST", "/infer"), ("POST", "/infer_file"), ("GET", "/download/abc"),
                                         ("POST", "/expire"), ("GET", "/expire"), ("POST", "/x/auto_segment")])
def test_every_endpoint_needs_the_key(world, method, path):
    assert call(world, method, path, key=None).status_code == 401
    assert call(world, method, path, key="wrong").status_code == 401


# ---------------------------------------------------------------------------------------------------------- listing

def test_model_info_describes_the_models_without_server_paths(world):
    r = call(world, "GET", "/model_info")
    assert r.status_code == 200
    info = r.json()
    assert list(info) == ["tiny_organs"]
    m = info["tiny_organs"]
    assert m["aliases"] == ["tiny"] and m["available"] is True
    template = tiny_nnunet.dcmqi_template()["segmentAttributes"][0]
    assert [(s["value"], s["name"], s["color"]) for s in m["labels"]] == [
        (t["labelID"], t["SegmentLabel"], t["recommendedDisplayRGBValue"]) for t in template]
    assert m["labels"][0]["terminology"]["type"]["CodeValue"] == tiny_nnunet.SCT_CODES["liver"]
    assert m["model_information"]["labels"] == {"liver": 1, "spleen": 2} and m["n_classes"] == 3
    assert m["license"].startswith("Tiny test model licence")
    assert m["default_args"]["use_folds"] == [0]
    assert world.models not in r.text and world.root not in r.text


def test_request_params_is_the_established_schema(world):
    schema = call(world, "GET", "/request-params").json()
    props = schema["properties"]
    assert set(ESTABLISHED_FIELDS) <= set(props)
    assert {"nnunet_id", "study_path", "output_dir"} <= set(schema["required"])
    assert props["tta"]["default"] is False and props["use_folds"]["default"] == [0]
    assert props["checkpoint_name"]["default"] == "checkpoint_final.pth"
    assert props["cascade_mode"]["default"] == "intersect" and props["min_intersection"]["default"] == 0.1
    assert props["crop_padding"]["default"] == [10, 10, 10] and props["save_proba_map"]["default"] is False


def test_readyz(world):
    r = call(world, "GET", "/readyz")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok" and body["models_loaded"] and body["device"] == "cpu" and body["device_usable"]
    assert body["infer_on_paths"] is True


def test_invalid_spec_stops_the_start_up_naming_entry_and_field(world, tmp_path, quiet_model):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_folder: %s\nmodels:\n  - id: broken\n    name: no rel_path\n" % world.models)
    proc = subprocess.run([sys.executable, "-m", "nninteractive_slicer_server", "--model-dir", quiet_model,
                           "--device", "cpu", "--port", str(free_port()), "--model-serve-spec", str(bad)],
                          env=SERVER_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "models[0] (id 'broken')" in proc.stderr and "'rel_path'" in proc.stderr


# ---------------------------------------------------------------------------------------------------------- /infer

def test_infer_validates_the_body(world):
    r = infer(world, not_a_field=1)
    assert r.status_code == 400 and "not_a_field" in r.json()["detail"]
    assert r.json()["status"] == "failed" and r.json()["error"] == r.json()["detail"]
    r = call(world, "POST", "/infer", json={"nnunet_id": "tiny_organs", "output_dir": world.allowed})
    assert r.status_code == 400 and "study_path" in r.json()["detail"]
    r = infer(world, tta="yes please")
    assert r.status_code == 400 and "tta" in r.json()["detail"]
    r = infer(world, nnunet_id="no_such_model")
    assert r.status_code == 400
    assert "no_such_model" in r.json()["detail"] and "tiny_organs" in r.json()["detail"]


@pytest.mark.parametrize("fields", [
    {"study_path": "OUTSIDE"},
    {"study_path": "ALLOWED/study1/../../outside"},
    {"study_path": "ALLOWED/link_out"},
    {"series_folders": ["../../outside/secret.nii.gz"]},
    {"series_folders": ["../link_out/secret.nii.gz"]},
    {"output_dir": "OUTSIDE/out"},
    {"output_dir": "ALLOWED/link_out/out"},
    {"crop_from": "OUTSIDE/secret.nii.gz"},
    {"intersect_with": "/etc/passwd"},
    {"tmp_dir": "/tmp"},
], ids=["outside", "dotdot", "symlink", "series-dotdot", "series-symlink", "output-outside", "output-symlink",
        "crop_from", "intersect_with", "tmp_dir"])
def test_infer_paths_outside_the_roots_are_forbidden(world, fields):
    fields = {k: json.loads(json.dumps(v).replace("OUTSIDE", world.outside).replace("ALLOWED", world.allowed))
              for k, v in fields.items()}
    r = infer(world, **fields)
    assert r.status_code == 403, r.text
    assert "--infer-root" in r.json()["detail"] and r.json()["status"] == "failed"
    assert not os.path.exists(os.path.join(world.outside, "out"))


def test_infer_inside_the_roots_runs_the_study(world):
    r = infer(world, output_dir=os.path.join(world.allowed, "study1", "..", "out1"))  # '..' staying inside is fine
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "done" and body["error"] is None and body["is_empty"] == [False]
    written = os.path.join(world.allowed, "out1", "stage_0", "prediction.nii.gz")  # the pipeline's stage_<i>/
    assert body["nifti_prediction"] == [written] and os.path.isfile(written)
    assert not os.path.isabs(body["nnunet_path"][0])  # relative to the registry's model folder: no server path
    assert world.models not in r.text


def test_infer_on_a_nifti_study_equals_auto_segment_on_the_session_image(world):
    """The same image two ways: a NIfTI file read by SimpleITK (array [k, j, i], spacing reversed from (i, j, k)) and
    a session holding the [k, j, i] array with its spacing in that order: the same labels, voxel for voxel."""
    import SimpleITK as sitk

    r = infer(world, output_dir=os.path.join(world.allowed, "same"))
    assert r.status_code == 200, r.text
    written = sitk.ReadImage(r.json()["nifti_prediction"][0])
    source = sitk.ReadImage(os.path.join(world.allowed, "study1", "ct.nii.gz"))
    assert written.GetSize() == source.GetSize() and written.GetSpacing() == source.GetSpacing()
    from_file = sitk.GetArrayFromImage(written)
    image = make_image()
    with RemoteSession(world.url, api_key=KEY) as remote:
        remote.set_image(image, image_properties={"spacing": list(SPACING)})
        bbox, region, labels, _ = remote.auto_segment("tiny_organs")
    from_session = paste(SHAPE, bbox, region)
    assert from_file.shape == SHAPE and from_file.any()
    np.testing.assert_array_equal(from_file, from_session)
    assert sorted(int(v) for v in np.unique(from_file) if v) == [lab["value"] for lab in labels]
    assert [(lab["value"], lab["name"]) for lab in r.json()["stages"][0]["labels"]] == [
        (lab["value"], lab["name"]) for lab in labels]


# ---------------------------------------------------------------------------------------------------------- /infer_file

def zip_bytes(entries):
    """``entries``: (name, bytes) or (name, bytes, unix_mode)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for entry in entries:
            info = zipfile.ZipInfo(entry[0])
            info.compress_type = zipfile.ZIP_DEFLATED
            if len(entry) > 2:
                info.external_attr = entry[2] << 16
            zf.writestr(info, entry[1])
    return buf.getvalue()


def tar_bytes(members):
    """``members``: (name, bytes) files, or (name, None, linkname) symbolic links."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data, *link in members:
            info = tarfile.TarInfo(name)
            if link:
                info.type, info.linkname = tarfile.SYMTYPE, link[0]
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def infer_file(world, archive, request=None, **kw):
    request = {"nnunet_id": "tiny_organs", "series_folders": ["ct.nii.gz"]} if request is None else request
    data = {} if request is False else {"request": request if isinstance(request, str) else json.dumps(request)}
    return call(world, "POST", "/infer_file", files={"file": ("study.zip", archive)}, data=data, **kw)


def study_zip(world):
    with open(os.path.join(world.allowed, "study1", "ct.nii.gz"), "rb") as f:
        return zip_bytes([("ct.nii.gz", f.read())])


def leftover_jobs(world):
    """Uploads left in the spool, and job folders other than finished jobs' (which hold only their index and
    outputs.zip, kept for /download until their TTL)."""
    spool = [os.path.join(".spool", f) for f in os.listdir(os.path.join(world.jobs, ".spool"))]
    return spool + sorted(j for j in os.listdir(world.jobs) if j != ".spool" and
                          sorted(os.listdir(os.path.join(world.jobs, j))) != ["job.json", "outputs.zip"])


@pytest.mark.parametrize("archive,status,words", [
    (lambda: zip_bytes([("ok.txt", b"x"), ("../evil.txt", b"owned")]), 400, "climbs out"),
    (lambda: zip_bytes([("a/../../evil.txt", b"owned")]), 400, "climbs out"),
    (lambda: zip_bytes([("/tmp/evil.txt", b"owned")]), 400, "absolute"),
    (lambda: zip_bytes([("link", b"/etc/passwd", 0o120777)]), 400, "symbolic link"),
    (lambda: tar_bytes([("../../evil.txt", b"owned")]), 400, "climbs out"),
    (lambda: tar_bytes([("link", None, "/etc")]), 400, "link"),
    (lambda: zip_bytes([("f%03d.txt" % i, b"x") for i in range(ARCHIVE_FILES + 5)]), 413, "--max-archive-files"),
    (lambda: zip_bytes([("zeros.raw", bytes(UNPACKED_LIMIT + 1))]), 413, "--max-unpacked-bytes"),
    (lambda: b"this is not an archive", 400, "not a zip or tar"),
], ids=["zip-dotdot", "zip-inner-dotdot", "zip-absolute", "zip-symlink", "tar-dotdot", "tar-symlink",
        "too-many-files", "unpacks-too-large", "not-an-archive"])
def test_infer_file_refuses_unsafe_archives(world, archive, status, words):
    body = archive()
    assert len(body) < UPLOAD_LIMIT
    r = infer_file(world, body)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    assert r.json()["status"] == "failed"
    if words == "not a zip or tar":
        assert "job_id" not in r.json()  # refused before any job exists (as the established server does)
    else:
        assert len(r.json()["job_id"]) == 32  # found while the job unpacked it
    assert leftover_jobs(world) == []  # a refused job leaves nothing behind
    for d in (world.root, os.path.dirname(world.jobs), "/tmp"):
        assert not os.path.exists(os.path.join(d, "evil.txt"))


def test_infer_file_refuses_oversize_uploads(world):
    big = bytes(UPLOAD_LIMIT + 1024)
    r = infer_file(world, big)
    assert r.status_code == 413 and "--max-upload-bytes" in r.json()["detail"]

    def chunks():  # no Content-Length: counted as it arrives
        yield (b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.zip"\r\n'
               b"Content-Type: application/octet-stream\r\n\r\n")
        for _ in range(4):
            yield bytes(UPLOAD_LIMIT // 2)

    r = call(world, "POST", "/infer_file", data=chunks(),
             headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 413 and "--max-upload-bytes" in r.json()["detail"]
    assert leftover_jobs(world) == []


def test_infer_file_validates_the_request(world):
    archive = study_zip(world)
    r = infer_file(world, archive, request=False)
    assert r.status_code == 400 and "'request'" in r.json()["detail"]
    r = infer_file(world, archive, request="{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["detail"]
    r = infer_file(world, archive, request={"nnunet_id": "nope", "series_folders": ["ct.nii.gz"]})
    assert r.status_code == 400 and "tiny_organs" in r.json()["detail"] and "job_id" not in r.json()
    r = infer_file(world, archive, request={"nnunet_id": "tiny", "series_folders": ["../../../outside"]})
    assert r.status_code == 403
    r = call(world, "POST", "/infer_file", json={"nnunet_id": "tiny"})
    assert r.status_code == 400 and "'file'" in r.json()["detail"]
    assert leftover_jobs(world) == []


def test_infer_file_runs_a_job_and_download_serves_it(world, tmp_path):
    import SimpleITK as sitk

    r = infer_file(world, study_zip(world))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "done" and len(body["job_id"]) == 32
    assert body["nifti_prediction"] == ["output/stage_0/prediction.nii.gz"]  # as named in the zip: no server path
    assert world.jobs not in r.text
    z = call(world, "GET", "/download/%s" % body["job_id"])
    assert z.status_code == 200 and z.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(z.content)) as zf:
        assert zf.namelist() == ["output/stage_0/prediction.nii.gz"]
        zf.extractall(str(tmp_path))
    from_job = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "output" / "stage_0" / "prediction.nii.gz")))
    r = infer(world, output_dir=os.path.join(world.allowed, "for_job"))
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(from_job, sitk.GetArrayFromImage(sitk.ReadImage(r.json()["nifti_prediction"][0])))
    assert sorted(os.listdir(os.path.join(world.jobs, body["job_id"]))) == ["job.json", "outputs.zip"]  # no inputs
    for job_id in ("0" * 32, "../../etc/passwd", "x" * 300):
        r = call(world, "GET", "/download/%s" % job_id)
        assert r.status_code == 404


def metaimage(data_file, tmp_path):
    """A MetaImage header (.mhd) of the test image whose ElementDataFile is ``data_file``, and its raw data."""
    import SimpleITK as sitk

    volume = sitk.GetImageFromArray(make_image()[0])
    volume.SetSpacing(SPACING[::-1])
    sitk.WriteImage(volume, str(tmp_path / "ct.mhd"))
    header = (tmp_path / "ct.mhd").read_text().replace("ElementDataFile = ct.raw", "ElementDataFile = " + data_file)
    return header.encode(), (tmp_path / "ct.raw").read_bytes()


def test_infer_file_reads_a_metaimage_that_holds_its_data(world, tmp_path):
    """MetaImage with its data attached (.mha, ElementDataFile = LOCAL) is read; a detached header (.mhd and its
    .raw) is refused even with its data beside it in the archive (test_hostile_files.py: headers that name files
    elsewhere)."""
    import SimpleITK as sitk

    volume = sitk.GetImageFromArray(make_image()[0])
    volume.SetSpacing(SPACING[::-1])
    sitk.WriteImage(volume, str(tmp_path / "ct.mha"))
    r = infer_file(world, zip_bytes([("ct.mha", (tmp_path / "ct.mha").read_bytes())]),
                   request={"nnunet_id": "tiny_organs", "series_folders": ["ct.mha"]})
    assert r.status_code == 200, r.text
    assert r.json()["is_empty"] == [False]
    header, raw = metaimage("ct.raw", tmp_path)
    r = infer_file(world, zip_bytes([("ct.mhd", header), ("ct.raw", raw)]),
                   request={"nnunet_id": "tiny_organs", "series_folders": ["ct.mhd"]})
    assert r.status_code == 400, r.text
    assert "ElementDataFile must be LOCAL" in r.json()["detail"]
    assert leftover_jobs(world) == []


# ---------------------------------------------------------------------------------------------------------- sessions

def in_process(world, image, spacing, **fields):
    from nninteractive_slicer_server.auto import load_registry
    from nninteractive_slicer_server.auto.predictors import AutoSegmenter

    torch.set_num_threads(int(TORCH_THREADS))
    return AutoSegmenter(load_registry(world.spec), device="cpu").predict("tiny_organs", image, spacing, **fields)


def local_session(model_dir):
    from nnInteractive.inference.inference_session import nnInteractiveInferenceSession

    s = nnInteractiveInferenceSession(device=torch.device("cpu"), use_torch_compile=False, verbose=False,
                                      torch_n_threads=int(TORCH_THREADS), do_autozoom=False)
    s.initialize_from_trained_model_folder(model_dir)
    return s


def paste(shape, bbox, region):
    full = np.zeros(shape, region.dtype)
    full[tuple(slice(lo, hi) for lo, hi in bbox)] = region
    return full


def test_auto_segment_equals_in_process_then_a_prompt_refines_one_label(world, speckle_model):
    image = make_image()
    expected = in_process(world, image, SPACING)
    assert not expected.empty
    with RemoteSession(world.url, api_key=KEY) as remote:
        models = remote.list_models()
        assert [m["id"] for m in models] == ["tiny_organs"]
        remote.set_image(image, image_properties={"spacing": list(SPACING)})
        bbox, region, labels, timings = remote.auto_segment("tiny")  # an alias works
        full = paste(SHAPE, bbox, region)
        np.testing.assert_array_equal(full, expected.labels)
        present = sorted(int(v) for v in np.unique(expected.labels) if v)
        assert [lab["value"] for lab in labels] == present
        assert [lab["voxels"] for lab in labels] == [int((expected.labels == v).sum()) for v in present]
        template = {t["labelID"]: t for t in tiny_nnunet.dcmqi_template()["segmentAttributes"][0]}
        for lab in labels:
            assert lab["name"] == template[lab["value"]]["SegmentLabel"]
            assert lab["color"] == template[lab["value"]]["recommendedDisplayRGBValue"]
            assert lab["terminology"]["type"]["CodingSchemeDesignator"] == "SCT"
        assert {"queue", "predict", "preprocess", "postprocess", "total", "exchange"} <= set(timings)

        # One label back as the initial segmentation, then a prompt: the same as in process.
        value = labels[-1]["value"]
        initial = (full == value).astype(np.uint8)
        point = tuple(int(c) for c in np.argwhere(initial)[len(np.argwhere(initial)) // 2])
        remote_buf = np.zeros(SHAPE, np.uint8)
        remote.set_target_buffer(remote_buf)
        remote.add_initial_seg_interaction(initial, run_prediction=False)
        np.testing.assert_array_equal(remote_buf, initial)
        remote.add_point_interaction(point, include_interaction=True)
    local = local_session(speckle_model)
    local_buf = np.zeros(SHAPE, np.uint8)
    local.set_image(image)
    local.set_target_buffer(local_buf)
    local.add_initial_seg_interaction(initial, run_prediction=False)
    local.add_point_interaction(point, include_interaction=True)
    np.testing.assert_array_equal(remote_buf, local_buf)
    assert not np.array_equal(remote_buf, initial)  # the prompt changed the label


def test_auto_segment_spacing_class_subset_and_empty_results(world):
    image = make_image()
    with RemoteSession(world.url, api_key=KEY) as remote:
        with pytest.raises(BadRequestError, match="no image yet"):
            remote.auto_segment("tiny_organs", spacing=SPACING)
        remote.set_image(image)  # no image_properties: the request must give the spacing
        with pytest.raises(BadRequestError, match="spacing"):
            remote.auto_segment("tiny_organs")
        with pytest.raises(BadRequestError, match="3 positive numbers"):
            remote.auto_segment("tiny_organs", spacing=[1.0, 0.0, 1.0])
        bbox, region, labels, _ = remote.auto_segment("tiny_organs", spacing=SPACING, class_idx=[2])
        expected = in_process(world, image, SPACING, class_idx=[2])
        np.testing.assert_array_equal(paste(SHAPE, bbox, region), expected.labels)
        assert [lab["value"] for lab in labels] == [2]
        bbox, region, labels, _ = remote.auto_segment("tiny_organs", spacing=SPACING, class_idx=1,
                                                      proba_threshold=1.0)  # nothing is above 1: nothing found
        assert bbox is None and region is None and labels == []
        with pytest.raises(BadRequestError, match="tiny_organs"):
            remote.auto_segment("no_such_model", spacing=SPACING)
        with pytest.raises(BadRequestError, match="unknown field"):
            remote.auto_segment("tiny_organs", spacing=SPACING, save_nifti_inputs=True)
        with pytest.raises(BadRequestError, match="class_idx"):
            remote.auto_segment("tiny_organs", spacing=SPACING, class_idx="liver")
    r = call(world, "POST", "/x/auto_segment", json={"model": "tiny_organs"})  # no lease
    assert r.status_code == 410


def test_expire_empties_the_predictor_cache(world):
    with RemoteSession(world.url, api_key=KEY) as remote:
        remote.set_image(make_image(), image_properties={"spacing": list(SPACING)})
        remote.auto_segment("tiny_organs")
    assert call(world, "GET", "/readyz").json()["predictor_cache"]["size"] >= 1
    r = call(world, "POST", "/expire")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["expired"] >= 1
    assert call(world, "GET", "/readyz").json()["predictor_cache"]["size"] == 0
    r = call(world, "GET", "/expire")  # the established server's method
    assert r.status_code == 200 and r.json()["expired"] == 0


# ---------------------------------------------------------------------------------------------------------- other servers

def test_without_infer_root_infer_on_paths_is_off(world, quiet_model, tmp_path):
    port = free_port()
    url = "http://127.0.0.1:%d" % port
    cmd = [sys.executable, "-m", "nninteractive_slicer_server", "--model-dir", quiet_model, "--device", "cpu",
           "--port", str(port), "--torch-n-threads", TORCH_THREADS, "--model-serve-spec", world.spec]
    with running(cmd, url, str(tmp_path / "no-roots.log")):
        r = requests.post(url + "/infer", json={"nnunet_id": "tiny_organs", "study_path": world.allowed,
                                                "series_folders": ["study1/ct.nii.gz"], "output_dir": world.allowed},
                          timeout=60)
        assert r.status_code == 403
        assert "off" in r.json()["detail"] and "--infer-root" in r.json()["detail"]
        assert requests.get(url + "/readyz", timeout=60).json()["infer_on_paths"] is False


def test_the_client_against_an_official_server(quiet_model, tmp_path):
    with official_server(quiet_model, tmp_path) as (url, _):
        with RemoteSession(url) as remote:
            assert remote.list_models() is None
            remote.set_image(make_image())
            with pytest.raises(BadRequestError, match="cannot run automatic models.*official"):
                remote.auto_segment("tiny_organs", spacing=SPACING)


# ---------------------------------------------------------------------------------------------------------- jobs (in process)

def test_jobs_are_zipped_owned_and_expire(tmp_path):
    from nninteractive_slicer_server.auto.jobs import JobStore
    from nninteractive_slicer_server.errors import Busy, NotFound, Unavailable
    from nninteractive_slicer_server.limits import Limits

    now = [1000.0]
    limits = Limits.defaults(memory_budget=1 << 30)
    limits.job_ttl_s, limits.max_jobs, limits.max_jobs_per_user = 60.0, 3, 2
    store = JobStore(str(tmp_path / "jobs"), limits, clock=lambda: now[0])
    job = store.create("alice", "upload", {})
    os.makedirs(os.path.join(job.output, "stage_0"))
    with open(os.path.join(job.output, "stage_0", "prediction.nii.gz"), "wb") as f:
        f.write(b"labels")
    os.symlink("/etc/passwd", os.path.join(job.output, "stage_0", "link"))  # never followed into the zip
    with pytest.raises(NotFound, match="queued"):
        store.download(job.id, "alice")  # not finished yet
    store.zip_outputs(job)
    job.status, job.finished = "done", now[0]
    assert sorted(os.listdir(job.folder)) == ["job.json", "outputs.zip"]
    assert job.bytes == sum(os.path.getsize(os.path.join(job.folder, f)) for f in os.listdir(job.folder))
    with zipfile.ZipFile(store.download(job.id, "alice").zip_path) as zf:
        assert zf.namelist() == ["output/stage_0/prediction.nii.gz"]
        assert zf.read("output/stage_0/prediction.nii.gz") == b"labels"
    with pytest.raises(NotFound):
        store.find(job.id, "bob")  # another user's job names nothing to them
    other = store.create("alice", "paths", {})
    with pytest.raises(Busy, match="--max-jobs-per-user"):
        store.create("alice", "paths", {})
    store.create("bob", "paths", {})
    with pytest.raises(Unavailable, match="--max-jobs"):
        store.create("carol", "paths", {})
    store.discard(other)
    now[0] += 61
    assert store.expire() == 1 and not os.path.exists(job.folder)
    with pytest.raises(NotFound, match="expired"):
        store.find(job.id, "alice")
    store.close()
    assert os.path.isdir(str(tmp_path / "jobs"))  # an operator's --jobs-dir stays; only a temporary one is removed
    temp = JobStore(None, limits)
    temp.close()
    assert not os.path.exists(temp.root)
