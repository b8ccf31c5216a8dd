"""Parity with the established nnU-Net model server (josegcpa/nnunet_serve) where it is cheap (issue 15, point 6):
``from:`` references between the models of a request (auto/references.py), ``class_idx`` lists and ``crop_from``
as it reads them, SNOMED CT codes for inline segment names (auto/terminology.py), the spec found at
./model-serve-spec.yaml with ``$OVERRIDE_MODEL_FOLDER``, ``GET /model_info_clean``, ``--nproc_writing``, and
``/infer_orthanc`` against a real Orthanc (Debian's ``orthanc``; skipped only where it is absent and CI is unset).

The pipeline tests run the real nnU-Net in-process on tiny random-weight models (Testing/models/tiny_nnunet.py);
their oracle for a reference is the same model run on the referenced output written to a file by hand. The HTTP
tests share one real server process, started from a folder holding model-serve-spec.yaml (no flag, no variable).
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import requests
import yaml

import tiny_nnunet
from conftest import SERVER_ENV, TORCH_THREADS, free_port, running
from nninteractive_slicer_server.auto import references, terminology
from nninteractive_slicer_server.auto.pipeline import keep_intersecting, run_study
from nninteractive_slicer_server.auto.predictors import AutoSegmenter
from nninteractive_slicer_server.auto.registry import Registry, UnknownModel, load_registry, spec_source
from nninteractive_slicer_server.validate import BadInput
from test_auto_io import phantom, write_ct_series  # the oblique CT series those tests write

sitk = pytest.importorskip("SimpleITK")
hd = pytest.importorskip("highdicom")

KEY = "parity-key"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _models(folder):
    tiny_nnunet.make_tiny_nnunet(folder)  # tiny_organs: CT -> liver (1), spleen (2)
    tiny_nnunet.make_tiny_nnunet(folder, labels=("lesion",), channels=("CT", "organ"),
                                 dataset_name="Dataset995_TinyWithOrgan", seed=7)
    return [
        {"id": "tiny_with_organ", "rel_path": "Dataset995_TinyWithOrgan", "aliases": ["with_organ"],
         # the established way for a model to take another model's output as an extra channel
         "default_args": {"series_folders": ["ct.nii.gz", "from:tiny_organs=1"]},
         "metadata": {"algorithm_name": "WithOrgan", "segment_names": ["lesion"]}},
        {"id": "tiny_inline", "rel_path": "Dataset998_TinyOrgans",
         "metadata": {"algorithm_name": "Inline", "segment_names": ["Liver", "kidney_left"]}}]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    folder = str(root / "models")
    extra = _models(folder)
    spec = tiny_nnunet.write_spec(str(root / "model-serve-spec.yaml"), folder)
    with open(spec) as f:
        data = yaml.safe_load(f)
    data["models"] += extra
    with open(spec, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    study = root / "study"
    write_ct_series(str(study / "ct"))
    image = sitk.GetImageFromArray(phantom().astype(np.float32))
    image.SetSpacing((1.3, 0.9, 2.5))
    sitk.WriteImage(image, str(study / "ct.nii.gz"))
    registry = load_registry(spec)
    return {"root": root, "study": str(study), "spec": spec, "folder": folder, "registry": registry,
            "seg": AutoSegmenter(registry, device="cpu"), "image": image}


def run(env, out, **fields):
    req = {"study_path": env["study"], "output_dir": str(env["root"] / out)}
    req.update(fields)
    return run_study(env["registry"], env["seg"], req)


def labels_of(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def write_like(env, name, array):
    img = sitk.GetImageFromArray(array)
    img.CopyInformation(env["image"])
    path = os.path.join(env["study"], name)
    sitk.WriteImage(img, path)
    return name


# ---------------------------------------------------------------------------------------------------------- from:

def test_reference_inserts_the_model_it_names_and_reads_its_label(env):
    r = run(env, "ref_eq", nnunet_id="tiny_with_organ", series_folders=["ct.nii.gz", "from:tiny=1"])
    # the referenced model ran first, as its own stage, with its own defaults; the request says so
    assert r["request"]["nnunet_id"] == ["tiny_organs", "tiny_with_organ"]
    assert r["request"]["series_folders"] == [["ct.nii.gz"], ["ct.nii.gz", "from:tiny=1"]]
    assert [s["nnunet_id"] for s in r["stages"]] == ["tiny_organs", "tiny_with_organ"]
    organs = labels_of(r["nifti_prediction"][0])
    alone = labels_of(run(env, "ref_eq_alone", nnunet_id="tiny", series_folders=["ct.nii.gz"])["nifti_prediction"][0])
    np.testing.assert_array_equal(organs, alone)
    # oracle: the second model on the CT and label 1 of the first written by hand, then the cascade's default
    # (intersect, min_intersection 0.1) against the first stage's mask, as established
    mask = write_like(env, "organ1.nii.gz", (organs == 1).astype(np.uint8))
    by_hand = labels_of(run(env, "ref_eq_hand", nnunet_id="tiny_with_organ",
                            series_folders=["ct.nii.gz", mask])["nifti_prediction"][0])
    expected, _ = keep_intersecting(by_hand, organs > 0, 0.1)
    lesion = labels_of(r["nifti_prediction"][1])
    np.testing.assert_array_equal(lesion, expected)
    assert lesion.any()

    # the model's default_args.series_folders adds the reference when the request gives only the CT
    injected = run(env, "ref_inj", nnunet_id="with_organ", series_folders=["ct.nii.gz"])
    assert injected["request"]["series_folders"][1] == ["ct.nii.gz", "from:tiny_organs=1"]
    np.testing.assert_array_equal(labels_of(injected["nifti_prediction"][1]), lesion)
    # a model already in the request is read, not run again
    explicit = run(env, "ref_exp", nnunet_id=["tiny", "tiny_with_organ"],
                   series_folders=[["ct.nii.gz"], ["ct.nii.gz", "from:Tiny organ segmentation (random weights)=1"]])
    assert explicit["request"]["nnunet_id"] == ["tiny_organs", "tiny_with_organ"]
    np.testing.assert_array_equal(labels_of(explicit["nifti_prediction"][1]), lesion)


def test_reference_to_a_probability_channel_and_to_the_label_map(env):
    r = run(env, "ref_idx", nnunet_id="tiny_with_organ", series_folders=["ct.nii.gz", "from:tiny[1]"])
    assert "nifti_proba" not in r  # computed for the reference, not written
    # oracle: channel 1 of the probability map the same model writes (spleen, masked by its label)
    saved = run(env, "ref_idx_map", nnunet_id="tiny", series_folders=["ct.nii.gz"], proba_threshold=0.0,
                save_proba_map=True)
    probs = labels_of(saved["nifti_proba"][0])  # [k, j, i, channel]
    organs = labels_of(saved["nifti_prediction"][0])
    spleen = write_like(env, "spleen_p.nii.gz", np.ascontiguousarray(probs[..., 1]))
    by_hand = labels_of(run(env, "ref_idx_hand", nnunet_id="tiny_with_organ",
                            series_folders=["ct.nii.gz", spleen])["nifti_prediction"][0])
    np.testing.assert_array_equal(labels_of(r["nifti_prediction"][1]), keep_intersecting(by_hand, organs > 0, 0.1)[0])

    plain = run(env, "ref_plain", nnunet_id="tiny_with_organ", series_folders=["ct.nii.gz", "from:tiny"])
    as_float = write_like(env, "organs_f.nii.gz", organs.astype(np.float32))
    by_hand = labels_of(run(env, "ref_plain_hand", nnunet_id="tiny_with_organ",
                            series_folders=["ct.nii.gz", as_float])["nifti_prediction"][0])
    np.testing.assert_array_equal(labels_of(plain["nifti_prediction"][1]),
                                  keep_intersecting(by_hand, organs > 0, 0.1)[0])


@pytest.mark.parametrize("series,error,match", [
    (["ct.nii.gz", "from:nope=1"], UnknownModel, r"unknown model 'nope'"),
    (["ct.nii.gz", "from:tiny=7"], BadInput, r"model 'tiny_organs' has no label 7 \(its labels: \[1, 2\]\)"),
    (["ct.nii.gz", "from:tiny[x]"], BadInput, r"write from:<model>, from:<model>=<label> or from:<model>\[<channel>\]"),
    (["ct.nii.gz", "from:tiny[5]"], BadInput, r"the probability map of stage 0 has 2 channel\(s\)"),
    (["from:tiny=1", "from:tiny=2"], BadInput, r"runs model 'tiny_organs' first, on the first 1 series of stage 0"),
    (["ct.nii.gz", "from:tiny=1", "from:tiny"], BadInput,
     r"model 'tiny_with_organ' takes 2 series \(CT, organ\); stage 1 of the request gives 3 \(ct.nii.gz, from:tiny=1"),
])
def test_bad_references(env, series, error, match):
    with pytest.raises(error, match=match):
        run(env, "bad_ref", nnunet_id="tiny_with_organ", series_folders=series)


def test_parse_and_expand():
    ref = references.parse("from:zones[2]")
    assert (ref.model, ref.equal, ref.index, str(ref)) == ("zones", None, 2, "from:zones[2]")
    assert references.parse("from:zones=1").equal == 1 and references.parse("from:zones").equal is None
    for bad in ("from:", "from:=1", "from:a=b", "from:a[1", "from:a=1[2]"):
        with pytest.raises(BadInput):
            references.parse(bad)
    exp = references.Expansion([], [], inserted=[0, 2], probabilities=set())
    assert exp.per_stage(["a", "b"]) == [None, "a", None, "b"]


# ---------------------------------------------------------------------------------------------------------- class_idx

def test_class_idx_lists_are_per_model_and_nested_lists_are_subsets(env):
    both = run(env, "ci_nested", nnunet_id="tiny", series_folders=["ct.nii.gz"], class_idx=[[1, 2]])
    assert set(np.unique(labels_of(both["nifti_prediction"][0]))) == {0, 1, 2}
    per_model = run(env, "ci_per", nnunet_id=["tiny", "tiny"], series_folders=["ct.nii.gz"], class_idx=[2, 1])
    assert [set(np.unique(labels_of(p))) - {0} for p in per_model["nifti_prediction"]] == [{2}, {1}]
    # one model, two labels unnested: the established server keeps label 1 and drops 2 silently; refused here
    with pytest.raises(BadInput, match=r"class_idx \[1, 2\] gives one label per model.*nest them: \[\[1, 2\]\]"):
        run(env, "ci_flat", nnunet_id="tiny", series_folders=["ct.nii.gz"], class_idx=[1, 2])


def test_crop_from_selects_label_one(env):
    arr = np.zeros(phantom().shape, dtype=np.uint8)
    arr[4:8, 10:20, 12:24] = 1
    arr[12:18, 2:8, 30:40] = 2  # another label elsewhere: not part of the crop, as established
    mask = write_like(env, "two_labels.nii.gz", arr)
    r = run(env, "crop1", nnunet_id="tiny", series_folders=["ct.nii.gz"], crop_from=os.path.join(env["study"], mask),
            crop_padding=0)
    assert r["stages"][0]["crop_ijk"] == [[12, 24], [10, 20], [4, 8]]
    other = write_like(env, "only_255.nii.gz", (arr > 0).astype(np.uint8) * 255)
    with pytest.raises(BadInput, match=r"crop_from only_255.nii.gz has no voxel of label 1.*its labels: \[255\]"):
        run(env, "crop255", nnunet_id="tiny", series_folders=["ct.nii.gz"], crop_from=os.path.join(env["study"], other))


# ---------------------------------------------------------------------------------------------------------- SNOMED CT

def test_inline_names_get_their_snomed_concepts(env):
    liver, kidney = env["registry"].segments("tiny_inline")
    assert liver.terminology["type"] == {"CodeValue": "10200004", "CodingSchemeDesignator": "SCT",
                                         "CodeMeaning": "Liver"}
    assert liver.terminology["category"]["CodeValue"] == "91723000"  # DICOM CID 7192: anatomical structure
    assert kidney.terminology["type"]["CodeValue"] == "64033007"
    assert kidney.terminology["type_modifier"] == {"CodeValue": "7771000", "CodingSchemeDesignator": "SCT",
                                                   "CodeMeaning": "Left"}
    assert terminology.coded_segment("Left lung")[1]["type"]["CodeValue"] == "39607008"
    assert terminology.coded_segment("lung", label="lung")[0] == "lung"
    assert terminology.coded_segment("lung_right")[0] == "lung_right"  # says its side already
    assert terminology.coded_segment("lung", label="Lung (right)")[1]["type_modifier"]["CodeValue"] == "24028007"
    assert terminology.coded_segment("spinal cord")[1]["type"]["CodeValue"] == "2748008"  # ours: words joined
    assert terminology.coded_segment("lesion")[1]["category"]["CodeValue"] == "49755003"
    assert terminology.coded_segment("cleft")[1] is None  # "left" is no word of it, and it names no concept
    # an explicit code wins; its category comes from DICOM's groups unless given
    assert terminology.coded_segment("Tumour", type_code="108369006")[1]["category"]["CodeValue"] == "49755003"
    # a name that codes nothing: a warning when the registry is loaded (the established server refuses it)
    reg = Registry({"model_folder": env["folder"], "models": [{"id": "m", "rel_path": "TinyOrgans", "metadata": {
        "segment_names": ["liver", "Prostate peripheral zone"]}}]}, base_dir=str(env["root"]))
    assert any("'Prostate peripheral zone' names no SNOMED CT concept" in w for w in reg.warnings)
    assert not any("'liver'" in w for w in reg.warnings)


def test_dicom_seg_carries_the_codes(env):
    r = run(env, "seg_codes", nnunet_id="tiny_inline", series_folders=["ct"], is_dicom=True)
    seg = hd.seg.segread(r["dicom_segmentation"][0])
    liver, kidney = seg.SegmentSequence
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert liver.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    assert kidney.SegmentLabel == "kidney_left"
    assert kidney.SegmentedPropertyTypeCodeSequence[0].CodeValue == "64033007"
    assert kidney.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "7771000"


# ---------------------------------------------------------------------------------------------------------- the spec

def test_spec_source_order(tmp_path, monkeypatch):
    env = {"MODEL_SERVE_SPEC": "env.yaml"}
    assert spec_source("cli.yaml", env, cwd=str(tmp_path)) == ("cli.yaml", "--model-serve-spec")
    assert spec_source(None, env, cwd=str(tmp_path)) == ("env.yaml", "$MODEL_SERVE_SPEC")
    assert spec_source(None, {}, cwd=str(tmp_path)) == (None, None)
    (tmp_path / "model-serve-spec.yaml").write_text("models: []\n")
    path, where = spec_source(None, {"MODEL_SERVE_SPEC": ""}, cwd=str(tmp_path))
    assert path == str(tmp_path / "model-serve-spec.yaml") and where.startswith("./model-serve-spec.yaml")


def test_override_model_folder(env, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(env["folder"], str(moved))
    reg = load_registry(env["spec"], environ={"OVERRIDE_MODEL_FOLDER": str(moved)})
    assert reg.model_folder == str(moved)
    assert reg.result_folder("tiny").startswith(str(moved))
    assert load_registry(env["spec"], environ={}).model_folder == env["folder"]


# ---------------------------------------------------------------------------------------------------------- commands

def test_batch_with_writing_workers(env, tmp_path):
    """--nproc_writing 2: the studies overlap (their forward passes take turns); the answers come in the studies'
    order, the outputs are those of the same requests run one by one, and a failing study fails alone."""
    items = [{"study_path": env["study"], "series_folders": [["ct.nii.gz"]], "output_dir": str(tmp_path / "a")},
             {"study_path": env["study"], "series_folders": [["missing"]], "output_dir": str(tmp_path / "b")},
             {"study_path": env["study"], "series_folders": [["ct.nii.gz", "from:tiny=2"]],
              "output_dir": str(tmp_path / "c")}]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(items))
    code = "import sys; from nninteractive_slicer_server.auto.predict_cli import batch_main; sys.exit(batch_main())"
    environ = dict(SERVER_ENV, OMP_NUM_THREADS="2")
    environ.pop("MODEL_SERVE_SPEC", None)
    p = subprocess.run([sys.executable, "-c", code, "--data_json", str(data), "--nnunet_id", "with_organ",
                        "--nproc_writing", "2", "--device", "cpu", "--model-serve-spec", env["spec"]],
                       env=environ, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr  # the second study fails
    responses = json.loads(p.stdout)  # stdout holds the JSON only, whatever the threads printed
    assert [r["status"] for r in responses] == ["done", "failed", "done"]
    assert "series folder 'missing' does not exist" in responses[1]["error"]
    for item, response in zip(items, responses):
        if response["status"] != "done":
            continue
        alone = run_study(env["registry"], env["seg"], dict(item, nnunet_id="with_organ",
                                                             output_dir=str(tmp_path / "alone")))
        np.testing.assert_array_equal(labels_of(os.path.join(item["output_dir"], "prediction.nii.gz")),
                                      labels_of(alone["nifti_prediction"][-1]))
    assert responses[0]["request"]["series_folders"][1] == ["ct.nii.gz", "from:tiny_organs=1"]  # injected

    p = subprocess.run([sys.executable, "-c", code, "--data_json", str(data), "--nnunet_id", "tiny",
                        "--nproc_writing", "0", "--model-serve-spec", env["spec"]], env=environ,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--nproc_writing must be 1 or more" in p.stderr


# ---------------------------------------------------------------------------------------------------------- a server

def orthanc_binary():
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
                                            if os.access(p, os.X_OK)), None)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A real Orthanc (Debian's package) on loopback, as a plain process with its own folder and a user; None where
    it is not installed and CI is unset."""
    binary = orthanc_binary()
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("Orthanc is not installed, and CI=true: .ci/run installs it (apt-get install -y orthanc)")
        yield None
        return
    root = tmp_path_factory.mktemp("orthanc")
    port = free_port()
    config = {"Name": "tests", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
              "HttpPort": port, "DicomPort": free_port(), "DicomServerEnabled": False, "RemoteAccessAllowed": False,
              "AuthenticationEnabled": True, "RegisteredUsers": {"tests": "secret"}, "Plugins": []}
    (root / "orthanc.json").write_text(json.dumps(config))
    url = "http://127.0.0.1:%d" % port
    ready = lambda: requests.get(url + "/system", auth=("tests", "secret"), timeout=1).status_code == 200  # noqa
    with running([binary, str(root / "orthanc.json")], url, str(root / "orthanc.log"), timeout=30, ready=ready,
                 what="Orthanc"):
        yield url


@pytest.fixture(scope="module")
def srv(env, orthanc, quiet_model, tmp_path_factory):
    """Our server started in a folder holding model-serve-spec.yaml (no --model-serve-spec, no MODEL_SERVE_SPEC),
    whose model_folder is wrong: $OVERRIDE_MODEL_FOLDER says where the models are."""
    home = tmp_path_factory.mktemp("parity-home")
    with open(env["spec"]) as f:
        data = yaml.safe_load(f)
    data["model_folder"] = "/nonexistent/models"
    (home / "model-serve-spec.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    shutil.copytree(os.path.join(os.path.dirname(env["spec"]), "metadata"), str(home / "metadata"))
    environ = dict(SERVER_ENV, NN_INTERACTIVE_API_KEY=KEY, OVERRIDE_MODEL_FOLDER=env["folder"])
    environ.pop("MODEL_SERVE_SPEC", None)
    if orthanc:
        environ.update(ORTHANC_URL=orthanc, ORTHANC_USER="tests", ORTHANC_PASSWORD="secret")
    port = free_port()
    url = "http://127.0.0.1:%d" % port
    log = str(home / "server.log")
    cmd = [sys.executable, "-m", "nninteractive_slicer_server", "--model-dir", quiet_model, "--device", "cpu",
           "--port", str(port), "--torch-n-threads", TORCH_THREADS, "--infer-root", str(env["root"])]
    with running(cmd, url, log, env=environ, cwd=str(home)):
        yield type("Srv", (), dict(url=url, home=str(home), log=log, orthanc=orthanc))


def call(srv, method, path, key=KEY, **kw):
    headers = {"Authorization": "Bearer " + key} if key else {}
    return requests.request(method, srv.url + path, headers=headers, timeout=300, **kw)


def test_server_takes_the_spec_of_its_folder_and_the_model_folder_override(srv, env):
    text = open(srv.log).read()
    assert "model registry: %s (from ./model-serve-spec.yaml in the working directory" % os.path.join(
        srv.home, "model-serve-spec.yaml") in text
    assert "model_folder %s from $OVERRIDE_MODEL_FOLDER" % env["folder"] in text
    info = call(srv, "GET", "/model_info").json()
    assert list(info) == ["tiny_organs", "tiny_with_organ", "tiny_inline"]
    assert all(m["available"] for m in info.values())


def test_model_info_clean(srv):
    assert call(srv, "GET", "/model_info_clean", key=None).status_code == 401
    info = call(srv, "GET", "/model_info_clean").json()
    organs, inline = info["tiny_organs"], info["tiny_inline"]
    assert organs["metadata"] == [{"Label ID": "liver", "Name": "liver", "Index": 1},
                                  {"Label ID": "spleen", "Name": "spleen", "Index": 2}]
    assert organs["description"] == "Segments the following regions:\nliver, spleen\nNumber of input channels:\n1"
    assert organs["description_long"] == (
        "Segments the following regions:\n\t- Label ID: liver, Name: liver, Index: 1\n"
        "\t- Label ID: spleen, Name: spleen, Index: 2\nUses the following channels:\n\t- 0: CT")
    assert inline["metadata"][1] == {"Label ID": "spleen", "Name": "kidney_left", "Index": 2}
    assert info["tiny_with_organ"]["description"].endswith("Number of input channels:\n2")
    assert organs["n_classes"] == 3 and organs["default_args"]["use_folds"] == [0]
    assert "/nonexistent" not in json.dumps(info) and srv.home not in json.dumps(info)


def test_infer_with_a_reference_over_http(srv, env):
    body = {"nnunet_id": "with_organ", "study_path": env["study"], "series_folders": ["ct.nii.gz"],
            "output_dir": str(env["root"] / "http_ref")}
    r = call(srv, "POST", "/infer", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["request"]["nnunet_id"] == ["tiny_organs", "tiny_with_organ"]
    oracle = run(env, "http_ref_oracle", nnunet_id="with_organ", series_folders=["ct.nii.gz"])
    for got, want in zip(answer["nifti_prediction"], oracle["nifti_prediction"]):
        np.testing.assert_array_equal(labels_of(got), labels_of(want))
    bad = call(srv, "POST", "/infer", json=dict(body, series_folders=["ct.nii.gz", "from:tiny=9"]))
    assert bad.status_code == 400 and bad.json()["status"] == "failed"
    assert "model 'tiny_organs' has no label 9" in bad.json()["error"]


def _store_series(orthanc, folder):
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            r = requests.post(orthanc + "/instances", data=f.read(), auth=("tests", "secret"),
                              headers={"Content-Type": "application/dicom"})
        assert r.status_code == 200, r.text
    return r.json()["ParentSeries"], r.json()["ParentStudy"]


def test_infer_orthanc(srv, env):
    if srv.orthanc is None:
        pytest.skip("Orthanc is not installed (Debian/Ubuntu: apt-get install -y orthanc; .ci/run installs it)")
    orthanc, auth = srv.orthanc, ("tests", "secret")
    series, study = _store_series(orthanc, os.path.join(env["study"], "ct"))
    assert call(srv, "POST", "/infer_orthanc", key=None, json={}).status_code == 401

    r = call(srv, "POST", "/infer_orthanc", json={"nnunet_id": "tiny_inline", "series_ids": [series]})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["status"] == "done" and answer["request"]["series_ids"] == [series]
    assert answer["orthanc_upload"]["uploaded_instance_count"] == 1
    seg_series = answer["orthanc_upload"]["responses"][0]
    assert answer["dicom_segmentation"] == ["output/stage_0/prediction.dcm"]  # no server path
    # the SEG is in Orthanc, in the source study, and is what /infer makes of the same series
    stored = requests.get(orthanc + "/series/%s" % seg_series, auth=auth).json()
    assert stored["ParentStudy"] == study and stored["MainDicomTags"]["Modality"] == "SEG"
    instance = stored["Instances"][0]
    path = os.path.join(str(env["root"]), "from_orthanc.dcm")
    with open(path, "wb") as f:
        f.write(requests.get(orthanc + "/instances/%s/file" % instance, auth=auth).content)
    got = hd.seg.segread(path)
    want = hd.seg.segread(run(env, "orthanc_oracle", nnunet_id="tiny_inline", series_folders=["ct"],
                              is_dicom=True)["dicom_segmentation"][0])
    np.testing.assert_array_equal(got.pixel_array, want.pixel_array)
    assert [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in got.SegmentSequence] == ["10200004", "64033007"]

    # a cascade through a from: reference: each stage's SEG goes back
    r = call(srv, "POST", "/infer_orthanc", json={"nnunet_id": "with_organ", "series_ids": [[series]]})
    assert r.status_code == 200, r.text
    assert r.json()["request"]["nnunet_id"] == ["tiny_organs", "tiny_with_organ"]
    assert r.json()["orthanc_upload"]["uploaded_instance_count"] == 2

    for body, match in (({"series_ids": ["../../patients"]}, "is not an Orthanc series identifier"),
                        ({"series_ids": ["0" * 8 + "-00000000" * 4]}, "has no series 00000000-"),
                        ({"series_ids": [series], "is_dicom": False}, "series of Orthanc are DICOM")):
        bad = call(srv, "POST", "/infer_orthanc", json=dict(body, nnunet_id="tiny_inline"))
        assert bad.status_code == 400 and match in bad.json()["error"], bad.text
    assert len(requests.get(orthanc + "/series", auth=auth).json()) == 4  # the CT and three SEGs, nothing else


def test_orthanc_settings():
    from nninteractive_slicer_server.auto.orthanc import Orthanc

    assert Orthanc.from_settings(None, {}) is None
    o = Orthanc.from_settings(None, {"ORTHANC_URL": "http://pacs:8042/", "ORTHANC_USER": "u", "ORTHANC_PASSWORD": "p"})
    assert (o.url, o.auth) == ("http://pacs:8042", ("u", "p"))
    assert Orthanc.from_settings("https://other", {"ORTHANC_URL": "http://pacs:8042"}).url == "https://other"
    with pytest.raises(ValueError, match="must start with http"):
        Orthanc.from_settings("pacs:8042", {})
